/*
 * test_moe_layer: one MoE layer (core/model/moe.c) built directly on the CPU
 * backend, with each router plugin loaded from the build tree.
 *
 *   1. Gradients. Probe L = sum(c .* y) + aux (the weighted auxiliary losses
 *      the forward adds to *aux_total), c random and fixed. moe_layer_backward
 *      with dy = c must give dL/dx and dL/dparam for every tensor (gate,
 *      experts, router params) equal to central finite differences of the
 *      forward (double accumulation of the probe). Coordinates where a
 *      routing decision (expert, kept or slot) differs at +eps or -eps are
 *      skipped and counted. For topk_hard weight="st" the backward is, by
 *      design, not the forward's gradient: the probe adds the surrogate
 *      sum D[t,k] * softk_weight(logits)[t,k] (D = dL/dweight at the base
 *      point, computed here from the saved expert outputs), whose true
 *      gradient is what straight-through promises.
 *      Each check also corrupts one analytic value and makes sure the
 *      comparison catches it (a test that cannot fail proves nothing).
 *   2. An independent double-precision reference of the forward: gate
 *      logits, capacity (k-major priority, position or probs), combine
 *      weights (renorm), experts (gelu/silu/swiglu, biases), y, aux and
 *      z losses, and the routing statistics; plus invariants (kept entries
 *      valid, kept count <= C per expert, distinct slots, counts, dropped +
 *      kept == assigned, y == 0 exactly for a token with nothing kept).
 *   3. A hand-worked top1 case with one token dropped (position and probs).
 *   4. A broken plugin (bad_router.c: expert out of range, negative or NaN
 *      weight, slot out of range or shared, a failing forward, a write past
 *      its declared workspace, a gap in slots declared dense) gives -1 and a
 *      message naming it; its controls (plain, and owning capacity with
 *      dense slots) run forward and backward.
 *   5. T = 0 is a valid empty call.
 */
#include <jansson.h>

#include "layer_harness.h"
#include "runtime/metrics.h"

/* ------------------------------------------------------------------------ */
/* independent reference of the forward, invariants and statistics           */
/* ------------------------------------------------------------------------ */

static double gelu_ref(double v) { return 0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))); }
static double silu_ref(double v) { return v / (1.0 + exp(-v)); }

static void ref_logits(const harness *h, const float *xr, double *l) {
    const moe_layer *L = &h->L;
    int d = h->d, E = h->E, gh = L->cfg.gate_hidden > 0 ? L->cfg.gate_hidden : d;
    double hid[64];
    for (int e = 0; e < E; ++e) l[e] = 0.0;
    if (L->cfg.gate == MOE_GATE_LINEAR) {
        for (int e = 0; e < E; ++e)
            for (int i = 0; i < d; ++i) l[e] += (double)xr[i] * L->wg[(size_t)i * E + e];
        return;
    }
    for (int j = 0; j < gh; ++j) {
        double a = 0.0, b = 0.0;
        for (int i = 0; i < d; ++i) {
            a += (double)xr[i] * L->g1[(size_t)i * gh + j];
            if (L->cfg.gate == MOE_GATE_MLP_HADAMARD) b += (double)xr[i] * L->g2[(size_t)i * gh + j];
        }
        hid[j] = L->cfg.gate == MOE_GATE_MLP ? gelu_ref(a + L->g1b[j]) : a * b;
    }
    for (int e = 0; e < E; ++e)
        for (int j = 0; j < gh; ++j) l[e] += hid[j] * L->wg[(size_t)j * E + e];
}

