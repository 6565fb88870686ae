/*
 * The training run: data, model, router plugin, optimizer, periodic
 * evaluation, metrics, checkpoints and the final summary.
 *
 * Results go to <run.out_dir>/<run.name>/:
 *   config.toml     the resolved configuration
 *   metrics.jsonl   one JSON object per evaluation
 *   checkpoint.bin  written atomically at each evaluation
 *   summary.json    final and best values, written at the end
 */
#ifndef MOE_TRAIN_H
#define MOE_TRAIN_H

#include <stddef.h>

#include "runtime/config.h"

typedef struct moe_train_options {
    int resume;          /* continue from checkpoint.bin */
    int quiet;           /* no progress output */
    long long stop_after; /* > 0: end after the checkpoint at the first evaluation at or
                            past this step, as an interruption would (no summary.json) */
} moe_train_options;

/* Run training as configured. 0 on success; -1 with a message in err. */
int moe_train_run(const moe_config *cfg, const moe_train_options *opt, char *err, size_t errcap);

#endif
