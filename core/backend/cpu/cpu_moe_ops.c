/*
 * CPU reference of the MoE routing core: capacity, dispatch and combine.
 * Written as loops over (token, assignment) so they read like the math in
 * design.md; the CUDA kernels are tested against these.
 */
#include "backend/cpu/cpu_moe_ops.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "moe/router_util.h"

/* Priority order for capacity. Assignments are k-major (every token's first
 * choice before any second choice, as in Switch/GShard); within one k,
 * "position" keeps token order and "probs" serves larger weights first. */
typedef struct assignment_ref {
    int t;
    float w;
} assignment_ref;

static int by_weight_desc(const void *a, const void *b) {
    const assignment_ref *x = a, *y = b;
    if (x->w > y->w) return -1;
    if (x->w < y->w) return 1;
    return (x->t > y->t) - (x->t < y->t);
}

void cpu_capacity_assign(moe_backend *be, const int32_t *expert, const float *weight, int T, int K,
                         int E, int C, int policy, int32_t *kept, int32_t *slot,
                         int32_t *counts_before, int32_t *counts_after) {
    (void)be;
    memset(counts_before, 0, (size_t)E * sizeof *counts_before);
    memset(counts_after, 0, (size_t)E * sizeof *counts_after);
    assignment_ref *order = malloc((size_t)(T > 0 ? T : 1) * sizeof *order);
    for (int k = 0; k < K; ++k) {
        for (int t = 0; t < T; ++t) order[t] = (assignment_ref){t, weight[(size_t)t * K + k]};
        if (policy == 1) qsort(order, (size_t)T, sizeof *order, by_weight_desc);
        for (int i = 0; i < T; ++i) {
            size_t a = (size_t)order[i].t * K + k;
            int e = expert[a];
            kept[a] = -1;
            slot[a] = -1;
            if (e < 0) continue;
            counts_before[e]++;
            if (counts_after[e] < C) {
                kept[a] = e;
                slot[a] = counts_after[e]++;
            }
        }
    }
    free(order);
}

void cpu_combine_weights(moe_backend *be, const float *weight, const int32_t *kept, int T, int K,
                         int renorm, float *cw) {
    (void)be;
    for (int t = 0; t < T; ++t) {
        const float *w = weight + (size_t)t * K;
        const int32_t *e = kept + (size_t)t * K;
        float *out = cw + (size_t)t * K;
        float sum = 0.0f;
        for (int k = 0; k < K; ++k) {
            out[k] = e[k] >= 0 ? w[k] : 0.0f;
            sum += out[k];
        }
        if (renorm && sum > 0.0f)
            for (int k = 0; k < K; ++k) out[k] /= sum;
    }
}

/* With renorm, cw_k = w_k / S over kept k, S = sum of kept w, so
 * dw_k = (dcw_k - sum_j cw_j dcw_j) / S for kept k, 0 otherwise. */
void cpu_combine_weights_bwd(moe_backend *be, const float *weight, const int32_t *kept, int T, int K,
                             int renorm, const float *dcw, float *dweight) {
    (void)be;
    for (int t = 0; t < T; ++t) {
        const float *w = weight + (size_t)t * K;
        const int32_t *e = kept + (size_t)t * K;
        const float *g = dcw + (size_t)t * K;
        float *dw = dweight + (size_t)t * K;
        float sum = 0.0f, dot = 0.0f;
        for (int k = 0; k < K; ++k)
            if (e[k] >= 0) sum += w[k];
        if (renorm && sum > 0.0f)
            for (int k = 0; k < K; ++k)
                if (e[k] >= 0) dot += (w[k] / sum) * g[k];
        for (int k = 0; k < K; ++k) {
            if (e[k] < 0)
                dw[k] = 0.0f;
            else if (renorm && sum > 0.0f)
                dw[k] = (g[k] - dot) / sum;
            else
                dw[k] = g[k];
        }
    }
}

/* fill_counts (a hint, backend.h) changes nothing here: every row is zeroed first. */
void cpu_dispatch(moe_backend *be, const float *x, const int32_t *kept, const int32_t *slot, int T,
                  int K, int C, int E, int d, const int32_t *fill_counts, float *Xe) {
    (void)be, (void)fill_counts;
    memset(Xe, 0, (size_t)E * C * d * sizeof *Xe);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t)
        for (int k = 0; k < K; ++k) {
            size_t a = (size_t)t * K + k;
            if (kept[a] < 0) continue;
            memcpy(Xe + ((size_t)kept[a] * C + slot[a]) * d, x + (size_t)t * d, (size_t)d * sizeof *Xe);
        }
}