static void ref_expert(const harness *h, int e, const float *xr, double *out) {
    const moe_layer *L = &h->L;
    int d = h->d, f = h->dff, swiglu = L->cfg.activation == MOE_ACT_SWIGLU, hin = swiglu ? 2 * f : f;
    double H[64], A[64];
    for (int j = 0; j < hin; ++j) {
        double s = L->cfg.expert_bias ? L->b1[(size_t)e * hin + j] : 0.0;
        for (int i = 0; i < d; ++i) s += (double)xr[i] * L->w1[((size_t)e * d + i) * hin + j];
        H[j] = s;
    }
    for (int j = 0; j < f; ++j)
        A[j] = swiglu ? silu_ref(H[j]) * H[f + j] : L->cfg.activation == MOE_ACT_SILU ? silu_ref(H[j]) : gelu_ref(H[j]);
    for (int i = 0; i < d; ++i) {
        double s = L->cfg.expert_bias ? L->b2[(size_t)e * d + i] : 0.0;
        for (int j = 0; j < f; ++j) s += A[j] * L->w2[((size_t)e * f + j) * d + i];
        out[i] = s;
    }
}

static void softmax_ref(const float *l, int E, double *p) {
    double m = -INFINITY, s = 0.0;
    for (int e = 0; e < E; ++e) m = l[e] > m ? l[e] : m;
    for (int e = 0; e < E; ++e) s += (p[e] = exp((double)l[e] - m));
    for (int e = 0; e < E; ++e) p[e] /= s;
}

/* After a forward at the current point (h->y holds its output, aux its
 * added value): everything the layer claims, recomputed here. */
