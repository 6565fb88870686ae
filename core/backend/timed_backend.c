/* The timing decorator (backend/timed_backend.h). */
#include "backend/timed_backend.h"

#include <stdlib.h>
#include <string.h>

#define TIMED_OPS(X) \
    X(gemm) X(gemm_strided_batched) X(gemm_bias) X(ffn_fwd) X(ffn_bwd) X(linear_bwd) X(add_bias) X(bias_grad) X(add_bias_batched) X(bias_grad_batched) \
    X(axpy) X(scale) X(mul) X(sumsq) \
    X(embed_fwd) X(embed_bwd) X(layernorm_fwd) X(layernorm_bwd) X(rmsnorm_fwd) X(rmsnorm_bwd) \
    X(act_fwd) X(act_bwd) X(rope_fwd) X(rope_bwd) X(attention_fwd) X(attention_bwd) X(dropout_fwd) \
    X(dropout_bwd) X(xent_fwd_bwd) X(adamw) X(capacity_assign) X(combine_weights) \
    X(combine_weights_bwd) X(dispatch) X(dispatch_bwd) X(combine) X(combine_bwd) X(aux_losses) \
    X(aux_losses_counts) X(check_routing) X(check_bytes) X(round_weights) X(keep_activations) X(xent_sums) \
    X(clip_grad_norm)

enum {
#define X(n) OP_##n,
    TIMED_OPS(X)
#undef X
    OP_COUNT
};

static const char *const op_names[OP_COUNT] = {
#define X(n) #n,
    TIMED_OPS(X)
#undef X
};

typedef struct timed_backend {
    moe_backend pub;   /* first: a moe_backend * is a timed_backend * */
    moe_backend *inner;
    int on;
    int lost;          /* the pool could not grow: some calls went untimed */
    /* The pool: pairs [0, used) are recorded and not yet read. */
    void **start, **end;
    int *op;
    int used, cap;
    long long calls[OP_COUNT];
    double ms[OP_COUNT];
} timed_backend;

static void timed_backend_destroy_impl(moe_backend *be);

int moe_timed_backend_is(const moe_backend *be) { return be && be->destroy == timed_backend_destroy_impl; }

static int grow(timed_backend *t) {
    int cap = t->cap ? 2 * t->cap : 256;
    void **s = realloc(t->start, (size_t)cap * sizeof *s);
    if (!s) return -1;
    t->start = s;
    void **e = realloc(t->end, (size_t)cap * sizeof *e);
    if (!e) return -1;
    t->end = e;
    int *o = realloc(t->op, (size_t)cap * sizeof *o);
    if (!o) return -1;
    t->op = o;
    for (int i = t->cap; i < cap; ++i) {
        t->start[i] = t->inner->event_create(t->inner);
        t->end[i] = t->inner->event_create(t->inner);
        if (!t->start[i] || !t->end[i]) {
            if (t->start[i]) t->inner->event_destroy(t->inner, t->start[i]);
            if (t->end[i]) t->inner->event_destroy(t->inner, t->end[i]);
            return -1;
        }
        t->cap = i + 1;
    }
    return 0;
}

/* A pair index for this call, its start recorded; -1 when not timing. */
static int begin(timed_backend *t, int op) {
    if (!t->on) return -1;
    if (t->used == t->cap && grow(t) != 0) {
        t->lost = 1;
        return -1;
    }
    int i = t->used++;
    t->op[i] = op;
    t->inner->event_record(t->inner, t->start[i]);
    return i;
}

static void end(timed_backend *t, int i) {
    if (i >= 0) t->inner->event_record(t->inner, t->end[i]);
}

