/*
 * Routing metrics of an evaluation, accumulated over its batches per MoE
 * layer and turned into the JSON fields of metrics.jsonl. The formulas are
 * in docs/metrics.md.
 */
#ifndef MOE_METRICS_H
#define MOE_METRICS_H

#include <jansson.h>
#include <stdint.h>

#include "model/moe.h"

typedef struct moe_layer_accum {
    int E;
    long long tokens, assigned, dropped, tokens_dropped, combine_tokens;
    double router_entropy, combine_entropy, topk_prob;
    double aux_loss, z_loss;           /* token-weighted sums */
    double cv_after, cv_before;        /* token-weighted sums of per-batch CVs */
    double used_capacity;              /* max over batches */
    long long *counts_before, *counts_after;
} moe_layer_accum;

void moe_layer_accum_init(moe_layer_accum *a, int E);
void moe_layer_accum_free(moe_layer_accum *a);
/* Add the statistics of one forward. */
void moe_layer_accum_add(moe_layer_accum *a, const moe_layer_stats *s);

/* Coefficient of variation (population std / mean) of counts; 0 if mean is 0. */
double moe_load_cv(const int32_t *counts, int E);

/* Set the routing fields of `obj`: per-layer objects under "layers" and
 * their means at the top level. */
void moe_metrics_put_routing(json_t *obj, const moe_layer_accum *layers, int n_layers);

#endif
