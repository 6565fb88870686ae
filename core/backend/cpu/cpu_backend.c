/*
 * The CPU backend object: host memory and the table of fp32 ops
 * (cpu_ops.h for the dense ops, cpu_moe_ops.h for the MoE routing core).
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_moe_ops.h"
#include "backend/cpu/cpu_ops.h"

/* 64 bytes: one cache line and one AVX-512 vector, so buffers start on a
 * line (threads splitting rows do not share lines at the start) and vector
 * loads of the first element are aligned. */
#define CPU_ALIGN 64

static void *cpu_alloc(moe_backend *be, size_t bytes) {
    (void)be;
    if (bytes > SIZE_MAX - CPU_ALIGN) return NULL;
    /* aligned_alloc wants a multiple of the alignment; 0 bytes still gets a
     * unique pointer so callers need no special case */
    size_t rounded = bytes == 0 ? CPU_ALIGN : (bytes + CPU_ALIGN - 1) / CPU_ALIGN * CPU_ALIGN;
    void *p = aligned_alloc(CPU_ALIGN, rounded);
    if (p) memset(p, 0, rounded);
    return p;
}

static void cpu_free(moe_backend *be, void *p) {
    (void)be;
    free(p);
}

/* memcpy/memset with a NULL pointer are undefined even for 0 bytes. */
static void cpu_copy(moe_backend *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    if (bytes) memcpy(dst, src, bytes);
}

static void cpu_zero(moe_backend *be, void *p, size_t bytes) {
    (void)be;
    if (bytes) memset(p, 0, bytes);
}

/* Every op has returned by the time it is called: nothing to wait for. */
static void cpu_sync(moe_backend *be) { (void)be; }

/* The CPU backend owns nothing beyond the table itself. */
static void cpu_destroy(moe_backend *be) { free(be); }

moe_backend *moe_backend_cpu_create(int threads) {
    moe_backend *be = calloc(1, sizeof *be);
    if (!be) return NULL;
    /* OpenMP loops follow this; OpenBLAS keeps its own pool (OPENBLAS_NUM_THREADS)
     * and is only called outside OpenMP regions, so the two never nest. */
    if (threads > 0) omp_set_num_threads(threads);

    be->name = "cpu";
    be->device = MOE_DEVICE_CPU;
    be->impl = NULL;
    be->stream = NULL; /* no streams: every op has finished when it returns */
    be->device_ordinal = 0;
    be->destroy = cpu_destroy;
    be->event_create = cpu_event_create;
    be->event_destroy = cpu_event_destroy;
    be->event_record = cpu_event_record;
    be->event_elapsed_ms = cpu_event_elapsed_ms;
    be->measure_gemm_tflops = cpu_measure_gemm_tflops;

    be->alloc = cpu_alloc;
    be->free = cpu_free;
    be->to_host = cpu_copy; /* host and device memory are the same */
    be->from_host = cpu_copy;
    be->copy = cpu_copy;
    be->zero = cpu_zero;
    be->sync = cpu_sync;

    be->gemm = cpu_gemm;
    be->gemm_strided_batched = cpu_gemm_strided_batched;
    be->add_bias = cpu_add_bias;
    be->bias_grad = cpu_bias_grad;
    be->add_bias_batched = cpu_add_bias_batched;
    be->gemm_bias = cpu_gemm_bias;
    be->ffn_fwd = moe_ffn_fwd_reference;
    be->ffn_bwd = moe_ffn_bwd_reference;
    be->linear_bwd = moe_linear_bwd_reference;
    be->bias_grad_batched = cpu_bias_grad_batched;

    be->axpy = cpu_axpy;
    be->scale = cpu_scale;
    be->sumsq = cpu_sumsq;
    be->mul = cpu_mul;

    be->embed_fwd = cpu_embed_fwd;
    be->embed_bwd = cpu_embed_bwd;

    be->layernorm_fwd = cpu_layernorm_fwd;
    be->layernorm_bwd = cpu_layernorm_bwd;
    be->rmsnorm_fwd = cpu_rmsnorm_fwd;
    be->rmsnorm_bwd = cpu_rmsnorm_bwd;

    be->act_fwd = cpu_act_fwd;
    be->act_bwd = cpu_act_bwd;

    be->rope_fwd = cpu_rope_fwd;
    be->rope_bwd = cpu_rope_bwd;
    be->attention_fwd = cpu_attention_fwd;
    be->attention_bwd = cpu_attention_bwd;

    be->dropout_fwd = cpu_dropout_fwd;
    be->dropout_bwd = cpu_dropout_bwd;

    be->xent_fwd_bwd = cpu_xent_fwd_bwd;

    be->adamw = cpu_adamw;

    be->capacity_assign = cpu_capacity_assign;
    be->combine_weights = cpu_combine_weights;
    be->combine_weights_bwd = cpu_combine_weights_bwd;
    be->dispatch = cpu_dispatch;
    be->dispatch_bwd = cpu_dispatch_bwd;
    be->combine = cpu_combine;
    be->combine_bwd = cpu_combine_bwd;
    be->aux_losses = cpu_aux_losses;
    be->aux_losses_counts = cpu_aux_losses_counts;
    be->check_routing = cpu_check_routing;
    be->check_bytes = cpu_check_bytes;
    be->round_weights = cpu_round_weights;
    be->keep_activations = cpu_keep_activations;
    be->xent_sums = cpu_xent_sums;
    be->clip_grad_norm = cpu_clip_grad_norm;
    return be;
}

/* Defined here because the CPU backend is always built; each backend frees
 * itself through its own destroy (the CUDA one has handles and streams). */
void moe_backend_destroy(moe_backend *be) {
    if (be && be->destroy) be->destroy(be);
}