void cpu_dispatch_bwd(moe_backend *be, const float *dXe, const int32_t *kept, const int32_t *slot,
                      int T, int K, int C, int d, int accumulate, float *dx) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
        float *dst = dx + (size_t)t * d;
        if (!accumulate) memset(dst, 0, (size_t)d * sizeof *dst);
        for (int k = 0; k < K; ++k) {
            size_t a = (size_t)t * K + k;
            if (kept[a] < 0) continue;
            const float *src = dXe + ((size_t)kept[a] * C + slot[a]) * d;
            for (int i = 0; i < d; ++i) dst[i] += src[i];
        }
    }
}

/* The weighted sum from 0 in k order, then the residual: bitwise combine
 * followed by axpy(1, residual, y), so a model folding its residual add in
 * here keeps its results. */
void cpu_combine(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                 const float *cw, int T, int K, int C, int d, const float *residual, float *y) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t) {
        float *out = y + (size_t)t * d;
        memset(out, 0, (size_t)d * sizeof *out);
        for (int k = 0; k < K; ++k) {
            size_t a = (size_t)t * K + k;
            if (kept[a] < 0) continue;
            const float *src = Ye + ((size_t)kept[a] * C + slot[a]) * d;
            for (int i = 0; i < d; ++i) out[i] += cw[a] * src[i];
        }
        if (residual) {
            const float *res = residual + (size_t)t * d;
            for (int i = 0; i < d; ++i) out[i] += res[i];
        }
    }
}

void cpu_combine_bwd(moe_backend *be, const float *Ye, const int32_t *kept, const int32_t *slot,
                     const float *cw, const float *dy, int T, int K, int C, int E, int d,
                     const int32_t *fill_counts, float *dYe, float *dcw) {
    (void)be, (void)fill_counts;
    memset(dYe, 0, (size_t)E * C * d * sizeof *dYe);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; ++t)
        for (int k = 0; k < K; ++k) {
            size_t a = (size_t)t * K + k;
            dcw[a] = 0.0f;
            if (kept[a] < 0) continue;
            size_t row = ((size_t)kept[a] * C + slot[a]) * d;
            const float *g = dy + (size_t)t * d;
            float dot = 0.0f;
            for (int i = 0; i < d; ++i) {
                dYe[row + i] = cw[a] * g[i];
                dot += g[i] * Ye[row + i];
            }
            dcw[a] = dot;
        }
}

