/*
 * The CPU's pointwise and per-row ops: token/position embeddings,
 * activations, dropout, softmax cross-entropy and the AdamW update.
 */
#include "backend/cpu/cpu_ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/philox.h"

/* ------------------------------------------------------------------ */
/* Embeddings                                                          */
/* ------------------------------------------------------------------ */

void cpu_embed_fwd(moe_backend *be, const int32_t *ids, const float *wte, const float *wpe,
                   float *out, int B, int S, int d) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int bs = 0; bs < B * S; ++bs) {
        const float *tok = wte + (size_t)ids[bs] * d;
        float *o = out + (size_t)bs * d;
        if (wpe) {
            const float *pos = wpe + (size_t)(bs % S) * d;
            for (int i = 0; i < d; ++i) o[i] = tok[i] + pos[i];
        } else {
            memcpy(o, tok, (size_t)d * sizeof *o);
        }
    }
}

/* A token id may repeat within the batch, so rows of dwte receive several
 * contributions. Threads own blocks of columns and walk the tokens in order:
 * no two threads touch the same element and each element is summed in token
 * order, whatever the thread count. */
void cpu_embed_bwd(moe_backend *be, const int32_t *ids, const float *dout, float *dwte, float *dwpe,
                   int B, int S, int d, int V) {
    (void)be, (void)V;
    int nblocks = (d + CPU_COL_BLOCK - 1) / CPU_COL_BLOCK;
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < nblocks; ++blk) {
        int i0 = blk * CPU_COL_BLOCK;
        int i1 = i0 + CPU_COL_BLOCK < d ? i0 + CPU_COL_BLOCK : d;
        for (int bs = 0; bs < B * S; ++bs) {
            const float *g = dout + (size_t)bs * d;
            float *tok = dwte + (size_t)ids[bs] * d;
            for (int i = i0; i < i1; ++i) tok[i] += g[i];
            if (dwpe) {
                float *pos = dwpe + (size_t)(bs % S) * d;
                for (int i = i0; i < i1; ++i) pos[i] += g[i];
            }
        }
    }
}

/* ------------------------------------------------------------------ */
/* Activations                                                         */
/* ------------------------------------------------------------------ */

/* GPT-2's GELU: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3). */
#define GELU_SCALE 0.7978845608028654f /* sqrt(2/pi) */
#define GELU_CUBE 0.044715f

static inline float gelu(float x) {
    float u = GELU_SCALE * (x + GELU_CUBE * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}

/* d/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx,
 * du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2) */
static inline float gelu_grad(float x) {
    float u = GELU_SCALE * (x + GELU_CUBE * x * x * x);
    float th = tanhf(u);
    float du = GELU_SCALE * (1.0f + 3.0f * GELU_CUBE * x * x);
    return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

static inline float silu(float x) { return x * sigmoid(x); }

/* d/dx x s(x) = s + x s (1 - s) */
static inline float silu_grad(float x) {
    float s = sigmoid(x);
    return s * (1.0f + x * (1.0f - s));
}

static void unknown_act(const char *op, moe_act_kind kind) {
    fprintf(stderr, "%s: unknown activation kind %d\n", op, (int)kind);
    abort();
}

void cpu_act_fwd(moe_backend *be, moe_act_kind kind, const float *in, float *out, int T, int n) {
    (void)be;
    size_t count = (size_t)T * n;
    switch (kind) {
    case MOE_ACT_GELU:
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; ++i) out[i] = gelu(in[i]);
        break;
    case MOE_ACT_SILU:
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; ++i) out[i] = silu(in[i]);
        break;
    case MOE_ACT_SWIGLU: /* in row = [gate (n) | up (n)], out = silu(gate) * up */
#pragma omp parallel for schedule(static)
        for (int t = 0; t < T; ++t) {
            const float *gate = in + (size_t)t * 2 * n, *up = gate + n;
            float *o = out + (size_t)t * n;
            for (int i = 0; i < n; ++i) o[i] = silu(gate[i]) * up[i];
        }
        break;
    default:
        unknown_act("cpu_act_fwd", kind);
    }
}

void cpu_act_bwd(moe_backend *be, moe_act_kind kind, const float *in, const float *dout, float *din,
                 int T, int n) {
    (void)be;
    size_t count = (size_t)T * n;
    switch (kind) {
    case MOE_ACT_GELU:
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; ++i) din[i] = dout[i] * gelu_grad(in[i]);
        break;
    case MOE_ACT_SILU:
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < count; ++i) din[i] = dout[i] * silu_grad(in[i]);
        break;
    case MOE_ACT_SWIGLU:
#pragma omp parallel for schedule(static)
        for (int t = 0; t < T; ++t) {
            const float *gate = in + (size_t)t * 2 * n, *up = gate + n;
            const float *g = dout + (size_t)t * n;
            float *dgate = din + (size_t)t * 2 * n, *dup = dgate + n;
            for (int i = 0; i < n; ++i) {
                dgate[i] = g[i] * up[i] * silu_grad(gate[i]);
                dup[i] = g[i] * silu(gate[i]);
            }
        }
        break;
    default:
        unknown_act("cpu_act_bwd", kind);
    }
}

