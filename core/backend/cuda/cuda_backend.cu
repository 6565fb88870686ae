/*
 * The CUDA backend object: device selection, the stream and cuBLAS handle,
 * memory ops, error recording, scratch memory, and the op table (the ops are
 * in the files listed in cuda_common.cuh).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_common.cuh"

/* ------------------------------------------------------------------ */
/* Errors                                                              */
/* ------------------------------------------------------------------ */

/* Printing stops after this many, so a dead context does not flood the log
 * (every later call fails the same way); the first one is the one that matters. */
#define CUDA_MAX_PRINTED_ERRORS 8

void cuda_record_error(moe_backend *be, const char *file, int line, const char *what,
                       const char *why) {
    cuda_impl *st = cuda_state(be);
    /* A failed runtime call also sets the thread's "last error"; clear it so
     * the next launch check does not blame an innocent kernel. */
    (void)cudaGetLastError();
    if (st->err[0] == '\0')
        snprintf(st->err, sizeof st->err, "%s:%d: %s: %s", file, line, what, why);
    if (st->errors_printed < CUDA_MAX_PRINTED_ERRORS) {
        fprintf(stderr, "moe cuda backend: %s:%d: %s: %s\n", file, line, what, why);
        if (++st->errors_printed == CUDA_MAX_PRINTED_ERRORS)
            fprintf(stderr, "moe cuda backend: further errors not printed\n");
    }
}

int cuda_after_launch(moe_backend *be, const char *file, int line, const char *kernel) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess && cuda_state(be)->sync_each_launch)
        e = cudaStreamSynchronize(cuda_stream(be));
    if (e != cudaSuccess) {
        cuda_record_error(be, file, line, kernel, cudaGetErrorString(e));
        return 0;
    }
    return 1;
}

/* Reads and clears the kernels' invalid-index flags (waits for the stream). */
static void check_device_flags(moe_backend *be) {
    cuda_impl *st = cuda_state(be);
    int flags = 0;
    CUDA_CHECK(be, cudaMemcpyAsync(&flags, st->d_flags, sizeof flags, cudaMemcpyDeviceToHost, st->stream));
    CUDA_CHECK(be, cudaStreamSynchronize(st->stream));
    if (!flags) return;
    CUDA_CHECK(be, cudaMemsetAsync(st->d_flags, 0, sizeof(int), st->stream));
    if (flags & CUDA_FLAG_TOKEN_ID)
        cuda_record_error(be, __FILE__, __LINE__, "embed_fwd/embed_bwd", "negative token id");
    if (flags & CUDA_FLAG_ROUTING)
        cuda_record_error(be, __FILE__, __LINE__, "capacity/dispatch/combine",
                          "expert index >= E or slot outside [0, C)");
    if (flags & CUDA_FLAG_TARGET)
        cuda_record_error(be, __FILE__, __LINE__, "xent_fwd_bwd", "target index >= V");
}

extern "C" int moe_cuda_backend_check(moe_backend *be, char *msg, size_t cap) {
    cuda_impl *st = cuda_state(be);
    cudaError_t e = cudaStreamSynchronize(st->stream);
    if (e != cudaSuccess) cuda_record_error(be, __FILE__, __LINE__, "cudaStreamSynchronize", cudaGetErrorString(e));
    check_device_flags(be);
    if (st->err[0] == '\0') return 0;
    if (msg && cap) snprintf(msg, cap, "%s", st->err);
    return -1;
}

/* ------------------------------------------------------------------ */
/* Scratch                                                             */
/* ------------------------------------------------------------------ */