static void check_forward(harness *h, double aux) {
    const moe_layer *L = &h->L;
    const lcase *lc = h->lc;
    int T = h->T, E = h->E, d = h->d, Ko = h->Ko;
    int owns = (L->rinfo.flags & MOE_ROUTER_OWNS_CAPACITY) != 0;
    int perturbs = (L->rinfo.flags & MOE_ROUTER_PERTURBS_LOGITS) != 0;
    const char *nm = lc->name;
    size_t nA = (size_t)T * Ko;

    /* capacity C = ceil(CF * T * K / E), K = experts per token */
    int K = Ko < lc->top_k ? Ko : lc->top_k;
    int C = (int)ceil(lc->cf * T * K / E);
    if (C < 1) C = 1;
    CHECK_MSG(L->C == C && L->stats.C == C && L->stats.T == T && L->stats.K == K,
              "%s: C = %d (stats %d), expected ceil(%g * %d * %d / %d) = %d", nm, L->C, L->stats.C, lc->cf, T, K, E, C);

    /* gate logits */
    int bad = 0;
    double l[16];
    for (int t = 0; t < T; ++t) {
        ref_logits(h, h->x + (size_t)t * d, l);
        for (int e = 0; e < E; ++e)
            if (fabs(l[e] - L->logits[(size_t)t * E + e]) > 1e-5 * (1.0 + fabs(l[e]))) bad++;
    }
    CHECK_MSG(bad == 0, "%s: %d gate logits differ from the reference", nm, bad);

    /* the router's assignment is valid */
    bad = 0;
    for (size_t a = 0; a < nA; ++a) {
        int e = L->expert[a];
        if (e < -1 || e >= E || (e >= 0 && !(L->weight[a] >= 0.0f && isfinite(L->weight[a])))) bad++;
    }
    CHECK_MSG(bad == 0, "%s: %d invalid router outputs", nm, bad);

    /* capacity, recomputed: k-major priority; position = token order,
     * probs = weight descending (ties to the lower token) */
    int32_t *kept = malloc(nA * sizeof *kept), *slot = malloc(nA * sizeof *slot);
    int before[16] = {0}, after[16] = {0};
    if (owns) {
        for (size_t a = 0; a < nA; ++a) {
            kept[a] = L->expert[a];
            slot[a] = L->expert[a] >= 0 ? L->slot[a] : -1;
            if (kept[a] >= 0) before[kept[a]]++, after[kept[a]]++;
        }
    } else {
        int order[64];
        for (int k = 0; k < Ko; ++k) {
            for (int t = 0; t < T; ++t) order[t] = t;
            if (lc->policy == 1) /* insertion sort: weight desc, then token asc */
                for (int i = 1; i < T; ++i)
                    for (int j = i; j > 0; --j) {
                        float wa = L->weight[(size_t)order[j - 1] * Ko + k], wb = L->weight[(size_t)order[j] * Ko + k];
                        if (wb > wa || (wb == wa && order[j] < order[j - 1])) {
                            int tmp = order[j];
                            order[j] = order[j - 1];
                            order[j - 1] = tmp;
                        } else
                            break;
                    }
            for (int i = 0; i < T; ++i) {
                size_t a = (size_t)order[i] * Ko + k;
                int e = L->expert[a];
                kept[a] = slot[a] = -1;
                if (e < 0) continue;
                before[e]++;
                if (after[e] < C) kept[a] = e, slot[a] = after[e]++;
            }
        }
    }
    bad = 0;
    for (size_t a = 0; a < nA; ++a)
        if (L->kept[a] != kept[a] || (kept[a] >= 0 && L->slot[a] != slot[a])) bad++;
    CHECK_MSG(bad == 0, "%s: %d kept/slot entries differ from the reference capacity step", nm, bad);

    /* invariants on the layer's own arrays */
    int nkept = 0, assigned = 0, cnt[16] = {0};
    unsigned char used[16 * 64] = {0};
    bad = 0;
    for (size_t a = 0; a < nA; ++a) {
        int e = L->expert[a], ke = L->kept[a];
        if (e >= 0) assigned++;
        if (ke < 0) continue;
        if (ke != e || L->slot[a] < 0 || L->slot[a] >= C || used[ke * 64 + L->slot[a]]++) bad++;
        else cnt[ke]++, nkept++;
    }
    CHECK_MSG(bad == 0, "%s: %d kept entries invalid (not the routed expert, slot outside [0,C) or shared)", nm, bad);
    int sum_after = 0, cnt_bad = 0;
    for (int e = 0; e < E; ++e) {
        if (cnt[e] > C || L->stats.counts_after[e] != cnt[e] || L->stats.counts_before[e] != before[e]) cnt_bad++;
        sum_after += L->stats.counts_after[e];
    }
    CHECK_MSG(cnt_bad == 0, "%s: per-expert counts exceed C or disagree with the stats", nm);
    CHECK_MSG(sum_after == nkept, "%s: sum counts_after %d != kept %d", nm, sum_after, nkept);
    CHECK_MSG(L->stats.assigned == assigned && L->stats.dropped + nkept == L->stats.assigned,
              "%s: assigned %lld (expected %d), dropped %lld, kept %d", nm, L->stats.assigned, assigned,
              L->stats.dropped, nkept);
    if (lc->drops == 1) CHECK_MSG(L->stats.dropped > 0, "%s: this case should drop assignments", nm);
    if (lc->drops == 0) CHECK_MSG(L->stats.dropped == 0, "%s: this case should drop nothing", nm);

    /* combine weights, experts, y */
    double *cw = malloc(nA * sizeof *cw), yref[64];
    int tokens_dropped = 0, ybad = 0, zero_bad = 0, combine_tokens = 0;
    double rent = 0.0, cent = 0.0, topk = 0.0;
    for (int t = 0; t < T; ++t) {
        double sum = 0.0, p[16];
        int any = 0;
        for (int k = 0; k < Ko; ++k) {
            size_t a = (size_t)t * Ko + k;
            cw[a] = kept[a] >= 0 ? L->weight[a] : 0.0;
            sum += cw[a];
            any |= kept[a] >= 0;
        }
        if (lc->renorm && sum > 0.0)
            for (int k = 0; k < Ko; ++k) cw[(size_t)t * Ko + k] /= sum;
        for (int i = 0; i < d; ++i) yref[i] = 0.0;
        for (int k = 0; k < Ko; ++k) {
            size_t a = (size_t)t * Ko + k;
            if (kept[a] < 0) continue;
            double ye[64];
            ref_expert(h, kept[a], h->x + (size_t)t * d, ye);
            for (int i = 0; i < d; ++i) yref[i] += cw[a] * ye[i];
        }
        const float *yt = h->y + (size_t)t * d;
        for (int i = 0; i < d; ++i)
            if (fabs(yt[i] - yref[i]) > 1e-5 + 1e-4 * fabs(yref[i])) ybad++;
        if (!any) {
            tokens_dropped++;
            for (int i = 0; i < d; ++i) zero_bad += yt[i] != 0.0f;
        }
        /* statistics */
        softmax_ref(L->logits + (size_t)t * E, E, p);
        for (int e = 0; e < E; ++e)
            if (p[e] > 0) rent -= p[e] * log(p[e]);
        for (int k = 0; k < Ko; ++k)
            if (L->expert[(size_t)t * Ko + k] >= 0) topk += p[L->expert[(size_t)t * Ko + k]];
        double ws = 0.0;
        for (int k = 0; k < Ko; ++k) ws += cw[(size_t)t * Ko + k];
        if (any && ws > 0.0) {
            combine_tokens++;
            for (int k = 0; k < Ko; ++k) {
                double q = cw[(size_t)t * Ko + k] / ws;
                if (q > 0) cent -= q * log(q);
            }
        }
    }
    CHECK_MSG(ybad == 0, "%s: %d outputs differ from the double-precision reference", nm, ybad);
    CHECK_MSG(zero_bad == 0, "%s: a token with every assignment dropped has a non-zero output", nm);
    CHECK_MSG(L->stats.tokens_dropped == tokens_dropped, "%s: tokens_dropped %lld, expected %d", nm,
              L->stats.tokens_dropped, tokens_dropped);
    CHECK_MSG(L->stats.combine_tokens == combine_tokens, "%s: combine_tokens %lld, expected %d", nm,
              L->stats.combine_tokens, combine_tokens);
    CHECK_CLOSE(L->stats.router_entropy, rent, 1e-4, 1e-6);
    CHECK_CLOSE(L->stats.combine_entropy, cent, 1e-4, 1e-6);
    CHECK_CLOSE(L->stats.topk_prob, topk, 1e-4, 1e-6);

    /* auxiliary losses: f from the routed counts, P from softmax of the
     * routing logits (l' for noisy routers), z from the gate logits */
    double lb = 0.0, z = 0.0, P[16] = {0};
    int routed = 0;
    for (int e = 0; e < E; ++e) routed += before[e];
    for (int t = 0; t < T; ++t) {
        double p[16];
        softmax_ref((perturbs ? L->route_logits : L->logits) + (size_t)t * E, E, p);
        for (int e = 0; e < E; ++e) P[e] += p[e] / T;
        const float *lz = L->logits + (size_t)t * E;
        double m = -INFINITY, s = 0.0;
        for (int e = 0; e < E; ++e) m = lz[e] > m ? lz[e] : m;
        for (int e = 0; e < E; ++e) s += exp((double)lz[e] - m);
        z += (m + log(s)) * (m + log(s)) / T;
    }
    for (int e = 0; e < E; ++e) lb += E * (routed ? (double)before[e] / routed : 0.0) * P[e];
    CHECK_CLOSE(L->stats.aux_loss, lb, 1e-5, 1e-7);
    CHECK_CLOSE(L->stats.z_loss, z, 1e-5, 1e-7);
    CHECK_CLOSE(aux, (double)lc->aux_w * lb + (double)lc->z_w * z, 1e-5, 1e-8);
    free(kept);
    free(slot);
    free(cw);
}

