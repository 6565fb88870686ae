#include "runtime/metrics.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void moe_layer_accum_init(moe_layer_accum *a, int E) {
    memset(a, 0, sizeof *a);
    a->E = E;
    a->counts_before = calloc((size_t)E, sizeof *a->counts_before);
    a->counts_after = calloc((size_t)E, sizeof *a->counts_after);
}

void moe_layer_accum_free(moe_layer_accum *a) {
    free(a->counts_before);
    free(a->counts_after);
    memset(a, 0, sizeof *a);
}

double moe_load_cv(const int32_t *counts, int E) {
    double mean = 0.0, var = 0.0;
    for (int e = 0; e < E; ++e) mean += counts[e];
    mean /= E;
    if (mean <= 0.0) return 0.0;
    for (int e = 0; e < E; ++e) var += (counts[e] - mean) * (counts[e] - mean);
    return sqrt(var / E) / mean;
}

void moe_layer_accum_add(moe_layer_accum *a, const moe_layer_stats *s) {
    a->tokens += s->T;
    a->assigned += s->assigned;
    a->dropped += s->dropped;
    a->tokens_dropped += s->tokens_dropped;
    a->combine_tokens += s->combine_tokens;
    a->router_entropy += s->router_entropy;
    a->combine_entropy += s->combine_entropy;
    a->topk_prob += s->topk_prob;
    a->aux_loss += s->aux_loss * s->T;
    a->z_loss += s->z_loss * s->T;
    a->cv_after += moe_load_cv(s->counts_after, a->E) * s->T;
    a->cv_before += moe_load_cv(s->counts_before, a->E) * s->T;
    int max_after = 0;
    for (int e = 0; e < a->E; ++e) {
        a->counts_before[e] += s->counts_before[e];
        a->counts_after[e] += s->counts_after[e];
        if (s->counts_after[e] > max_after) max_after = s->counts_after[e];
    }
    double used = s->C > 0 ? (double)max_after / s->C : 0.0;
    if (used > a->used_capacity) a->used_capacity = used;
}

static double ratio(double num, double den) { return den > 0 ? num / den : 0.0; }

/* The per-layer values, in the order of the field names below. */
enum { F_DROP, F_TOKEN_DROP, F_CV, F_CV_BEFORE, F_USED, F_RENT, F_CENT, F_TOPK, F_AUX, F_Z, F_COUNT };
static const char *const field_names[F_COUNT] = {
    "drop_rate", "token_drop_rate", "load_cv", "load_cv_before", "used_capacity", "router_entropy",
    "combine_entropy", "mean_topk_prob", "aux_loss", "z_loss"};

static void layer_values(const moe_layer_accum *a, double v[F_COUNT]) {
    v[F_DROP] = ratio((double)a->dropped, (double)a->assigned);
    v[F_TOKEN_DROP] = ratio((double)a->tokens_dropped, (double)a->tokens);
    v[F_CV] = ratio(a->cv_after, (double)a->tokens);
    v[F_CV_BEFORE] = ratio(a->cv_before, (double)a->tokens);
    v[F_USED] = a->used_capacity;
    v[F_RENT] = ratio(a->router_entropy, (double)a->tokens);
    v[F_CENT] = ratio(a->combine_entropy, (double)a->combine_tokens);
    v[F_TOPK] = ratio(a->topk_prob, (double)a->tokens);
    v[F_AUX] = ratio(a->aux_loss, (double)a->tokens);
    v[F_Z] = ratio(a->z_loss, (double)a->tokens);
}

void moe_metrics_put_routing(json_t *obj, const moe_layer_accum *layers, int n_layers) {
    double mean[F_COUNT] = {0};
    json_t *arr = json_array();
    for (int l = 0; l < n_layers; ++l) {
        double v[F_COUNT];
        layer_values(&layers[l], v);
        json_t *lo = json_object();
        json_object_set_new(lo, "layer", json_integer(l));
        for (int i = 0; i < F_COUNT; ++i) {
            json_object_set_new(lo, field_names[i], json_real(v[i]));
            mean[i] += v[i] / n_layers;
        }
        json_t *cb = json_array(), *ca = json_array();
        for (int e = 0; e < layers[l].E; ++e) {
            json_array_append_new(cb, json_integer(layers[l].counts_before[e]));
            json_array_append_new(ca, json_integer(layers[l].counts_after[e]));
        }
        json_object_set_new(lo, "expert_counts", ca);
        json_object_set_new(lo, "expert_counts_before", cb);
        json_array_append_new(arr, lo);
    }
    for (int i = 0; i < F_COUNT; ++i) json_object_set_new(obj, field_names[i], json_real(mean[i]));
    json_object_set_new(obj, "layers", arr);
}
