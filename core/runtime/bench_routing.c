#include "runtime/bench_routing.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "moe/philox.h"
#include "runtime/plugin_loader.h"

void moe_bench_routing_defaults(moe_bench_routing_options *o) {
    memset(o, 0, sizeof *o);
    o->what = "capacity";
    o->device = "auto";
    o->router = "softk";
    o->tokens = 16384;
    o->d = 4096;
    o->n_experts = 3;
    o->experts[0] = 64, o->experts[1] = 128, o->experts[2] = 256;
    o->n_k = 3;
    o->ks[0] = 1, o->ks[1] = 2, o->ks[2] = 4;
    o->n_cf = 6;
    const double cfs[6] = {0.9, 1.0, 1.05, 1.1, 1.25, 1.5};
    memcpy(o->cfs, cfs, sizeof cfs);
    o->warmup = 5;
    o->iters = 50;
    o->seed = 17; /* the seed bench's fixed seed */
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Buffers of one benchmark, sized for the largest grid point. */
typedef struct bench_buffers {
    float *logits, *x, *weight, *cw, *Xe, *y;
    int32_t *expert, *kept, *slot;
    void *workspace;
    int32_t *counts_before, *counts_after; /* host */
} bench_buffers;

static moe_backend *make_backend(const char *device, char *err, size_t errcap) {
#ifdef MOE_HAVE_CUDA_BACKEND
    if (strcmp(device, "cuda") == 0 || (strcmp(device, "auto") == 0 && moe_cuda_device_count() > 0))
        return moe_backend_cuda_create(0, MOE_PRECISION_BF16, err, errcap);
#else
    if (strcmp(device, "cuda") == 0) {
        snprintf(err, errcap, "--device cuda: this moehost was built without the CUDA backend");
        return NULL;
    }
#endif
    moe_backend *be = moe_backend_cpu_create(0);
    if (!be) snprintf(err, errcap, "cannot create the CPU backend");
    return be;
}

/* Fill a backend buffer with N(0, 1) draws keyed by (seed, which). */
static int fill_normal(moe_backend *be, float *dst, size_t n, unsigned long long seed, uint32_t which) {
    float *host = malloc((n ? n : 1) * sizeof *host);
    if (!host) return -1;
    moe_rng_key key = {seed, 0, which, MOE_RNG_STREAM_USER};
    for (size_t i = 0; i < n; ++i) host[i] = moe_rng_normal(key, i);
    be->from_host(be, dst, host, n * sizeof *host);
    free(host);
    return 0;
}

/* Device-to-device copy rate, GiB/s counting bytes read plus written. */
static double copy_gibps(moe_backend *be, float *dst, const float *src, size_t n, int iters, void *e0, void *e1) {
    float *ms = malloc((size_t)iters * sizeof *ms);
    be->copy(be, dst, src, n * sizeof(float));
    for (int i = 0; i < iters; ++i) {
        be->event_record(be, e0);
        be->copy(be, dst, src, n * sizeof(float));
        be->event_record(be, e1);
        ms[i] = be->event_elapsed_ms(be, e0, e1);
    }
    qsort(ms, (size_t)iters, sizeof *ms, cmp_float);
    double med = ms[iters / 2];
    free(ms);
    return 2.0 * (double)n * sizeof(float) / (med * 1e-3) / (1024.0 * 1024.0 * 1024.0);
}

int moe_bench_routing(const moe_bench_routing_options *o, char *err, size_t errcap) {
    int T = (int)o->tokens, d = o->d, rc = -1;
    if (o->tokens < 1 || o->tokens > (1LL << 26) || d < 1 || o->iters < 1 || o->warmup < 0) {
        snprintf(err, errcap, "bench %s: need 1 <= --tokens <= 2^26, --hidden >= 1, --iters >= 1, --warmup >= 0",
                 o->what);
        return -1;
    }
    int E_max = 1, K_max = 1;
    double cf_max = 0.0;
    for (int i = 0; i < o->n_experts; ++i) E_max = o->experts[i] > E_max ? o->experts[i] : E_max;
    for (int i = 0; i < o->n_k; ++i) K_max = o->ks[i] > K_max ? o->ks[i] : K_max;
    for (int i = 0; i < o->n_cf; ++i) cf_max = o->cfs[i] > cf_max ? o->cfs[i] : cf_max;
    for (int i = 0; i < o->n_k; ++i)
        for (int j = 0; j < o->n_experts; ++j)
            if (o->ks[i] > o->experts[j]) {
                snprintf(err, errcap, "bench %s: K = %d exceeds E = %d; choose --k values <= every --experts value",
                         o->what, o->ks[i], o->experts[j]);
                return -1;
            }
    /* Capacity rows, as the host computes them: C = ceil(CF T K / E) <= T. */
    long long rows = 0;
    for (int i = 0; i < o->n_experts; ++i)
        for (int k = 0; k < o->n_k; ++k)
            for (int c = 0; c < o->n_cf; ++c) {
                long long C = (long long)ceil(o->cfs[c] * T * o->ks[k] / o->experts[i]);
                if (C > T) C = T;
                if (C < 1) C = 1;
                if ((long long)o->experts[i] * C > rows) rows = (long long)o->experts[i] * C;
            }

    moe_backend *be = make_backend(o->device, err, errcap);
    if (!be) return -1;
    moe_router_lib lib;
    memset(&lib, 0, sizeof lib);
    bench_buffers b;
    memset(&b, 0, sizeof b);
    FILE *out = NULL;
    void *e0 = be->event_create(be), *e1 = be->event_create(be);
    float *ms = malloc((size_t)o->iters * sizeof *ms);
    char msg[1024] = "";
    if (moe_router_lib_open(&lib, o->router, err, errcap) != 0) goto done;
    const moe_router_impl *impl = be->device == MOE_DEVICE_CUDA ? lib.api->cuda : lib.api->cpu;
    if (!impl) {
        snprintf(err, errcap, "router '%s' has no %s implementation", lib.api->name, be->name);
        goto done;
    }
    size_t f = sizeof(float), i32 = sizeof(int32_t), TK = (size_t)T * K_max;
    b.logits = be->alloc(be, (size_t)T * E_max * f);
    b.x = be->alloc(be, (size_t)T * d * f);
    b.y = be->alloc(be, (size_t)T * d * f);
    b.Xe = be->alloc(be, (size_t)rows * d * f);
    b.weight = be->alloc(be, TK * f);
    b.cw = be->alloc(be, TK * f);
    b.expert = be->alloc(be, TK * i32);
    b.kept = be->alloc(be, TK * i32);
    b.slot = be->alloc(be, TK * i32);
    b.counts_before = calloc((size_t)E_max, i32);
    b.counts_after = calloc((size_t)E_max, i32);
    if (!b.logits || !b.x || !b.y || !b.Xe || !b.weight || !b.cw || !b.expert || !b.kept || !b.slot ||
        !b.counts_before || !b.counts_after || !ms) {
        snprintf(err, errcap, "out of memory for T = %d, d = %d, %lld capacity rows; lower --tokens or --hidden", T, d,
                 rows);
        goto done;
    }
    if (fill_normal(be, b.x, (size_t)T * d, o->seed, 1) != 0) goto done;
    double copy_rate = copy_gibps(be, b.y, b.x, (size_t)T * d, o->iters, e0, e1);
    if (o->out && !(out = fopen(o->out, "a"))) {
        snprintf(err, errcap, "cannot append to '%s'", o->out);
        goto done;
    }

    for (int ie = 0; ie < o->n_experts; ++ie) {
        int E = o->experts[ie];
        if (fill_normal(be, b.logits, (size_t)T * E, o->seed, 100 + (uint32_t)E) != 0) goto done;
        for (int ik = 0; ik < o->n_k; ++ik) {
            int K = o->ks[ik];
            /* One router instance per (E, K). */
            moe_router_dims dims;
            memset(&dims, 0, sizeof dims);
            dims.struct_size = sizeof dims;
            dims.num_experts = E;
            dims.top_k = K;
            dims.d_model = d;
            dims.vocab_size = 1;
            dims.max_tokens = T;
            dims.capacity_factor = 1.0;
            void *state = NULL;
            moe_router_info info;
            memset(&info, 0, sizeof info);
            info.struct_size = sizeof info;
            if (lib.api->create(&dims, NULL, 0, &state, msg, sizeof msg) != MOE_OK ||
                lib.api->query(state, &info) != MOE_OK) {
                snprintf(err, errcap, "router '%s' (E=%d, K=%d): %s", lib.api->name, E, K, msg);
                if (state) lib.api->destroy(state);
                goto done;
            }
            if (info.k_out != K || (info.flags & MOE_ROUTER_OWNS_CAPACITY) || info.n_params > 0) {
                snprintf(err, errcap,
                         "bench %s needs a top-k router with no parameters that leaves capacity to the host "
                         "(k_out = K); '%s' is not one (try softk or topk_hard)",
                         o->what, lib.api->name);
                lib.api->destroy(state);
                goto done;
            }
            be->free(be, b.workspace);
            b.workspace = be->alloc(be, info.workspace_bytes ? info.workspace_bytes : 1);
            moe_context ctx;
            memset(&ctx, 0, sizeof ctx);
            ctx.struct_size = sizeof ctx;
            ctx.device = be->device;
            ctx.stream = be->stream;
            ctx.workspace = b.workspace;
            ctx.workspace_bytes = info.workspace_bytes;
            ctx.world_size = 1;
            ctx.msg = msg;
            ctx.msg_cap = sizeof msg;
            moe_router_fwd_args fa;
            memset(&fa, 0, sizeof fa);
            fa.struct_size = sizeof fa;
            fa.T = T;
            fa.E = E;
            fa.k_out = K;
            fa.d_model = d;
            fa.logits = b.logits;
            fa.x = b.x;
            fa.expert = b.expert;
            fa.weight = b.weight;
            moe_status st = impl->forward(state, &ctx, &fa);
            if (st != MOE_OK) {
                snprintf(err, errcap, "router '%s' forward: %s", lib.api->name, msg);
                lib.api->destroy(state);
                goto done;
            }
            if (strcmp(o->what, "topk") == 0) {
                /* The router's forward alone. */
                for (int i = 0; i < o->warmup; ++i) impl->forward(state, &ctx, &fa);
                for (int i = 0; i < o->iters; ++i) {
                    be->event_record(be, e0);
                    impl->forward(state, &ctx, &fa);
                    be->event_record(be, e1);
                    ms[i] = be->event_elapsed_ms(be, e0, e1);
                }
                qsort(ms, (size_t)o->iters, sizeof *ms, cmp_float);
                json_t *j = json_object();
                json_object_set_new(j, "bench", json_string("topk"));
                json_object_set_new(j, "router", json_string(lib.api->name));
                json_object_set_new(j, "device", json_string(be->name));
                json_object_set_new(j, "E", json_integer(E));
                json_object_set_new(j, "K", json_integer(K));
                json_object_set_new(j, "T", json_integer(T));
                json_object_set_new(j, "ms", json_real(ms[o->iters / 2]));
                json_object_set_new(j, "tokens_per_s", json_real(T / (ms[o->iters / 2] * 1e-3)));
                char *text = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(6));
                printf("%s\n", text);
                if (out) fprintf(out, "%s\n", text);
                free(text);
                json_decref(j);
                lib.api->destroy(state);
                continue;
            }
            for (int ic = 0; ic < o->n_cf; ++ic) {
                double cf = o->cfs[ic];
                long long Cl = (long long)ceil(cf * T * K / E);
                int C = (int)(Cl > T ? T : (Cl < 1 ? 1 : Cl));
                be->capacity_assign(be, b.expert, b.weight, T, K, E, C, 0, b.kept, b.slot, b.counts_before,
                                    b.counts_after);
                be->combine_weights(be, b.weight, b.kept, T, K, 0, b.cw);
                long long routed = 0, kept = 0;
                for (int e = 0; e < E; ++e) {
                    routed += b.counts_before[e];
                    kept += b.counts_after[e];
                }
                for (int i = 0; i < o->warmup; ++i) {
                    be->dispatch(be, b.x, b.kept, b.slot, T, K, C, E, d, NULL, b.Xe);
                    be->combine(be, b.Xe, b.kept, b.slot, b.cw, T, K, C, d, NULL, b.y);
                }
                for (int i = 0; i < o->iters; ++i) {
                    be->event_record(be, e0);
                    be->dispatch(be, b.x, b.kept, b.slot, T, K, C, E, d, NULL, b.Xe);
                    be->combine(be, b.Xe, b.kept, b.slot, b.cw, T, K, C, d, NULL, b.y);
                    be->event_record(be, e1);
                    ms[i] = be->event_elapsed_ms(be, e0, e1);
                }
                qsort(ms, (size_t)o->iters, sizeof *ms, cmp_float);
                double med = ms[o->iters / 2];
                double bw = (double)T * (2 + 2 * K) * d * sizeof(float) / (med * 1e-3) / (1024.0 * 1024 * 1024);
                json_t *j = json_object();
                json_object_set_new(j, "bench", json_string(o->what));
                json_object_set_new(j, "router", json_string(lib.api->name));
                json_object_set_new(j, "device", json_string(be->name));
                json_object_set_new(j, "E", json_integer(E));
                json_object_set_new(j, "K", json_integer(K));
                json_object_set_new(j, "capacity_factor", json_real(cf));
                json_object_set_new(j, "T", json_integer(T));
                json_object_set_new(j, "d", json_integer(d));
                json_object_set_new(j, "C", json_integer(C));
                json_object_set_new(j, "drop_rate", json_real(routed ? (double)(routed - kept) / routed : 0.0));
                json_object_set_new(j, "ms", json_real(med));
                json_object_set_new(j, "ms_min", json_real(ms[0]));
                json_object_set_new(j, "tokens_per_s", json_real(T / (med * 1e-3)));
                json_object_set_new(j, "bytes_per_elem", json_integer((json_int_t)sizeof(float)));
                json_object_set_new(j, "bw_GiBps_strict", json_real(bw));
                json_object_set_new(j, "copy_GiBps", json_real(copy_rate));
                json_object_set_new(j, "fraction_of_copy", json_real(copy_rate > 0 ? bw / copy_rate : 0.0));
                char *text = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(6));
                printf("%s\n", text);
                if (out) fprintf(out, "%s\n", text);
                free(text);
                json_decref(j);
            }
            lib.api->destroy(state);
        }
    }
    rc = 0;
done:
    if (out) fclose(out);
    free(ms);
    be->event_destroy(be, e0);
    be->event_destroy(be, e1);
    float *bufs[] = {b.logits, b.x, b.y, b.Xe, b.weight, b.cw};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; ++i) be->free(be, bufs[i]);
    be->free(be, b.expert);
    be->free(be, b.kept);
    be->free(be, b.slot);
    be->free(be, b.workspace);
    free(b.counts_before);
    free(b.counts_after);
    if (lib.handle) moe_router_lib_close(&lib);
    moe_backend_destroy(be);
    return rc;
}
