/*
 * Rotary position embedding and causal multi-head softmax attention on the
 * CPU, as plain loops over (batch, head): S is at most a few hundred here, and
 * keeping each (b,h) on one thread makes every output element the work of one
 * thread, so the results do not depend on scheduling.
 *
 * Layout: qkv[B,S,3*H*hd], each token row = [q heads | k heads | v heads],
 * each head hd contiguous. out[B,S,H*hd]. probs[B,H,S,S].
 */
#include "backend/cpu/cpu_ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

/* Rotate the pairs (2i, 2i+1) of every q and k head of token s by the angle
 * sign * s * theta^(-2i/hd). sign = -1 is the inverse rotation, which is also
 * the transpose, so rope_bwd is rope_fwd with the angle negated. The angle is
 * formed in double: s * freq reaches several hundred radians. */
static void rope_rotate(float *qkv, int B, int S, int H, int hd, float theta, double sign) {
    const int C = H * hd;
#pragma omp parallel for schedule(static)
    for (int bs = 0; bs < B * S; ++bs) {
        int s = bs % S;
        float *row = qkv + (size_t)bs * 3 * C;
        for (int i = 0; i < hd / 2; ++i) {
            double angle = sign * s * pow((double)theta, -2.0 * i / hd);
            float c = (float)cos(angle), sn = (float)sin(angle);
            for (int h = 0; h < 2 * H; ++h) { /* the H q heads, then the H k heads */
                float *x = row + (size_t)h * hd + 2 * i;
                float x0 = x[0], x1 = x[1];
                x[0] = x0 * c - x1 * sn;
                x[1] = x0 * sn + x1 * c;
            }
        }
    }
}

void cpu_rope_fwd(moe_backend *be, float *qkv, int B, int S, int H, int hd, float theta) {
    (void)be;
    rope_rotate(qkv, B, S, H, hd, theta, 1.0);
}

void cpu_rope_bwd(moe_backend *be, float *dqkv, int B, int S, int H, int hd, float theta) {
    (void)be;
    rope_rotate(dqkv, B, S, H, hd, theta, -1.0);
}

/* For each query s of head h:
 *   a[j] = <q_s, k_j> / sqrt(hd) for j <= s,  p = softmax(a),  out_s = sum_j p[j] v_j. */
void cpu_attention_fwd(moe_backend *be, const float *qkv, float *out, float *probs, int B, int S,
                       int H, int hd) {
    (void)be;
    const int C = H * hd;
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int s = 0; s < S; ++s) {
                const float *q = qkv + ((size_t)b * S + s) * 3 * C + (size_t)h * hd;
                float *p = probs + (((size_t)b * H + h) * S + s) * S;
                float maxv = -INFINITY;
                for (int j = 0; j <= s; ++j) {
                    const float *k = qkv + ((size_t)b * S + j) * 3 * C + C + (size_t)h * hd;
                    float dot = 0.0f;
                    for (int i = 0; i < hd; ++i) dot += q[i] * k[i];
                    p[j] = dot * scale;
                    if (p[j] > maxv) maxv = p[j];
                }
                /* subtract the max so exp never overflows */
                float sum = 0.0f;
                for (int j = 0; j <= s; ++j) {
                    p[j] = expf(p[j] - maxv);
                    sum += p[j];
                }
                float inv = 1.0f / sum;
                for (int j = 0; j <= s; ++j) p[j] *= inv;
                for (int j = s + 1; j < S; ++j) p[j] = 0.0f; /* causal: future keys get nothing */

                float *o = out + ((size_t)b * S + s) * C + (size_t)h * hd;
                for (int i = 0; i < hd; ++i) o[i] = 0.0f;
                for (int j = 0; j <= s; ++j) {
                    const float *v = qkv + ((size_t)b * S + j) * 3 * C + 2 * C + (size_t)h * hd;
                    for (int i = 0; i < hd; ++i) o[i] += p[j] * v[i];
                }
            }
}

/* Backward, per query s (go = dout_s):
 *   dv_j += p[j] go                      dp[j] = <go, v_j>
 *   da[j] = p[j] (dp[j] - sum_i p[i] dp[i])          (softmax backward)
 *   dq_s += da[j] k_j / sqrt(hd)         dk_j += da[j] q_s / sqrt(hd)
 * dk_j and dv_j collect over queries s >= j; all of them live in the same
 * (b,h), so one thread sums them in query order. */
void cpu_attention_bwd(moe_backend *be, const float *qkv, const float *probs, const float *dout,
                       float *dqkv, int B, int S, int H, int hd) {
    (void)be;
    const int C = H * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    /* scratch for dp: one row of S per thread, allocated once outside the loop */
    int nthreads = omp_get_max_threads();
    float *dp_all = malloc((size_t)nthreads * (S > 0 ? S : 1) * sizeof *dp_all);
    if (!dp_all) {
        fprintf(stderr, "cpu_attention_bwd: out of memory\n");
        abort();
    }
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
            float *dp = dp_all + (size_t)omp_get_thread_num() * S;
            for (int s = 0; s < S; ++s) { /* this head's dq, dk, dv are ours alone: clear them */
                float *row = dqkv + ((size_t)b * S + s) * 3 * C + (size_t)h * hd;
                memset(row, 0, (size_t)hd * sizeof *row);
                memset(row + C, 0, (size_t)hd * sizeof *row);
                memset(row + 2 * C, 0, (size_t)hd * sizeof *row);
            }
            for (int s = 0; s < S; ++s) {
                const float *q = qkv + ((size_t)b * S + s) * 3 * C + (size_t)h * hd;
                float *dq = dqkv + ((size_t)b * S + s) * 3 * C + (size_t)h * hd;
                const float *p = probs + (((size_t)b * H + h) * S + s) * S;
                const float *go = dout + ((size_t)b * S + s) * C + (size_t)h * hd;
                float sum_pdp = 0.0f;
                for (int j = 0; j <= s; ++j) {
                    size_t vj = ((size_t)b * S + j) * 3 * C + 2 * C + (size_t)h * hd;
                    float dot = 0.0f;
                    for (int i = 0; i < hd; ++i) {
                        dot += go[i] * qkv[vj + i];
                        dqkv[vj + i] += p[j] * go[i];
                    }
                    dp[j] = dot;
                    sum_pdp += p[j] * dot;
                }
                for (int j = 0; j <= s; ++j) {
                    size_t kj = ((size_t)b * S + j) * 3 * C + C + (size_t)h * hd;
                    float da = p[j] * (dp[j] - sum_pdp) * scale;
                    for (int i = 0; i < hd; ++i) {
                        dq[i] += da * qkv[kj + i];
                        dqkv[kj + i] += da * q[i];
                    }
                }
            }
        }
    free(dp_all);
}
