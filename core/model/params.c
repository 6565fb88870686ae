#include "model/params.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "moe/philox.h"

void moe_params_init_set(moe_param_set *ps, int with_grads) {
    memset(ps, 0, sizeof *ps);
    ps->with_grads = with_grads;
}

void moe_params_declare(moe_param_set *ps, const char *name, int ndim, const int64_t *shape,
                        moe_init_kind init, float init_value, int decay, float **value, float **grad) {
    if (ps->n == ps->cap) {
        ps->cap = ps->cap ? 2 * ps->cap : 64;
        ps->entries = realloc(ps->entries, (size_t)ps->cap * sizeof *ps->entries);
        if (!ps->entries) {
            fprintf(stderr, "moehost: out of memory declaring parameters\n");
            exit(1);
        }
    }
    moe_param_entry *e = &ps->entries[ps->n++];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s", name);
    e->ndim = ndim;
    e->numel = 1;
    for (int i = 0; i < ndim; ++i) {
        e->shape[i] = shape[i];
        e->numel *= (size_t)shape[i];
    }
    e->offset = ps->total;
    /* Keep every tensor 16-element aligned so vector loads never straddle. */
    ps->total += (e->numel + 15) & ~(size_t)15;
    e->init = init;
    e->init_value = init_value;
    e->decay = decay;
    e->value = value;
    e->grad = grad;
}

static void draw_initial_values(const moe_param_entry *e, int index, uint64_t seed, float *out) {
    moe_rng_key key = {seed, 0, (uint32_t)index, MOE_RNG_STREAM_INIT};
    for (size_t i = 0; i < e->numel; ++i) {
        switch (e->init) {
        case MOE_INIT_ZEROS: out[i] = 0.0f; break;
        case MOE_INIT_CONST: out[i] = e->init_value; break;
        case MOE_INIT_NORMAL: out[i] = e->init_value * moe_rng_normal(key, i); break;
        case MOE_INIT_UNIFORM: out[i] = e->init_value * (2.0f * moe_rng_uniform(key, i) - 1.0f); break;
        }
    }
}

int moe_params_allocate(moe_param_set *ps, moe_backend *be, uint64_t seed) {
    size_t bytes = (ps->total ? ps->total : 1) * sizeof(float);
    ps->values = be->alloc(be, bytes);
    if (!ps->values) return -1;
    if (ps->with_grads) {
        ps->grads = be->alloc(be, bytes);
        ps->adam_m = be->alloc(be, bytes);
        ps->adam_v = be->alloc(be, bytes);
        ps->decay_mask = be->alloc(be, ps->total ? ps->total : 1);
        if (!ps->grads || !ps->adam_m || !ps->adam_v || !ps->decay_mask) return -1;
    }
    /* Initial values are drawn on the host, then copied once. */
    float *host = calloc(ps->total ? ps->total : 1, sizeof(float));
    uint8_t *mask = calloc(ps->total ? ps->total : 1, 1);
    if (!host || !mask) {
        free(host);
        free(mask);
        return -1;
    }
    for (int i = 0; i < ps->n; ++i) {
        moe_param_entry *e = &ps->entries[i];
        draw_initial_values(e, i, seed, host + e->offset);
        if (e->decay) memset(mask + e->offset, 1, e->numel);
        if (e->value) *e->value = ps->values + e->offset;
        if (e->grad) *e->grad = ps->with_grads ? ps->grads + e->offset : NULL;
    }
    be->from_host(be, ps->values, host, ps->total * sizeof(float));
    if (ps->with_grads) be->from_host(be, ps->decay_mask, mask, ps->total);
    free(host);
    free(mask);
    return 0;
}

void moe_params_free(moe_param_set *ps, moe_backend *be) {
    be->free(be, ps->values);
    be->free(be, ps->grads);
    be->free(be, ps->adam_m);
    be->free(be, ps->adam_v);
    be->free(be, ps->decay_mask);
    free(ps->entries);
    memset(ps, 0, sizeof *ps);
}

/* FNV-1a over names and shapes. */
uint64_t moe_params_layout_hash(const moe_param_set *ps) {
    uint64_t h = 1469598103934665603ULL;
    for (int i = 0; i < ps->n; ++i) {
        const moe_param_entry *e = &ps->entries[i];
        for (const char *c = e->name; *c; ++c) h = (h ^ (uint8_t)*c) * 1099511628211ULL;
        for (int d = 0; d < e->ndim; ++d) h = (h ^ (uint64_t)e->shape[d]) * 1099511628211ULL;
    }
    return h;
}
