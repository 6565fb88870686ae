/*
 * Timing for benchmarks on the CUDA backend: events are CUDA events recorded
 * on the backend's stream, and the GEMM rate (the MFU denominator) is
 * measured on a large square product with bf16 operands and fp32
 * accumulation, the work the bf16 backend's GEMMs do.
 */
#include <cuda_bf16.h>
#include <stdlib.h>

#include "backend/cuda/cuda_common.cuh"

void *cuda_event_create(moe_backend *be) {
    cudaEvent_t ev = NULL;
    CUDA_CHECK_RET(be, cudaEventCreate(&ev), (void *)NULL);
    return (void *)ev;
}

void cuda_event_destroy(moe_backend *be, void *ev) {
    if (!ev) return;
    CUDA_CHECK(be, cudaEventDestroy((cudaEvent_t)ev));
}

void cuda_event_record(moe_backend *be, void *ev) {
    CUDA_CHECK(be, cudaEventRecord((cudaEvent_t)ev, cuda_stream(be)));
}

/* Waits for `end`, so the time of everything queued before it is counted. */
float cuda_event_elapsed_ms(moe_backend *be, void *start, void *end) {
    float ms = 0.0f;
    CUDA_CHECK_RET(be, cudaEventSynchronize((cudaEvent_t)end), 0.0f);
    CUDA_CHECK_RET(be, cudaEventElapsedTime(&ms, (cudaEvent_t)start, (cudaEvent_t)end), 0.0f);
    return ms;
}

/* Operands from a hash of the index, in [-0.5, 0.5): not zeros, on which
 * tensor cores run measurably faster than on real data. */
__global__ void gemm_bench_fill_kernel(__nv_bfloat16 *x, size_t n, uint32_t salt) {
    GRID_STRIDE_LOOP(i, n) {
        uint32_t h = (uint32_t)i * 2654435761u ^ salt;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        x[i] = __float2bfloat16_rn((float)(h & 0xFFFF) / 65536.0f - 0.5f);
    }
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Median of 10 timed 8192^3 products (1.1 TFLOP each, about 1.4 ms on an
 * H100) after 3 warm-ups; 0 on failure. Uses 768 MB of device memory for
 * the duration of the call. */
double cuda_measure_gemm_tflops(moe_backend *be) {
    const int n = 8192, warmup = 3, reps = 10;
    const size_t elems = (size_t)n * n;
    cudaStream_t st = cuda_stream(be);
    cublasHandle_t h = cuda_state(be)->cublas;
    __nv_bfloat16 *a = NULL, *b = NULL;
    float *c = NULL;
    cudaEvent_t ev0 = NULL, ev1 = NULL;
    float ms[10];
    double result = 0.0;
    const float alpha = 1.0f, beta = 0.0f;
    int ok = 1;

    /* A failure below leaves ok = 0 and falls through to the clean-up. */
#define BENCH_CUDA(call) CUDA_OK_OR(be, call, { ok = 0; goto done; })
#define BENCH_CUBLAS(call)                                                                    \
    do {                                                                                      \
        cublasStatus_t cs_ = (call);                                                          \
        if (cs_ != CUBLAS_STATUS_SUCCESS) {                                                   \
            cuda_record_error(be, __FILE__, __LINE__, #call, cublasGetStatusString(cs_));     \
            ok = 0;                                                                           \
            goto done;                                                                        \
        }                                                                                     \
    } while (0)

    BENCH_CUDA(cudaMalloc(&a, elems * sizeof *a));
    BENCH_CUDA(cudaMalloc(&b, elems * sizeof *b));
    BENCH_CUDA(cudaMalloc(&c, elems * sizeof *c));
    BENCH_CUDA(cudaEventCreate(&ev0));
    BENCH_CUDA(cudaEventCreate(&ev1));
    gemm_bench_fill_kernel<<<cuda_blocks(elems), CUDA_THREADS, 0, st>>>(a, elems, 0x1234567u);
    if (!cuda_after_launch(be, __FILE__, __LINE__, "gemm_bench_fill_kernel")) {
        ok = 0;
        goto done;
    }
    gemm_bench_fill_kernel<<<cuda_blocks(elems), CUDA_THREADS, 0, st>>>(b, elems, 0x89abcdefu);
    if (!cuda_after_launch(be, __FILE__, __LINE__, "gemm_bench_fill_kernel")) {
        ok = 0;
        goto done;
    }
    for (int r = 0; r < warmup + reps; ++r) {
        BENCH_CUDA(cudaEventRecord(ev0, st));
        BENCH_CUBLAS(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, b, CUDA_R_16BF, n, a,
                                  CUDA_R_16BF, n, &beta, c, CUDA_R_32F, n, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
        BENCH_CUDA(cudaEventRecord(ev1, st));
        BENCH_CUDA(cudaEventSynchronize(ev1));
        if (r >= warmup) BENCH_CUDA(cudaEventElapsedTime(&ms[r - warmup], ev0, ev1));
    }
    qsort(ms, reps, sizeof ms[0], cmp_float);
    result = 2.0 * n * (double)n * n / (ms[reps / 2] * 1e-3) / 1e12;
#undef BENCH_CUDA
#undef BENCH_CUBLAS

done:
    /* clean-up errors are not worth a second report: the first one is kept */
    cudaStreamSynchronize(st);
    if (ev0) cudaEventDestroy(ev0);
    if (ev1) cudaEventDestroy(ev1);
    cudaFree(a);
    cudaFree(b);
    cudaFree(c);
    (void)cudaGetLastError();
    return ok ? result : 0.0;
}
