/*
 * Checkpoints: everything needed to continue a run bit for bit: parameters,
 * AdamW moments, router buffers and the run's progress counters. Data
 * batches, dropout and router noise are pure functions of (seed, step), so
 * no generator state needs saving.
 *
 * File layout (little-endian): magic "MOECKPT\0", u32 version, u32 reserved,
 * u64 step, u64 layout hash, u64 n_params, u64 n_buffers, the progress block
 * (u64 tokens_seen, f64 train_seconds, f64 best_val_loss, u64 best_step),
 * then f32 params, m, v (n_params each) and buffers (n_buffers).
 */
#ifndef MOE_CHECKPOINT_H
#define MOE_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

typedef struct moe_progress {
    uint64_t step;            /* last completed step */
    uint64_t tokens_seen;     /* training tokens so far */
    double train_seconds;     /* wall time of training steps so far */
    double best_val_loss;
    uint64_t best_step;
} moe_progress;

/* Write atomically. 0 ok, -1 + err. */
int moe_checkpoint_save(const char *path, const moe_model *m, const moe_progress *p, char *err, size_t errcap);
/* Load into an already built model of the same layout. 0 ok, -1 + err. */
int moe_checkpoint_load(const char *path, moe_model *m, moe_progress *p, char *err, size_t errcap);

#endif