void cpu_mul(moe_backend *be, const float *a, const float *b, float *out, size_t n) {
    (void)be;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

/* P[e] = (1/T) sum_t p[t,e] with p = softmax(lb_logits[t]); lb = E sum_e f_e P_e.
 * d lb / d lb_logits[t,j] = (E/T) p[t,j] (f_j - sum_e f_e p[t,e]).
 * z = (1/T) sum_t lse_t^2; d z / d logits[t,j] = (2/T) lse_t softmax(logits[t])[j]. */
void cpu_aux_losses(moe_backend *be, const float *lb_logits, const float *logits, const float *f, int T,
                    int E, float alpha, float beta, float *d_lb, float *dlogits, double *lb, double *z) {
    (void)be;
    double lb_sum = 0.0, z_sum = 0.0;
    float *p = malloc((size_t)E * sizeof *p);
    for (int t = 0; t < T; ++t) {
        const float *l = lb_logits + (size_t)t * E;
        moe_softmax_row(l, p, E, 1.0f);
        double fp = 0.0;
        for (int e = 0; e < E; ++e) fp += (double)f[e] * p[e];
        lb_sum += fp;
        for (int e = 0; e < E; ++e)
            d_lb[(size_t)t * E + e] = (float)(alpha * (double)E / T * p[e] * (f[e] - fp));

        const float *lz = logits + (size_t)t * E;
        float lse = moe_logsumexp_row(lz, E);
        z_sum += (double)lse * lse;
        for (int e = 0; e < E; ++e)
            dlogits[(size_t)t * E + e] += beta * 2.0f / (float)T * lse * expf(lz[e] - lse);
    }
    free(p);
    *lb = T > 0 ? (double)E * lb_sum / T : 0.0;
    *z = T > 0 ? z_sum / T : 0.0;
}

/* f from the counts, exactly as core/model/moe.c computed it on the host,
 * then aux_losses. */
void cpu_aux_losses_counts(moe_backend *be, const float *lb_logits, const float *logits, const int32_t *counts,
                           int T, int E, float alpha, float beta, float *d_lb, float *dlogits, double *out) {
    long long routed = 0;
    for (int e = 0; e < E; ++e) routed += counts[e];
    float *f = malloc((size_t)(E > 0 ? E : 1) * sizeof *f);
    for (int e = 0; e < E; ++e) f[e] = routed ? (float)counts[e] / (float)routed : 0.0f;
    cpu_aux_losses(be, lb_logits, logits, f, T, E, alpha, beta, d_lb, dlogits, &out[0], &out[1]);
    free(f);
}

/* ---- checks (contracts: backend.h) ---- */

static void set_record(int32_t *record, int32_t code, int32_t t, int32_t k, int32_t value, int32_t extra) {
    if (record[0] != 0) return; /* the first error stays */
    record[1] = t;
    record[2] = k;
    record[3] = value;
    record[4] = extra;
    record[0] = code;
}

/* check_routing's finite zone: the first non-finite v[i] (backend.h). */
static void check_finite_zone(const float *v, size_t n, int32_t code, int32_t *record) {
    for (size_t i = 0; i < n; ++i)
        if (!isfinite(v[i])) {
            int32_t bits;
            memcpy(&bits, &v[i], sizeof bits);
            set_record(record, code, (int32_t)i, 0, bits, (int32_t)n);
            return;
        }
}

void cpu_check_routing(moe_backend *be, const moe_guard_zone *guard, const moe_finite_zone *finite,
                       const int32_t *expert, const float *weight, const int32_t *slot, int T, int K, int E, int C,
                       int dense_slots, int32_t *kept, int32_t *counts_before, int32_t *counts_after,
                       int32_t *record) {
    if (guard) cpu_check_bytes(be, guard->p, guard->n, guard->value, guard->code, record);
    if (finite) check_finite_zone(finite->v, finite->n, finite->code, record);
    const size_t nA = (size_t)(T > 0 ? T : 0) * (size_t)(K > 0 ? K : 0);
    int32_t *count = slot && E > 0 ? calloc((size_t)E, sizeof *count) : NULL;
    int bad = 0;
    for (size_t a = 0; a < nA; ++a) {
        const int e = expert[a];
        const int t = (int)(a / (size_t)K), k = (int)(a % (size_t)K);
        if (slot) {
            const int valid = e >= 0 && e < E && slot[a] >= 0 && slot[a] < C;
            kept[a] = valid ? e : -1;
            if (valid && count) count[e]++;
        }
        if (bad) continue;
        if (e < -1 || e >= E) {
            set_record(record, MOE_CHECK_EXPERT, t, k, e, E);
            bad = 1;
        } else if (e >= 0 && !(isfinite(weight[a]) && weight[a] >= 0.0f)) {
            int32_t bits;
            memcpy(&bits, &weight[a], sizeof bits);
            set_record(record, MOE_CHECK_WEIGHT, t, k, bits, 0);
            bad = 1;
        } else if (slot && e >= 0 && (slot[a] < 0 || slot[a] >= C)) {
            set_record(record, MOE_CHECK_SLOT, t, k, slot[a], C);
            bad = 1;
        }
    }
    if (slot && E > 0) {
        for (int e = 0; e < E; ++e) {
            if (counts_before) counts_before[e] = count ? count[e] : 0;
            if (counts_after) counts_after[e] = count ? count[e] : 0;
        }
    }
    /* Slots must be distinct within an expert, or two tokens would share one
     * expert row. Every index is in range here. */
    unsigned char *seen = !bad && slot && nA > 0 && count ? calloc((size_t)E * (size_t)C, 1) : NULL;
    if (seen) {
        for (size_t a = 0; a < nA; ++a) {
            if (expert[a] < 0) continue;
            unsigned char *s = &seen[(size_t)expert[a] * C + slot[a]];
            if (*s) {
                set_record(record, MOE_CHECK_SLOT_TWICE, (int)(a / (size_t)K), (int)(a % (size_t)K), slot[a],
                           expert[a]);
                bad = 1;
                break;
            }
            *s = 1;
        }
        /* Dense slots: with distinct slots in [0, C), expert e's count[e]
         * slots are 0 .. count[e]-1 unless one below count[e] is empty. */
        for (int e = 0; e < E && !bad && dense_slots; ++e)
            for (int s = 0; s < count[e]; ++s)
                if (!seen[(size_t)e * C + s]) {
                    if (record[0] == 0) {
                        record[1] = 0;
                        record[2] = 0;
                        record[3] = s;
                        record[4] = e;
                        record[5] = count[e];
                        record[0] = MOE_CHECK_SLOT_GAP;
                    }
                    bad = 1;
                    break;
                }
    }
    free(seen);
    free(count);
}

void cpu_check_bytes(moe_backend *be, const void *p, size_t n, uint8_t value, int32_t code, int32_t *record) {
    (void)be;
    const unsigned char *b = p;
    for (size_t i = 0; i < n; ++i)
        if (b[i] != value) {
            set_record(record, code, (int32_t)i, 0, b[i], 0);
            return;
        }
}


/* The CPU's GEMMs read the fp32 weights themselves: there is no copy to make. */
void cpu_round_weights(moe_backend *be, const float *params, const moe_weight_view *views, int n) {
    (void)be, (void)params, (void)views, (void)n;
}

/* ... nor an activation copy to keep. */
void cpu_keep_activations(moe_backend *be, const moe_activation_view *views, int n) {
    (void)be, (void)views, (void)n;
}

