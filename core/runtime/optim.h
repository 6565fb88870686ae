/*
 * Optimizers over the model's flat parameter buffer.
 *
 *   adamw  AdamW on every tensor (decoupled weight decay on matrices).
 *   muon   Muon (Jordan et al. 2024) on the hidden weight matrices: SGD
 *          momentum (Nesterov) whose update is orthogonalised by five
 *          Newton-Schulz iterations; AdamW on everything else (embeddings,
 *          LM head, norms, biases, router plugin parameters). A 3-D expert
 *          tensor [E, rows, cols] is E matrices.
 */
#ifndef MOE_OPTIM_H
#define MOE_OPTIM_H

#include <stddef.h>

#include "model/model.h"
#include "runtime/config.h"

typedef struct moe_optimizer {
    int muon;                 /* 0 adamw, 1 muon */
    unsigned char *use_muon;  /* per param entry */
    float *x, *a, *b, *y;     /* Newton-Schulz scratch for the largest matrix */
    float *u;                 /* the Nesterov update of one tensor */
} moe_optimizer;

/* Which entries Muon handles: matrices inside the network. */
int moe_optimizer_is_muon_tensor(const moe_param_entry *e);

int moe_optimizer_init(moe_optimizer *o, const moe_train_cfg *tc, moe_model *m, char *err, size_t errcap);
/* One update with the schedule's learning rate `lr` (AdamW's; Muon's is
 * scaled by muon_lr / train.lr) at 1-based step t, after global-norm
 * clipping at train.grad_clip; the norm goes to m->grad_norm. */
void moe_optimizer_step(moe_optimizer *o, const moe_train_cfg *tc, moe_model *m, double lr, long long t);
void moe_optimizer_free(moe_optimizer *o, moe_backend *be);

/* The Newton-Schulz orthogonalisation used by Muon, exposed for tests:
 * X[rows,cols] (rows <= cols) is replaced by an approximation of U V^T of
 * its SVD. Scratch: a, b [rows,rows], y [rows,cols]. */
void moe_newton_schulz5(moe_backend *be, float *X, int rows, int cols, int steps, float *a, float *b, float *y);

#endif