/* ------------------------------------------------------------------------ */
/* the cases                                                                 */
/* ------------------------------------------------------------------------ */


/* name, plugin, options, gate, gate_hidden, act, expert_bias, policy, renorm, cf, top_k, T, training,
 * aux_w, z_w, probe, drops */
static const lcase cases[] = {
    {"softk linear gelu bias cf2", "softk", NOOPT, LIN, 0, GELU, 1, 0, 0, 2.0, 2, 12, 1, 0.1f, 0.05f, PROBE_FULL, 0},
    {"softk mlp(gh5) silu cf0.5 renorm", "softk", NOOPT, MLP, 5, SILU, 0, 0, 1, 0.5, 2, 12, 1, 0.1f, 0.05f,
     PROBE_FULL, 1},
    {"softk hadamard(gh5) swiglu bias cf0.5 probs", "softk", NOOPT, HAD, 5, SWIGLU, 1, 1, 0, 0.5, 2, 12, 1, 0.1f,
     0.05f, PROBE_FULL, 1},
    {"softk linear swiglu cf0.5 probs renorm", "softk", NOOPT, LIN, 0, SWIGLU, 0, 1, 1, 0.5, 2, 12, 1, 0.1f, 0.05f,
     PROBE_FULL, 1},
    {"softk mlp gelu bias cf2 T=7", "softk", NOOPT, MLP, 0, GELU, 1, 0, 0, 2.0, 2, 7, 1, 0.1f, 0.05f, PROBE_FULL, 0},
    {"softk hadamard aux+z only cf0.5", "softk", NOOPT, HAD, 0, GELU, 1, 0, 0, 0.5, 2, 12, 1, 0.1f, 0.05f,
     PROBE_AUX_ONLY, 1},
    {"top1 linear gelu bias cf0.5", "top1", NOOPT, LIN, 0, GELU, 1, 0, 0, 0.5, 1, 12, 1, 0.1f, 0.05f, PROBE_FULL, 1},
    {"top1 mlp silu cf0.5 probs", "top1", NOOPT, MLP, 0, SILU, 0, 1, 0, 0.5, 1, 12, 1, 0.1f, 0.05f, PROBE_FULL, 1},
    {"top1 hadamard swiglu cf0.5 renorm", "top1", NOOPT, HAD, 0, SWIGLU, 1, 0, 1, 0.5, 1, 12, 1, 0.1f, 0.05f,
     PROBE_FULL, 1},
    {"top1 with top_k=2 (C uses K=1) cf1", "top1", NOOPT, LIN, 0, GELU, 1, 0, 0, 1.0, 2, 12, 1, 0.1f, 0.05f,
     PROBE_FULL, -1},
    {"topk_hard st linear gelu cf0.5", "topk_hard", OPT_S("weight", "st"), LIN, 0, GELU, 1, 0, 0, 0.5, 2, 12, 1, 0.1f,
     0.05f, PROBE_ST, 1},
    {"topk_hard st hadamard swiglu cf2", "topk_hard", OPT_S("weight", "st"), HAD, 0, SWIGLU, 0, 0, 0, 2.0, 2, 12, 1,
     0.1f, 0.05f, PROBE_ST, 0},
    {"noisy_topk learned linear gelu cf2", "noisy_topk", OPT_B("learned", 1), LIN, 0, GELU, 1, 0, 0, 2.0, 2, 12, 1,
     0.1f, 0.05f, PROBE_FULL, 0},
    {"noisy_topk learned mlp silu cf0.5 probs renorm", "noisy_topk", OPT_B("learned", 1), MLP, 0, SILU, 1, 1, 1, 0.5,
     2, 12, 1, 0.1f, 0.05f, PROBE_FULL, 1},
    {"noisy_topk learned aux+z only cf0.5", "noisy_topk", OPT_B("learned", 1), LIN, 0, GELU, 1, 0, 0, 0.5, 2, 12, 1,
     0.1f, 0.05f, PROBE_AUX_ONLY, 1},
    {"expert_choice linear gelu cf1", "expert_choice", NOOPT, LIN, 0, GELU, 1, 0, 0, 1.0, 2, 12, 1, 0.1f, 0.05f,
     PROBE_FULL, 0},
    {"expert_choice mlp swiglu cf0.5 renorm", "expert_choice", NOOPT, MLP, 0, SWIGLU, 0, 0, 1, 0.5, 2, 12, 1, 0.1f,
     0.05f, PROBE_FULL, 0},
    {"expert_choice max_per_token=2 linear silu cf0.5", "expert_choice", OPT_I("max_per_token", 2), LIN, 0, SILU, 1,
     0, 0, 0.5, 2, 12, 1, 0.1f, 0.05f, PROBE_FULL, 1},
    {"expert_choice max_per_token=2 hadamard probs renorm", "expert_choice", OPT_I("max_per_token", 2), HAD, 0, GELU,
     1, 1, 1, 0.5, 2, 12, 1, 0.1f, 0.05f, PROBE_FULL, 1},
    {"hash (no router grad) mlp gelu cf0.5", "hash", NOOPT, MLP, 0, GELU, 1, 0, 0, 0.5, 2, 12, 1, 0.1f, 0.05f,
     PROBE_FULL, 1},
};

