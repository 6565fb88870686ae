/*
 * The experts' MLP on the GPU (backend.h, ffn_fwd / ffn_bwd).
 *
 * In fp32 this is the reference composition of plain ops
 * (core/backend/composed_ops.c). With bf16 GEMM operands every GEMM input
 * must be rounded to bf16 anyway, so the passes that only move data are
 * folded into the passes that compute:
 *
 *   forward   H = X w1 + b1        bias in the GEMM's epilogue, H fp32
 *             A = act(H)           written once, as bf16 (into A's buffer)
 *             Y = A w2 + b2        A read as it is
 *   backward  dA = dY w2^T         dY rounded once for both its GEMMs, db2
 *                                  summed in that pass; dA written as bf16
 *                                  (into dA's buffer)
 *             dw2 (+)= A^T dY      A read as it is (+= or =: accumulate_dw)
 *             dH = act'(H) dA      written once, as bf16 (into dH's buffer),
 *             db1 += colsum(dH)    summed from the fp32 values in the same pass
 *             dX = dH w1^T, dw1 (+)= X^T dH
 *
 * For GELU, where cuBLASLt takes the shape, the first GEMM's epilogue also
 * applies the bias and the GELU (the tanh form, as the CPU) and writes A and
 * the pre-activation H, both bf16, and the bf16 copy of X the backward
 * needs is kept beside H in H's buffer, so the forward makes no activation
 * pass and the backward rounds no X. When X is a saved activation with an
 * operand copy of its own (keep_activations: dispatch writes it), both
 * passes read that copy instead and nothing is kept beside H.
 *
 * The composition in bf16 mode rounds every GEMM operand (X, the weights,
 * A, dY, dH) to bf16; this path rounds there too, and also where it does
 * not (nor the fp32 CPU):
 *  - dA, for every activation: the dA GEMM writes it in bf16 (each element
 *    rounded once from its fp32 sum), so the dH pass, bound by reading it,
 *    reads half the bytes; act'(H) dA is then taken at dA's bf16 value
 *    (relative error 2^-9 per element, before dH's own rounding);
 *  - with the GELU epilogue, H: the GELU derivative is taken at bf16 H;
 *  - with the GELU epilogue, b1: it enters H with bf16's relative error,
 *    below the rounding of H itself where |b1| <= |H|.
 *
 * The backward does not take dH from cuBLASLt's matching DGELU or
 * DGELU_BGRAD epilogue, measured slower on the H100 with cuBLASLt 13.1 at
 * the expC shape (8 x [2560, 256] x [256, 1024]), where the dA GEMM, the dH
 * pass and db1's finish took ~98 us with dA in fp32 and take ~74 us with
 * dA in bf16 (GEMM 38 -> 24.5 us, dH pass 59 -> 49 us): batched, cuBLASLt
 * runs either as a plain GEMM followed by a separate epilogue kernel
 * (~190 us; ~205 us with the bias gradient, which it offers in bf16 only);
 * one product at a time, DGELU is fused but in an sm80 kernel, 8 x 13 us,
 * ~127 us with db1's column sums over the bf16 dH.
 *
 * The weights are read from round_weights' copies when the caller made them
 * (the model does, once per forward), else rounded once per call
 * (transposed where the GEMM reads them transposed: cuBLAS is fastest with
 * both operands untransposed at these shapes). Elsewhere (SiLU, SwiGLU, GELU where cuBLASLt refuses the
 * epilogue) H stays fp32, and the path differs from the reference by
 * the operand roundings, dA's rounding and fp32 summation order.
 */
#include "backend/cuda/cuda_act.cuh"
#include "backend/cuda/cuda_common.cuh"

static int ffn_in_width(moe_act_kind kind, int n) { return kind == MOE_ACT_SWIGLU ? 2 * n : n; }

