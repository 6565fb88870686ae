/*
 * TinyMoE forward and backward. One block:
 *
 *   n1 = norm1(x);  qkv = n1 Wqkv + bqkv;  (RoPE on q, k);  att = attention(qkv)
 *   x_mid = x + dropout(att Wo + bo)
 *   n2 = norm2(x_mid);  x' = x_mid + dropout(MoE(n2))
 *
 * and the head: logits = norm_f(x_L) Wlm^T, loss = mean cross-entropy.
 * The backward walks the same steps in reverse with one residual-gradient
 * buffer `dres` that each branch adds into.
 */
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Random-number uses, one key layer per site so no two sites share draws. */
static moe_rng_key dropout_key(const moe_model *m, uint64_t step, int site) {
    moe_rng_key k = {m->seed, step, (uint32_t)site, MOE_RNG_STREAM_DROPOUT};
    return k;
}
static moe_rng_key router_key(const moe_model *m, uint64_t step, int layer) {
    moe_rng_key k = {m->seed, step, (uint32_t)layer, MOE_RNG_STREAM_ROUTER};
    return k;
}
enum { SITE_EMBED = 0 }; /* block l uses sites 1 + 2l (attention) and 2 + 2l (MoE) */

static void decl(moe_param_set *ps, const char *name, int ndim, int64_t a, int64_t b, moe_init_kind init,
                 float v, int decay, float **p, float **g) {
    int64_t shape[2] = {a, b};
    moe_params_declare(ps, name, ndim, shape, init, v, decay, p, g);
}

static moe_act_kind act_from(const char *s) {
    if (strcmp(s, "silu") == 0) return MOE_ACT_SILU;
    if (strcmp(s, "swiglu") == 0) return MOE_ACT_SWIGLU;
    return MOE_ACT_GELU;
}
static moe_gate_kind gate_from(const char *s) {
    if (strcmp(s, "mlp") == 0) return MOE_GATE_MLP;
    if (strcmp(s, "mlp_hadamard") == 0) return MOE_GATE_MLP_HADAMARD;
    return MOE_GATE_LINEAR;
}

/* Allocate, and clear *ok on failure so one check covers every buffer. */
static void *alloc_tracked(moe_backend *be, size_t bytes, int *ok) {
    void *p = be->alloc(be, bytes ? bytes : 1);
    if (!p) *ok = 0;
    return p;
}

