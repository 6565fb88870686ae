/*
 * hash: Hash Layers (Roller et al. 2021, "Hash Layers For Large Sparse Models").
 *
 * Every token goes to K experts picked by a fixed hash of its vocabulary id,
 * each with weight 1/K. The router never looks at the logits and has nothing
 * to learn: it is the content-agnostic baseline that separates "balanced
 * load" from "good routing". A fixed random hash spreads a vocabulary evenly
 * in expectation, so the experts see balanced loads without any auxiliary
 * loss, and the same word always meets the same experts.
 *
 *   h    = mix64(id)                          a fixed 64-bit mix (splitmix64)
 *   e_0  = h mod E
 *   s    = 1 + ((h >> 32) mod (E - 1)), raised until gcd(s, E) = 1
 *   e_j  = (e_0 + j s) mod E,  j = 0 .. K-1   K distinct experts
 *   w_j  = 1 / K
 *
 * Option key = "position" hashes the flat position t of the token in the call
 * instead of its id: the seed bench's variant, kept so its tables can be
 * reproduced. It ignores content altogether (a token's experts change with
 * where it sits in the batch).
 */
#include <moe/router.h>

typedef enum hash_key { HASH_KEY_TOKEN = 0, HASH_KEY_POSITION = 1 } hash_key;

typedef struct hash_state {
    int32_t E, K;
    int32_t vocab_size;
    hash_key key;
} hash_state;

/* The CUDA path (hash.cu): its table, and the workspace it needs. Defined
 * only when the build compiles hash.cu; MOE_ROUTER_IF_CUDA uses them only then. */
extern const moe_router_impl hash_cuda_impl;
size_t hash_cuda_workspace_bytes(const hash_state *s);

static const moe_option_spec hash_options[] = {
    {"key", MOE_OPT_STRING, "token", "token|position", 0.0, 0.0,
     "what is hashed: the token's vocabulary id (Hash Layers) or its flat position in the batch (seed bench)"},
};
#define HASH_N_OPTIONS ((int)(sizeof hash_options / sizeof hash_options[0]))

/* The output function of splitmix64 (Steele, Lea & Flood 2014, with the
 * constants of Stafford's "Mix13"): two xor-shift-multiply rounds, a
 * bijection on 64-bit integers in which every input bit flips each output bit
 * with probability close to 1/2. Neighbouring ids (0, 1, 2, ...) therefore land
 * on unrelated experts. Adding the golden-ratio increment first, as splitmix64
 * does, keeps id 0 off the fixed point mix(0) = 0; hash_mix64(0) is the first
 * output of splitmix64 seeded with 0. */