/* A[r, j] = bf16(act(H[r, :])) for rows r < rows and j < n. */
__global__ void ffn_act_fwd_kernel(moe_act_kind kind, const float *H, __nv_bfloat16 *A, int n, int hin,
                                   size_t count) {
    GRID_STRIDE_LOOP(i, count) {
        const size_t r = i / (size_t)n, j = i - r * (size_t)n;
        const float *h = H + r * (size_t)hin;
        float v;
        if (kind == MOE_ACT_GELU) v = gelu(h[j]);
        else if (kind == MOE_ACT_SILU) v = silu(h[j]);
        else v = silu(h[j]) * h[n + j]; /* SwiGLU: [gate | up] */
        A[i] = __float2bfloat16_rn(v);
    }
}

/* The same for GELU and SiLU when n is a multiple of 4: four at a time. */
__global__ void ffn_act_fwd_vec4_kernel(moe_act_kind kind, const float4 *H, uint2 *A, size_t count4) {
    GRID_STRIDE_LOOP(i, count4) {
        const float4 h = H[i];
        float v[4] = {h.x, h.y, h.z, h.w};
#pragma unroll
        for (int q = 0; q < 4; ++q) v[q] = kind == MOE_ACT_GELU ? gelu(v[q]) : silu(v[q]);
        A[i] = pack_bf16x4(v[0], v[1], v[2], v[3]);
    }
}

/* Element (t, j) of the batched column sum over batch*hin columns: row t of
 * expert j / hin, column c = j % hin of dH. It computes dH there from H and
 * dA (bf16), stores it as bf16 for the GEMMs, and returns the fp32 value
 * for db1. colsum_partial_kernel calls it once per element. */
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename HT> /* H in fp32, or bf16 when the GELU epilogue saved it */
struct ffn_dh_term {
    moe_act_kind kind;
    const HT *H;
    const __nv_bfloat16 *dA;
    __nv_bfloat16 *dH;
    int C, n, hin;
    __device__ float operator()(int t, int j) const {
        const int e = j / hin, c = j - e * hin;
        const size_t row = (size_t)e * C + t;
        const HT *h = H + row * hin;
        const __nv_bfloat16 *da = dA + row * n;
        float v;
        if (kind == MOE_ACT_GELU) {
            v = to_f32(da[c]) * gelu_grad(to_f32(h[c]));
        } else if (kind == MOE_ACT_SILU) {
            v = to_f32(da[c]) * silu_grad(to_f32(h[c]));
        } else if (c < n) { /* SwiGLU, d/d gate of silu(gate) * up */
            v = to_f32(da[c]) * to_f32(h[n + c]) * silu_grad(to_f32(h[c]));
        } else { /* d/d up */
            v = to_f32(da[c - n]) * silu(to_f32(h[c - n]));
        }
        dH[row * hin + c] = __float2bfloat16_rn(v);
        return v;
    }
};

/* The same pass for GELU and SiLU when hin (= n) is a multiple of 4, four
 * columns per thread: 16-byte (fp32) or 8-byte (bf16) loads of H, 8-byte
 * loads of dA (bf16), an 8-byte store of dH.
 * Block (32, COLSUM_LANES) covers 128 columns of COLSUM_ROWS rows; each
 * thread sums its rows in order, then the lanes are added in lane order,
 * as colsum_partial_kernel does, so the partials are deterministic. */
/* Four values from fp32 (16 bytes) or bf16 (8 bytes). */
__device__ __forceinline__ void load4(const float *p, float v[4]) {
    const float4 h = *reinterpret_cast<const float4 *>(p);
    v[0] = h.x, v[1] = h.y, v[2] = h.z, v[3] = h.w;
}
__device__ __forceinline__ void load4(const __nv_bfloat16 *p, float v[4]) {
    const uint2 u = *reinterpret_cast<const uint2 *>(p);
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&u.y));
    v[0] = lo.x, v[1] = lo.y, v[2] = hi.x, v[3] = hi.y;
}

/* Its chunks are FFN_DH_ROWS rows, not COLSUM_ROWS: the experts' dH has
 * batch * hin columns (8192 at the expC shape), enough blocks already, and
 * longer chunks leave fewer partials to add. */
constexpr int FFN_DH_ROWS = 256;
static_assert(FFN_DH_ROWS >= COLSUM_ROWS, "ffn_bwd sizes the dH partials for COLSUM_ROWS chunks");