int moe_model_create(moe_model *m, const moe_config *cfg, moe_backend *be, int V, int B_max,
                     const moe_router_plugin_v1_t *router, char *err, size_t errcap) {
    memset(m, 0, sizeof *m);
    const moe_model_cfg *mc = &cfg->model;
    m->be = be;
    m->V = V;
    m->d = mc->d_model;
    m->n_layers = mc->n_layers;
    m->n_heads = mc->n_heads;
    m->S = mc->seq_len;
    /* Token counts index int arrays everywhere: keep a batch well inside int. */
    long long tokens = (long long)B_max * mc->seq_len;
    if (tokens > (1LL << 28)) {
        snprintf(err, errcap,
                 "a batch of %d sequences of %d tokens is %lld tokens, more than the 2^28 this build handles; lower "
                 "train.batch_size, eval.batch_size or model.seq_len",
                 B_max, mc->seq_len, tokens);
        return -1;
    }
    m->B_max = B_max;
    m->T_max = (int)tokens;
    m->rope = strcmp(mc->pos, "rope") == 0;
    m->rms = strcmp(mc->norm, "rmsnorm") == 0;
    m->tied = mc->tie_embeddings;
    m->eps = (float)mc->norm_eps;
    m->dropout = (float)mc->dropout;
    m->rope_theta = (float)mc->rope_theta;
    m->seed = (uint64_t)cfg->run.seed;
    int d = m->d, L = m->n_layers;
    float s = (float)mc->init_std;

    moe_params_init_set(&m->params, 1);
    moe_params_init_set(&m->buffers, 0);
    moe_param_set *P = &m->params;
    decl(P, "wte", 2, V, d, MOE_INIT_NORMAL, s, 1, &m->wte, &m->dwte);
    if (!m->rope) decl(P, "wpe", 2, m->S, d, MOE_INIT_NORMAL, s, 1, &m->wpe, &m->dwpe);

    m->blocks = calloc((size_t)L, sizeof *m->blocks);
    if (!m->blocks) {
        snprintf(err, errcap, "out of memory for %d layers; lower model.n_layers", L);
        return -1;
    }
    for (int l = 0; l < L; ++l) {
        moe_block *b = &m->blocks[l];
        char n[64];
#define NAME(s_) (snprintf(n, sizeof n, "layer%d.%s", l, s_), n)
        decl(P, NAME("norm1.g"), 1, d, 0, MOE_INIT_CONST, 1.0f, 0, &b->n1g, &b->dn1g);
        if (!m->rms) decl(P, NAME("norm1.b"), 1, d, 0, MOE_INIT_ZEROS, 0, 0, &b->n1b, &b->dn1b);
        decl(P, NAME("attn.wqkv"), 2, d, 3 * d, MOE_INIT_NORMAL, s, 1, &b->wqkv, &b->dwqkv);
        decl(P, NAME("attn.bqkv"), 1, 3 * d, 0, MOE_INIT_ZEROS, 0, 0, &b->bqkv, &b->dbqkv);
        /* GPT-2's scaled init for projections into the residual stream. */
        decl(P, NAME("attn.wo"), 2, d, d, MOE_INIT_NORMAL, s / sqrtf(2.0f * L), 1, &b->wo, &b->dwo);
        decl(P, NAME("attn.bo"), 1, d, 0, MOE_INIT_ZEROS, 0, 0, &b->bo, &b->dbo);
        decl(P, NAME("norm2.g"), 1, d, 0, MOE_INIT_CONST, 1.0f, 0, &b->n2g, &b->dn2g);
        if (!m->rms) decl(P, NAME("norm2.b"), 1, d, 0, MOE_INIT_ZEROS, 0, 0, &b->n2b, &b->dn2b);
#undef NAME
        moe_layer_cfg lc;
        memset(&lc, 0, sizeof lc);
        lc.d_model = d;
        lc.num_experts = cfg->moe.num_experts;
        lc.top_k = cfg->moe.top_k;
        lc.d_ff = cfg->moe.d_ff;
        lc.gate_hidden = cfg->moe.gate_hidden;
        lc.max_tokens = m->T_max;
        lc.layer = l;
        lc.vocab_size = V;
        lc.gate = gate_from(cfg->moe.gate);
        lc.activation = act_from(cfg->moe.activation);
        lc.expert_bias = cfg->moe.expert_bias;
        lc.drop_policy = strcmp(cfg->moe.drop_policy, "probs") == 0;
        lc.renorm_after_drop = cfg->moe.renorm_after_drop;
        lc.capacity_factor = cfg->moe.capacity_factor;
        lc.aux_loss_weight = (float)cfg->moe.aux_loss_weight;
        lc.z_loss_weight = (float)cfg->moe.z_loss_weight;
        lc.init_std = s;
        if (moe_layer_create(&b->moe, &lc, be, router, cfg->router.opts, cfg->router.n_opts, P, &m->buffers,
                             err, errcap) != 0)
            return -1;
    }
    decl(P, "normf.g", 1, d, 0, MOE_INIT_CONST, 1.0f, 0, &m->nfg, &m->dnfg);
    if (!m->rms) decl(P, "normf.b", 1, d, 0, MOE_INIT_ZEROS, 0, 0, &m->nfb, &m->dnfb);
    if (!m->tied) decl(P, "lm_head", 2, V, d, MOE_INIT_NORMAL, s, 1, &m->wlm, &m->dwlm);

    if (moe_params_allocate(&m->params, be, m->seed) != 0 || moe_params_allocate(&m->buffers, be, m->seed ^ 0xB0FFu) != 0) {
        snprintf(err, errcap, "out of memory allocating %zu parameters", m->params.total);
        return -1;
    }
    if (m->tied) {
        m->wlm = m->wte;
        m->dwlm = m->dwte;
    }
    /* the GEMMs' weights, for round_weights: per block the attention's two
     * projections and the experts', and the LM head */
    m->weight_views = calloc((size_t)L * 5 + 1, sizeof *m->weight_views);
    if (!m->weight_views) {
        snprintf(err, errcap, "out of memory for the model's weight views");
        return -1;
    }
    const float *P0 = m->params.values;
    for (int l = 0; l < L; ++l) {
        moe_block *b = &m->blocks[l];
        m->weight_views[m->n_weight_views++] = (moe_weight_view){b->wqkv - P0, 1, d, 3 * d, 0};
        m->weight_views[m->n_weight_views++] = (moe_weight_view){b->wo - P0, 1, d, d, 0};
        m->n_weight_views += moe_layer_weight_views(&b->moe, P0, m->weight_views + m->n_weight_views);
    }
    m->weight_views[m->n_weight_views++] = (moe_weight_view){m->wlm - P0, 1, V, d, 0};
    m->activation_views = calloc((size_t)L * 3 + 1, sizeof *m->activation_views);
    if (!m->activation_views) {
        snprintf(err, errcap, "out of memory for the model's activation views");
        return -1;
    }

    /* the results block (model.h): xent sums per pending forward (+1 for
     * forwards with out), the gradient norm, per layer lb and z, per layer
     * the check record */
    m->max_pending = cfg->train.grad_accum > 0 ? cfg->train.grad_accum : 1;
    size_t xent_bytes = 2 * ((size_t)m->max_pending + 1) * sizeof(double);
    size_t norm_off = xent_bytes, aux_off = norm_off + 2 * sizeof(double);
    size_t rec_off = aux_off + 2 * (size_t)L * sizeof(double);
    m->results_bytes = rec_off + (size_t)L * MOE_CHECK_RECORD_WORDS * sizeof(int32_t);
    m->results = be->alloc(be, m->results_bytes);
    m->results_host = calloc(1, m->results_bytes);
    m->pending_targets = calloc((size_t)m->max_pending, sizeof *m->pending_targets);
    m->results_out = calloc((size_t)m->max_pending, sizeof *m->results_out);
    if (!m->results || !m->results_host || !m->pending_targets || !m->results_out) {
        snprintf(err, errcap, "out of memory for the model's results block");
        return -1;
    }
    m->xent_sums = (double *)m->results;
    m->grad_norm = (double *)((char *)m->results + norm_off);
    for (int l = 0; l < L; ++l) {
        moe_layer *ml = &m->blocks[l].moe;
        ml->scalars = (double *)((char *)m->results + aux_off) + 2 * (size_t)l;
        ml->record = (int32_t *)((char *)m->results + rec_off) + (size_t)l * MOE_CHECK_RECORD_WORDS;
    }

    /* activations for T_max tokens */
    size_t T = (size_t)m->T_max, f = sizeof(float);
    int ok = 1;
    m->ids = alloc_tracked(be, T * sizeof(int32_t), &ok);
    m->targets = alloc_tracked(be, T * sizeof(int32_t), &ok);
    m->correct = alloc_tracked(be, T * sizeof(int32_t), &ok);
    m->x = calloc((size_t)L + 1, sizeof *m->x);
    for (int l = 0; l <= L; ++l) m->x[l] = alloc_tracked(be, T * d * f, &ok);
    for (int l = 0; l < L; ++l) {
        moe_block *b = &m->blocks[l];
        b->x_mid = alloc_tracked(be, T * d * f, &ok);
        b->n1 = alloc_tracked(be, T * d * f, &ok);
        b->n1_mean = alloc_tracked(be, T * f, &ok);
        b->n1_rstd = alloc_tracked(be, T * f, &ok);
        b->qkv = alloc_tracked(be, T * 3 * d * f, &ok);
        b->att = alloc_tracked(be, T * d * f, &ok);
        b->probs = alloc_tracked(be, (size_t)B_max * m->n_heads * m->S * m->S * f, &ok);
        b->n2 = alloc_tracked(be, T * d * f, &ok);
        b->n2_mean = alloc_tracked(be, T * f, &ok);
        b->n2_rstd = alloc_tracked(be, T * f, &ok);
        if (ok && moe_layer_alloc(&b->moe, err, errcap) != 0) return -1;
    }
    m->xf = alloc_tracked(be, T * d * f, &ok);
    m->nf_mean = alloc_tracked(be, T * f, &ok);
    m->nf_rstd = alloc_tracked(be, T * f, &ok);
    m->logits = alloc_tracked(be, T * (size_t)V * f, &ok);
    m->dlogits = alloc_tracked(be, T * (size_t)V * f, &ok);
    m->losses = alloc_tracked(be, T * f, &ok);
    m->dres = alloc_tracked(be, T * d * f, &ok);
    m->tmp1 = alloc_tracked(be, T * d * f, &ok);
    m->tmp2 = alloc_tracked(be, T * d * f, &ok);
    m->dqkv = alloc_tracked(be, T * 3 * d * f, &ok);
    if (!ok) {
        snprintf(err, errcap, "out of memory allocating activations for %zu tokens; lower train.batch_size or model.seq_len", T);
        return -1;
    }
    return 0;
}