static void run_case(const lcase *lc, uint64_t seed) {
    harness h;
    if (h_open(&h, lc, seed) == 0) {
        char err[1024];
        double aux = 0.0;
        int rc = moe_layer_forward(&h.L, h.x, h.ids, h.T, lc->training, h.key, NULL, h.y, &aux, err, sizeof err);
        CHECK_MSG(rc == 0, "%s: forward: %s", lc->name, err);
        if (rc == 0) check_forward(&h, aux);
        gradcheck(&h);
    }
    h_close(&h);
}

/* ------------------------------------------------------------------------ */
/* hand-worked top1 case                                                     */
/* ------------------------------------------------------------------------ */

/* d = E = 4, linear gate w = 2 I, so logits = 2 x. Tokens 0,1,2 prefer
 * expert 0 (logits 2, 4, 3), tokens 3,4,5 experts 1,2,3. C = ceil(1.0 * 6 *
 * 1 / 4) = 2, so expert 0 keeps two of its three tokens: with "position"
 * tokens 0 and 1 (token 2 dropped), with "probs" the two most confident,
 * tokens 1 and 2 (token 0 dropped). */
static void test_hand_top1(int policy) {
    lcase lc = {policy ? "hand top1 probs" : "hand top1 position", "top1", NOOPT, LIN, 0, GELU, 1, policy, 0, 1.0, 1,
                6, 1, 0.1f, 0.05f, PROBE_FULL, 1};
    harness h;
    if (h_open_dims(&h, &lc, 4, 4, 11) != 0) {
        h_close(&h);
        return;
    }
    moe_layer *L = &h.L;
    for (int i = 0; i < 4; ++i)
        for (int e = 0; e < 4; ++e) L->wg[i * 4 + e] = i == e ? 2.0f : 0.0f;
    const float xs[6][4] = {{1, 0, 0, 0}, {2, 0, 0, 0}, {1.5f, 0, 0, 0}, {0, 1, 0, 0}, {0, 0, 1, 0}, {0, 0, 0, 1}};
    memcpy(h.x, xs, sizeof xs);
    char err[1024];
    double aux = 0.0;
    int rc = moe_layer_forward(L, h.x, h.ids, 6, 1, h.key, NULL, h.y, &aux, err, sizeof err);
    CHECK_MSG(rc == 0, "%s: %s", lc.name, err);
    if (rc != 0) {
        h_close(&h);
        return;
    }
    int dropped_tok = policy ? 0 : 2;
    const int32_t want_expert[6] = {0, 0, 0, 1, 2, 3};
    const int32_t want_slot_pos[6] = {0, 1, -1, 0, 0, 0}, want_slot_probs[6] = {-1, 0, 1, 0, 0, 0};
    for (int t = 0; t < 6; ++t) {
        CHECK(L->expert[t] == want_expert[t]);
        CHECK(L->kept[t] == (t == dropped_tok ? -1 : want_expert[t]));
        CHECK(L->slot[t] == (policy ? want_slot_probs[t] : want_slot_pos[t]));
        /* top1 weight = softmax(l)[e] */
        double s = 0.0, le = 2.0 * xs[t][want_expert[t]];
        for (int e = 0; e < 4; ++e) s += exp(2.0 * xs[t][e]);
        CHECK_CLOSE(L->weight[t], exp(le) / s, 1e-5, 1e-7);
    }
    const moe_layer_stats *s = &L->stats;
    CHECK(L->C == 2 && s->C == 2 && s->T == 6 && s->K == 1);
    CHECK(s->assigned == 6);
    CHECK(s->dropped == 1);
    CHECK(s->tokens_dropped == 1);
    const int32_t want_before[4] = {3, 1, 1, 1}, want_after[4] = {2, 1, 1, 1};
    for (int e = 0; e < 4; ++e) CHECK(s->counts_before[e] == want_before[e] && s->counts_after[e] == want_after[e]);
    for (int i = 0; i < 4; ++i) CHECK(h.y[dropped_tok * 4 + i] == 0.0f);
    check_forward(&h, aux);

    /* the metrics built from these stats: drop_rate 1/6, token_drop_rate
     * 1/6, used_capacity = max kept / C = 1 */
    moe_layer_accum acc;
    moe_layer_accum_init(&acc, 4);
    moe_layer_accum_add(&acc, s);
    json_t *obj = json_object();
    moe_metrics_put_routing(obj, &acc, 1);
    CHECK_CLOSE(json_real_value(json_object_get(obj, "drop_rate")), 1.0 / 6.0, 1e-12, 0);
    CHECK_CLOSE(json_real_value(json_object_get(obj, "token_drop_rate")), 1.0 / 6.0, 1e-12, 0);
    CHECK_CLOSE(json_real_value(json_object_get(obj, "used_capacity")), 1.0, 1e-12, 0);
    json_decref(obj);
    moe_layer_accum_free(&acc);
    h_close(&h);
}

