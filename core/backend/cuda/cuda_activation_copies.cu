/*
 * keep_activations on the GPU (backend.h): in bf16 mode, each declared
 * activation gets a bf16 copy beside it, so that the GEMMs that read it as
 * an operand, in the forward and again in the backward (a layer's input
 * for its dW), read one rounding instead of each rounding it again.
 *
 * Who writes a copy: the op that produces the activation, in the same pass
 * as its fp32 output, when it knows how (cuda_activation_copy_target:
 * LayerNorm, attention, dispatch); otherwise the first GEMM that reads it
 * (cuda_bf16_operand). Either way the copy is the activation rounded to
 * nearest bf16, element by element: exactly what the GEMM would have made,
 * so results are bitwise those without the copies.
 *
 * That is safe because the caller promised that a declared buffer is
 * written at most once until the next declaration: a copy, once written,
 * never goes stale. Since every op runs in order on one stream, "written"
 * is tracked on the host as the ops are enqueued.
 */
#include "backend/cuda/cuda_common.cuh"

/* Elements reserved for a copy: rounded up to a multiple of 8, so every
 * copy starts 16-byte aligned (producers store 8 or 16 bytes at a time). */
static size_t copy_elems(const moe_activation_view &v) { return ((size_t)(v.rows * v.cols) + 7) & ~(size_t)7; }

void cuda_activation_copies_release(cuda_impl *st) {
    free(st->acopy);
    if (st->acopy_mem) cudaFree(st->acopy_mem);
    st->acopy = NULL, st->acopy_mem = NULL;
    st->acopy_n = st->acopy_cap = 0;
    st->acopy_mem_elems = 0;
}

void cuda_keep_activations(moe_backend *be, const moe_activation_view *views, int n) {
    cuda_impl *st = cuda_state(be);
    st->acopy_n = 0; /* forget the earlier list first: a failure below leaves none */
    if (st->precision != MOE_PRECISION_BF16 || n <= 0 || !views) return;
    size_t elems = 0;
    for (int i = 0; i < n; ++i) {
        if (!views[i].data || views[i].rows <= 0 || views[i].cols <= 0) {
            cuda_record_error(be, __FILE__, __LINE__, "keep_activations", "an activation view with no elements");
            return;
        }
        elems += copy_elems(views[i]);
    }
    if (n > st->acopy_cap) {
        cuda_activation_copy *a = (cuda_activation_copy *)realloc(st->acopy, (size_t)n * sizeof *a);
        if (!a) {
            cuda_record_error(be, __FILE__, __LINE__, "keep_activations", "out of host memory for the views");
            return;
        }
        st->acopy = a;
        st->acopy_cap = n;
    }
    if (elems > st->acopy_mem_elems) {
        /* Grows only: the model declares the same buffers every forward.
         * The old copies may still be read by enqueued GEMMs: cudaFree
         * waits for the device before it releases them. */
        if (st->acopy_mem) cudaFree(st->acopy_mem);
        st->acopy_mem = NULL;
        st->acopy_mem_elems = 0;
        void *p = NULL;
        cudaError_t e = cudaMalloc(&p, elems * sizeof(__nv_bfloat16));
        if (e != cudaSuccess) {
            cuda_record_error(be, __FILE__, __LINE__, "cudaMalloc (activation copies)", cudaGetErrorString(e));
            return;
        }
        st->acopy_mem = (__nv_bfloat16 *)p;
        st->acopy_mem_elems = elems;
    }
    size_t at = 0;
    for (int i = 0; i < n; ++i) {
        st->acopy[i].view = views[i];
        st->acopy[i].copy = st->acopy_mem + at;
        st->acopy[i].written = false;
        at += copy_elems(views[i]);
    }
    st->acopy_n = n;
}

cuda_activation_copy *cuda_activation_copy_of(moe_backend *be, const float *src, long long ld, long long stride,
                                              int rows, int cols, int batch) {
    cuda_impl *st = cuda_state(be);
    if (ld != cols || (batch > 1 && stride != (long long)rows * cols)) return NULL;
    for (int i = 0; i < st->acopy_n; ++i) {
        const moe_activation_view &v = st->acopy[i].view;
        if (v.data == src && v.cols == cols && v.rows == (int64_t)rows * batch) return &st->acopy[i];
    }
    return NULL;
}

__nv_bfloat16 *cuda_activation_copy_target(moe_backend *be, const float *dst, long long rows, long long cols) {
    if (rows <= 0 || cols <= 0 || rows > 0x7fffffffLL || cols > 0x7fffffffLL) return NULL;
    cuda_activation_copy *a = cuda_activation_copy_of(be, dst, cols, 0, (int)rows, (int)cols, 1);
    if (!a) return NULL;
    a->written = true;
    return a->copy;
}