void moe_model_destroy(moe_model *m) {
    moe_backend *be = m->be;
    if (!be) return;
    be->round_weights(be, NULL, NULL, 0); /* the copies must not outlive the weights */
    be->keep_activations(be, NULL, 0);     /* nor the activations */
    free(m->weight_views);
    free(m->activation_views);
    for (int l = 0; l < m->n_layers && m->blocks; ++l) {
        moe_block *b = &m->blocks[l];
        moe_layer_destroy(&b->moe);
        float *bufs[] = {b->x_mid, b->n1, b->n1_mean, b->n1_rstd, b->qkv, b->att, b->probs, b->n2, b->n2_mean, b->n2_rstd};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i) be->free(be, bufs[i]);
    }
    for (int l = 0; m->x && l <= m->n_layers; ++l) be->free(be, m->x[l]);
    float *bufs[] = {m->xf, m->nf_mean, m->nf_rstd, m->logits, m->dlogits, m->losses, m->dres, m->tmp1, m->tmp2, m->dqkv};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i) be->free(be, bufs[i]);
    be->free(be, m->ids);
    be->free(be, m->targets);
    be->free(be, m->correct);
    be->free(be, m->results);
    free(m->results_host);
    free(m->pending_targets);
    free(m->results_out);
    free(m->x);
    free(m->blocks);
    moe_params_free(&m->params, be);
    moe_params_free(&m->buffers, be);
    memset(m, 0, sizeof *m);
}

