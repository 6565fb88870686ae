/*
 * hash, CUDA path: the routing of hash.c on the device, one thread per token.
 *
 * Each thread hashes its token's id (or position) with the same 64-bit mix
 * and walks the same stride (hash_mix64, hash_gcd and hash_experts are copied
 * below for the device): integer arithmetic only, so the experts are bitwise
 * the CPU's, and the weights are the constant 1/K.
 *
 * With key = "token", ids outside the vocabulary are refused before anything
 * is written: a first kernel records the first bad token in the workspace,
 * one 8-byte copy brings it to the host, and the call fails naming the token
 * and its id, as the CPU does. That copy is the one synchronization of a
 * call; key = "position" reads no ids and needs none.
 *
 * Pointers in the arguments are device pointers; everything runs on
 * ctx->stream.
 */
#include <moe/router_cuda.cuh>

/* The instance state exactly as hash.c defines it: both files read one struct. */
typedef enum hash_key { HASH_KEY_TOKEN = 0, HASH_KEY_POSITION = 1 } hash_key;
typedef struct hash_state {
    int32_t E, K;
    int32_t vocab_size;
    hash_key key;
} hash_state;

/* Workspace: one 256-byte block for the error flag (the first bad token). */
extern "C" size_t hash_cuda_workspace_bytes(const hash_state *s) {
    (void)s;
    return MOE_ROUTER_CUDA_FLAG_BYTES;
}

/* ---- the hash (device copies of hash.c's; see there for why) ------------------- */

/* splitmix64's output function after its golden-ratio increment. */
__device__ uint64_t hash_mix64(uint64_t v) {
    uint64_t z = v + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ uint32_t hash_gcd(uint32_t a, uint32_t b) {
    while (b != 0) {
        uint32_t r = a % b;
        a = b;
        b = r;
    }
    return a;
}

/* experts[0..K) for hash value h: e_j = (h mod E + j s) mod E with a stride s
 * coprime to E, so the K experts are distinct. */
__device__ void hash_experts(uint64_t h, int32_t E, int32_t K, int32_t *experts) {
    uint64_t e0 = h % (uint64_t)E;
    uint64_t s = 0; /* unused when E = 1: then K = 1 */
    if (E > 1) {
        s = 1 + (h >> 32) % (uint64_t)(E - 1);
        while (hash_gcd((uint32_t)s, (uint32_t)E) != 1) ++s;
    }
    for (int32_t j = 0; j < K; ++j) experts[j] = (int32_t)((e0 + (uint64_t)j * s) % (uint64_t)E);
}

/* ---- kernels ------------------------------------------------------------------- */

/* token_ids = NULL hashes the position t (key = "position"). */
__global__ void hash_forward_kernel(const int32_t *token_ids, int32_t T, int32_t E, int32_t K, float w,
                                    int32_t *expert, float *weight) {
    const int32_t t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    uint64_t what = token_ids ? (uint64_t)token_ids[t] : (uint64_t)t;
    hash_experts(hash_mix64(what), E, K, expert + (size_t)t * K);
    for (int32_t j = 0; j < K; ++j) weight[(size_t)t * K + j] = w;
}

/* ---- host side ------------------------------------------------------------------- */

/* Every id is checked before any output is written: the first id outside
 * [0, vocab) is flagged on the device, and one copy brings the flag home. */
static moe_status hash_cuda_check_ids(const hash_state *s, const moe_context *ctx, cudaStream_t stream,
                                      const int32_t *token_ids, int32_t T) {
    moe_status st = moe_router_check_workspace(ctx, hash_cuda_workspace_bytes(s));
    if (st != MOE_OK || moe_context_inputs_checked(ctx)) return st; /* the host's ids are in range */
    unsigned long long *flag = (unsigned long long *)ctx->workspace;
    MOE_ROUTER_CUDA(cudaMemsetAsync(flag, 0xFF, sizeof *flag, stream));
    st = moe_router_cuda_flag_out_of_range(ctx, stream, token_ids, (size_t)T, 0, s->vocab_size, flag);
    unsigned long long first = 0;
    if (st == MOE_OK) st = moe_router_cuda_read_flags(ctx, stream, flag, &first, 1);
    if (st != MOE_OK || first == MOE_ROUTER_NO_FLAG) return st;
    int32_t id = 0; /* only on failure: fetch the id to name it */
    st = moe_router_cuda_fetch(ctx, stream, &id, token_ids + first, sizeof id);
    if (st != MOE_OK) return st;
    return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "token %d has id %d, outside the vocabulary [0, %d)",
                    (int)first, id, s->vocab_size);
}

static moe_status hash_cuda_forward(void *state, const moe_context *ctx, const moe_router_fwd_args *a) {
    const hash_state *s = (const hash_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = moe_router_check_shape(ctx, a->T, a->E, a->k_out, s->E, s->K);
    if (st != MOE_OK || a->T == 0) return st;
    if (!a->expert || !a->weight)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "forward: expert and weight must not be NULL");
    if (s->key == HASH_KEY_TOKEN && !a->token_ids)
        return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG,
                        "forward: token_ids is NULL; key = \"token\" hashes the vocabulary ids");
    cudaStream_t stream = (cudaStream_t)ctx->stream;
    const int32_t *ids = s->key == HASH_KEY_TOKEN ? a->token_ids : NULL;
    if (ids) {
        st = hash_cuda_check_ids(s, ctx, stream, ids, a->T);
        if (st != MOE_OK) return st;
    }
    hash_forward_kernel<<<moe_router_cuda_row_blocks((size_t)a->T), MOE_ROUTER_CUDA_ROW_THREADS, 0, stream>>>(
        ids, a->T, s->E, s->K, 1.0f / (float)s->K, a->expert, a->weight);
    MOE_ROUTER_LAUNCHED(hash_forward_kernel);
    return MOE_OK;
}

/* The weights are constants and the logits unused: the routing gradient is
 * zero. The host skips this call (MOE_ROUTER_NO_GRAD); a caller that does call
 * it still gets the contract: dlogits overwritten. */
static moe_status hash_cuda_backward(void *state, const moe_context *ctx, const moe_router_bwd_args *a) {
    const hash_state *s = (const hash_state *)state;
    if (!s || !ctx || !a) return MOE_ERR_INVALID_ARG;
    moe_status st = moe_router_check_shape(ctx, a->T, a->E, a->k_out, s->E, s->K);
    if (st != MOE_OK || a->T == 0) return st;
    if (!a->dlogits) return moe_fail(ctx->msg, ctx->msg_cap, MOE_ERR_INVALID_ARG, "backward: dlogits must not be NULL");
    MOE_ROUTER_CUDA(cudaMemsetAsync(a->dlogits, 0, (size_t)a->T * (size_t)s->E * sizeof(float), (cudaStream_t)ctx->stream));
    return MOE_OK;
}

extern "C" {
extern const moe_router_impl hash_cuda_impl;
const moe_router_impl hash_cuda_impl = {hash_cuda_forward, hash_cuda_backward};
}