char *cuda_scratch(moe_backend *be, size_t bytes) {
    cuda_impl *st = cuda_state(be);
    /* A request for 0 bytes (an op whose layout needs nothing at this size)
     * still gets a buffer: its caller reads NULL as "failed, error recorded"
     * and skips its work, so NULL here, before the first allocation, made
     * such an op silently do nothing when it ran first. */
    if (st->scratch && bytes <= st->scratch_bytes) return (char *)st->scratch;
    /* Grow to the next MiB (at least one) with 25% headroom, so a slowly
     * rising need (a longer batch) does not reallocate every step. Earlier
     * ops may still be reading the old buffer: wait for them before freeing
     * it. */
    const size_t mib = (size_t)1 << 20;
    size_t want = bytes + bytes / 4;
    want = want < mib ? mib : (want + mib - 1) & ~(mib - 1);
    cudaError_t e = cudaStreamSynchronize(st->stream);
    if (e == cudaSuccess && st->scratch) e = cudaFree(st->scratch);
    st->scratch = NULL;
    st->scratch_bytes = 0;
    if (e == cudaSuccess) e = cudaMalloc(&st->scratch, want);
    if (e != cudaSuccess) {
        st->scratch = NULL;
        char why[160];
        snprintf(why, sizeof why, "%s (asked for %zu bytes of scratch)", cudaGetErrorString(e), want);
        cuda_record_error(be, __FILE__, __LINE__, "cuda_scratch", why);
        return NULL;
    }
    st->scratch_bytes = want;
    return (char *)st->scratch;
}

bool cuda_is_device_ptr(const void *p) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        (void)cudaGetLastError(); /* not a launch failure: clear it */
        return false;
    }
    return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

/* ------------------------------------------------------------------ */
/* Memory                                                              */
/* ------------------------------------------------------------------ */

/* Zeroed, and ready when this returns (the memset is waited for), so the
 * memory may be used from any stream at once. Allocation is rare (set-up),
 * so the wait costs nothing that matters. Out of memory gives NULL without
 * recording an error: the caller decides what that means. */
static void *cuda_alloc(moe_backend *be, size_t bytes) {
    /* 0 bytes still gets a unique, valid pointer, as on the CPU */
    size_t n = bytes ? bytes : 256;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* not a launch failure: clear it */
        return NULL;
    }
    CUDA_OK_OR(be, cudaMemsetAsync(p, 0, n, cuda_stream(be)), { cudaFree(p); return NULL; });
    CUDA_OK_OR(be, cudaStreamSynchronize(cuda_stream(be)), { cudaFree(p); return NULL; });
    return p;
}

/* Kernels queued earlier may still use p: wait for them first. */
static void cuda_free_mem(moe_backend *be, void *p) {
    if (!p) return;
    CUDA_CHECK(be, cudaStreamSynchronize(cuda_stream(be)));
    CUDA_CHECK(be, cudaFree(p));
}

/* Copies use cudaMemcpyDefault (unified addressing tells host from device),
 * so a caller that passes the "wrong" kind of pointer still gets a correct
 * copy. to_host waits: the caller reads the host buffer as soon as it
 * returns. from_host lets the caller reuse its buffer at once: small copies
 * (a batch's token ids, a guard pattern) go through pinned staging and are
 * only queued; larger ones (parameters at set-up, checkpoints) wait. */
static void cuda_to_host(moe_backend *be, void *dst_host, const void *src, size_t bytes) {
    if (!bytes) return;
    CUDA_CHECK(be, cudaMemcpyAsync(dst_host, src, bytes, cudaMemcpyDefault, cuda_stream(be)));
    CUDA_CHECK(be, cudaStreamSynchronize(cuda_stream(be)));
}

#define UPLOAD_HALF_BYTES ((size_t)1 << 20)

static void cuda_from_host(moe_backend *be, void *dst, const void *src_host, size_t bytes) {
    if (!bytes) return;
    cuda_impl *st = cuda_state(be);
    if (bytes <= UPLOAD_HALF_BYTES && st->upload_stage[0] && st->upload_stage[1]) {
        int h = st->upload_half;
        if (st->upload_used[h] + bytes > UPLOAD_HALF_BYTES) {
            /* switch halves; the other one's copies were queued before this
             * half's, so in a training loop they are long done */
            h ^= 1;
            CUDA_CHECK(be, cudaEventSynchronize(st->upload_done[h]));
            st->upload_used[h] = 0;
            st->upload_half = h;
        }
        char *stage = st->upload_stage[h] + st->upload_used[h];
        memcpy(stage, src_host, bytes);
        CUDA_CHECK(be, cudaMemcpyAsync(dst, stage, bytes, cudaMemcpyDefault, st->stream));
        CUDA_CHECK(be, cudaEventRecord(st->upload_done[h], st->stream));
        st->upload_used[h] += (bytes + 255) / 256 * 256;
        return;
    }
    CUDA_CHECK(be, cudaMemcpyAsync(dst, src_host, bytes, cudaMemcpyDefault, st->stream));
    CUDA_CHECK(be, cudaStreamSynchronize(st->stream));
}

