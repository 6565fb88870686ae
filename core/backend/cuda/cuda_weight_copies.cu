/*
 * round_weights on the GPU (backend.h): in bf16 mode, one pass makes a bf16
 * copy of every listed weight and of its transpose; the GEMM paths then
 * read those copies (cuda_bf16_operand) instead of rounding the weight in
 * every call, forward and (transposed) backward. Without the copies a
 * training step rounded ~40 weight operands one launch at a time.
 *
 * Layout of the copies in cuda_impl.wcopy: per view, its `batch` matrices
 * [rows][cols] packed, then the transposes [cols][rows] packed, each copy
 * starting at an even offset.
 */
#include "backend/cuda/cuda_common.cuh"

/* One view as the kernel sees it: where its fp32 rows are, where its two
 * copies go, and the first of its tiles in the kernel's numbering. */
struct weight_tile_view {
    const float *src;
    __nv_bfloat16 *plain, *trans;
    int batch, rows, cols, tiles_x, tiles_y;
    long long first_tile;
};

/* Block = one WT_TILE x WT_TILE tile of one matrix of one view, 256
 * threads: thread (x, y) reads columns 2x, 2x + 1 of rows y, y + 8, ...
 * (8-byte loads), stores them rounded in place two at a time, and after a
 * trip through shared memory stores rows 2x, 2x + 1 of columns y, y + 8,
 * ... of the transpose two at a time (a warp writes 128 contiguous bytes
 * either way). Pairs fall back to single elements at odd widths, where a
 * pair would not be 4-byte aligned, and at the tile's edge. */
constexpr int WT_TILE = 64;

__global__ void __launch_bounds__(256) round_weights_kernel(const weight_tile_view *views, int nviews) {
    __shared__ float tile[WT_TILE][WT_TILE + 1]; /* +1: the column reads hit different banks */
    const long long id = blockIdx.x;
    int v = 0;
    while (v + 1 < nviews && views[v + 1].first_tile <= id) ++v;
    const weight_tile_view w = views[v];
    long long k = id - w.first_tile;
    const int per_matrix = w.tiles_x * w.tiles_y;
    const int b = (int)(k / per_matrix);
    k -= (long long)b * per_matrix;
    const int r0 = (int)(k / w.tiles_x) * WT_TILE, c0 = (int)(k % w.tiles_x) * WT_TILE;
    const size_t mat = (size_t)w.rows * w.cols;
    const float *s = w.src + b * mat;
    __nv_bfloat16 *plain = w.plain + b * mat, *trans = w.trans + b * mat;
    const int x = threadIdx.x, y = threadIdx.y;
    /* pairs need 8-byte aligned fp32 and 4-byte aligned bf16: even widths
     * (the copies start at even offsets) and an 8-byte aligned source */
    const bool pairs_in = (w.cols % 2) == 0 && ((uintptr_t)w.src & 7) == 0, pairs_out = (w.rows % 2) == 0;
    const int c = c0 + 2 * x;
    for (int i = y; i < WT_TILE; i += 8) {
        const int r = r0 + i;
        if (r >= w.rows || c >= w.cols) continue;
        const float *src = s + (size_t)r * w.cols + c;
        __nv_bfloat16 *dst = plain + (size_t)r * w.cols + c;
        if (pairs_in && c + 1 < w.cols) {
            const float2 v2 = *reinterpret_cast<const float2 *>(src);
            tile[i][2 * x] = v2.x, tile[i][2 * x + 1] = v2.y;
            *reinterpret_cast<__nv_bfloat162 *>(dst) = __floats2bfloat162_rn(v2.x, v2.y);
        } else {
            tile[i][2 * x] = src[0];
            dst[0] = __float2bfloat16_rn(src[0]);
            if (c + 1 < w.cols) {
                tile[i][2 * x + 1] = src[1];
                dst[1] = __float2bfloat16_rn(src[1]);
            }
        }
    }
    __syncthreads();
    const int r = r0 + 2 * x; /* this thread's two rows of the transpose's columns */
    for (int j = y; j < WT_TILE; j += 8) {
        const int cc = c0 + j;
        if (cc >= w.cols || r >= w.rows) continue;
        __nv_bfloat16 *dst = trans + (size_t)cc * w.rows + r;
        if (pairs_out && r + 1 < w.rows) {
            *reinterpret_cast<__nv_bfloat162 *>(dst) = __floats2bfloat162_rn(tile[2 * x][j], tile[2 * x + 1][j]);
        } else {
            dst[0] = __float2bfloat16_rn(tile[2 * x][j]);
            if (r + 1 < w.rows) dst[1] = __float2bfloat16_rn(tile[2 * x + 1][j]);
        }
    }
}

/* Elements reserved for one of a view's two copies: its size rounded up to
 * even, so every copy starts 4-byte aligned (the kernel stores pairs). */
static size_t copy_elems(const moe_weight_view &v) { return ((size_t)v.batch * v.rows * v.cols + 1) & ~(size_t)1; }

void cuda_weight_copies_release(cuda_impl *st) {
    free(st->wv);
    free(st->wv_copy);
    if (st->wcopy) cudaFree(st->wcopy);
    if (st->d_wv_table) cudaFree(st->d_wv_table);
    st->wv = NULL, st->wv_copy = NULL, st->wcopy = NULL, st->d_wv_table = NULL;
    st->wv_n = st->wv_cap = 0;
    st->wcopy_elems = st->d_wv_table_bytes = 0;
    st->wv_params = NULL;
}