/* ------------------------------------------------------------------------ */
/* a broken plugin                                                           */
/* ------------------------------------------------------------------------ */

static void test_bad_router(void) {
    static const char *const want[] = {"expert", "expert", "weight", "weight", "slot", "slot", "deliberate failure",
                                       "", "workspace", "declares MOE_ROUTER_DENSE_SLOTS, but expert 0's", ""};
    for (int mode = 0; mode <= 10; ++mode) {
        lcase lc = {"bad_router", MOE_TEST_BAD_ROUTER, OPT_I("mode", 0), LIN, 0, GELU, 1, 0, 0, 1.0, 1, 8, 1,
                    0.1f, 0.05f, PROBE_FULL, -1};
        lc.opts[0].i = mode;
        harness h;
        if (h_open(&h, &lc, 21) != 0) {
            h_close(&h);
            continue;
        }
        char err[1024] = "";
        double aux = 0.0;
        int rc = moe_layer_forward(&h.L, h.x, h.ids, 8, 1, h.key, NULL, h.y, &aux, err, sizeof err);
        if (mode != 7 && mode != 10) {
            CHECK_MSG(rc == -1, "bad_router mode %d: forward returned %d, expected -1", mode, rc);
            CHECK_MSG(strstr(err, "bad_router") != NULL && strstr(err, want[mode]) != NULL,
                      "bad_router mode %d: message '%s' should name the router and '%s'", mode, err, want[mode]);
        } else {
            CHECK_MSG(rc == 0, "bad_router control: %s", err);
            h.be->zero(h.be, h.dx, (size_t)8 * h.d * sizeof(float));
            CHECK(moe_layer_backward(&h.L, h.ids, h.c, h.dx, 1, h.key, err, sizeof err) == 0);
        }
        h_close(&h);
    }
}