static void cuda_copy(moe_backend *be, void *dst, const void *src, size_t bytes) {
    if (!bytes || dst == src) return;
    CUDA_CHECK(be, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cuda_stream(be)));
}

static void cuda_zero(moe_backend *be, void *p, size_t bytes) {
    if (!bytes) return;
    CUDA_CHECK(be, cudaMemsetAsync(p, 0, bytes, cuda_stream(be)));
}

/* Waits for the stream and surfaces the kernels' invalid-index flags. */
static void cuda_sync(moe_backend *be) {
    CUDA_CHECK(be, cudaStreamSynchronize(cuda_stream(be)));
    check_device_flags(be);
}

/* ------------------------------------------------------------------ */
/* Creation                                                            */
/* ------------------------------------------------------------------ */

/* A trivial kernel: asking for its attributes tells whether this binary
 * carries code the device can run (it is built for sm_90). */
__global__ void cuda_probe_kernel() {}

static void release(moe_backend *be) {
    if (!be) return;
    cuda_impl *st = cuda_state(be);
    if (st) {
        if (st->stream) cudaStreamSynchronize(st->stream);
        cuda_lt_release(st);
        if (st->cublas) cublasDestroy(st->cublas);
        if (st->scratch) cudaFree(st->scratch);
        if (st->d_flags) cudaFree(st->d_flags);
        if (st->d_aux_out) cudaFree(st->d_aux_out);
        if (st->d_check_keys) cudaFree(st->d_check_keys);
        if (st->d_slot_holders) cudaFree(st->d_slot_holders);
        if (st->d_slot_sums) cudaFree(st->d_slot_sums);
        if (st->d_tickets) cudaFree(st->d_tickets);
        cuda_weight_copies_release(st);
        cuda_activation_copies_release(st);
        for (int h = 0; h < 2; ++h) {
            if (st->upload_stage[h]) cudaFreeHost(st->upload_stage[h]);
            if (st->upload_done[h]) cudaEventDestroy(st->upload_done[h]);
        }
        if (st->stream) cudaStreamDestroy(st->stream);
        free(st);
    }
    free(be);
}

static void cuda_destroy(moe_backend *be) { release(be); }

extern "C" int moe_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError(); /* no driver, or no device: not an error for later calls */
        return 0;
    }
    return n;
}

#define CREATE_FAIL(...)                                   \
    do {                                                   \
        if (err && errcap) snprintf(err, errcap, __VA_ARGS__); \
        release(be);                                       \
        return NULL;                                       \
    } while (0)

