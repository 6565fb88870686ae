/*
 * What a training run and a training benchmark both need: the data, the
 * router plugin, the backend chosen by run.device and the model, built from
 * one config.
 */
#ifndef MOE_SESSION_H
#define MOE_SESSION_H

#include <stddef.h>

#include "backend/backend.h"
#include "model/model.h"
#include "runtime/config.h"
#include "runtime/data.h"
#include "runtime/optim.h"
#include "runtime/plugin_loader.h"

typedef struct moe_session {
    moe_dataset ds;
    moe_router_lib lib;
    moe_backend *be;
    moe_model model;
    moe_optimizer opt;
    int B;          /* training batch (one micro-batch when train.grad_accum > 1) */
    int eval_B;     /* evaluation batch */
} moe_session;

/* 0 ok; -1 + err (everything opened so far is closed again). */
int moe_session_open(moe_session *s, const moe_config *cfg, char *err, size_t errcap);
/* The same, with the backend wrapped by wrap (which takes ownership of it,
 * or returns NULL and leaves it alone) before the model is built on it:
 * `moehost bench train --breakdown` wraps it in the timing decorator. */
int moe_session_open_wrapped(moe_session *s, const moe_config *cfg, moe_backend *(*wrap)(moe_backend *inner),
                             char *err, size_t errcap);
void moe_session_close(moe_session *s);

/* Linear warm-up to lr over warmup_steps, then cosine decay to
 * lr * min_lr_ratio at the last step. step is 1-based. */
double moe_learning_rate(const moe_train_cfg *t, long long step);

/* One optimizer step (1-based `step`): train.grad_accum micro-batches (x, y:
 * scratch of B*seq_len ids) each forward and backward, their gradients
 * averaged, global-norm clipping, then AdamW or Muon. The step waits for
 * the device once, at its end, to read the losses, the gradient norm and
 * the router checks (moe_model_collect); Muon's Newton-Schulz scaling
 * waits once per matrix. Returns the training loss and the gradient norm
 * before clipping. 0 ok; -1 + err (a router's invalid output, a non-finite
 * loss or gradient norm). */
int moe_session_train_step(moe_session *s, const moe_config *cfg, long long step, int32_t *x, int32_t *y,
                           double *loss, double *grad_norm, char *err, size_t errcap);

/* 0 when the backend has met no error (a failed CUDA or cuBLAS call, an
 * index a kernel found out of range); else -1 with the backend's message.
 * The ops themselves return nothing, so the step and the evaluation ask. */
int moe_session_check_device(moe_session *s, char *err, size_t errcap);

/* run.device: "cpu", "cuda", or "auto" (CUDA when built with it and a GPU
 * is visible). NULL + err when the request cannot be met. */
moe_backend *moe_backend_for_config(const moe_config *cfg, char *err, size_t errcap);

#endif
