/*
 * Benchmarks. `moehost bench train` times training steps only: warm-up
 * steps first, then each timed step between two backend events (CUDA events
 * on the GPU), and reports the median.
 */
#ifndef MOE_BENCH_H
#define MOE_BENCH_H

#include <stddef.h>

#include "runtime/config.h"

typedef struct moe_bench_train_options {
    int warmup;      /* untimed steps first */
    int steps;       /* timed steps */
    int json;        /* print one JSON object instead of the table */
} moe_bench_train_options;

int moe_bench_train(const moe_config *cfg, const moe_bench_train_options *opt, char *err, size_t errcap);

#endif