extern "C" moe_backend *moe_backend_cuda_create(int ordinal, moe_precision precision, char *err,
                                                size_t errcap) {
    moe_backend *be = NULL;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        CREATE_FAIL("no usable CUDA device: cudaGetDeviceCount: %s", cudaGetErrorString(e));
    }
    if (count == 0) CREATE_FAIL("no CUDA device present");
    if (ordinal < 0 || ordinal >= count)
        CREATE_FAIL("CUDA device %d requested but %d device(s) present (ordinals 0..%d)", ordinal,
                    count, count - 1);
    if (precision != MOE_PRECISION_FP32 && precision != MOE_PRECISION_BF16)
        CREATE_FAIL("unknown CUDA backend precision %d (0 = fp32, 1 = bf16)", (int)precision);
    if ((e = cudaSetDevice(ordinal)) != cudaSuccess)
        CREATE_FAIL("cudaSetDevice(%d): %s", ordinal, cudaGetErrorString(e));

    cudaDeviceProp prop;
    if ((e = cudaGetDeviceProperties(&prop, ordinal)) != cudaSuccess)
        CREATE_FAIL("cudaGetDeviceProperties(%d): %s", ordinal, cudaGetErrorString(e));
    cudaFuncAttributes attr;
    if ((e = cudaFuncGetAttributes(&attr, cuda_probe_kernel)) != cudaSuccess) {
        (void)cudaGetLastError();
        CREATE_FAIL("CUDA device %d (%s, compute capability %d.%d) cannot run this build's kernels "
                    "(built for sm_90): %s",
                    ordinal, prop.name, prop.major, prop.minor, cudaGetErrorString(e));
    }

    be = (moe_backend *)calloc(1, sizeof *be);
    if (!be) CREATE_FAIL("out of host memory");
    cuda_impl *st = (cuda_impl *)calloc(1, sizeof *st);
    if (!st) CREATE_FAIL("out of host memory");
    be->impl = st;
    st->precision = precision;
    const char *sync_env = getenv("MOE_CUDA_SYNC_CHECK");
    st->sync_each_launch = sync_env && sync_env[0] && strcmp(sync_env, "0") != 0;

    /* Non-blocking: the legacy default stream, which other libraries may
     * use, never serialises with ours. */
    if ((e = cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking)) != cudaSuccess)
        CREATE_FAIL("cudaStreamCreateWithFlags: %s", cudaGetErrorString(e));
    cublasStatus_t cs = cublasCreate(&st->cublas);
    if (cs != CUBLAS_STATUS_SUCCESS) {
        st->cublas = NULL;
        CREATE_FAIL("cublasCreate: %s", cublasGetStatusString(cs));
    }
    if ((cs = cublasSetStream(st->cublas, st->stream)) != CUBLAS_STATUS_SUCCESS)
        CREATE_FAIL("cublasSetStream: %s", cublasGetStatusString(cs));
    /* Pure fp32 for the fp32 GEMMs (no TF32), so results match the CPU to
     * fp32 rounding; the bf16 path asks for its types explicitly. */
    if ((cs = cublasSetMathMode(st->cublas, CUBLAS_DEFAULT_MATH)) != CUBLAS_STATUS_SUCCESS)
        CREATE_FAIL("cublasSetMathMode: %s", cublasGetStatusString(cs));
    if ((cs = cublasLtCreate(&st->lt)) != CUBLAS_STATUS_SUCCESS) {
        st->lt = NULL;
        CREATE_FAIL("cublasLtCreate: %s", cublasGetStatusString(cs));
    }
    st->lt_workspace_bytes = (size_t)32 << 20;
    if ((e = cudaMalloc(&st->lt_workspace, st->lt_workspace_bytes)) != cudaSuccess) {
        st->lt_workspace = NULL;
        CREATE_FAIL("cudaMalloc (cuBLASLt workspace): %s", cudaGetErrorString(e));
    }
    if ((e = cudaMalloc(&st->d_flags, sizeof(int))) != cudaSuccess) {
        st->d_flags = NULL;
        CREATE_FAIL("cudaMalloc (error flags): %s", cudaGetErrorString(e));
    }
    if ((e = cudaMalloc(&st->d_check_keys, sizeof(unsigned long long))) != cudaSuccess ||
        (e = cudaMemsetAsync(st->d_check_keys, 0xFF, sizeof(unsigned long long), st->stream)) != cudaSuccess) {
        if (st->d_check_keys) cudaFree(st->d_check_keys);
        st->d_check_keys = NULL;
        CREATE_FAIL("cudaMalloc (routing check key): %s", cudaGetErrorString(e));
    }
    if ((e = cudaMalloc(&st->d_aux_out, 2 * sizeof(double))) != cudaSuccess) {
        st->d_aux_out = NULL;
        CREATE_FAIL("cudaMalloc (aux results): %s", cudaGetErrorString(e));
    }
    if ((e = cudaMalloc(&st->d_tickets, CUDA_TICKETS * sizeof(int))) != cudaSuccess ||
        (e = cudaMemset(st->d_tickets, 0, CUDA_TICKETS * sizeof(int))) != cudaSuccess) {
        if (st->d_tickets) cudaFree(st->d_tickets);
        st->d_tickets = NULL;
        CREATE_FAIL("cudaMalloc (reduction tickets): %s", cudaGetErrorString(e));
    }
    /* Pinned staging for from_host; without it (pinned memory refused)
     * from_host falls back to waiting copies. */
    for (int h = 0; h < 2; ++h) {
        if (cudaMallocHost((void **)&st->upload_stage[h], UPLOAD_HALF_BYTES) != cudaSuccess ||
            cudaEventCreateWithFlags(&st->upload_done[h], cudaEventDisableTiming) != cudaSuccess) {
            (void)cudaGetLastError();
            if (st->upload_stage[h]) cudaFreeHost(st->upload_stage[h]);
            st->upload_stage[h] = NULL;
            st->upload_done[h] = NULL;
        }
    }
    if ((e = cudaMemsetAsync(st->d_flags, 0, sizeof(int), st->stream)) != cudaSuccess ||
        (e = cudaStreamSynchronize(st->stream)) != cudaSuccess)
        CREATE_FAIL("clearing the error flags: %s", cudaGetErrorString(e));

    be->name = "cuda";
    be->device = MOE_DEVICE_CUDA;
    be->stream = (void *)st->stream;
    be->device_ordinal = ordinal;
    be->destroy = cuda_destroy;

    be->event_create = cuda_event_create;
    be->event_destroy = cuda_event_destroy;
    be->event_record = cuda_event_record;
    be->event_elapsed_ms = cuda_event_elapsed_ms;
    be->measure_gemm_tflops = cuda_measure_gemm_tflops;

    be->alloc = cuda_alloc;
    be->free = cuda_free_mem;
    be->to_host = cuda_to_host;
    be->from_host = cuda_from_host;
    be->copy = cuda_copy;
    be->zero = cuda_zero;
    be->sync = cuda_sync;

    be->gemm = cuda_gemm;
    be->gemm_strided_batched = cuda_gemm_strided_batched;
    be->gemm_bias = cuda_gemm_bias;
    be->ffn_fwd = cuda_ffn_fwd;
    be->ffn_bwd = cuda_ffn_bwd;
    be->linear_bwd = cuda_linear_bwd;
    be->add_bias = cuda_add_bias;
    be->bias_grad = cuda_bias_grad;
    be->add_bias_batched = cuda_add_bias_batched;
    be->bias_grad_batched = cuda_bias_grad_batched;

    be->axpy = cuda_axpy;
    be->scale = cuda_scale;
    be->mul = cuda_mul;
    be->sumsq = cuda_sumsq;

    be->embed_fwd = cuda_embed_fwd;
    be->embed_bwd = cuda_embed_bwd;

    be->layernorm_fwd = cuda_layernorm_fwd;
    be->layernorm_bwd = cuda_layernorm_bwd;
    be->rmsnorm_fwd = cuda_rmsnorm_fwd;
    be->rmsnorm_bwd = cuda_rmsnorm_bwd;

    be->act_fwd = cuda_act_fwd;
    be->act_bwd = cuda_act_bwd;

    be->rope_fwd = cuda_rope_fwd;
    be->rope_bwd = cuda_rope_bwd;
    be->attention_fwd = cuda_attention_fwd;
    be->attention_bwd = cuda_attention_bwd;

    be->dropout_fwd = cuda_dropout_fwd;
    be->dropout_bwd = cuda_dropout_bwd;

    be->xent_fwd_bwd = cuda_xent_fwd_bwd;
    be->adamw = cuda_adamw;

    be->capacity_assign = cuda_capacity_assign;
    be->combine_weights = cuda_combine_weights;
    be->combine_weights_bwd = cuda_combine_weights_bwd;
    be->dispatch = cuda_dispatch;
    be->dispatch_bwd = cuda_dispatch_bwd;
    be->combine = cuda_combine;
    be->combine_bwd = cuda_combine_bwd;
    be->aux_losses = cuda_aux_losses;
    be->aux_losses_counts = cuda_aux_losses_counts;
    be->check_routing = cuda_check_routing;
    be->check_bytes = cuda_check_bytes;
    be->round_weights = cuda_round_weights;
    be->keep_activations = cuda_keep_activations;
    be->xent_sums = cuda_xent_sums;
    be->clip_grad_norm = cuda_clip_grad_norm;
    return be;
}