template <typename HT>
__global__ void ffn_dh_vec4_kernel(moe_act_kind kind, const HT *H, const __nv_bfloat16 *dA, __nv_bfloat16 *dH,
                                   int C, int hin, int cols, float *partial, colsum_out dst) {
    __shared__ float lane_sums[COLSUM_LANES][128];
    const int chunk = blockIdx.x;
    const int j = blockIdx.y * 128 + threadIdx.x * 4; /* first of this thread's four columns */
    const int t0 = chunk * FFN_DH_ROWS, t1 = min(C, t0 + FFN_DH_ROWS);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (j < cols) {
        const int e = j / hin, c = j - e * hin; /* hin % 4 == 0: the four share an expert */
        for (int t = t0 + threadIdx.y; t < t1; t += COLSUM_LANES) {
            const size_t at = ((size_t)e * C + t) * hin + c;
            float hv[4], gv[4];
            load4(H + at, hv);
            load4(dA + at, gv);
            float v[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                v[q] = gv[q] * (kind == MOE_ACT_GELU ? gelu_grad(hv[q]) : silu_grad(hv[q]));
                acc[q] += v[q];
            }
            *reinterpret_cast<uint2 *>(dH + at) = pack_bf16x4(v[0], v[1], v[2], v[3]);
        }
    }
    colsum4_store(lane_sums, acc, cols, partial, dst);
}

/* The backward's first pass over dY [batch][C][d]: dY rounded to bf16 for
 * both of its GEMMs, and its column sums (db2) taken from the fp32 values
 * in the same pass, in colsum_partial_kernel's order (so db2 is the bits
 * bias_grad_batched would give). Column j of the sum is expert j / d,
 * column j % d. */
struct ffn_dy_term {
    const float *dY;
    __nv_bfloat16 *out;
    int C, d;
    __device__ float operator()(int t, int j) const {
        const int e = j / d, c = j - e * d;
        const size_t at = ((size_t)e * C + t) * d + c;
        const float v = dY[at];
        out[at] = __float2bfloat16_rn(v);
        return v;
    }
};

/* The same four columns per thread (d % 4 == 0, dY 16-byte aligned), with
 * COLSUM_ROWS_IN_FLIGHT rows loaded before the first is used and the
 * staged finish (40 chunks a column at the expC shape; 14.2 -> 14.0 us per
 * call in a softk step, ncu, H100). */
__global__ void ffn_dy_vec4_kernel(const float *__restrict__ dY, __nv_bfloat16 *__restrict__ out, int C, int d,
                                   int cols, float *partial, colsum_out dst) {
    __shared__ float lane_sums[COLSUM_LANES][128];
    const int j = blockIdx.y * 128 + threadIdx.x * 4;
    const int t0 = blockIdx.x * COLSUM_ROWS, t1 = min(C, t0 + COLSUM_ROWS);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (j < cols) {
        const int e = j / d, c = j - e * d; /* d % 4 == 0: the four share an expert */
        const size_t base = (size_t)e * C * d + c;
        round_rows4_colsum(dY + base, out + base, (size_t)d, t0, t1, acc);
    }
    colsum4_store_staged(lane_sums, acc, cols, partial, dst);
}

static bool bf16_mode(moe_backend *be) { return cuda_state(be)->precision == MOE_PRECISION_BF16; }

/* Whether ffn_fwd takes the GELU-epilogue path, and so what H holds for
 * ffn_bwd: [batch][C][n] bf16 pre-activations, then X as [batch][C][d]
 * bf16 (which fits when d <= n). Forward and backward ask with the same
 * buffers and get the same answer; cuBLASLt must take the product with and
 * without a bias, since the backward does not know which the forward had.
 * The weights are rounded into the 256-byte aligned scratch: H's own
 * alignment stands for theirs. */
