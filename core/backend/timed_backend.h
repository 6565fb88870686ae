/*
 * A timing decorator: wraps any backend and times each compute op between
 * two of the inner backend's events (CUDA events on the GPU, host clock
 * readings on the CPU), accumulating milliseconds and calls per op name.
 *
 * What is measured for one call: the time between its two events on the
 * stream, i.e. the op's kernels plus any idle gap inside the op (a kernel
 * waiting for the host to launch it counts; the gaps between two ops do not).
 * Memory ops (alloc, free, copies, zero, sync) and the timing ops are
 * forwarded untimed, and so is work launched on the stream outside the table
 * (a router plugin's kernels): step time minus the sum of op times is that
 * plus host overhead and idle gaps between ops.
 *
 * Events are resolved lazily: each timed call takes a pair from a pool and
 * records it, and nothing waits until moe_timed_backend_collect reads the
 * pairs (call it where the stream has been waited for anyway, e.g. after a
 * training step). Timing is off until moe_timed_backend_enable; while off,
 * every op is forwarded as is.
 */
#ifndef MOE_TIMED_BACKEND_H
#define MOE_TIMED_BACKEND_H

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* At least the number of op names the decorator times. */
#define MOE_TIMED_MAX_OPS 64

typedef struct moe_timed_op_stat {
    const char *op;   /* the op's name in the table ("gemm", "attention_fwd", ...) */
    long long calls;
    double ms;        /* summed over the calls */
} moe_timed_op_stat;

/* Wraps inner, which the decorator then owns (its destroy destroys inner).
 * NULL when out of memory (inner is left alone then). */
moe_backend *moe_timed_backend_wrap(moe_backend *inner);
/* 1 when be was made by moe_timed_backend_wrap. */
int moe_timed_backend_is(const moe_backend *be);
/* Start (1) or stop (0) timing calls. */
void moe_timed_backend_enable(moe_backend *be, int on);
/* Reads every recorded pair (waiting for the last) into the totals and
 * frees the pool for reuse. 0 ok; -1 when the pool could not grow earlier
 * (some calls then went untimed). */
int moe_timed_backend_collect(moe_backend *be);
/* Zeroes the totals (pending pairs are dropped). */
void moe_timed_backend_reset(moe_backend *be);
/* The totals of ops called at least once, at most cap of them, in the
 * table's order; returns how many were written. */
int moe_timed_backend_stats(moe_backend *be, moe_timed_op_stat *out, int cap);

#ifdef __cplusplus
}
#endif

#endif