/* The gaps between the experts' weight gradients (every layer's dw1 and
 * dw2, in address order) are zeroed; those the next backward overwrites. */
void moe_model_zero_grads(moe_model *m) {
    moe_backend *be = m->be;
    float *g = m->params.grads;
    size_t at = 0; /* everything before this index is done */
    for (int l = 0; l < m->n_layers; ++l) {
        float *skip[2];
        size_t len[2];
        moe_layer_expert_weight_grads(&m->blocks[l].moe, skip, len);
        for (int k = 0; k < 2; ++k) {
            const size_t off = (size_t)(skip[k] - g);
            if (off < at) { /* not in address order: zero everything, accumulate */
                be->zero(be, g, m->params.total * sizeof(float));
                m->expert_dw_unset = 0;
                return;
            }
            if (off > at) be->zero(be, g + at, (off - at) * sizeof(float));
            at = off + len[k];
        }
    }
    if (at < m->params.total) be->zero(be, g + at, (m->params.total - at) * sizeof(float));
    m->expert_dw_unset = m->n_layers > 0;
}

/* ---- the two norms behind one call ---- */

static void norm_fwd(moe_model *m, const float *x, const float *g, const float *b, float *y, float *mean,
                     float *rstd, int T) {
    if (m->rms) m->be->rmsnorm_fwd(m->be, x, g, y, rstd, T, m->d, m->eps);
    else m->be->layernorm_fwd(m->be, x, g, b, y, mean, rstd, T, m->d, m->eps);
}

