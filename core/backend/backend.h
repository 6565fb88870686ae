/*
 * The backend op set: every numerical operation the model and the MoE layer
 * need, once for the CPU (core/backend/cpu, fp32, OpenBLAS + OpenMP) and once
 * for CUDA. The model calls only these, so it is written once.
 *
 * Conventions for every op:
 *   - Pointers are in the backend's memory (host memory for the CPU).
 *   - Row-major. "T" is a number of token rows.
 *   - Outputs are overwritten unless the comment says "accumulate" (+=).
 *   - Results are deterministic for a given thread count (no reduction whose
 *     order depends on scheduling), so a resumed run repeats an
 *     uninterrupted one bit for bit.
 */
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "moe/abi.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moe_act_kind { MOE_ACT_GELU = 0, MOE_ACT_SILU = 1, MOE_ACT_SWIGLU = 2 } moe_act_kind;

typedef struct moe_backend moe_backend;

/* A weight the GEMMs read as an operand, for round_weights: `batch`
 * matrices of rows x cols, packed, starting `offset` floats into the
 * parameter buffer. */
typedef struct moe_weight_view {
    int64_t offset;
    int32_t batch, rows, cols, pad_;
} moe_weight_view;

/* A guard zone for check_routing: n bytes at p (backend memory, n < 2^31)
 * that must all still equal value, recorded with code when one does not. */
typedef struct moe_guard_zone {
    const void *p;
    size_t n;
    uint8_t value;
    int32_t code;
} moe_guard_zone;

/* Floats for check_routing that must all be finite: n floats at v (backend
 * memory, n < 2^31). The first non-finite v[i] is recorded as {code, i, 0,
 * the float's bits, n} (for the gate's logits and a perturbing router's
 * route_logits after them, n tells where the second array starts). */
typedef struct moe_finite_zone {
    const float *v;
    size_t n;
    int32_t code;
} moe_finite_zone;

/* A saved activation for keep_activations: rows x cols floats, packed. */
typedef struct moe_activation_view {
    const float *data;
    int64_t rows, cols;
} moe_activation_view;

struct moe_backend {
    const char *name;       /* "cpu" or "cuda" */
    moe_device_kind device;
    void *impl;             /* backend-private state (handles, stream) */
    void *stream;           /* cudaStream_t the ops run on (NULL on the CPU); plugins get it too */
    int device_ordinal;
    /* Releases the backend (moe_backend_destroy calls it). */
    void (*destroy)(moe_backend *be);

    /* ---- timing (benchmarks) ---- */
    /* Markers on the backend's stream (CUDA events; host clock readings on
     * the CPU). event_elapsed_ms waits for `end` and returns end - start. */
    void *(*event_create)(moe_backend *be);
    void (*event_destroy)(moe_backend *be, void *ev);
    void (*event_record)(moe_backend *be, void *ev);
    float (*event_elapsed_ms)(moe_backend *be, void *start, void *end);
    /* Dense GEMM rate measured on this device in TFLOP/s: bf16 operands with
     * fp32 accumulation on CUDA, fp32 on the CPU. The MFU denominator. */
    double (*measure_gemm_tflops)(moe_backend *be);

    /* ---- memory ---- */
    void *(*alloc)(moe_backend *be, size_t bytes);   /* zeroed; NULL on failure */
    void (*free)(moe_backend *be, void *p);
    /* Waits for the ops before it, then copies: dst_host is ready on return. */
    void (*to_host)(moe_backend *be, void *dst_host, const void *src, size_t bytes);
    /* Ordered after the ops before it, like an op; src_host may be reused or
     * freed as soon as it returns. It need not wait: CUDA stages copies of
     * up to 1 MiB through pinned memory and returns at once (larger ones
     * wait). */
    void (*from_host)(moe_backend *be, void *dst, const void *src_host, size_t bytes);
    void (*copy)(moe_backend *be, void *dst, const void *src, size_t bytes);
    void (*zero)(moe_backend *be, void *p, size_t bytes);
    void (*sync)(moe_backend *be);

