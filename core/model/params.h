/*
 * Parameters, gradients and optimizer state live in flat buffers: one
 * allocation each, so the optimizer is one pass, a gradient all-reduce is one
 * call and a checkpoint is one write. Layers *declare* their tensors (name,
 * shape, init, weight decay) and receive pointers into the flat buffers once
 * every tensor is known.
 */
#ifndef MOE_PARAMS_H
#define MOE_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "moe/abi.h"

typedef struct moe_param_entry {
    char name[80];
    int ndim;
    int64_t shape[MOE_MAX_TENSOR_DIMS];
    size_t numel;
    size_t offset;           /* in elements, into the flat buffers */
    moe_init_kind init;
    float init_value;
    int decay;               /* AdamW weight decay applies */
    float **value;           /* where to store the pointer to the values */
    float **grad;            /* where to store the pointer to the gradient (may be NULL) */
} moe_param_entry;

typedef struct moe_param_set {
    moe_param_entry *entries;
    int n, cap;
    size_t total;            /* elements */
    int with_grads;          /* 1 for trainable parameters, 0 for state buffers */
    float *values;           /* flat, in backend memory */
    float *grads;
    float *adam_m, *adam_v;
    uint8_t *decay_mask;     /* per element, 1 = decay */
} moe_param_set;

void moe_params_init_set(moe_param_set *ps, int with_grads);
/* Declare one tensor. `value`/`grad` receive pointers at allocation. */
void moe_params_declare(moe_param_set *ps, const char *name, int ndim, const int64_t *shape,
                        moe_init_kind init, float init_value, int decay, float **value, float **grad);
/* Allocate the flat buffers, hand out the pointers, draw the initial values
 * from Philox keyed by (seed, tensor index). Returns 0, or -1 on no memory. */
int moe_params_allocate(moe_param_set *ps, moe_backend *be, uint64_t seed);
void moe_params_free(moe_param_set *ps, moe_backend *be);
/* A stable fingerprint of the layout (names, shapes, order), stored in
 * checkpoints so a run never resumes into a different model. */
uint64_t moe_params_layout_hash(const moe_param_set *ps);

#endif
