/*
 * loss_free_bias: auxiliary-loss-free load balancing (Wang et al. 2024,
 * "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts";
 * DeepSeek-V3, 2024). Shared by the CPU path (loss_free_bias.c) and the CUDA
 * path (loss_free_bias.cu): the state, and the per-token routines, which are
 * MOE_HD so the same code runs on both devices.
 *
 * For token t with logits l[E]:
 *
 *   s_e     = sigmoid(l_e)              score = "sigmoid" (DeepSeek-V3, default)
 *           = softmax(l)_e              score = "softmax"
 *   chosen  = top-K of s_e + b_e        ties to the lower expert index
 *   w_j     = s_j / sum_{i chosen} s_i  normalize = true (default)
 *           = s_j                       normalize = false
 *
 * b[E] is a plugin buffer (state the host owns, checkpoints and never trains):
 * it steers the selection only; the weights come from the unbiased scores.
 * In a training forward, after routing the T tokens,
 *
 *   c_e  = tokens that chose expert e,   c_mean = T K / E
 *   b_e += u * sign(c_mean - c_e)         u = update_rate
 *
 * so an overloaded expert becomes less attractive and an idle one more, with
 * no auxiliary loss in the gradient (set [moe].aux_loss_weight = 0).
 *
 * Backward flows through the weights only (the selection is piecewise
 * constant): with g = dL/dw over the chosen experts,
 *
 *   normalize:  ds_j = (g_j - sum_i w_i g_i) / S,   S = sum_i s_i
 *   otherwise:  ds_j = g_j
 *   sigmoid:    dl_e = ds_e s_e (1 - s_e)
 *   softmax:    dl_e = s_e (ds_e - sum_m s_m ds_m)
 *
 * Scores are computed in double and rounded once, so the CPU and the GPU
 * (whose float exp differs from glibc's in the last bits) rank experts alike.
 */
#ifndef LOSS_FREE_BIAS_H
#define LOSS_FREE_BIAS_H

#include <moe/router.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { LFB_SIGMOID = 0, LFB_SOFTMAX = 1 };

typedef struct lfb_state {
    int32_t E, K;
    int score;         /* LFB_SIGMOID | LFB_SOFTMAX */
    int normalize;     /* weights divided by their sum over the chosen */
    float update_rate; /* u */
} lfb_state;

/* Workspace: the per-expert counts of a training forward, and one int the
 * CUDA path uses to report the first non-finite logit. */
#define LFB_WORKSPACE_BYTES(E) ((size_t)((E) + 1) * sizeof(int32_t))

/* The checks of a call, the same on both devices (host code): the shapes the
 * instance was created for, the bias buffer, the workspace. */
static inline moe_status lfb_check_call(const lfb_state *s, const moe_context *ctx, int32_t T, int32_t E,
                                        int32_t k_out, float *const *buffers) {
    if (T < 0 || E != s->E || k_out != s->K)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "called with T = %d, E = %d, k_out = %d; this instance has E = %d, k_out = %d", T, E, k_out,
                        s->E, s->K);
    if (T > 0 && (!buffers || !buffers[0]))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "the bias buffer is missing");
    if (T > 0 && (!ctx->workspace || ctx->workspace_bytes < LFB_WORKSPACE_BYTES(s->E)))
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "workspace of %zu bytes, query() asked for %zu",
                        ctx->workspace_bytes, LFB_WORKSPACE_BYTES(s->E));
    return MOE_OK;
}

/* Row statistics of the softmax score: max and sum of exp(l - max). */
MOE_HD void lfb_softmax_stats(const float *l, int E, double *m, double *z) {
    double mx = l[0];
    for (int e = 1; e < E; ++e) mx = l[e] > mx ? l[e] : mx;
    double s = 0.0;
    for (int e = 0; e < E; ++e) s += exp((double)l[e] - mx);
    *m = mx;
    *z = s;
}

/* s_e in double; m and z from lfb_softmax_stats for the softmax score. */
MOE_HD double lfb_score(const float *l, int e, int score, double m, double z) {
    if (score == LFB_SOFTMAX) return exp((double)l[e] - m) / z;
    return 1.0 / (1.0 + exp(-(double)l[e]));
}

/* Route one token: idx[K] (best first) by s + b, w[K] from s. */
MOE_HD void lfb_route_row(const float *l, const float *bias, int E, int K, int score, int normalize, int32_t *idx,
                          float *w) {
    double m = 0.0, z = 1.0;
    if (score == LFB_SOFTMAX) lfb_softmax_stats(l, E, &m, &z);
    for (int j = 0; j < K; ++j) {
        int best = -1;
        float best_v = 0.0f;
        for (int e = 0; e < E; ++e) {
            int taken = 0;
            for (int q = 0; q < j; ++q) taken |= idx[q] == e;
            if (taken) continue;
            float v = (float)lfb_score(l, e, score, m, z) + bias[e];
            if (best < 0 || moe_ranks_before(v, e, best_v, best)) {
                best = e;
                best_v = v;
            }
        }
        idx[j] = best;
    }
    double S = 0.0;
    for (int j = 0; j < K; ++j) S += lfb_score(l, idx[j], score, m, z);
    for (int j = 0; j < K; ++j) {
        double s = lfb_score(l, idx[j], score, m, z);
        /* All chosen scores 0 (logits near -inf): share equally. */
        w[j] = (float)(!normalize ? s : S > 0.0 ? s / S : 1.0 / K);
    }
}

/* dl[E] (overwritten) from the chosen idx[K] and g[K] = dL/dw. */
MOE_HD void lfb_backward_row(const float *l, const int32_t *idx, const float *g, int E, int K, int score,
                             int normalize, float *dl) {
    double m = 0.0, z = 1.0;
    if (score == LFB_SOFTMAX) lfb_softmax_stats(l, E, &m, &z);
    double S = 0.0, wg = 0.0;
    for (int j = 0; j < K; ++j) S += lfb_score(l, idx[j], score, m, z);
    for (int j = 0; j < K; ++j) wg += (S > 0.0 ? lfb_score(l, idx[j], score, m, z) / S : 0.0) * g[j];
    double sds = 0.0; /* sum_m s_m ds_m, over the chosen (ds is 0 elsewhere) */
    for (int e = 0; e < E; ++e) dl[e] = 0.0f;
    for (int j = 0; j < K; ++j) {
        double s = lfb_score(l, idx[j], score, m, z);
        double ds = !normalize ? (double)g[j] : S > 0.0 ? ((double)g[j] - wg) / S : 0.0;
        sds += s * ds;
        /* sigmoid: ds s (1 - s); softmax: the s ds part of s (ds - sds) */
        dl[idx[j]] = (float)(score == LFB_SOFTMAX ? s * ds : ds * s * (1.0 - s));
    }
    if (score == LFB_SOFTMAX)
        for (int e = 0; e < E; ++e) dl[e] = (float)((double)dl[e] - lfb_score(l, e, score, m, z) * sds);
}

/* b_e += u * sign(c_mean - c_e) */
MOE_HD float lfb_bias_step(float b, int32_t count, double mean, float u) {
    double d = mean - (double)count;
    return d > 0.0 ? b + u : d < 0.0 ? b - u : b;
}

#ifdef __cplusplus
}
#endif
#endif