static bool gelu_epilogue_path(moe_backend *be, moe_act_kind kind, const float *H, const float *A, int batch, int C,
                               int d, int n) {
    if (!bf16_mode(be) || kind != MOE_ACT_GELU || d > n) return false;
    const __nv_bfloat16 *Hh = (const __nv_bfloat16 *)H, *Xs = Hh + (size_t)batch * C * n;
    return cuda_gelu_aux_available(be, C, n, d, Xs, Hh, H, A, Hh, batch) &&
           cuda_gelu_aux_available(be, C, n, d, Xs, Hh, NULL, A, Hh, batch);
}

void cuda_ffn_fwd(moe_backend *be, moe_act_kind kind, const float *X, const float *w1, const float *b1,
                  const float *w2, const float *b2, float *H, float *A, float *Y, int batch, int C, int d,
                  int n) {
    if (!bf16_mode(be) || batch <= 0 || C <= 0 || d <= 0 || n <= 0) {
        moe_ffn_fwd_reference(be, kind, X, w1, b1, w2, b2, H, A, Y, batch, C, d, n);
        return;
    }
    const int hin = ffn_in_width(kind, n);
    const long long sX = (long long)C * d, sH = (long long)C * hin, sA = (long long)C * n;
    const long long sw1 = (long long)d * hin, sw2 = (long long)n * d;
    ScratchLayout lay;
    const size_t x_off = lay.add((size_t)sX * batch * sizeof(__nv_bfloat16));
    const size_t w1_off = lay.add((size_t)sw1 * batch * sizeof(__nv_bfloat16));
    const size_t w2_off = lay.add((size_t)sw2 * batch * sizeof(__nv_bfloat16));
    const size_t b1_off = lay.add((size_t)hin * batch * sizeof(__nv_bfloat16));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    __nv_bfloat16 *Xh = (__nv_bfloat16 *)(base + x_off);
    __nv_bfloat16 *Ah = (__nv_bfloat16 *)A; /* A's buffer holds bf16 from here to ffn_bwd */

    /* the weights as round_weights copied them, or rounded here */
    const __nv_bfloat16 *w1h =
        cuda_bf16_operand(be, w1, hin, sw1, d, hin, batch, (__nv_bfloat16 *)(base + w1_off), false);
    const __nv_bfloat16 *w2h = cuda_bf16_operand(be, w2, d, sw2, n, d, batch, (__nv_bfloat16 *)(base + w2_off), false);
    if (gelu_epilogue_path(be, kind, H, A, batch, C, d, n)) {
        __nv_bfloat16 *Hh = (__nv_bfloat16 *)H, *Xs = Hh + (size_t)batch * C * n;
        /* X's copy where dispatch wrote it (keep_activations), else rounded beside H */
        const __nv_bfloat16 *Xop = cuda_bf16_operand(be, X, d, sX, C, d, batch, Xs, false);
        const __nv_bfloat16 *b1h =
            b1 ? cuda_bf16_operand(be, b1, n, n, 1, n, batch, (__nv_bfloat16 *)(base + b1_off), false) : NULL;
        /* A = gelu(X w1 + b1) and H = X w1 + b1, both bf16, from the epilogue */
        if (!cuda_gemm_bf16_gelu_aux(be, C, n, d, Xop, w1h, b1h, Ah, Hh, batch))
            cuda_record_error(be, __FILE__, __LINE__, "ffn_fwd", "cuBLASLt refused a GELU plan it had accepted");
        cuda_gemm_bf16_operands(be, 0, 0, C, d, n, Ah, n, sA, w2h, d, sw2, b2, d, 0.0f, Y, d, sX, batch);
        return;
    }
    const __nv_bfloat16 *Xop = cuda_bf16_operand(be, X, d, sX, C, d, batch, Xh, false);
    /* H = X w1 + b1 */
    cuda_gemm_bf16_operands(be, 0, 0, C, hin, d, Xop, d, sX, w1h, hin, sw1, b1, hin, 0.0f, H, hin, sH, batch);
    /* A = act(H), bf16 */
    const size_t count = (size_t)batch * C * n;
    if (kind != MOE_ACT_SWIGLU && n % 4 == 0) {
        ffn_act_fwd_vec4_kernel<<<cuda_blocks(count / 4), CUDA_THREADS, 0, cuda_stream(be)>>>(
            kind, (const float4 *)H, (uint2 *)Ah, count / 4);
        KERNEL_CHECK(be, "ffn_act_fwd_vec4_kernel");
    } else {
        ffn_act_fwd_kernel<<<cuda_blocks(count), CUDA_THREADS, 0, cuda_stream(be)>>>(kind, H, Ah, n, hin, count);
        KERNEL_CHECK(be, "ffn_act_fwd_kernel");
    }
    /* Y = A w2 + b2 */
    cuda_gemm_bf16_operands(be, 0, 0, C, d, n, Ah, n, sA, w2h, d, sw2, b2, d, 0.0f, Y, d, sX, batch);
}