/* T = 0: a valid empty call; nothing is added to aux, the stats are zero. */
static void test_empty(void) {
    lcase lc = {"T=0", "softk", NOOPT, MLP, 0, GELU, 1, 0, 0, 1.0, 2, 0, 1, 0.1f, 0.05f, PROBE_FULL, -1};
    harness h;
    if (h_open(&h, &lc, 31) == 0) {
        char err[1024];
        double aux = 0.25;
        int rc = moe_layer_forward(&h.L, h.x, h.ids, 0, 1, h.key, NULL, h.y, &aux, err, sizeof err);
        CHECK_MSG(rc == 0, "T=0 forward: %s", err);
        CHECK(aux == 0.25);
        CHECK(h.L.stats.T == 0 && h.L.stats.assigned == 0 && h.L.stats.dropped == 0 && h.L.stats.tokens_dropped == 0);
        if (rc == 0) CHECK(moe_layer_backward(&h.L, h.ids, h.c, h.dx, 1, h.key, err, sizeof err) == 0);
    }
    h_close(&h);
}

int main(void) {
    printf("gradient checks (eps %g, tolerance %g * max|grad| + %g):\n", (double)FD_EPS, RTOL, ATOL);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) run_case(&cases[i], 1000 + i);
    test_hand_top1(0);
    test_hand_top1(1);
    test_empty();
    test_bad_router();
    return moe_test_summary("test_model_moe_layer");
}