    /* ---- dense linear algebra ---- */
    /* C[M,N] = alpha * op(A) op(B) + beta * C; op(X) = X or X^T (ta/tb != 0). */
    void (*gemm)(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
    /* The same for `batch` independent products at fixed strides (experts). */
    void (*gemm_strided_batched)(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                                 const float *A, int lda, long long strideA, const float *B, int ldb,
                                 long long strideB, float beta, float *C, int ldc, long long strideC,
                                 int batch);
    /* C = op(A) op(B) + bias + residual (overwrite) for `batch` products at
     * fixed strides: bias[e*stride_bias + n] is added to every row of
     * product e (stride_bias 0: one bias for all; bias NULL: no bias), and
     * residual, laid out as C (ldc, strideC), element by element (NULL: none;
     * it must not overlap C). The result is gemm_strided_batched with alpha 1
     * and beta 0, then the bias add of add_bias_batched, then the residual
     * add; one op, so that CUDA adds the bias in the GEMM's epilogue and the
     * residual as the GEMM's C input (beta 1) instead of in more passes over
     * C. CUDA's order of the two adds is cuBLASLt's, so equal within
     * rounding. */
    void (*gemm_bias)(moe_backend *be, int ta, int tb, int M, int N, int K, const float *A, int lda,
                      long long strideA, const float *B, int ldb, long long strideB, const float *bias,
                      long long stride_bias, const float *residual, float *C, int ldc, long long strideC,
                      int batch);
    /* y[T,N] += b[N] on every row. */
    void (*add_bias)(moe_backend *be, float *y, const float *b, int T, int N);
    /* db[N] += sum over rows of dy[T,N]. */
    void (*bias_grad)(moe_backend *be, const float *dy, float *db, int T, int N);
    /* The same for `batch` entries at fixed strides (experts), in one call:
     *   y[e*stride_y + t*N + n] += b[e*stride_b + n]
     *   db[e*stride_db + n]     += sum_t dy[e*stride_dy + t*N + n]
     * for e < batch, t < T, n < N. Same determinism as bias_grad (fixed
     * summation order, no float atomics); on the CPU the results are bitwise
     * those of a loop of add_bias / bias_grad over the entries. */
    void (*add_bias_batched)(moe_backend *be, float *y, const float *b, int batch, int T, int N,
                             long long stride_y, long long stride_b);
    void (*bias_grad_batched)(moe_backend *be, const float *dy, float *db, int batch, int T, int N,
                              long long stride_dy, long long stride_db);

    /* ---- the experts' MLP, one call for all experts ----
     * For each expert e < batch, on its C rows (X + e*C*d, Y + e*C*d):
     *   H = X w1[e] + b1[e]   [C, hin]   (hin = 2n for SwiGLU, else n)
     *   A = act(H)            [C, n]
     *   Y = A w2[e] + b2[e]   [C, d]     (overwrite)
     * with w1[e] = w1 + e*d*hin ([d, hin]), w2[e] = w2 + e*n*d ([n, d]), b1
     * and b2 at strides hin and d, or NULL for no bias. H [batch*C*hin] and
     * A [batch*C*n] keep what ffn_bwd needs; what they hold is the
     * backend's own (CUDA keeps A in bf16 when its GEMMs take bf16
     * operands, so the backward reads it without another rounding pass):
     * read only Y. The CPU's ffn_fwd is exactly gemm_bias, act_fwd,
     * gemm_bias (core/backend/composed_ops.c), the math in plain ops. */
    void (*ffn_fwd)(moe_backend *be, moe_act_kind kind, const float *X, const float *w1, const float *b1,
                    const float *w2, const float *b2, float *H, float *A, float *Y, int batch, int C, int d,
                    int n);
    /* Its backward from dY: dX (overwrite); dw1 and dw2 accumulate (+=)
     * when accumulate_dw is non-zero, else are overwritten (so that a
     * caller need not zero the largest gradients of an MoE model before
     * their first backward); db1, db2 (when not NULL) accumulate. dA
     * [batch*C*n] and dH [batch*C*hin] are work space (left holding the
     * backend's own values). X, w1, w2, H and A as ffn_fwd had and left
     * them. */
    void (*ffn_bwd)(moe_backend *be, moe_act_kind kind, const float *X, const float *w1, const float *w2,
                    const float *H, const float *A, const float *dY, float *dA, float *dH, float *dX,
                    float *dw1, float *db1, float *dw2, float *db2, int batch, int C, int d, int n,
                    int accumulate_dw);

    /* The backward of a linear layer Y[T,N] = X[T,K] W[K,N] + b[N]: dX
     * (overwrite) = dY W^T, dW += X^T dY, db += colsum dY (db may be NULL).
     * One op, so that CUDA rounds dY to bf16 once for both products and sums
     * db in that pass. */
    void (*linear_bwd)(moe_backend *be, const float *X, const float *W, const float *dY, float *dX, float *dW,
                       float *db, int T, int K, int N);

    /* ---- elementwise ---- */
    /* y[i] += a * x[i] */
    void (*axpy)(moe_backend *be, float a, const float *x, float *y, size_t n);
    /* x[i] *= a */
    void (*scale)(moe_backend *be, float *x, float a, size_t n);
    /* out[i] = a[i] * b[i] (the Hadamard gate) */
    void (*mul)(moe_backend *be, const float *a, const float *b, float *out, size_t n);
    /* sum of squares in double (gradient clipping) */
    double (*sumsq)(moe_backend *be, const float *x, size_t n);

    /* ---- embeddings ---- */
    /* out[b,s,:] = wte[ids[b,s],:] (+ wpe[s,:] when wpe != NULL); ids are [B*S]. */
    void (*embed_fwd)(moe_backend *be, const int32_t *ids, const float *wte, const float *wpe,
                      float *out, int B, int S, int d);
    /* accumulate: dwte[ids] += dout; dwpe[s] += dout (when dwpe != NULL).
     * Every id is in [0, V), the rows of dwte (CUDA sorts the ids on only
     * the bits V needs). */
    void (*embed_bwd)(moe_backend *be, const int32_t *ids, const float *dout, float *dwte,
                      float *dwpe, int B, int S, int d, int V);

    /* ---- normalization (per row of d) ---- */
    /* y = (x - mean) * rstd * g + b; saves mean[T], rstd[T]. */
    void (*layernorm_fwd)(moe_backend *be, const float *x, const float *g, const float *b, float *y,
                          float *mean, float *rstd, int T, int d, float eps);
    /* dx accumulate; dg, db accumulate. */
    void (*layernorm_bwd)(moe_backend *be, const float *x, const float *g, const float *mean,
                          const float *rstd, const float *dy, float *dx, float *dg, float *db,
                          int T, int d);
    /* y = x * rstd * g, rstd = 1/sqrt(mean(x^2) + eps); saves rstd[T]. */
    void (*rmsnorm_fwd)(moe_backend *be, const float *x, const float *g, float *y, float *rstd,
                        int T, int d, float eps);
    /* dx accumulate; dg accumulate. */
    void (*rmsnorm_bwd)(moe_backend *be, const float *x, const float *g, const float *rstd,
                        const float *dy, float *dx, float *dg, int T, int d);

    /* ---- activations ---- */
    /* GELU (tanh form) and SiLU: out[T,n] = act(in[T,n]).
     * SwiGLU: in is [T,2n] = [gate | up] per row, out[T,n] = silu(gate) * up. */
    void (*act_fwd)(moe_backend *be, moe_act_kind kind, const float *in, float *out, int T, int n);
    /* din (overwrite) from in and dout; din has in's shape. */
    void (*act_bwd)(moe_backend *be, moe_act_kind kind, const float *in, const float *dout,
                    float *din, int T, int n);

    /* ---- attention ---- */
    /* Rotary position embedding applied in place to the q and k parts of
     * qkv[B,S,3*H*hd] (layout per token: q heads, k heads, v heads; each head
     * hd contiguous; pairs (2i, 2i+1) rotated by angle s * theta^(-2i/hd)). */
    void (*rope_fwd)(moe_backend *be, float *qkv, int B, int S, int H, int hd, float theta);
    /* Inverse rotation applied in place to dq and dk in dqkv. */
    void (*rope_bwd)(moe_backend *be, float *dqkv, int B, int S, int H, int hd, float theta);
    /* Causal softmax attention. qkv[B,S,3*H*hd] -> out[B,S,H*hd].
     * probs [B*H*S*S floats] keeps what attention_bwd needs; what it holds
     * is the backend's own (the CPU and fp32 CUDA keep the probabilities,
     * zeros above the diagonal; bf16 CUDA keeps a softmax statistic per
     * query row and recomputes the probabilities in the backward): read
     * only out. */
    void (*attention_fwd)(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S,
                          int H, int hd);
    /* dqkv (overwrite) from dout. qkv and probs as attention_fwd had and
     * left them. */
    void (*attention_bwd)(moe_backend *be, const float *qkv, const float *probs, const float *dout,
                          float *dqkv, int B, int S, int H, int hd);

    /* ---- dropout (Philox, mask regenerated in backward) ---- */
    /* y = x * mask / (1-p), mask[i] = (uniform(key, i) > p). p = 0 copies. */
    void (*dropout_fwd)(moe_backend *be, const float *x, float *y, size_t n, float p, moe_rng_key key);
    /* dx = dy * mask / (1-p) (overwrite). */
    void (*dropout_bwd)(moe_backend *be, const float *dy, float *dx, size_t n, float p, moe_rng_key key);

    /* ---- loss ---- */
    /* Softmax cross-entropy over V classes for T rows. losses[T] = -log p[target];
     * correct[T] = 1 if argmax (ties to lower index) == target. When dlogits is
     * not NULL it receives grad_scale * (softmax - onehot) (overwrite).
     * Rows with target < 0 are ignored: loss 0, correct 0, gradient 0. */
    void (*xent_fwd_bwd)(moe_backend *be, const float *logits, const int32_t *targets, int T, int V,
                         float *losses, int32_t *correct, float *dlogits, float grad_scale);

    /* ---- optimizer ---- */
    /* AdamW over n elements with bias correction at step t (1-based):
     * m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
     * p -= lr * (mhat / (sqrt(vhat) + eps) + wd * decay[i] * p), decay[i] in {0,1}
     * (decay may be NULL: no decay).
     * Global-norm clipping folded in: when grad_norm != NULL (a double in
     * backend memory, as clip_grad_norm with clip 0 writes it) and clip > 0
     * and *grad_norm > clip, every g[i] is read as g[i] * (float)(clip /
     * *grad_norm), the bits clip_grad_norm's scaling would have left in g;
     * g itself is not written. One pass over the gradients fewer. */
    void (*adamw)(moe_backend *be, float *p, const float *g, float *m, float *v,
                  const uint8_t *decay, size_t n, float lr, float b1, float b2, float eps, float wd,
                  long long t, const double *grad_norm, double clip);
    /* ---- MoE routing core: capacity, dispatch, combine (core/model/moe.c) ---- */
    /* Capacity C per expert. Assignments are visited in priority order
     * (policy 0 "position": k-major, then token order; policy 1 "probs":
     * k-major, then weight descending, ties to the lower token) and take the
     * next free slot of their expert while one is left. Outputs:
     * kept[T,K] = expert or -1 when dropped/empty, slot[T,K] (-1 when not kept),
     * counts_before[E] (assignments routed to e), counts_after[E] (kept),
     * both in backend memory like the other outputs, so nothing waits.
     * (For tools written against the earlier contract, CUDA still accepts
     * host arrays for the counts and then waits so they can be read at
     * once.) */
    void (*capacity_assign)(moe_backend *be, const int32_t *expert, const float *weight, int T, int K,
                            int E, int C, int policy, int32_t *kept, int32_t *slot,
                            int32_t *counts_before, int32_t *counts_after);
    /* Combine weights: cw[t,k] = weight[t,k] for kept assignments, 0 else;
     * with renorm, divided by the sum of the token's kept weights (a token
     * with none kept keeps zeros). */
    void (*combine_weights)(moe_backend *be, const float *weight, const int32_t *kept, int T, int K,
                            int renorm, float *cw);
    /* Backward of combine_weights: dweight (overwrite) from dcw. */
    void (*combine_weights_bwd)(moe_backend *be, const float *weight, const int32_t *kept, int T,
                                int K, int renorm, const float *dcw, float *dweight);
    /* Xe[E*C,d]: row e*C+slot = x[t] for each kept (t,k); other rows 0.
     * fill_counts: NULL, or E counts in backend memory with the promise
     * that expert e's kept slots are exactly 0 .. fill_counts[e]-1
     * (capacity_assign's counts_after): the rows to zero are then known
     * without marking the filled ones first (CUDA zeroes them in the same
     * launch). The result is the same either way. */
    void (*dispatch)(moe_backend *be, const float *x, const int32_t *kept, const int32_t *slot, int T,
                     int K, int C, int E, int d, const int32_t *fill_counts, float *Xe);
    /* dx[t] += sum over kept k of dXe[kept*C+slot] when accumulate != 0;
     * else dx[t] = that sum (0 for a token with none kept): the same bits as
     * zeroing dx first, without the pass. */
    void (*dispatch_bwd)(moe_backend *be, const float *dXe, const int32_t *kept, const int32_t *slot,
                         int T, int K, int C, int d, int accumulate, float *dx);
    /* y[t] = sum over kept k of cw[t,k] * Ye[kept*C+slot] (overwrite), the
     * products added in k order from 0, and then, when residual [T,d] is
     * not NULL, + residual[t] (the residual connection around the MoE
     * branch, added last: the sum is bitwise that of combine followed by
     * axpy(1, residual, y)). residual must not overlap y. */
    void (*combine)(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                    const float *cw, int T, int K, int C, int d, const float *residual, float *y);
    /* dYe (overwrite, E*C rows): row of (t,k) = cw[t,k] * dy[t], others 0;
     * dcw[t,k] = <dy[t], Ye[row]> for kept, 0 else. fill_counts as for
     * dispatch. */
    void (*combine_bwd)(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                        const float *cw, const float *dy, int T, int K, int C, int E, int d,
                        const int32_t *fill_counts, float *dYe, float *dcw);
    /* Auxiliary losses of a routing step (design.md, "One MoE layer"):
     *   lb = E * sum_e f[e] * P[e], P[e] = mean_t softmax(lb_logits[t])[e]
     *   z  = mean_t logsumexp(logits[t])^2
     * f[E] (host memory) is the fraction of assignments routed to each expert.
     * lb_logits are the logits routing used (l, or l' for noisy routers).
     * Writes d_lb[T,E] = alpha * d lb / d lb_logits (overwrite) and adds
     * beta * d z / d logits into dlogits (accumulate); returns lb and z in
     * host doubles (CUDA waits for them). d_lb may be dlogits itself: each
     * row then receives d_lb and has the z-loss term added, dlogits =
     * d_lb + d z (overwrite), what the model asks for when the
     * load-balancing gradient goes straight to the logits. The model uses
     * aux_losses_counts, which keeps everything in backend memory. */
    void (*aux_losses)(moe_backend *be, const float *lb_logits, const float *logits, const float *f,
                       int T, int E, float alpha, float beta, float *d_lb, float *dlogits,
                       double *lb, double *z);
    /* aux_losses without a round trip: f is computed from counts[E]
     * (backend memory, assignments routed to each expert, capacity_assign's
     * counts_before) as f[e] = (float)counts[e] / (float)sum_e counts[e]
     * (0 when the sum is 0), and lb, z go to out[0], out[1] (doubles in
     * backend memory). Same results as aux_losses given that f. */
    void (*aux_losses_counts)(moe_backend *be, const float *lb_logits, const float *logits,
                              const int32_t *counts, int T, int E, float alpha, float beta,
                              float *d_lb, float *dlogits, double *out);

    /* ---- checks and reductions whose results stay in backend memory ----
     * Nothing here waits: the caller reads the results when it needs them
     * (core/model reads every layer's records and scalars in one copy per
     * training step). */

    /* Validates a router plugin's output (design.md, "Plugin ABI").
     * First, when guard is not NULL (a host struct), the guard zone after
     * the plugin's workspace, exactly as check_bytes(guard->p, guard->n,
     * guard->value, guard->code) would (so that a plugin that overran its
     * workspace is named for that, before what it wrote). Then, when
     * finite is not NULL (a host struct), its floats (moe_finite_zone): the
     * router's input logits (and a perturbing router's route_logits after
     * them), checked with its outputs in one pass rather than in a launch
     * of their own. Then
     * assignments a = t*K + k are visited in order, and for each: expert in
     * [-1, E) (MOE_CHECK_EXPERT); for expert >= 0, weight finite and >= 0
     * (MOE_CHECK_WEIGHT); when slot != NULL and expert >= 0, slot in [0, C)
     * (MOE_CHECK_SLOT). The first failure in that order is recorded. When
     * none fails and slot != NULL, the first assignment whose (expert, slot)
     * an earlier assignment already holds is recorded (MOE_CHECK_SLOT_TWICE).
     * When that passes too and dense_slots != 0 (the router declares
     * MOE_ROUTER_DENSE_SLOTS), the lowest expert e whose n_e assignments
     * leave a slot below n_e empty is recorded with the lowest such slot
     * (MOE_CHECK_SLOT_GAP). A record is written only while record[0] == 0,
     * so the first error of a layer stays.
     * When slot != NULL (the router owns capacity), kept[T*K] receives
     * expert where expert is in [0, E) and slot in [0, C), else -1: the
     * kept mask, safe to dispatch whatever the plugin wrote; and
     * counts_before[E] and counts_after[E] (backend memory; either may be
     * NULL) both receive the number of kept assignments of each expert
     * (the router's capacity is final, so capacity_assign's two counts
     * coincide), whatever was recorded: with
     * a recorded error they are what the layer counts, not a promise about
     * the slots. Without slot, kept and the counts are not touched and
     * dense_slots is ignored. */
    void (*check_routing)(moe_backend *be, const moe_guard_zone *guard, const moe_finite_zone *finite,
                          const int32_t *expert,
                          const float *weight, const int32_t *slot, int T, int K, int E, int C,
                          int dense_slots, int32_t *kept, int32_t *counts_before,
                          int32_t *counts_after, int32_t *record);
    /* Records {code, i} for the first i < n (n < 2^31) with p[i] != value,
     * while record[0] == 0 (guard zones). */
    void (*check_bytes)(moe_backend *be, const void *p, size_t n, uint8_t value, int32_t code,
                        int32_t *record);

    /* ---- operand copies of the weights ----
     * Makes the backend's own copies of the listed weights of `params` (a
     * host array of n views) in the precision its GEMMs take, as they are
     * now, and forgets any earlier list. Until the next call, an op that
     * reads one of these weights as a GEMM operand (the exact view: its
     * pointer and shape) reads the copy instead of converting the weight
     * again: so the caller calls it whenever the weights may have changed,
     * before the ops that read them (the model does at the start of every
     * forward), and with n = 0 before their memory is freed. The copies
     * hold exactly what the op would have converted, so results are the
     * same bits either way. CUDA in bf16 mode makes a bf16 copy of each
     * weight and of its transpose in one pass; where GEMMs read fp32 (the
     * CPU, CUDA in fp32 mode) there is nothing to copy. */
    void (*round_weights)(moe_backend *be, const float *params, const moe_weight_view *views, int n);
    /* ---- operand copies of saved activations ----
     * Declares activation buffers (a host array of n views) that, until the
     * next call, are each written at most once, as an op's output, and
     * otherwise only read: the activations a forward saves for its backward
     * (the model declares them at the start of every forward). The backend
     * may keep its own GEMM-operand copy of each, written by the op that
     * produces the buffer or made by the first GEMM that reads it, and read
     * by every later GEMM instead of converting the buffer again. A copy
     * holds exactly what that conversion gives, so results are the same
     * bits either way. A call forgets the earlier list; n = 0 before the
     * buffers are freed. CUDA in bf16 mode keeps bf16 copies (layernorm_fwd,
     * attention_fwd and dispatch write them as they write the buffer); where
     * GEMMs read fp32 (the CPU, CUDA in fp32 mode) there is nothing to keep. */
    void (*keep_activations)(moe_backend *be, const moe_activation_view *views, int n);
    /* out[0] = sum_t losses[t] (double), out[1] = sum_t correct[t] (exact in a
     * double); out in backend memory, summed in an order fixed by T. The CPU
     * adds in token order. */
    void (*xent_sums)(moe_backend *be, const float *losses, const int32_t *correct, int T,
                      double *out);
    /* Global-norm clipping in place: norm = sqrt(sumsq(g, n)) is written to
     * norm_out[0] (a double in backend memory); when clip > 0 and norm >
     * clip, g is scaled by (float)(clip / norm) as scale() would. */
    void (*clip_grad_norm)(moe_backend *be, float *g, size_t n, double clip, double *norm_out);
};

/* A check record: MOE_CHECK_RECORD_WORDS int32 in backend memory, all 0
 * while nothing failed. [0] the code (below, or check_bytes' caller's code),
 * [1] t (token; for check_bytes the byte index), [2] k, [3] the offending
 * value (expert, slot, the weight's float bits, or the byte), [4] E for
 * MOE_CHECK_EXPERT, C for MOE_CHECK_SLOT, the expert for
 * MOE_CHECK_SLOT_TWICE. MOE_CHECK_SLOT_GAP names no assignment: [1] and
 * [2] are 0, [3] the empty slot, [4] the expert, [5] its number of
 * assignments. */
#define MOE_CHECK_RECORD_WORDS 8
enum {
    MOE_CHECK_EXPERT = 1,
    MOE_CHECK_WEIGHT = 2,
    MOE_CHECK_SLOT = 3,
    MOE_CHECK_SLOT_TWICE = 4,
    MOE_CHECK_SLOT_GAP = 5,
};

/* The composite ops written with the other ops of `be` (the CPU backend's
 * ffn_fwd, ffn_bwd and linear_bwd, and the CUDA backend's in fp32):
 * core/backend/composed_ops.c. */
void moe_ffn_fwd_reference(moe_backend *be, moe_act_kind kind, const float *X, const float *w1,
                           const float *b1, const float *w2, const float *b2, float *H, float *A, float *Y,
                           int batch, int C, int d, int n);
void moe_ffn_bwd_reference(moe_backend *be, moe_act_kind kind, const float *X, const float *w1,
                           const float *w2, const float *H, const float *A, const float *dY, float *dA,
                           float *dH, float *dX, float *dw1, float *db1, float *dw2, float *db2, int batch,
                           int C, int d, int n, int accumulate_dw);

void moe_linear_bwd_reference(moe_backend *be, const float *X, const float *W, const float *dY, float *dX,
                              float *dW, float *db, int T, int K, int N);

/* The CPU backend (always built). threads <= 0 keeps OpenMP's default. */
moe_backend *moe_backend_cpu_create(int threads);

/* Matrix-product precision of the CUDA backend: fp32 end to end, or bf16
 * operands with fp32 accumulation and fp32 outputs for the GEMMs and for
 * attention's six products (master weights, softmax statistics and router
 * math stay fp32 either way; so do GEMMs with a side shorter than 16, such
 * as the gate's, where tensor cores gain nothing). */
typedef enum moe_precision { MOE_PRECISION_FP32 = 0, MOE_PRECISION_BF16 = 1 } moe_precision;

/* The CUDA backend on device `ordinal` (built when MOE_HAVE_CUDA_BACKEND is
 * defined). NULL with a message in err when no usable GPU is present. */
moe_backend *moe_backend_cuda_create(int ordinal, moe_precision precision, char *err, size_t errcap);
/* Number of visible CUDA devices (0 without a driver or in a CPU-only build). */
int moe_cuda_device_count(void);

/* Either backend. */
void moe_backend_destroy(moe_backend *be);

#ifdef __cplusplus
}
#endif

#endif
