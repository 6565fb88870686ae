/*
 * MoE Routing Bench SDK: small helpers for router plugins (header-only).
 *
 *   - option resolution against a plugin's moe_option_spec table, with the
 *     error messages the host expects;
 *   - the row operations most routers are made of: softmax, top-k with the
 *     project's tie rule, and the softmax-over-selected (softk) weights and
 *     their backward.
 *
 * All functions are static inline, so a plugin links nothing extra. The row
 * operations are marked MOE_HD and also compile in CUDA device code.
 */
#ifndef MOE_ROUTER_UTIL_H
#define MOE_ROUTER_UTIL_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "abi.h"
#include "philox.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ */
/* Messages                                                            */
/* ------------------------------------------------------------------ */

/* printf into a plugin's message buffer; returns `st` so that
 * `return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "...")` reads well. */
static inline moe_status moe_fail(char *msg, size_t cap, moe_status st, const char *fmt, ...) {
    if (msg && cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, cap, fmt, ap);
        va_end(ap);
    }
    return st;
}

/* ------------------------------------------------------------------ */
/* Options                                                             */
/* ------------------------------------------------------------------ */

static inline const char *moe_opt_type_name(moe_opt_type t) {
    switch (t) {
    case MOE_OPT_BOOL: return "a boolean";
    case MOE_OPT_INT: return "an integer";
    case MOE_OPT_FLOAT: return "a number";
    case MOE_OPT_STRING: return "a string";
    }
    return "?";
}

static inline int moe_choice_ok(const char *choices, const char *s) {
    size_t n = strlen(s);
    const char *p = choices;
    while (p && *p) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, s, n) == 0) return 1;
        p = bar ? bar + 1 : NULL;
    }
    return 0;
}

/* Parse a spec's default_value text into `out`. */
static inline int moe_opt_parse_default(const moe_option_spec *sp, moe_option *out) {
    const char *d = sp->default_value ? sp->default_value : "";
    out->key = sp->key;
    out->type = sp->type;
    out->i = 0;
    out->f = 0.0;
    out->s = NULL;
    switch (sp->type) {
    case MOE_OPT_BOOL: out->i = (strcmp(d, "true") == 0); return 1;
    case MOE_OPT_INT: out->i = strtoll(d, NULL, 10); out->f = (double)out->i; return 1;
    case MOE_OPT_FLOAT: out->f = strtod(d, NULL); return 1;
    case MOE_OPT_STRING: out->s = d; return 1;
    }
    return 0;
}

/* Resolve the options given in the config against the spec table.
 * out[n_spec] receives one value per spec entry, in spec order: the given
 * value or the default. Unknown keys, wrong types, values outside a choice
 * list or range are refused with a message naming the key and the fix.
 * An integer is accepted where a number is expected. */
static inline moe_status moe_options_resolve(const moe_option_spec *spec, int n_spec,
                                             const moe_option *opts, int n_opts,
                                             moe_option *out, char *msg, size_t cap) {
    for (int j = 0; j < n_spec; ++j) moe_opt_parse_default(&spec[j], &out[j]);
    if (n_opts > 0 && !opts) return moe_fail(msg, cap, MOE_ERR_INVALID_ARG, "%d options given but no option array", n_opts);
    for (int i = 0; i < n_opts; ++i) {
        const moe_option *o = &opts[i];
        if (!o->key) return moe_fail(msg, cap, MOE_ERR_OPTION, "option %d has no key", i);
        if (o->type == MOE_OPT_STRING && !o->s)
            return moe_fail(msg, cap, MOE_ERR_OPTION, "option '%s' is a string without a value", o->key);
        int j = 0;
        while (j < n_spec && strcmp(spec[j].key, o->key) != 0) ++j;
        if (j == n_spec) {
            char known[512];
            size_t used = 0;
            known[0] = '\0';
            for (int k = 0; k < n_spec && used + 2 < sizeof known; ++k) {
                int w = snprintf(known + used, sizeof known - used, "%s%s", k ? ", " : "", spec[k].key);
                if (w < 0) break;
                used += (size_t)w;
            }
            return moe_fail(msg, cap, MOE_ERR_OPTION, "unknown option '%s'; this router accepts: %s",
                            o->key, n_spec ? known : "no options");
        }
        const moe_option_spec *sp = &spec[j];
        moe_option v = *o;
        v.key = sp->key;
        if (sp->type == MOE_OPT_FLOAT && o->type == MOE_OPT_INT) {
            v.type = MOE_OPT_FLOAT;
            v.f = (double)o->i;
        }
        if (v.type != sp->type)
            return moe_fail(msg, cap, MOE_ERR_OPTION, "option '%s' must be %s (default %s), got %s",
                            sp->key, moe_opt_type_name(sp->type), sp->default_value,
                            moe_opt_type_name(o->type));
        if (sp->type == MOE_OPT_STRING && sp->choices && !moe_choice_ok(sp->choices, v.s))
            return moe_fail(msg, cap, MOE_ERR_OPTION, "option '%s' = \"%s\" is not one of %s",
                            sp->key, v.s, sp->choices);
        if (sp->min < sp->max && (sp->type == MOE_OPT_INT || sp->type == MOE_OPT_FLOAT)) {
            double x = sp->type == MOE_OPT_INT ? (double)v.i : v.f;
            if (!(x >= sp->min && x <= sp->max))
                return moe_fail(msg, cap, MOE_ERR_OPTION, "option '%s' = %g is outside [%g, %g]",
                                sp->key, x, sp->min, sp->max);
        }
        if (sp->type == MOE_OPT_INT) v.f = (double)v.i;
        out[j] = v;
    }
    return MOE_OK;
}