/* ------------------------------------------------------------------ */
/* Dropout                                                             */
/* ------------------------------------------------------------------ */

/* out[i] = in[i] * mask[i] / (1-p) with mask[i] = (uniform(key, i) > p).
 * Forward and backward are the same map (the mask is regenerated from the
 * key, never stored). One Philox call yields the words of 4 consecutive
 * elements, so the loop walks blocks of 4. */
static void dropout_apply(const float *in, float *out, size_t n, float p, moe_rng_key key) {
    if (p <= 0.0f) {
        if (n) memcpy(out, in, n * sizeof *out);
        return;
    }
    const float scale = 1.0f / (1.0f - p);
    size_t nblocks = (n + 3) / 4;
#pragma omp parallel for schedule(static)
    for (size_t blk = 0; blk < nblocks; ++blk) {
        moe_u32x4 words = moe_rng_block(key, blk);
        for (size_t lane = 0; lane < 4 && 4 * blk + lane < n; ++lane) {
            size_t i = 4 * blk + lane;
            out[i] = moe_u32_to_unit(words.v[lane]) > p ? in[i] * scale : 0.0f;
        }
    }
}

void cpu_dropout_fwd(moe_backend *be, const float *x, float *y, size_t n, float p,
                     moe_rng_key key) {
    (void)be;
    dropout_apply(x, y, n, p, key);
}

void cpu_dropout_bwd(moe_backend *be, const float *dy, float *dx, size_t n, float p,
                     moe_rng_key key) {
    (void)be;
    dropout_apply(dy, dx, n, p, key);
}

/* ------------------------------------------------------------------ */
/* Softmax cross-entropy                                               */
/* ------------------------------------------------------------------ */

/* loss = logsumexp(l) - l[target], with logsumexp = max + log(sum exp(l - max))
 * and the sum in double (V is tens of thousands for BPE vocabularies). */
void cpu_xent_fwd_bwd(moe_backend *be, const float *logits, const int32_t *targets, int T, int V,
                      float *losses, int32_t *correct, float *dlogits, float grad_scale) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
        const float *l = logits + (size_t)t * V;
        float *dl = dlogits ? dlogits + (size_t)t * V : NULL;
        int target = targets[t];
        if (target < 0) { /* ignored row (padding) */
            losses[t] = 0.0f;
            correct[t] = 0;
            if (dl) memset(dl, 0, (size_t)V * sizeof *dl);
            continue;
        }
        int argmax = 0; /* strict > keeps the lower index on ties */
        for (int j = 1; j < V; ++j)
            if (l[j] > l[argmax]) argmax = j;
        float maxv = l[argmax];
        double sum = 0.0;
        for (int j = 0; j < V; ++j) sum += expf(l[j] - maxv);
        losses[t] = (float)((double)maxv + log(sum) - (double)l[target]);
        correct[t] = argmax == target;
        if (dl) {
            float inv = (float)(1.0 / sum);
            for (int j = 0; j < V; ++j) dl[j] = grad_scale * expf(l[j] - maxv) * inv;
            dl[target] -= grad_scale;
        }
    }
}

/* In token order, as the model summed its host copies before. */
void cpu_xent_sums(moe_backend *be, const float *losses, const int32_t *correct, int T, double *out) {
    (void)be;
    double sum = 0.0;
    long long n_correct = 0;
    for (int t = 0; t < T; ++t) {
        sum += losses[t];
        n_correct += correct[t];
    }
    out[0] = sum;
    out[1] = (double)n_correct;
}

/* ------------------------------------------------------------------ */
/* AdamW                                                               */
/* ------------------------------------------------------------------ */

void cpu_adamw(moe_backend *be, float *p, const float *g, float *m, float *v, const uint8_t *decay,
               size_t n, float lr, float b1, float b2, float eps, float wd, long long t, const double *grad_norm,
               double clip) {
    (void)be;
    /* bias corrections 1 - b^t in double: early on they are small differences
     * of numbers near 1, where float would lose digits */
    const float bc1 = (float)(1.0 - pow((double)b1, (double)t));
    const float bc2 = (float)(1.0 - pow((double)b2, (double)t));
    /* clipping: the factor cpu_clip_grad_norm would have scaled g by */
    const int clipped = grad_norm && clip > 0.0 && *grad_norm > clip;
    const float gscale = clipped ? (float)(clip / *grad_norm) : 1.0f;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) {
        const float gi = clipped ? g[i] * gscale : g[i];
        m[i] = b1 * m[i] + (1.0f - b1) * gi;
        v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
        float mhat = m[i] / bc1;
        float vhat = v[i] / bc2;
        /* decoupled weight decay (Loshchilov & Hutter): applied to p, not to g */
        float decay_term = decay && decay[i] ? wd * p[i] : 0.0f;
        p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + decay_term);
    }
}
