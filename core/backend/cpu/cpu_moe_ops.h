/*
 * CPU implementations of the MoE routing core ops of moe_backend
 * (capacity_assign, combine_weights(_bwd), dispatch(_bwd), combine(_bwd),
 * aux_losses(_counts), the router-output checks and expert counts) and the
 * elementwise product used by the Hadamard gate.
 * Their contracts are the comments in core/backend/backend.h.
 */
#ifndef MOE_CPU_MOE_OPS_H
#define MOE_CPU_MOE_OPS_H

#include "backend/backend.h"

void cpu_capacity_assign(moe_backend *be, const int32_t *expert, const float *weight, int T, int K,
                         int E, int C, int policy, int32_t *kept, int32_t *slot,
                         int32_t *counts_before, int32_t *counts_after);
void cpu_combine_weights(moe_backend *be, const float *weight, const int32_t *kept, int T, int K,
                         int renorm, float *cw);
void cpu_combine_weights_bwd(moe_backend *be, const float *weight, const int32_t *kept, int T, int K,
                             int renorm, const float *dcw, float *dweight);
void cpu_dispatch(moe_backend *be, const float *x, const int32_t *kept, const int32_t *slot, int T,
                  int K, int C, int E, int d, const int32_t *fill_counts, float *Xe);
void cpu_dispatch_bwd(moe_backend *be, const float *dXe, const int32_t *kept, const int32_t *slot,
                      int T, int K, int C, int d, int accumulate, float *dx);
void cpu_combine(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                 const float *cw, int T, int K, int C, int d, const float *residual, float *y);
void cpu_combine_bwd(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                     const float *cw, const float *dy, int T, int K, int C, int E, int d,
                     const int32_t *fill_counts, float *dYe, float *dcw);
void cpu_mul(moe_backend *be, const float *a, const float *b, float *out, size_t n);
void cpu_aux_losses(moe_backend *be, const float *lb_logits, const float *logits, const float *f, int T,
                    int E, float alpha, float beta, float *d_lb, float *dlogits, double *lb, double *z);
void cpu_aux_losses_counts(moe_backend *be, const float *lb_logits, const float *logits, const int32_t *counts,
                           int T, int E, float alpha, float beta, float *d_lb, float *dlogits, double *out);
void cpu_check_routing(moe_backend *be, const moe_guard_zone *guard, const moe_finite_zone *finite,
                       const int32_t *expert, const float *weight,
                       const int32_t *slot, int T, int K, int E, int C, int dense_slots, int32_t *kept,
                       int32_t *counts_before, int32_t *counts_after, int32_t *record);
void cpu_check_bytes(moe_backend *be, const void *p, size_t n, uint8_t value, int32_t code, int32_t *record);
void cpu_round_weights(moe_backend *be, const float *params, const moe_weight_view *views, int n);
void cpu_keep_activations(moe_backend *be, const moe_activation_view *views, int n);

#endif