/* The resolved value for `key` (which must be in the spec). */
static inline const moe_option *moe_option_get(const moe_option *resolved, int n, const char *key) {
    for (int i = 0; i < n; ++i)
        if (strcmp(resolved[i].key, key) == 0) return &resolved[i];
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Row operations                                                      */
/* ------------------------------------------------------------------ */

/* p = softmax(l / temperature) over n entries. */
MOE_HD void moe_softmax_row(const float *l, float *p, int n, float temperature) {
    float m = -INFINITY;
    for (int i = 0; i < n; ++i) m = l[i] > m ? l[i] : m;
    float s = 0.0f;
    for (int i = 0; i < n; ++i) {
        p[i] = expf((l[i] - m) / temperature);
        s += p[i];
    }
    for (int i = 0; i < n; ++i) p[i] /= s;
}

/* log(sum(exp(l))) over n entries. */
MOE_HD float moe_logsumexp_row(const float *l, int n) {
    float m = -INFINITY;
    for (int i = 0; i < n; ++i) m = l[i] > m ? l[i] : m;
    float s = 0.0f;
    for (int i = 0; i < n; ++i) s += expf(l[i] - m);
    return m + logf(s);
}

/* Does a before b in routing order: larger value first, ties to the lower
 * index. NaN never wins against a number. */
MOE_HD int moe_ranks_before(float va, int ia, float vb, int ib) {
    if (va != va) return 0;
    if (vb != vb) return 1;
    return va > vb || (va == vb && ia < ib);
}

/* idx[0..k) = indices of the k largest of l[0..n), largest first, ties to
 * the lower index. k <= n. O(n*k): n is the number of experts. */
MOE_HD void moe_topk_row(const float *l, int n, int k, int32_t *idx) {
    for (int j = 0; j < k; ++j) {
        int best = -1;
        for (int i = 0; i < n; ++i) {
            int taken = 0;
            for (int q = 0; q < j; ++q) taken |= (idx[q] == i);
            if (taken) continue;
            if (best < 0 || moe_ranks_before(l[i], i, l[best], best)) best = i;
        }
        idx[j] = best;
    }
}

/* softk weights: w[j] = softmax over the k selected logits / temperature. */
MOE_HD void moe_softk_weights(const float *l, const int32_t *idx, int k, float temperature, float *w) {
    float m = -INFINITY;
    for (int j = 0; j < k; ++j) m = l[idx[j]] > m ? l[idx[j]] : m;
    float s = 0.0f;
    for (int j = 0; j < k; ++j) {
        w[j] = expf((l[idx[j]] - m) / temperature);
        s += w[j];
    }
    for (int j = 0; j < k; ++j) w[j] /= s;
}

/* Backward of moe_softk_weights: dl[idx[j]] += w_j (dw_j - sum_i w_i dw_i) / T.
 * dl is a full row of n entries; unselected entries are left as they are. */
MOE_HD void moe_softk_weights_backward(const int32_t *idx, const float *w, const float *dw, int k,
                                       float temperature, float *dl) {
    float dot = 0.0f;
    for (int j = 0; j < k; ++j) dot += w[j] * dw[j];
    for (int j = 0; j < k; ++j) dl[idx[j]] += w[j] * (dw[j] - dot) / temperature;
}

/* 1 if every value is finite. */
static inline int moe_all_finite(const float *v, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (!isfinite(v[i])) return 0;
    return 1;
}

#ifdef __cplusplus
}
#endif
#endif
