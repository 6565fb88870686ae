/*
 * Benchmarks. `moehost bench train` times training steps only: warm-up
 * steps first, then each timed step between two backend events (CUDA events
 * on the GPU), and reports the median. With --breakdown, `steps` more steps
 * run with every backend op timed (the median above comes from steps with
 * timing off), and a table of ms per op and step follows.
 */
#ifndef MOE_BENCH_H
#define MOE_BENCH_H

#include <stddef.h>

#include "runtime/config.h"

typedef struct moe_bench_train_options {
    int warmup;      /* untimed steps first */
    int steps;       /* timed steps */
    int json;        /* print one JSON object instead of the table */
    int breakdown;   /* then as many steps again through the timing decorator
                        (backend/timed_backend.h): time per op */
} moe_bench_train_options;

int moe_bench_train(const moe_config *cfg, const moe_bench_train_options *opt, char *err, size_t errcap);

#endif