static void norm_bwd(moe_model *m, const float *x, const float *g, const float *mean, const float *rstd,
                     const float *dy, float *dx, float *dg, float *db, int T) {
    if (m->rms) m->be->rmsnorm_bwd(m->be, x, g, rstd, dy, dx, dg, T, m->d);
    else m->be->layernorm_bwd(m->be, x, g, mean, rstd, dy, dx, dg, db, T, m->d);
}

/* Where a residual branch writes its output: straight into the sum's
 * buffer x_out when no dropout applies (the op that makes the branch then
 * adds x_in itself, see residual_input: no pass of its own), else into
 * tmp1. */
static float *residual_branch(moe_model *m, int training, float *x_out) {
    return training && m->dropout > 0.0f ? m->tmp1 : x_out;
}

/* The residual input the op making a branch adds as it writes it
 * (gemm_bias's and combine's residual argument): x_in when the branch goes
 * straight into the sum's buffer, NULL when dropout must come between
 * (residual_add then adds x_in). */
static const float *residual_input(const float *x_in, const float *branch, const float *x_out) {
    return branch == x_out ? x_in : NULL;
}

/* x_out = x_in + dropout(branch), branch from residual_branch (clobbered).
 * Nothing to do when the branch was made in x_out: its op added x_in. */
static void residual_add(moe_model *m, const float *x_in, float *branch, float *x_out, int T, int training,
                         uint64_t step, int site) {
    moe_backend *be = m->be;
    size_t n = (size_t)T * m->d;
    if (branch == x_out) return;
    if (training && m->dropout > 0.0f) be->dropout_fwd(be, branch, branch, n, m->dropout, dropout_key(m, step, site));
    be->copy(be, x_out, x_in, n * sizeof(float));
    be->axpy(be, 1.0f, branch, x_out, n);
}

/* ============================ results block ============================= */

/* The host copy's parts, at the offsets of the device block's. */
static const double *host_part(const moe_model *m, const void *dev) {
    return (const double *)((const char *)m->results_host + ((const char *)dev - (const char *)m->results));
}

/* One copy of the block (a wait), then the check records, layer by layer. */
static int read_results(moe_model *m, char *err, size_t errcap) {
    moe_backend *be = m->be;
    be->to_host(be, m->results_host, m->results, m->results_bytes);
    for (int l = 0; l < m->n_layers; ++l) {
        moe_layer *L = &m->blocks[l].moe;
        const int32_t *rec = (const int32_t *)host_part(m, L->record);
        if (moe_layer_record_message(L, rec, err, errcap) == 0) continue;
        /* clear every record, so a caller that carries on starts clean */
        const moe_layer *L0 = &m->blocks[0].moe;
        be->zero(be, L0->record, (size_t)m->n_layers * MOE_CHECK_RECORD_WORDS * sizeof(int32_t));
        return -1;
    }
    return 0;
}

/* A call that failed on the host (a plugin refusing its input) after an
 * earlier layer's output failed its checks on the device: the record names
 * the cause, so it replaces the message. Only on error paths (a wait). */
static int prefer_record(moe_model *m, char *err, size_t errcap) {
    if (m->be->device == MOE_DEVICE_CPU) return -1; /* the CPU reports records at once */
    char why[1024];
    if (read_results(m, why, sizeof why) != 0) snprintf(err, errcap, "%s", why);
    return -1;
}

/* The weighted auxiliary losses of the last forward, summed over layers in
 * layer order as moe_layer_forward's aux_total did. */
static double results_aux(const moe_model *m) {
    double aux = 0.0;
    for (int l = 0; l < m->n_layers; ++l) {
        const moe_layer *L = &m->blocks[l].moe;
        const double *sc = host_part(m, L->scalars);
        aux += L->cfg.aux_loss_weight * sc[0] + L->cfg.z_loss_weight * sc[1];
    }
    return aux;
}