static uint64_t hash_mix64(uint64_t v) {
    uint64_t z = v + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint32_t hash_gcd(uint32_t a, uint32_t b) {
    while (b != 0) {
        uint32_t r = a % b;
        a = b;
        b = r;
    }
    return a;
}

/* experts[0..K) for hash value h. Any stride coprime to E visits all E
 * experts before repeating: e_0 + j s = e_0 + j' s (mod E) means E divides
 * (j - j') s, hence E divides j - j', impossible for distinct j, j' < E. The
 * stride comes from the high half of h so it is independent of e_0, which
 * uses the low bits (all of them when E is a power of two). */
static void hash_experts(uint64_t h, int32_t E, int32_t K, int32_t *experts) {
    uint64_t e0 = h % (uint64_t)E;
    uint64_t s = 0; /* unused when E = 1: then K = 1 */
    if (E > 1) {
        s = 1 + (h >> 32) % (uint64_t)(E - 1);
        /* Terminates at s = E - 1 at the latest: gcd(E - 1, E) = 1. */
        while (hash_gcd((uint32_t)s, (uint32_t)E) != 1) ++s;
    }
    for (int32_t j = 0; j < K; ++j) experts[j] = (int32_t)((e0 + (uint64_t)j * s) % (uint64_t)E);
}

static moe_status hash_create(const moe_router_dims *dims, const moe_option *opts, int32_t n_opts,
                              void **state, char *msg, size_t msg_cap) {
    moe_option v[HASH_N_OPTIONS];
    moe_status st = moe_options_resolve(hash_options, HASH_N_OPTIONS, opts, n_opts, v, msg, msg_cap);
    if (st != MOE_OK) return st;
    if (!dims || !state) return moe_fail(msg, msg_cap, MOE_ERR_INVALID_ARG, "create: dims and state must not be NULL");
    st = moe_router_check_dims(dims, msg, msg_cap);
    if (st != MOE_OK) return st;
    hash_key key = strcmp(moe_option_get(v, HASH_N_OPTIONS, "key")->s, "position") == 0 ? HASH_KEY_POSITION
                                                                                         : HASH_KEY_TOKEN;
    if (key == HASH_KEY_TOKEN && dims->vocab_size < 1)
        return moe_fail(msg, msg_cap, MOE_ERR_INVALID_ARG,
                        "vocab_size = %d; hashing token ids needs the vocabulary size (or set [router].key = \"position\")",
                        dims->vocab_size);
    hash_state *s = malloc(sizeof *s);
    if (!s) return moe_fail(msg, msg_cap, MOE_ERR_NO_MEMORY, "out of host memory");
    s->E = dims->num_experts;
    s->K = dims->top_k;
    s->vocab_size = dims->vocab_size;
    s->key = key;
    *state = s;
    return MOE_OK;
}

static void hash_destroy(void *state) { free(state); }

static moe_status hash_query(const void *state, moe_router_info *info) {
    const hash_state *s = state;
    if (!s || !info) return MOE_ERR_INVALID_ARG;
    memset(info, 0, sizeof *info);
    info->struct_size = sizeof *info;
    info->k_out = s->K;
    info->flags = MOE_ROUTER_IGNORES_LOGITS | MOE_ROUTER_NO_GRAD | MOE_ROUTER_WEIGHT_SUM_EXACT;
    info->weight_sum = 1.0f;
    /* The CPU path needs none; the CUDA path's flag block when it is built. */
    info->workspace_bytes = MOE_ROUTER_IF_CUDA(hash_cuda_workspace_bytes(s), 0);
    return MOE_OK;
}

static moe_status hash_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const hash_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = moe_router_check_shape(ctx, a->T, a->E, a->k_out, s->E, s->K);
    if (st != MOE_OK || a->T == 0) return st;
    if (!a->expert || !a->weight)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "forward: expert and weight must not be NULL");
    if (s->key == HASH_KEY_TOKEN && !a->token_ids)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "forward: token_ids is NULL; key = \"token\" hashes the vocabulary ids");
    const float w = 1.0f / (float)s->K;
    for (int32_t t = 0; t < a->T; ++t) {
        uint64_t what = (uint64_t)t;
        if (s->key == HASH_KEY_TOKEN) {
            int32_t id = a->token_ids[t];
            if (id < 0 || id >= s->vocab_size)
                return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                                "token %d has id %d, outside the vocabulary [0, %d)", t, id, s->vocab_size);
            what = (uint64_t)id;
        }
        int32_t *expert = a->expert + (size_t)t * s->K;
        hash_experts(hash_mix64(what), s->E, s->K, expert);
        for (int32_t j = 0; j < s->K; ++j) a->weight[(size_t)t * s->K + j] = w;
    }
    return MOE_OK;
}

/* The weights are constants and the logits unused: the routing gradient is
 * zero. The host skips this call (MOE_ROUTER_NO_GRAD); it exists so a caller
 * that does call it still gets the contract: dlogits overwritten. */
static moe_status hash_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const hash_state *s = state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = moe_router_check_shape(ctx, a->T, a->E, a->k_out, s->E, s->K);
    if (st != MOE_OK || a->T == 0) return st;
    if (!a->dlogits) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "backward: dlogits must not be NULL");
    memset(a->dlogits, 0, (size_t)a->T * (size_t)s->E * sizeof(float));
    return MOE_OK;
}

static const moe_router_impl hash_cpu = {hash_forward, hash_backward};

MOE_ROUTER_PLUGIN_V1("hash",
                     "Hash Layers (Roller et al. 2021): K distinct experts from a fixed hash of the token id, weight 1/K",
                     hash_options, hash_create, hash_destroy, hash_query, &hash_cpu,
                     MOE_ROUTER_CUDA_IMPL(hash_cuda_impl))
