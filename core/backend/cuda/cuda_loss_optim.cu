/*
 * Softmax cross-entropy and the AdamW update on the GPU.
 */
#include <math.h>

#include "backend/cuda/cuda_common.cuh"

/* ------------------------------------------------------------------ */
/* Softmax cross-entropy                                               */
/* ------------------------------------------------------------------ */

constexpr int XENT_THREADS = 256;

/* (value, index) of the larger logit, ties to the lower index (the CPU's
 * sequential strict > keeps the first maximum). idx < 0 is "none yet". */
struct arg_best {
    float v;
    int idx;
};

__device__ __forceinline__ arg_best better(arg_best a, arg_best b) {
    if (a.idx < 0) return b;
    if (b.idx < 0) return a;
    if (b.v > a.v || (b.v == a.v && b.idx < a.idx)) return b;
    return a;
}

__device__ arg_best block_argmax(arg_best a) {
    __shared__ float vals[XENT_THREADS / 32];
    __shared__ int idxs[XENT_THREADS / 32];
    for (int off = 16; off > 0; off >>= 1) {
        arg_best o;
        o.v = __shfl_xor_sync(0xffffffffu, a.v, off);
        o.idx = __shfl_xor_sync(0xffffffffu, a.idx, off);
        a = better(a, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        vals[warp] = a.v;
        idxs[warp] = a.idx;
    }
    __syncthreads();
    arg_best r = {vals[0], idxs[0]};
    for (int w = 1; w < XENT_THREADS / 32; ++w) r = better(r, arg_best{vals[w], idxs[w]});
    return r;
}

/* The threads that share one row: a whole block (large V), or one warp
 * (V up to XENT_WARP_MAX_V: a block per row would leave most of its threads
 * idle and spend the row's time in block-wide reductions). */
struct xent_block_group {
    __device__ int rank() const { return threadIdx.x; }
    __device__ int size() const { return blockDim.x; }
    __device__ arg_best argmax(arg_best a) const { return block_argmax(a); }
    __device__ double sum(double v) const { return block_sum(v); }
};
struct xent_warp_group {
    __device__ int rank() const { return threadIdx.x & 31; }
    __device__ int size() const { return 32; }
    __device__ arg_best argmax(arg_best a) const {
        for (int off = 16; off > 0; off >>= 1) {
            arg_best o;
            o.v = __shfl_xor_sync(0xffffffffu, a.v, off);
            o.idx = __shfl_xor_sync(0xffffffffu, a.idx, off);
            a = better(a, o);
        }
        return a;
    }
    __device__ double sum(double v) const { return warp_sum(v); }
};
constexpr int XENT_WARP_MAX_V = 2048;

/* Row t, by the threads of group g:
 *   loss = logsumexp(l) - l[target] = max + log(sum exp(l - max)) - l[target],
 * the sum in double as on the CPU (V reaches tens of thousands);
 *   dl = grad_scale * (softmax - onehot).
 * The products of dl are rounded one at a time (__fmul_rn, no fused
 * multiply-add) to follow the CPU's arithmetic. */
template <class G>
__device__ void xent_row(G g, int t, const float *logits, const int32_t *targets, int V, float *losses,
                         int32_t *correct, float *dlogits, float grad_scale, int *flags) {
    const float *l = logits + (size_t)t * V;
    float *dl = dlogits ? dlogits + (size_t)t * V : nullptr;
    const int target = targets[t];
    /* every thread of the group sees the same target and takes this branch */
    if (target < 0 || target >= V) {
        if (target >= V && g.rank() == 0) cuda_flag(flags, CUDA_FLAG_TARGET);
        if (g.rank() == 0) {
            losses[t] = 0.0f;
            correct[t] = 0;
        }
        if (dl)
            for (int j = g.rank(); j < V; j += g.size()) dl[j] = 0.0f;
        return;
    }

    arg_best best = {0.0f, -1};
    for (int j = g.rank(); j < V; j += g.size()) best = better(best, arg_best{l[j], j});
    best = g.argmax(best);
    const float maxv = best.v;

    double part = 0.0;
    for (int j = g.rank(); j < V; j += g.size()) part += (double)expf(l[j] - maxv);
    const double sum = g.sum(part);

    if (g.rank() == 0) {
        losses[t] = (float)((double)maxv + log(sum) - (double)l[target]);
        correct[t] = best.idx == target;
    }
    if (dl) {
        const float inv = (float)(1.0 / sum);
        for (int j = g.rank(); j < V; j += g.size()) {
            float gr = __fmul_rn(__fmul_rn(grad_scale, expf(l[j] - maxv)), inv);
            if (j == target) gr = __fsub_rn(gr, grad_scale);
            dl[j] = gr;
        }
    }
}

/* One block per row. */
__global__ void xent_kernel(const float *logits, const int32_t *targets, int V, float *losses,
                            int32_t *correct, float *dlogits, float grad_scale, int *flags) {
    xent_row(xent_block_group{}, blockIdx.x, logits, targets, V, losses, correct, dlogits, grad_scale, flags);
}

/* One warp per row, XENT_THREADS / 32 rows per block. */
__global__ void xent_warp_kernel(const float *logits, const int32_t *targets, int T, int V, float *losses,
                                 int32_t *correct, float *dlogits, float grad_scale, int *flags) {
    const int t = blockIdx.x * (XENT_THREADS / 32) + (threadIdx.x >> 5);
    if (t >= T) return; /* a whole warp: the warp's shuffles see no missing lane */
    xent_row(xent_warp_group{}, t, logits, targets, V, losses, correct, dlogits, grad_scale, flags);
}

void cuda_xent_fwd_bwd(moe_backend *be, const float *logits, const int32_t *targets, int T, int V,
                       float *losses, int32_t *correct, float *dlogits, float grad_scale) {
    if (T <= 0) return;
    if (V <= 0) {
        cuda_record_error(be, __FILE__, __LINE__, "xent_fwd_bwd", "V <= 0");
        return;
    }
    int *flags = cuda_state(be)->d_flags;
    if (V <= XENT_WARP_MAX_V) {
        const unsigned blocks = (unsigned)((T + XENT_THREADS / 32 - 1) / (XENT_THREADS / 32));
        xent_warp_kernel<<<blocks, XENT_THREADS, 0, cuda_stream(be)>>>(logits, targets, T, V, losses, correct,
                                                                      dlogits, grad_scale, flags);
        KERNEL_CHECK(be, "xent_warp_kernel");
        return;
    }
    xent_kernel<<<(unsigned)T, XENT_THREADS, 0, cuda_stream(be)>>>(logits, targets, V, losses, correct, dlogits,
                                                                   grad_scale, flags);
    KERNEL_CHECK(be, "xent_kernel");
}

/* The model's two numbers per forward: sum of losses and of correct flags,
 * one block, each thread summing a fixed stride of tokens in double, then
 * the block's fixed tree (block_sum). The counts are small integers: exact
 * in a double. */
constexpr int XENT_SUM_THREADS = 1024;

__global__ void xent_sums_kernel(const float *losses, const int32_t *correct, int T, double *out) {
    double s = 0.0, c = 0.0;
    for (int t = threadIdx.x; t < T; t += blockDim.x) {
        s += (double)losses[t];
        c += (double)correct[t];
    }
    s = block_sum(s);
    c = block_sum(c);
    if (threadIdx.x == 0) {
        out[0] = s;
        out[1] = c;
    }
}

void cuda_xent_sums(moe_backend *be, const float *losses, const int32_t *correct, int T, double *out) {
    xent_sums_kernel<<<1, XENT_SUM_THREADS, 0, cuda_stream(be)>>>(losses, correct, T > 0 ? T : 0, out);
    KERNEL_CHECK(be, "xent_sums_kernel");
}

/* ------------------------------------------------------------------ */
/* AdamW                                                               */
/* ------------------------------------------------------------------ */

/* The CPU's formula, operation for operation, each rounded on its own
 * (the _rn intrinsics forbid fused multiply-adds): the same inputs give the
 * same bits as cpu_adamw. bc1, bc2 = 1 - b^t come from the host, computed in
 * double exactly as the CPU does; gscale is the clipping factor (1: none). */
struct adamw_coef {
    float lr, b1, b2, eps, wd, bc1, bc2;
};

__device__ __forceinline__ void adamw_one(const adamw_coef &c, bool clipped, float gscale, float g, bool decays,
                                          float &p, float &m, float &v) {
    const float gi = clipped ? __fmul_rn(g, gscale) : g;
    const float mi = __fadd_rn(__fmul_rn(c.b1, m), __fmul_rn(__fsub_rn(1.0f, c.b1), gi));
    const float vi = __fadd_rn(__fmul_rn(c.b2, v), __fmul_rn(__fmul_rn(__fsub_rn(1.0f, c.b2), gi), gi));
    m = mi;
    v = vi;
    const float mhat = __fdiv_rn(mi, c.bc1);
    const float vhat = __fdiv_rn(vi, c.bc2);
    /* decoupled weight decay (Loshchilov & Hutter): applied to p, not to g */
    const float decay_term = decays ? __fmul_rn(c.wd, p) : 0.0f;
    const float step = __fadd_rn(__fdiv_rn(mhat, __fadd_rn(__fsqrt_rn(vhat), c.eps)), decay_term);
    p = __fsub_rn(p, __fmul_rn(c.lr, step));
}

/* The clipping factor, from the norm clip_grad_norm left on the device: the
 * (float)(clip / norm) cuda_clip_grad_norm would have scaled g by. */
__device__ __forceinline__ bool adamw_clip(const double *grad_norm, double clip, float *gscale) {
    const double nrm = grad_norm ? *grad_norm : 0.0;
    const bool clipped = clip > 0.0 && nrm > clip; /* false for a NaN norm: the caller reports it */
    *gscale = clipped ? (float)(clip / nrm) : 1.0f;
    return clipped;
}

/* Elements [0, 4*n4) four at a time (16-byte loads of p, g, m, v), the rest
 * one at a time; every element sees the same arithmetic either way. */
__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, const uint8_t *decay, size_t n,
                             size_t n4, adamw_coef c, const double *grad_norm, double clip) {
    float gscale;
    const bool clipped = adamw_clip(grad_norm, clip, &gscale);
    GRID_STRIDE_LOOP(i, n4) {
        float4 pv = reinterpret_cast<float4 *>(p)[i], mv = reinterpret_cast<float4 *>(m)[i];
        float4 vv = reinterpret_cast<float4 *>(v)[i];
        const float4 gv = reinterpret_cast<const float4 *>(g)[i];
        uchar4 dv = make_uchar4(0, 0, 0, 0);
        if (decay) dv = reinterpret_cast<const uchar4 *>(decay)[i];
        adamw_one(c, clipped, gscale, gv.x, dv.x != 0, pv.x, mv.x, vv.x);
        adamw_one(c, clipped, gscale, gv.y, dv.y != 0, pv.y, mv.y, vv.y);
        adamw_one(c, clipped, gscale, gv.z, dv.z != 0, pv.z, mv.z, vv.z);
        adamw_one(c, clipped, gscale, gv.w, dv.w != 0, pv.w, mv.w, vv.w);
        reinterpret_cast<float4 *>(p)[i] = pv;
        reinterpret_cast<float4 *>(m)[i] = mv;
        reinterpret_cast<float4 *>(v)[i] = vv;
    }
    GRID_STRIDE_LOOP(j, n - 4 * n4) {
        const size_t i = 4 * n4 + j;
        adamw_one(c, clipped, gscale, g[i], decay && decay[i], p[i], m[i], v[i]);
    }
}

void cuda_adamw(moe_backend *be, float *p, const float *g, float *m, float *v,
                const uint8_t *decay, size_t n, float lr, float b1, float b2, float eps, float wd,
                long long t, const double *grad_norm, double clip) {
    if (!n) return;
    adamw_coef c;
    c.lr = lr, c.b1 = b1, c.b2 = b2, c.eps = eps, c.wd = wd;
    c.bc1 = (float)(1.0 - pow((double)b1, (double)t));
    c.bc2 = (float)(1.0 - pow((double)b2, (double)t));
    /* the vector body needs 16-byte aligned p, g, m, v and 4-byte aligned decay */
    const bool aligned = (((uintptr_t)p | (uintptr_t)g | (uintptr_t)m | (uintptr_t)v) % 16 == 0) &&
                         (uintptr_t)decay % 4 == 0;
    const size_t n4 = aligned ? n / 4 : 0;
    adamw_kernel<<<cuda_blocks(n4 ? n4 : n), CUDA_THREADS, 0, cuda_stream(be)>>>(p, g, m, v, decay, n, n4, c,
                                                                                  grad_norm, clip);
    KERNEL_CHECK(be, "adamw_kernel");
}