static void fill_result(const moe_model *m, int slot, long long n_targets, double aux, moe_forward_result *out) {
    const double *sums = host_part(m, m->xent_sums + 2 * (size_t)slot);
    out->n_targets = n_targets;
    out->n_correct = (long long)sums[1];
    out->loss = n_targets ? sums[0] / (double)n_targets : 0.0;
    out->aux = aux;
}

int moe_model_collect(moe_model *m, double *grad_norm, char *err, size_t errcap) {
    int n = m->n_pending;
    m->n_pending = 0;
    m->n_results = 0;
    if (read_results(m, err, errcap) != 0) return -1;
    double aux = results_aux(m);
    for (int i = 0; i < n; ++i) fill_result(m, i, m->pending_targets[i], aux, &m->results_out[i]);
    m->n_results = n;
    if (grad_norm) *grad_norm = *host_part(m, m->grad_norm);
    return 0;
}

int moe_model_check(moe_model *m, char *err, size_t errcap) { return moe_model_collect(m, NULL, err, errcap); }

void moe_model_set_collect_stats(moe_model *m, int on) {
    for (int l = 0; l < m->n_layers; ++l) m->blocks[l].moe.collect_stats = on;
}

/* =============================== forward ================================ */

/* The saved activations that bf16 GEMMs read in the forward and again in
 * the backward, each written once per forward: per block the attention's
 * input (n1) and output (att) and the experts' dispatched rows (Xe), and
 * the head's input (xf). The backend keeps one operand copy of each. */
static void declare_saved_activations(moe_model *m, int T) {
    int n = 0;
    for (int l = 0; l < m->n_layers && T > 0; ++l) {
        moe_block *b = &m->blocks[l];
        m->activation_views[n++] = (moe_activation_view){b->n1, T, m->d};
        m->activation_views[n++] = (moe_activation_view){b->att, T, m->d};
        moe_activation_view xe = moe_layer_activation_view(&b->moe, T);
        if (xe.rows > 0) m->activation_views[n++] = xe;
    }
    if (T > 0) m->activation_views[n++] = (moe_activation_view){m->xf, T, m->d};
    m->be->keep_activations(m->be, m->activation_views, n);
}

