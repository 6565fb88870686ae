/*
 * CPU implementations of the dense ops of moe_backend (everything except the
 * MoE routing core, which is in cpu_moe_ops.h). Their contracts are the
 * comments in core/backend/backend.h; cpu_backend.c puts them in the table.
 *
 *   cpu_linalg.c     gemm, batched gemm, bias, axpy, scale, sumsq
 *   cpu_norm.c       layernorm, rmsnorm
 *   cpu_attention.c  rope, causal attention
 *   cpu_ops.c        embeddings, activations, dropout, cross-entropy, AdamW
 *
 * Determinism: every loop is schedule(static) and every output element is
 * written by exactly one thread; sums over rows (bias_grad, norm weight
 * grads, embedding grads) are split by columns so each column is summed in
 * row order by one thread. Results therefore do not depend on scheduling.
 */
#ifndef MOE_CPU_OPS_H
#define MOE_CPU_OPS_H

#include "backend/backend.h"

/* ---- cpu_linalg.c ---- */
void cpu_gemm(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha, const float *A,
              int lda, const float *B, int ldb, float beta, float *C, int ldc);
void cpu_gemm_strided_batched(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                              const float *A, int lda, long long strideA, const float *B, int ldb,
                              long long strideB, float beta, float *C, int ldc, long long strideC,
                              int batch);
void cpu_add_bias(moe_backend *be, float *y, const float *b, int T, int N);
void cpu_bias_grad(moe_backend *be, const float *dy, float *db, int T, int N);
void cpu_gemm_bias(moe_backend *be, int ta, int tb, int M, int N, int K, const float *A, int lda,
                   long long strideA, const float *B, int ldb, long long strideB, const float *bias,
                   long long stride_bias, const float *residual, float *C, int ldc, long long strideC,
                   int batch);
void cpu_add_bias_batched(moe_backend *be, float *y, const float *b, int batch, int T, int N,
                          long long stride_y, long long stride_b);
void cpu_bias_grad_batched(moe_backend *be, const float *dy, float *db, int batch, int T, int N,
                           long long stride_dy, long long stride_db);
void cpu_axpy(moe_backend *be, float a, const float *x, float *y, size_t n);
void cpu_scale(moe_backend *be, float *x, float a, size_t n);
double cpu_sumsq(moe_backend *be, const float *x, size_t n);
void cpu_clip_grad_norm(moe_backend *be, float *g, size_t n, double clip, double *norm_out);

/* ---- cpu_norm.c ---- */
void cpu_layernorm_fwd(moe_backend *be, const float *x, const float *g, const float *b, float *y,
                       float *mean, float *rstd, int T, int d, float eps);
void cpu_layernorm_bwd(moe_backend *be, const float *x, const float *g, const float *mean,
                       const float *rstd, const float *dy, float *dx, float *dg, float *db, int T,
                       int d);
void cpu_rmsnorm_fwd(moe_backend *be, const float *x, const float *g, float *y, float *rstd, int T,
                     int d, float eps);
void cpu_rmsnorm_bwd(moe_backend *be, const float *x, const float *g, const float *rstd,
                     const float *dy, float *dx, float *dg, int T, int d);

/* ---- cpu_attention.c ---- */
void cpu_rope_fwd(moe_backend *be, float *qkv, int B, int S, int H, int hd, float theta);
void cpu_rope_bwd(moe_backend *be, float *dqkv, int B, int S, int H, int hd, float theta);
void cpu_attention_fwd(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S,
                       int H, int hd);
void cpu_attention_bwd(moe_backend *be, const float *qkv, const float *probs, const float *dout,
                       float *dqkv, int B, int S, int H, int hd);

/* ---- cpu_ops.c ---- */
void cpu_embed_fwd(moe_backend *be, const int32_t *ids, const float *wte, const float *wpe,
                   float *out, int B, int S, int d);
void cpu_embed_bwd(moe_backend *be, const int32_t *ids, const float *dout, float *dwte, float *dwpe,
                   int B, int S, int d, int V);
void cpu_act_fwd(moe_backend *be, moe_act_kind kind, const float *in, float *out, int T, int n);
void cpu_act_bwd(moe_backend *be, moe_act_kind kind, const float *in, const float *dout, float *din,
                 int T, int n);
void cpu_dropout_fwd(moe_backend *be, const float *x, float *y, size_t n, float p, moe_rng_key key);
void cpu_dropout_bwd(moe_backend *be, const float *dy, float *dx, size_t n, float p,
                     moe_rng_key key);
void cpu_xent_fwd_bwd(moe_backend *be, const float *logits, const int32_t *targets, int T, int V,
                      float *losses, int32_t *correct, float *dlogits, float grad_scale);
void cpu_xent_sums(moe_backend *be, const float *losses, const int32_t *correct, int T, double *out);
void cpu_adamw(moe_backend *be, float *p, const float *g, float *m, float *v, const uint8_t *decay,
               size_t n, float lr, float b1, float b2, float eps, float wd, long long t, const double *grad_norm,
               double clip);

/* Width of the column blocks that reductions over rows hand to threads:
 * 16 floats = one 64-byte cache line, so two threads never write the same
 * line of the output. */
#define CPU_COL_BLOCK 16

/* timing (cpu_timing.c) */
void *cpu_event_create(moe_backend *be);
void cpu_event_destroy(moe_backend *be, void *ev);
void cpu_event_record(moe_backend *be, void *ev);
float cpu_event_elapsed_ms(moe_backend *be, void *start, void *end);
double cpu_measure_gemm_tflops(moe_backend *be);

#endif
