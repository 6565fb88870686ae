/*
 * A config file with a [bench] table describes a routing microbenchmark (the
 * seed's experiment B) instead of a training run, so it too runs as
 * `moehost --config configs/expB.toml`:
 *
 *   [bench]
 *   kind = "capacity"              # capacity | topk | dispatch-combine
 *   name = "expB"                  # results in <out_dir>/<name>/capacity.jsonl
 *   out_dir = "runs"
 *   device = "auto"                # auto | cpu | cuda
 *   router = "softk"
 *   tokens = 16384
 *   hidden = 4096
 *   experts = [64, 128, 256]
 *   k = [1, 2, 4]
 *   capacity_factors = [0.9, 1.0, 1.05, 1.1, 1.25, 1.5]
 *   iters = 50
 *   warmup = 5
 *
 * `--set bench.KEY=VALUE` overrides a key.
 */
#ifndef MOE_BENCH_CONFIG_H
#define MOE_BENCH_CONFIG_H

#include <stddef.h>

#include "runtime/bench_routing.h"

typedef struct moe_bench_config {
    moe_bench_routing_options opt;
    char kind[32], device[16], router[256], name[128], out_dir[256];
    char result_dir[512];        /* <out_dir>/<name> */
    char result_file[600];       /* <result_dir>/capacity.jsonl (or topk.jsonl, ...) */
} moe_bench_config;

/* 1 when `path` has a [bench] table (bc filled), 0 when it has none or does
 * not parse (the run loader reports that), -1 + err (file:line and the key)
 * on a bad table or override. */
int moe_bench_config_load(const char *path, const char *const *sets, int n_sets, moe_bench_config *bc, char *err,
                          size_t errcap);

/* Run it: the JSON lines go to result_file (written whole, then renamed into
 * place; an existing result is never overwritten). 0 ok, -1 + err. */
int moe_bench_config_run(moe_bench_config *bc, char *err, size_t errcap);

#endif