int moe_model_forward(moe_model *m, const int32_t *ids, const int32_t *targets, int B, int training,
                      uint64_t step, moe_forward_result *out, char *err, size_t errcap) {
    moe_backend *be = m->be;
    int S = m->S, d = m->d, H = m->n_heads, hd = d / H, V = m->V, T = B * S;
    if (B < 1 || B > m->B_max) {
        snprintf(err, errcap, "batch of %d sequences outside [1, %d]", B, m->B_max);
        return -1;
    }
    if (!out && m->n_pending >= m->max_pending) {
        snprintf(err, errcap, "%d forwards already pending (the most train.grad_accum = %d allows); read them with "
                 "moe_model_collect", m->n_pending, m->max_pending);
        return -1;
    }
    /* Token ids index the embedding and are hashed by routers: every id in
     * [0, V), checked here on the host copy so no device check must wait. */
    for (int i = 0; i < T; ++i)
        if (ids[i] < 0 || ids[i] >= V) {
            snprintf(err, errcap, "token %d of the batch has id %d, outside the vocabulary [0, %d)", i, ids[i], V);
            return -1;
        }
    m->T = T;
    /* the backend's operand copies of the weights as they are now (the
     * optimizer, a checkpoint or the caller may have changed them) */
    be->round_weights(be, m->params.values, m->weight_views, m->n_weight_views);
    declare_saved_activations(m, T);
    be->from_host(be, m->ids, ids, (size_t)T * sizeof(int32_t));
    be->from_host(be, m->targets, targets, (size_t)T * sizeof(int32_t));
    if (out) memset(out, 0, sizeof *out);

    /* embeddings */
    be->embed_fwd(be, m->ids, m->wte, m->rope ? NULL : m->wpe, m->x[0], B, S, d);
    if (training && m->dropout > 0.0f)
        be->dropout_fwd(be, m->x[0], m->x[0], (size_t)T * d, m->dropout, dropout_key(m, step, SITE_EMBED));

    for (int l = 0; l < m->n_layers; ++l) {
        moe_block *b = &m->blocks[l];
        /* attention branch */
        norm_fwd(m, m->x[l], b->n1g, b->n1b, b->n1, b->n1_mean, b->n1_rstd, T);
        be->gemm_bias(be, 0, 0, T, 3 * d, d, b->n1, d, 0, b->wqkv, 3 * d, 0, b->bqkv, 0, NULL, b->qkv, 3 * d, 0, 1);
        if (m->rope) be->rope_fwd(be, b->qkv, B, S, H, hd, m->rope_theta);
        be->attention_fwd(be, b->qkv, b->att, b->probs, B, S, H, hd);
        float *branch = residual_branch(m, training, b->x_mid);
        be->gemm_bias(be, 0, 0, T, d, d, b->att, d, 0, b->wo, d, 0, b->bo, 0,
                      residual_input(m->x[l], branch, b->x_mid), branch, d, 0, 1);
        residual_add(m, m->x[l], branch, b->x_mid, T, training, step, 1 + 2 * l);
        /* MoE branch */
        norm_fwd(m, b->x_mid, b->n2g, b->n2b, b->n2, b->n2_mean, b->n2_rstd, T);
        branch = residual_branch(m, training, m->x[l + 1]);
        if (moe_layer_forward(&b->moe, b->n2, m->ids, T, training, router_key(m, step, l),
                              residual_input(b->x_mid, branch, m->x[l + 1]), branch, NULL, err, errcap) != 0)
            return prefer_record(m, err, errcap);
        residual_add(m, b->x_mid, branch, m->x[l + 1], T, training, step, 2 + 2 * l);
    }

    /* head */
    norm_fwd(m, m->x[m->n_layers], m->nfg, m->nfb, m->xf, m->nf_mean, m->nf_rstd, T);
    be->gemm(be, 0, 1, T, V, d, 1.0f, m->xf, d, m->wlm, d, 0.0f, m->logits, V);
    long long n_targets = 0;
    for (int t = 0; t < T; ++t) n_targets += targets[t] >= 0;
    float scale = n_targets ? 1.0f / (float)n_targets : 0.0f;
    be->xent_fwd_bwd(be, m->logits, m->targets, T, V, m->losses, m->correct, training ? m->dlogits : NULL, scale);
    /* two numbers on the device instead of 2T copied back */
    int slot = out ? m->max_pending : m->n_pending;
    be->xent_sums(be, m->losses, m->correct, T, m->xent_sums + 2 * (size_t)slot);
    if (!out) {
        m->pending_targets[m->n_pending++] = n_targets;
        return 0;
    }
    if (read_results(m, err, errcap) != 0) return -1;
    fill_result(m, slot, n_targets, results_aux(m), out);
    return 0;
}

/* =============================== backward =============================== */

