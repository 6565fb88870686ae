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
#include "runtime/plugin_loader.h"

typedef struct moe_session {
    moe_dataset ds;
    moe_router_lib lib;
    moe_backend *be;
    moe_model model;
    int B;          /* training batch */
    int eval_B;     /* evaluation batch */
} moe_session;

/* 0 ok; -1 + err (everything opened so far is closed again). */
int moe_session_open(moe_session *s, const moe_config *cfg, char *err, size_t errcap);
void moe_session_close(moe_session *s);

/* run.device: "cpu", "cuda", or "auto" (CUDA when built with it and a GPU
 * is visible). NULL + err when the request cannot be met. */
moe_backend *moe_backend_for_config(const moe_config *cfg, char *err, size_t errcap);

#endif