#define T_ (timed_backend *)be
#define IN (((timed_backend *)be)->inner)
/* A void op: time the inner call. */
#define TIMED_VOID(name, call)                       \
    do {                                             \
        timed_backend *t = T_;                       \
        int i_ = begin(t, OP_##name);                \
        t->inner->name call;                         \
        end(t, i_);                                  \
    } while (0)

/* ---- forwarded untimed ---- */
static void *t_event_create(moe_backend *be) { return IN->event_create(IN); }
static void t_event_destroy(moe_backend *be, void *ev) { IN->event_destroy(IN, ev); }
static void t_event_record(moe_backend *be, void *ev) { IN->event_record(IN, ev); }
static float t_event_elapsed_ms(moe_backend *be, void *a, void *b) { return IN->event_elapsed_ms(IN, a, b); }
static double t_measure_gemm_tflops(moe_backend *be) { return IN->measure_gemm_tflops(IN); }
static void *t_alloc(moe_backend *be, size_t n) { return IN->alloc(IN, n); }
static void t_free(moe_backend *be, void *p) { IN->free(IN, p); }
static void t_to_host(moe_backend *be, void *d, const void *s, size_t n) { IN->to_host(IN, d, s, n); }
static void t_from_host(moe_backend *be, void *d, const void *s, size_t n) { IN->from_host(IN, d, s, n); }
static void t_copy(moe_backend *be, void *d, const void *s, size_t n) { IN->copy(IN, d, s, n); }
static void t_zero(moe_backend *be, void *p, size_t n) { IN->zero(IN, p, n); }
static void t_sync(moe_backend *be) { IN->sync(IN); }

/* ---- timed ---- */
static void t_gemm(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha, const float *A, int lda,
                   const float *B, int ldb, float beta, float *C, int ldc) {
    TIMED_VOID(gemm, (t->inner, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc));
}
static void t_gemm_strided_batched(moe_backend *be, int ta, int tb, int M, int N, int K, float alpha,
                                   const float *A, int lda, long long sA, const float *B, int ldb, long long sB,
                                   float beta, float *C, int ldc, long long sC, int batch) {
    TIMED_VOID(gemm_strided_batched, (t->inner, ta, tb, M, N, K, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, batch));
}
static void t_gemm_bias(moe_backend *be, int ta, int tb, int M, int N, int K, const float *A, int lda,
                        long long sA, const float *B, int ldb, long long sB, const float *bias, long long sbias,
                        const float *residual, float *C, int ldc, long long sC, int batch) {
    TIMED_VOID(gemm_bias,
               (t->inner, ta, tb, M, N, K, A, lda, sA, B, ldb, sB, bias, sbias, residual, C, ldc, sC, batch));
}
static void t_ffn_fwd(moe_backend *be, moe_act_kind kind, const float *X, const float *w1, const float *b1,
                      const float *w2, const float *b2, float *H, float *A, float *Y, int batch, int C, int d,
                      int n) {
    TIMED_VOID(ffn_fwd, (t->inner, kind, X, w1, b1, w2, b2, H, A, Y, batch, C, d, n));
}
static void t_ffn_bwd(moe_backend *be, moe_act_kind kind, const float *X, const float *w1, const float *w2,
                      const float *H, const float *A, const float *dY, float *dA, float *dH, float *dX,
                      float *dw1, float *db1, float *dw2, float *db2, int batch, int C, int d, int n,
                      int accumulate_dw) {
    TIMED_VOID(ffn_bwd,
               (t->inner, kind, X, w1, w2, H, A, dY, dA, dH, dX, dw1, db1, dw2, db2, batch, C, d, n, accumulate_dw));
}
static void t_linear_bwd(moe_backend *be, const float *X, const float *W, const float *dY, float *dX, float *dW,
                         float *db, int T, int K, int N) {
    TIMED_VOID(linear_bwd, (t->inner, X, W, dY, dX, dW, db, T, K, N));
}
static void t_add_bias(moe_backend *be, float *y, const float *b, int T, int N) {
    TIMED_VOID(add_bias, (t->inner, y, b, T, N));
}
static void t_bias_grad(moe_backend *be, const float *dy, float *db, int T, int N) {
    TIMED_VOID(bias_grad, (t->inner, dy, db, T, N));
}
static void t_add_bias_batched(moe_backend *be, float *y, const float *b, int batch, int T, int N,
                               long long sy, long long sb) {
    TIMED_VOID(add_bias_batched, (t->inner, y, b, batch, T, N, sy, sb));
}
static void t_bias_grad_batched(moe_backend *be, const float *dy, float *db, int batch, int T, int N,
                                long long sdy, long long sdb) {
    TIMED_VOID(bias_grad_batched, (t->inner, dy, db, batch, T, N, sdy, sdb));
}
static void t_axpy(moe_backend *be, float a, const float *x, float *y, size_t n) {
    TIMED_VOID(axpy, (t->inner, a, x, y, n));
}
static void t_scale(moe_backend *be, float *x, float a, size_t n) { TIMED_VOID(scale, (t->inner, x, a, n)); }
static void t_mul(moe_backend *be, const float *a, const float *b, float *out, size_t n) {
    TIMED_VOID(mul, (t->inner, a, b, out, n));
}
static double t_sumsq(moe_backend *be, const float *x, size_t n) {
    timed_backend *t = T_;
    int i = begin(t, OP_sumsq);
    double r = t->inner->sumsq(t->inner, x, n);
    end(t, i);
    return r;
}
static void t_embed_fwd(moe_backend *be, const int32_t *ids, const float *wte, const float *wpe, float *out, int B,
                        int S, int d) {
    TIMED_VOID(embed_fwd, (t->inner, ids, wte, wpe, out, B, S, d));
}
static void t_embed_bwd(moe_backend *be, const int32_t *ids, const float *dout, float *dwte, float *dwpe, int B,
                        int S, int d, int V) {
    TIMED_VOID(embed_bwd, (t->inner, ids, dout, dwte, dwpe, B, S, d, V));
}
static void t_layernorm_fwd(moe_backend *be, const float *x, const float *g, const float *b, float *y, float *mean,
                            float *rstd, int T, int d, float eps) {
    TIMED_VOID(layernorm_fwd, (t->inner, x, g, b, y, mean, rstd, T, d, eps));
}
static void t_layernorm_bwd(moe_backend *be, const float *x, const float *g, const float *mean, const float *rstd,
                            const float *dy, float *dx, float *dg, float *db, int T, int d) {
    TIMED_VOID(layernorm_bwd, (t->inner, x, g, mean, rstd, dy, dx, dg, db, T, d));
}
static void t_rmsnorm_fwd(moe_backend *be, const float *x, const float *g, float *y, float *rstd, int T, int d,
                          float eps) {
    TIMED_VOID(rmsnorm_fwd, (t->inner, x, g, y, rstd, T, d, eps));
}
static void t_rmsnorm_bwd(moe_backend *be, const float *x, const float *g, const float *rstd, const float *dy,
                          float *dx, float *dg, int T, int d) {
    TIMED_VOID(rmsnorm_bwd, (t->inner, x, g, rstd, dy, dx, dg, T, d));
}
static void t_act_fwd(moe_backend *be, moe_act_kind k, const float *in, float *out, int T, int n) {
    TIMED_VOID(act_fwd, (t->inner, k, in, out, T, n));
}
static void t_act_bwd(moe_backend *be, moe_act_kind k, const float *in, const float *dout, float *din, int T,
                      int n) {
    TIMED_VOID(act_bwd, (t->inner, k, in, dout, din, T, n));
}
static void t_rope_fwd(moe_backend *be, float *qkv, int B, int S, int H, int hd, float theta) {
    TIMED_VOID(rope_fwd, (t->inner, qkv, B, S, H, hd, theta));
}
static void t_rope_bwd(moe_backend *be, float *dqkv, int B, int S, int H, int hd, float theta) {
    TIMED_VOID(rope_bwd, (t->inner, dqkv, B, S, H, hd, theta));
}
static void t_attention_fwd(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S, int H,
                            int hd) {
    TIMED_VOID(attention_fwd, (t->inner, qkv, out, probs, B, S, H, hd));
}
static void t_attention_bwd(moe_backend *be, const float *qkv, const float *probs, const float *dout, float *dqkv,
                            int B, int S, int H, int hd) {
    TIMED_VOID(attention_bwd, (t->inner, qkv, probs, dout, dqkv, B, S, H, hd));
}
static void t_dropout_fwd(moe_backend *be, const float *x, float *y, size_t n, float p, moe_rng_key key) {
    TIMED_VOID(dropout_fwd, (t->inner, x, y, n, p, key));
}
static void t_dropout_bwd(moe_backend *be, const float *dy, float *dx, size_t n, float p, moe_rng_key key) {
    TIMED_VOID(dropout_bwd, (t->inner, dy, dx, n, p, key));
}
static void t_xent_fwd_bwd(moe_backend *be, const float *logits, const int32_t *targets, int T, int V,
                           float *losses, int32_t *correct, float *dlogits, float grad_scale) {
    TIMED_VOID(xent_fwd_bwd, (t->inner, logits, targets, T, V, losses, correct, dlogits, grad_scale));
}
static void t_adamw(moe_backend *be, float *p, const float *g, float *m, float *v, const uint8_t *decay, size_t n,
                    float lr, float b1, float b2, float eps, float wd, long long step, const double *grad_norm,
                    double clip) {
    TIMED_VOID(adamw, (t->inner, p, g, m, v, decay, n, lr, b1, b2, eps, wd, step, grad_norm, clip));
}
static void t_capacity_assign(moe_backend *be, const int32_t *expert, const float *weight, int T, int K, int E,
                              int C, int policy, int32_t *kept, int32_t *slot, int32_t *cb, int32_t *ca) {
    TIMED_VOID(capacity_assign, (t->inner, expert, weight, T, K, E, C, policy, kept, slot, cb, ca));
}
static void t_combine_weights(moe_backend *be, const float *weight, const int32_t *kept, int T, int K, int renorm,
                              float *cw) {
    TIMED_VOID(combine_weights, (t->inner, weight, kept, T, K, renorm, cw));
}
static void t_combine_weights_bwd(moe_backend *be, const float *weight, const int32_t *kept, int T, int K,
                                  int renorm, const float *dcw, float *dweight) {
    TIMED_VOID(combine_weights_bwd, (t->inner, weight, kept, T, K, renorm, dcw, dweight));
}
static void t_dispatch(moe_backend *be, const float *x, const int32_t *kept, const int32_t *slot, int T, int K,
                       int C, int E, int d, const int32_t *fill_counts, float *Xe) {
    TIMED_VOID(dispatch, (t->inner, x, kept, slot, T, K, C, E, d, fill_counts, Xe));
}
static void t_dispatch_bwd(moe_backend *be, const float *dXe, const int32_t *kept, const int32_t *slot, int T,
                           int K, int C, int d, int accumulate, float *dx) {
    TIMED_VOID(dispatch_bwd, (t->inner, dXe, kept, slot, T, K, C, d, accumulate, dx));
}
static void t_combine(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot, const float *cw,
                      int T, int K, int C, int d, const float *residual, float *y) {
    TIMED_VOID(combine, (t->inner, Ye, kept, slot, cw, T, K, C, d, residual, y));
}
static void t_combine_bwd(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                          const float *cw, const float *dy, int T, int K, int C, int E, int d,
                          const int32_t *fill_counts, float *dYe, float *dcw) {
    TIMED_VOID(combine_bwd, (t->inner, Ye, kept, slot, cw, dy, T, K, C, E, d, fill_counts, dYe, dcw));
}
static void t_aux_losses(moe_backend *be, const float *lb_logits, const float *logits, const float *f, int T,
                         int E, float alpha, float beta, float *d_lb, float *dlogits, double *lb, double *z) {
    TIMED_VOID(aux_losses, (t->inner, lb_logits, logits, f, T, E, alpha, beta, d_lb, dlogits, lb, z));
}
static void t_aux_losses_counts(moe_backend *be, const float *lb_logits, const float *logits,
                                const int32_t *counts, int T, int E, float alpha, float beta, float *d_lb,
                                float *dlogits, double *out) {
    TIMED_VOID(aux_losses_counts, (t->inner, lb_logits, logits, counts, T, E, alpha, beta, d_lb, dlogits, out));
}
static void t_check_routing(moe_backend *be, const moe_guard_zone *guard, const moe_finite_zone *finite,
                            const int32_t *expert, const float *weight, const int32_t *slot, int T, int K, int E,
                            int C, int dense_slots, int32_t *kept, int32_t *counts_before, int32_t *counts_after,
                            int32_t *record) {
    TIMED_VOID(check_routing, (t->inner, guard, finite, expert, weight, slot, T, K, E, C, dense_slots, kept,
                               counts_before, counts_after, record));
}
static void t_check_bytes(moe_backend *be, const void *p, size_t n, uint8_t value, int32_t code, int32_t *record) {
    TIMED_VOID(check_bytes, (t->inner, p, n, value, code, record));
}
static void t_round_weights(moe_backend *be, const float *params, const moe_weight_view *views, int n) {
    TIMED_VOID(round_weights, (t->inner, params, views, n));
}
static void t_keep_activations(moe_backend *be, const moe_activation_view *views, int n) {
    TIMED_VOID(keep_activations, (t->inner, views, n));
}
static void t_xent_sums(moe_backend *be, const float *losses, const int32_t *correct, int T, double *out) {
    TIMED_VOID(xent_sums, (t->inner, losses, correct, T, out));
}
static void t_clip_grad_norm(moe_backend *be, float *g, size_t n, double clip, double *norm_out) {
    TIMED_VOID(clip_grad_norm, (t->inner, g, n, clip, norm_out));
}

static void release_pool(timed_backend *t) {
    for (int i = 0; i < t->cap; ++i) {
        t->inner->event_destroy(t->inner, t->start[i]);
        t->inner->event_destroy(t->inner, t->end[i]);
    }
    free(t->start);
    free(t->end);
    free(t->op);
    t->start = t->end = NULL;
    t->op = NULL;
    t->cap = t->used = 0;
}

static void timed_backend_destroy_impl(moe_backend *be) {
    timed_backend *t = T_;
    release_pool(t);
    moe_backend_destroy(t->inner);
    free(t);
}

moe_backend *moe_timed_backend_wrap(moe_backend *inner) {
    if (!inner) return NULL;
    timed_backend *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->inner = inner;
    t->pub = *inner; /* name, device, impl, stream, ordinal; ops replaced below */
    moe_backend *b = &t->pub;
    b->destroy = timed_backend_destroy_impl;
    b->event_create = t_event_create;
    b->event_destroy = t_event_destroy;
    b->event_record = t_event_record;
    b->event_elapsed_ms = t_event_elapsed_ms;
    b->measure_gemm_tflops = t_measure_gemm_tflops;
    b->alloc = t_alloc;
    b->free = t_free;
    b->to_host = t_to_host;
    b->from_host = t_from_host;
    b->copy = t_copy;
    b->zero = t_zero;
    b->sync = t_sync;
    /* A timed op only where the inner backend has one. */
#define X(n) if (inner->n) b->n = t_##n;
    TIMED_OPS(X)
#undef X
    return b;
}

void moe_timed_backend_enable(moe_backend *be, int on) {
    if (moe_timed_backend_is(be)) ((timed_backend *)be)->on = on;
}

int moe_timed_backend_collect(moe_backend *be) {
    if (!moe_timed_backend_is(be)) return -1;
    timed_backend *t = T_;
    for (int i = 0; i < t->used; ++i) {
        t->ms[t->op[i]] += t->inner->event_elapsed_ms(t->inner, t->start[i], t->end[i]);
        t->calls[t->op[i]]++;
    }
    t->used = 0;
    int rc = t->lost ? -1 : 0;
    t->lost = 0;
    return rc;
}

void moe_timed_backend_reset(moe_backend *be) {
    if (!moe_timed_backend_is(be)) return;
    timed_backend *t = T_;
    t->used = 0;
    t->lost = 0;
    memset(t->calls, 0, sizeof t->calls);
    memset(t->ms, 0, sizeof t->ms);
}

int moe_timed_backend_stats(moe_backend *be, moe_timed_op_stat *out, int cap) {
    if (!moe_timed_backend_is(be)) return 0;
    timed_backend *t = T_;
    int n = 0;
    for (int i = 0; i < OP_COUNT && n < cap; ++i)
        if (t->calls[i] > 0) out[n++] = (moe_timed_op_stat){op_names[i], t->calls[i], t->ms[i]};
    return n;
}
