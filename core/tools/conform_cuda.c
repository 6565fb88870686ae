/*
 * moe-conform on CUDA: device memory, copies and a stream for the plugin's
 * cuda table. Built only when the project is configured with CUDA
 * (MOE_WITH_CUDA); the CPU-only build reports the CUDA checks as SKIP.
 *
 * Plain C against the CUDA runtime API: the plugin receives a cudaStream_t
 * in ctx->stream and device pointers in its args, exactly as from the host.
 * The stream is a blocking one, so the synchronous cudaMemcpy calls that
 * fill the inputs are ordered before the plugin's kernels.
 */
#include <cuda_runtime_api.h>
#include <stdio.h>

#include "tools/conform.h"

int cf_cuda_open(char *name, size_t name_cap, void **stream, char *why, size_t cap) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        snprintf(why, cap, "no usable CUDA device: %s", cudaGetErrorString(e));
        return -1;
    }
    if (n < 1) {
        snprintf(why, cap, "no CUDA device present");
        return -1;
    }
    e = cudaSetDevice(0);
    struct cudaDeviceProp prop;
    if (e == cudaSuccess) e = cudaGetDeviceProperties(&prop, 0);
    cudaStream_t s = NULL;
    if (e == cudaSuccess) e = cudaStreamCreate(&s);
    if (e != cudaSuccess) {
        snprintf(why, cap, "CUDA device 0 cannot be used: %s", cudaGetErrorString(e));
        return -1;
    }
    snprintf(name, name_cap, "cuda (device 0: %s, sm_%d%d)", prop.name, prop.major, prop.minor);
    *stream = s;
    return 0;
}

void cf_cuda_close(void *stream) {
    if (stream) cudaStreamDestroy((cudaStream_t)stream);
}

void *cf_cuda_alloc(size_t bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 256) != cudaSuccess) return NULL;
    return p;
}

void cf_cuda_free(void *p) {
    if (p) cudaFree(p);
}

int cf_cuda_h2d(void *dst, const void *src, size_t bytes) {
    if (!bytes) return 0;
    return cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice) == cudaSuccess ? 0 : -1;
}

int cf_cuda_d2h(void *dst, const void *src, size_t bytes) {
    if (!bytes) return 0;
    return cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost) == cudaSuccess ? 0 : -1;
}

int cf_cuda_sync(void *stream, char *why, size_t cap) {
    cudaError_t e = cudaStreamSynchronize((cudaStream_t)stream);
    if (e == cudaSuccess) e = cudaGetLastError();
    if (e != cudaSuccess) {
        snprintf(why, cap, "%s", cudaGetErrorString(e));
        return -1;
    }
    return 0;
}
