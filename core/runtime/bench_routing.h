/*
 * Routing microbenchmarks, outside any model:
 *
 *   capacity          the seed's experiment B: over a grid of E, K and capacity
 *                     factors, route T random tokens with a router plugin, apply
 *                     capacity, and time dispatch + combine of [T, d] activations.
 *   topk              the router plugin's forward alone.
 *   dispatch-combine  one (E, K, CF) point of the capacity grid.
 *
 * Each point prints one JSON line (E, K, capacity_factor, T, d, drop_rate,
 * ms, tokens_per_s, bw_GiBps_strict, copy_GiBps, fraction_of_copy).
 * bw_GiBps_strict = T * (2 + 2K) * d * bytes / time: dispatch reads and
 * writes each token row once per kept assignment plus the input, combine
 * reads each expert row and writes the output. bytes is the activation size
 * (4: activations are fp32 in this build). copy_GiBps is a device-to-device
 * copy measured the same way (bytes read + written), the ceiling.
 */
#ifndef MOE_BENCH_ROUTING_H
#define MOE_BENCH_ROUTING_H

#include <stddef.h>

#define MOE_BENCH_MAX_GRID 16

typedef struct moe_bench_routing_options {
    const char *what;              /* "capacity" | "topk" | "dispatch-combine" */
    const char *device;            /* "auto" | "cpu" | "cuda" */
    const char *router;            /* plugin name or path, default softk */
    long long tokens;              /* T */
    int d;                         /* hidden size */
    int n_experts, experts[MOE_BENCH_MAX_GRID];
    int n_k, ks[MOE_BENCH_MAX_GRID];
    int n_cf;
    double cfs[MOE_BENCH_MAX_GRID];
    int warmup, iters;
    unsigned long long seed;
    const char *out;               /* also append the JSON lines to this file (NULL: stdout only) */
} moe_bench_routing_options;

/* Fill the defaults of the seed's experiment B: T = 16384, d = 4096,
 * E in {64, 128, 256}, K in {1, 2, 4}, CF in {0.9, 1.0, 1.05, 1.1, 1.25, 1.5}. */
void moe_bench_routing_defaults(moe_bench_routing_options *o);

int moe_bench_routing(const moe_bench_routing_options *o, char *err, size_t errcap);

#endif
