/*
 * Timing for benchmarks on the CPU backend: an "event" is a host clock
 * reading (every CPU op has finished when it returns, so no waiting is
 * needed), and the GEMM rate is measured on a square fp32 product.
 */
#include "backend/cpu/cpu_ops.h"

#include <stdlib.h>
#include <time.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

void *cpu_event_create(moe_backend *be) {
    (void)be;
    return calloc(1, sizeof(double));
}

void cpu_event_destroy(moe_backend *be, void *ev) {
    (void)be;
    free(ev);
}

void cpu_event_record(moe_backend *be, void *ev) {
    (void)be;
    *(double *)ev = now_ms();
}

float cpu_event_elapsed_ms(moe_backend *be, void *start, void *end) {
    (void)be;
    return (float)(*(double *)end - *(double *)start);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of 5 timed 1024^3 products after one warm-up. */
double cpu_measure_gemm_tflops(moe_backend *be) {
    const int n = 1024, reps = 5;
    float *a = be->alloc(be, (size_t)n * n * sizeof(float));
    float *b = be->alloc(be, (size_t)n * n * sizeof(float));
    float *c = be->alloc(be, (size_t)n * n * sizeof(float));
    if (!a || !b || !c) {
        be->free(be, a);
        be->free(be, b);
        be->free(be, c);
        return 0.0;
    }
    /* Not zeros: some kernels run faster on zeros than on real data. */
    for (size_t i = 0; i < (size_t)n * n; ++i) {
        a[i] = (float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f;
        b[i] = (float)((i * 40503u) % 1000) * 1e-3f - 0.5f;
    }
    double ms[5];
    be->gemm(be, 0, 0, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
    for (int r = 0; r < reps; ++r) {
        double t0 = now_ms();
        be->gemm(be, 0, 0, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        ms[r] = now_ms() - t0;
    }
    qsort(ms, reps, sizeof ms[0], cmp_double);
    be->free(be, a);
    be->free(be, b);
    be->free(be, c);
    return 2.0 * n * n * (double)n / (ms[reps / 2] * 1e-3) / 1e12;
}