int moe_model_backward(moe_model *m, uint64_t step, char *err, size_t errcap) {
    moe_backend *be = m->be;
    int S = m->S, d = m->d, H = m->n_heads, hd = d / H, V = m->V, T = m->T, B = T / S;
    size_t n = (size_t)T * d;
    /* the experts' weight gradients: written over after moe_model_zero_grads
     * left them, added to otherwise */
    const int accumulate_expert_dw = !m->expert_dw_unset;
    m->expert_dw_unset = 0;

    /* head: dlogits was written by the forward's cross-entropy */
    be->gemm(be, 1, 0, V, d, T, 1.0f, m->dlogits, V, m->xf, d, 1.0f, m->dwlm, d);
    be->gemm(be, 0, 0, T, d, V, 1.0f, m->dlogits, V, m->wlm, d, 0.0f, m->tmp1, d);
    be->zero(be, m->dres, n * sizeof(float));
    norm_bwd(m, m->x[m->n_layers], m->nfg, m->nf_mean, m->nf_rstd, m->tmp1, m->dres, m->dnfg, m->dnfb, T);

    for (int l = m->n_layers - 1; l >= 0; --l) {
        moe_block *b = &m->blocks[l];
        int dropping = m->dropout > 0.0f;
        /* MoE branch: dres is d x[l+1] */
        /* Each branch reads its output gradient before norm_bwd adds into
         * dres, so without dropout it reads dres itself. */
        const float *dbranch = m->dres;
        if (dropping) {
            be->dropout_bwd(be, m->dres, m->tmp1, n, m->dropout, dropout_key(m, step, 2 + 2 * l));
            dbranch = m->tmp1;
        }
        if (moe_layer_backward(&b->moe, m->ids, dbranch, m->tmp2, accumulate_expert_dw, router_key(m, step, l), err,
                               errcap) != 0)
            return prefer_record(m, err, errcap);
        norm_bwd(m, b->x_mid, b->n2g, b->n2_mean, b->n2_rstd, m->tmp2, m->dres, b->dn2g, b->dn2b, T);
        /* attention branch: dres is now d x_mid */
        dbranch = m->dres;
        if (dropping) {
            be->dropout_bwd(be, m->dres, m->tmp1, n, m->dropout, dropout_key(m, step, 1 + 2 * l));
            dbranch = m->tmp1;
        }
        be->linear_bwd(be, b->att, b->wo, dbranch, m->tmp2, b->dwo, b->dbo, T, d, d);
        be->attention_bwd(be, b->qkv, b->probs, m->tmp2, m->dqkv, B, S, H, hd);
        if (m->rope) be->rope_bwd(be, m->dqkv, B, S, H, hd, m->rope_theta);
        be->linear_bwd(be, b->n1, b->wqkv, m->dqkv, m->tmp2, b->dwqkv, b->dbqkv, T, d, 3 * d);
        norm_bwd(m, m->x[l], b->n1g, b->n1_mean, b->n1_rstd, m->tmp2, m->dres, b->dn1g, b->dn1b, T);
    }

    /* embeddings: dres is d x[0] */
    if (m->dropout > 0.0f) {
        be->dropout_bwd(be, m->dres, m->tmp1, n, m->dropout, dropout_key(m, step, SITE_EMBED));
        be->copy(be, m->dres, m->tmp1, n * sizeof(float));
    }
    be->embed_bwd(be, m->ids, m->dres, m->dwte, m->rope ? NULL : m->dwpe, B, S, d, m->V);
    return 0;
}

double moe_model_train_flops(const moe_model *m, int B) {
    double T = (double)B * m->S, d = m->d, V = m->V, S = m->S, fwd = 0.0;
    for (int l = 0; l < m->n_layers; ++l) {
        const moe_layer *L = &m->blocks[l].moe;
        const moe_layer_cfg *c = &L->cfg;
        double E = c->num_experts, h = c->d_ff, hin = c->activation == MOE_ACT_SWIGLU ? 2.0 * h : h;
        double C = fmin(ceil(c->capacity_factor * T * L->K_cap / E), T);
        double gh = c->gate_hidden > 0 ? c->gate_hidden : d;
        double gate = c->gate == MOE_GATE_LINEAR ? 2 * T * d * E
                    : c->gate == MOE_GATE_MLP    ? 2 * T * d * gh + 2 * T * gh * E
                                                 : 4 * T * d * gh + 2 * T * gh * E;
        fwd += 2 * T * d * 3 * d + 2 * T * d * d;             /* qkv and output projections */
        fwd += 2.0 * 2.0 * B * (S * (S + 1) / 2) * d;          /* q k^T and p v over the causal triangle */
        fwd += gate + 2 * E * C * d * hin + 2 * E * C * h * d; /* gate, expert GEMMs */
    }
    fwd += 2 * T * d * V; /* LM head */
    return 3.0 * fwd;
}