/* Grows a device buffer to at least `bytes` (its contents are not kept). */
static bool grow_device(moe_backend *be, void **p, size_t *have, size_t bytes, const char *what) {
    if (*have >= bytes) return true;
    if (*p) cudaFree(*p);
    *p = NULL;
    *have = 0;
    cudaError_t e = cudaMalloc(p, bytes);
    if (e != cudaSuccess) {
        *p = NULL;
        cuda_record_error(be, __FILE__, __LINE__, what, cudaGetErrorString(e));
        return false;
    }
    *have = bytes;
    return true;
}

void cuda_round_weights(moe_backend *be, const float *params, const moe_weight_view *views, int n) {
    cuda_impl *st = cuda_state(be);
    st->wv_n = 0; /* forget the earlier list first: a failure below leaves none */
    if (st->precision != MOE_PRECISION_BF16 || n <= 0 || !params || !views) return;
    if (n > st->wv_cap) {
        moe_weight_view *wv = (moe_weight_view *)realloc(st->wv, (size_t)n * sizeof *wv);
        long long *wc = wv ? (long long *)realloc(st->wv_copy, (size_t)n * sizeof *wc) : NULL;
        if (wv) st->wv = wv;
        if (wc) st->wv_copy = wc;
        if (!wv || !wc) {
            cuda_record_error(be, __FILE__, __LINE__, "round_weights", "out of host memory for the weight views");
            return;
        }
        st->wv_cap = n;
    }
    weight_tile_view *table = (weight_tile_view *)malloc((size_t)n * sizeof *table);
    if (!table) {
        cuda_record_error(be, __FILE__, __LINE__, "round_weights", "out of host memory for the weight views");
        return;
    }
    size_t elems = 0;
    long long tiles = 0;
    for (int i = 0; i < n; ++i) {
        const moe_weight_view v = views[i];
        if (v.batch <= 0 || v.rows <= 0 || v.cols <= 0 || v.offset < 0) {
            free(table);
            cuda_record_error(be, __FILE__, __LINE__, "round_weights", "a weight view with no elements or a negative offset");
            return;
        }
        st->wv[i] = v;
        st->wv_copy[i] = (long long)elems;
        const size_t numel = copy_elems(v);
        table[i].src = params + v.offset;
        table[i].batch = v.batch, table[i].rows = v.rows, table[i].cols = v.cols;
        table[i].tiles_x = (v.cols + WT_TILE - 1) / WT_TILE, table[i].tiles_y = (v.rows + WT_TILE - 1) / WT_TILE;
        table[i].first_tile = tiles;
        tiles += (long long)v.batch * table[i].tiles_x * table[i].tiles_y;
        elems += 2 * numel;
    }
    bool ok = tiles <= 0x7fffffffLL;
    if (!ok) cuda_record_error(be, __FILE__, __LINE__, "round_weights", "more than 2^31 tiles of weights");
    void *wcopy = st->wcopy;
    size_t have = st->wcopy_elems * sizeof(__nv_bfloat16);
    ok = ok && grow_device(be, &wcopy, &have, elems * sizeof(__nv_bfloat16), "cudaMalloc (weight copies)");
    st->wcopy = (__nv_bfloat16 *)wcopy;
    st->wcopy_elems = have / sizeof(__nv_bfloat16);
    ok = ok && grow_device(be, &st->d_wv_table, &st->d_wv_table_bytes, (size_t)n * sizeof *table,
                           "cudaMalloc (weight view table)");
    if (ok) {
        for (int i = 0; i < n; ++i) {
            const size_t numel = copy_elems(views[i]);
            table[i].plain = st->wcopy + st->wv_copy[i];
            table[i].trans = table[i].plain + numel;
        }
        be->from_host(be, st->d_wv_table, table, (size_t)n * sizeof *table); /* ordered before the kernel */
        round_weights_kernel<<<(unsigned)tiles, dim3(32, 8), 0, cuda_stream(be)>>>(
            (const weight_tile_view *)st->d_wv_table, n);
        ok = cuda_after_launch(be, __FILE__, __LINE__, "round_weights_kernel") != 0;
    }
    free(table);
    if (!ok) return;
    st->wv_params = params;
    st->wv_n = n;
}

const __nv_bfloat16 *cuda_weight_copy(moe_backend *be, const float *src, long long ld, long long stride, int rows,
                                      int cols, int batch, bool transpose) {
    const cuda_impl *st = cuda_state(be);
    if (st->wv_n == 0 || src < st->wv_params || ld != cols) return NULL;
    const long long offset = src - st->wv_params;
    for (int i = 0; i < st->wv_n; ++i) {
        const moe_weight_view &v = st->wv[i];
        if (v.offset != offset || v.rows != rows || v.cols != cols || v.batch != batch) continue;
        if (batch > 1 && stride != (long long)rows * cols) continue;
        const __nv_bfloat16 *plain = st->wcopy + st->wv_copy[i];
        return transpose ? plain + copy_elems(v) : plain;
    }
    return NULL;
}

const __nv_bfloat16 *cuda_bf16_operand(moe_backend *be, const float *src, long long ld, long long stride, int rows,
                                       int cols, int batch, __nv_bfloat16 *dst, bool transpose) {
    const __nv_bfloat16 *copy = cuda_weight_copy(be, src, ld, stride, rows, cols, batch, transpose);
    if (copy) return copy;
    cuda_activation_copy *a = transpose ? NULL : cuda_activation_copy_of(be, src, ld, stride, rows, cols, batch);
    if (a) { /* a saved activation: its copy, made now by the first GEMM to read it */
        if (!a->written) cuda_round_bf16(be, src, ld, stride, rows, cols, batch, a->copy, false);
        a->written = true;
        return a->copy;
    }
    cuda_round_bf16(be, src, ld, stride, rows, cols, batch, dst, transpose);
    return dst;
}