void cuda_ffn_bwd(moe_backend *be, moe_act_kind kind, const float *X, const float *w1, const float *w2,
                  const float *H, const float *A, const float *dY, float *dA, float *dH, float *dX, float *dw1,
                  float *db1, float *dw2, float *db2, int batch, int C, int d, int n, int accumulate_dw) {
    if (!bf16_mode(be) || batch <= 0 || C <= 0 || d <= 0 || n <= 0) {
        moe_ffn_bwd_reference(be, kind, X, w1, w2, H, A, dY, dA, dH, dX, dw1, db1, dw2, db2, batch, C, d, n,
                              accumulate_dw);
        return;
    }
    const float dw_beta = accumulate_dw ? 1.0f : 0.0f;
    const int hin = ffn_in_width(kind, n);
    const long long sX = (long long)C * d, sH = (long long)C * hin, sA = (long long)C * n;
    const long long sw1 = (long long)d * hin, sw2 = (long long)n * d;
    const bool saved_bf16 = gelu_epilogue_path(be, kind, H, A, batch, C, d, n);
    const __nv_bfloat16 *Hh = (const __nv_bfloat16 *)H, *Xs = Hh + (size_t)batch * C * n;
    const int cols = batch * hin, nchunks = (C + COLSUM_ROWS - 1) / COLSUM_ROWS;
    const bool vec4 = kind != MOE_ACT_SWIGLU && hin % 4 == 0 && (uintptr_t)H % 16 == 0 && (uintptr_t)dA % 8 == 0;
    dim3 grid;
    if (!colsum_grid(be, C, cols, vec4, "ffn_bwd", &grid)) return;
    /* the vector dH pass takes FFN_DH_ROWS rows per chunk (fewer chunks
     * than COLSUM_ROWS gives, so the partials' space below is enough) */
    const int dh_chunks = vec4 ? (C + FFN_DH_ROWS - 1) / FFN_DH_ROWS : nchunks;
    grid.x = (unsigned)dh_chunks;
    ScratchLayout lay;
    const size_t dy_off = lay.add((size_t)sX * batch * sizeof(__nv_bfloat16));
    const size_t x_off = lay.add((size_t)sX * batch * sizeof(__nv_bfloat16));
    const size_t w1t_off = lay.add((size_t)sw1 * batch * sizeof(__nv_bfloat16));
    const size_t w2t_off = lay.add((size_t)sw2 * batch * sizeof(__nv_bfloat16));
    const size_t part_off = lay.add((size_t)nchunks * cols * sizeof(float));
    const int dy_cols = batch * d;
    const size_t dy_part_off = lay.add((size_t)nchunks * dy_cols * sizeof(float));
    char *base = cuda_scratch(be, lay.total);
    if (!base) return;
    __nv_bfloat16 *dYh = (__nv_bfloat16 *)(base + dy_off), *Xh = (__nv_bfloat16 *)(base + x_off);

    float *partial = (float *)(base + part_off);
    const __nv_bfloat16 *Ah = (const __nv_bfloat16 *)A; /* as ffn_fwd left it */
    __nv_bfloat16 *dAh = (__nv_bfloat16 *)dA, *dHh = (__nv_bfloat16 *)dH;

    /* dY to bf16, db2 summed on the way */
    {
        const bool dy_vec4 = d % 4 == 0 && (uintptr_t)dY % 16 == 0;
        dim3 dy_grid;
        if (!colsum_grid(be, C, dy_cols, dy_vec4, "ffn_bwd (dY)", &dy_grid)) return;
        const colsum_out dy_dst = colsum_dest(be, db2, d, d, dy_grid.y);
        float *dy_partial = (float *)(base + dy_part_off);
        if (dy_vec4) {
            ffn_dy_vec4_kernel<<<dy_grid, dim3(32, COLSUM_LANES), 0, cuda_stream(be)>>>(dY, dYh, C, d, dy_cols,
                                                                                       dy_partial, dy_dst);
        } else {
            colsum_partial_kernel<ffn_dy_term><<<dy_grid, dim3(32, COLSUM_LANES), 0, cuda_stream(be)>>>(
                ffn_dy_term{dY, dYh, C, d}, C, dy_cols, dy_partial, dy_dst);
        }
        KERNEL_CHECK(be, "ffn dY pass");
        colsum_finish_if_needed(be, dy_dst, db2, dy_partial, nchunks, dy_cols, "colsum finish (ffn db2)");
    }
    const __nv_bfloat16 *w2t = /* [d, n] */
        cuda_bf16_operand(be, w2, d, sw2, n, d, batch, (__nv_bfloat16 *)(base + w2t_off), true);
    /* dA = dY w2^T (bf16); dw2 (+)= A^T dY */
    cuda_gemm_bf16_out(be, 0, 0, C, n, d, dYh, d, sX, w2t, n, sw2, dAh, n, sA, batch);
    cuda_gemm_bf16_operands(be, 1, 0, n, d, C, Ah, n, sA, dYh, d, sX, NULL, 0, dw_beta, dw2, d, sw2, batch);
    /* dH = act'(H) dA as bf16, and its column sums in the same pass */
    const dim3 block(32, COLSUM_LANES);
    cudaStream_t st = cuda_stream(be);
    const colsum_out dst = colsum_dest(be, db1, hin, hin, grid.y); /* db1's sums finish in the pass */
    if (vec4 && saved_bf16) {
        ffn_dh_vec4_kernel<__nv_bfloat16><<<grid, block, 0, st>>>(kind, Hh, dAh, dHh, C, hin, cols, partial, dst);
    } else if (vec4) {
        ffn_dh_vec4_kernel<float><<<grid, block, 0, st>>>(kind, H, dAh, dHh, C, hin, cols, partial, dst);
    } else if (saved_bf16) {
        colsum_partial_kernel<ffn_dh_term<__nv_bfloat16>><<<grid, block, 0, st>>>(
            ffn_dh_term<__nv_bfloat16>{kind, Hh, dAh, dHh, C, n, hin}, C, cols, partial, dst);
    } else {
        colsum_partial_kernel<ffn_dh_term<float>><<<grid, block, 0, st>>>(
            ffn_dh_term<float>{kind, H, dAh, dHh, C, n, hin}, C, cols, partial, dst);
    }
    KERNEL_CHECK(be, "ffn dH pass");
    colsum_finish_if_needed(be, dst, db1, partial, dh_chunks, cols, "colsum finish (ffn db1)");
    /* dX = dH w1^T; dw1 (+)= X^T dH */
    const __nv_bfloat16 *w1t = /* [hin, d] */
        cuda_bf16_operand(be, w1, hin, sw1, d, hin, batch, (__nv_bfloat16 *)(base + w1t_off), true);
    cuda_gemm_bf16_operands(be, 0, 0, C, d, hin, dHh, hin, sH, w1t, d, sw1, NULL, 0, 0.0f, dX, d, sX, batch);
    /* X as ffn_fwd read it: the saved activation's copy, or the one it
     * kept beside H, or rounded again */
    const __nv_bfloat16 *Xop = cuda_activation_copy_of(be, X, d, sX, C, d, batch) || !saved_bf16
                                   ? cuda_bf16_operand(be, X, d, sX, C, d, batch, Xh, false)
                                   : Xs;
    cuda_gemm_bf16_operands(be, 1, 0, d, hin, C, Xop, d, sX, dHh, hin, sH, NULL, 0, dw_beta, dw1, hin, sw1, batch);
}
