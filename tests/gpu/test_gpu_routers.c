/*
 * The CUDA paths of the six router plugins against their CPU paths.
 *
 * For every plugin and every option setting that changes its code path,
 * on T in {1, 37, 4096}, E in {8, 64}, K in {1, 2}, d_model 24 (and a few
 * larger cases for expert choice's sort and its fused select, E = 12 and 3
 * for its lane groups of 16 and 4 lanes a token, which have idle lanes, and
 * for noisy_topk's learned noise wider d_model: the training shape, tiles
 * cut short, and the shapes
 * that fall back to the global-memory kernels), with fresh random inputs:
 *
 *   forward   the same logits, x, token ids and parameters go to the CPU
 *             table (host buffers) and the CUDA table (device buffers, outputs
 *             poisoned with 0xFF first). Expert indices and slots must be
 *             equal; weights and route_logits within 1e-5 (max abs).
 *   backward  both tables get the same inputs: the CPU forward's outputs, one
 *             random dweight (0 where the expert is -1, as the host passes
 *             it), one random d_route_logits, and dx / parameter gradients
 *             preset to the same random values (they are accumulated into).
 *             dlogits, dx and the parameter gradients must agree within 1e-4,
 *             relative in the 2-norm.
 *   determinism  the CUDA forward and backward run a second time with a
 *             different poison, and told that the host checks the inputs
 *             (moe_context.inputs_checked, as in the model's training steps:
 *             the paths without a wait); every output must be bitwise the
 *             first run's (which also shows that every output element is
 *             written).
 *   saved     a plugin that declares a saved buffer (info.saved_bytes) gets
 *             one on the CPU, and on the device in the second run only (its
 *             content poisoned first): the first run is then an older host's
 *             (no buffer: the backward computes again what it needs), and the
 *             bitwise comparison of the two runs shows that the saved values
 *             are the ones the backward would have computed.
 *   workspace the device workspace is exactly the size query() reports,
 *             followed by a guard that must come back untouched.
 *   bad input a NaN logit, an id outside the vocabulary, an expert entry
 *             outside its range: the CUDA path must fail with the CPU's status
 *             and message, and leave expert and weight unwritten.
 *
 * Logits are distinct within a row (no exact ties) except in the cases marked
 * "ties", whose logits take 3 values, so that rows and whole tokens tie and
 * the tie rules (lower expert; lower token where experts choose) decide.
 *
 * One exception to exact decisions, reported as near_ties=N: noisy_topk with
 * learned noise in training routes on l' = l + softplus(x W) n, and the
 * device's expf / log1pf may round sigma an ulp away from glibc's, so two
 * perturbed logits that tie to within a few ulps may be ordered differently.
 * Such a row passes only if the CPU's own l' values of the swapped experts
 * differ by at most 8 ulps and the device's choice is exactly the top-K of
 * the device's l'; its weights are then not compared.
 *
 * Prints one line per case, `PASS|FAIL <plugin> <case> max_err=<e> (...)`
 * with max_err the larger of the forward's max abs error and the backward's
 * relative error, then `N passed, M failed`. Exit status 0 when all pass,
 * 1 otherwise, 77 (skip) without a CUDA device. The seed comes from the clock
 * and is printed; MOE_TEST_SEED=<n> repeats a run. MOE_TEST_PLUGIN_DIR in the
 * environment overrides the plugin folder compiled in (a build carried to
 * another machine). MOE_TEST_QUICK=1 keeps T <= 37 (for compute-sanitizer).
 */
#include <cuda_runtime_api.h>
#include <float.h>
#include <inttypes.h>
#include <time.h>

#include "routers/router_harness.h"

#define D_MODEL 24
#define VOCAB 1000
#define CAPACITY_FACTOR 1.25
#define GUARD_BYTES 4096
#define GUARD_BYTE 0xA5
#define TOL_FWD 1e-5
#define TOL_BWD 1e-4

static int g_passed, g_failed;

/* ---- CUDA calls of the test itself: a failure leaves the device in an
 * unknown state, so the run stops there. --------------------------------- */

static void cu_die(cudaError_t e, const char *what, const char *file, int line) {
    if (e == cudaSuccess) return;
    fprintf(stderr, "%s:%d: %s failed: %s (%s)\n", file, line, what, cudaGetErrorString(e), cudaGetErrorName(e));
    printf("%d passed, %d failed (stopped by a CUDA error in the test)\n", g_passed, g_failed + 1);
    exit(1);
}
#define CU(call) cu_die((call), #call, __FILE__, __LINE__)

static void *dev_alloc(size_t bytes) {
    void *p = NULL;
    CU(cudaMalloc(&p, bytes ? bytes : 1));
    return p;
}

static void *host_alloc(size_t bytes) {
    void *p = calloc(bytes ? bytes : 1, 1);
    if (!p) {
        fprintf(stderr, "out of host memory (%zu bytes)\n", bytes);
        exit(1);
    }
    return p;
}

/* ---- cases ------------------------------------------------------------- */

typedef struct tcase {
    const char *plugin;
    const char *setting; /* the options, as printed */
    moe_option opts[3];
    int n_opts;
    int training;
    int near_ties_ok; /* noisy_topk, learned noise, training: see the top */
    int T, E, K;
    int d_model;
    int ties;
} tcase;

/* Logits: uniform in [-4, 4), distinct within each row; with `ties`, values
 * from {-1, 0, 1}, so rows tie inside and tokens tie with each other. */
static void fill_logits(moe_test_rng *rng, float *l, int T, int E, int ties) {
    for (int t = 0; t < T; ++t) {
        float *row = l + (size_t)t * E;
        for (int e = 0; e < E; ++e) {
            if (ties) {
                row[e] = (float)((int)(moe_test_next(rng) % 3) - 1);
                continue;
            }
            for (;;) {
                float v = moe_test_uniform(rng, -4.0f, 4.0f);
                int dup = 0;
                for (int q = 0; q < e && !dup; ++q) dup = row[q] == v;
                if (!dup) {
                    row[e] = v;
                    break;
                }
            }
        }
    }
}

/* ---- comparisons ------------------------------------------------------- */

static double max_abs_err(const float *ref, const float *got, size_t n, const unsigned char *skip_row, size_t row_len,
                          size_t *worst) {
    double m = 0.0;
    for (size_t i = 0; i < n; ++i) {
        if (skip_row && skip_row[i / row_len]) continue;
        double d = fabs((double)ref[i] - (double)got[i]);
        if (isnan(d)) d = (isnan(ref[i]) && isnan(got[i])) ? 0.0 : INFINITY;
        if (d > m) {
            m = d;
            *worst = i;
        }
    }
    return m;
}

/* ||got - ref|| / ||ref||, 0 when both are 0, inf when only ref is. */
static double rel_err(const float *ref, const float *got, size_t n) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; ++i) {
        double d = (double)got[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    if (isnan(num)) return INFINITY;
    if (den == 0.0) return num == 0.0 ? 0.0 : INFINITY;
    return sqrt(num / den);
}

static size_t count_bitwise_equal(const float *a, const float *b, size_t n) {
    size_t k = 0;
    for (size_t i = 0; i < n; ++i) k += memcmp(&a[i], &b[i], sizeof(float)) == 0;
    return k;
}

static void print_row(const char *what, const float *v, int n) {
    fprintf(stderr, "    %s:", what);
    for (int i = 0; i < n && i < 16; ++i) fprintf(stderr, " %.9g", v[i]);
    fprintf(stderr, n > 16 ? " ...\n" : "\n");
}

/* ---- one routing call's buffers, host and device ----------------------- */

typedef struct io {
    int32_t *expert, *slot;
    float *weight, *route, *dlogits, *dx, *pgrad[MOE_MAX_PLUGIN_TENSORS];
} io;

typedef struct sizes {
    size_t nTE, nTK, nTD, np[MOE_MAX_PLUGIN_TENSORS];
    int n_params, owns, perturbs;
} sizes;

/* The buffer sizes of T tokens through instance r. */
static sizes sizes_for(const rh_router *r, int T, int d_model) {
    sizes z;
    memset(&z, 0, sizeof z);
    z.nTE = (size_t)T * r->dims.num_experts;
    z.nTK = (size_t)T * r->info.k_out;
    z.nTD = (size_t)T * d_model;
    z.n_params = r->info.n_params;
    for (int i = 0; i < z.n_params; ++i) z.np[i] = r->param_size[i];
    z.owns = (r->info.flags & MOE_ROUTER_OWNS_CAPACITY) != 0;
    z.perturbs = (r->info.flags & MOE_ROUTER_PERTURBS_LOGITS) != 0;
    return z;
}

static void io_alloc(io *o, const sizes *z, int device) {
    memset(o, 0, sizeof *o);
    void *(*alloc)(size_t) = device ? dev_alloc : host_alloc;
    o->expert = alloc(z->nTK * sizeof(int32_t));
    o->slot = alloc(z->nTK * sizeof(int32_t));
    o->weight = alloc(z->nTK * sizeof(float));
    o->route = alloc(z->nTE * sizeof(float));
    o->dlogits = alloc(z->nTE * sizeof(float));
    o->dx = alloc(z->nTD * sizeof(float));
    for (int i = 0; i < z->n_params; ++i) o->pgrad[i] = alloc(z->np[i] * sizeof(float));
}

static void io_free(io *o, const sizes *z, int device) {
    void *all[6 + MOE_MAX_PLUGIN_TENSORS] = {o->expert, o->slot, o->weight, o->route, o->dlogits, o->dx};
    for (int i = 0; i < z->n_params; ++i) all[6 + i] = o->pgrad[i];
    for (int i = 0; i < 6 + z->n_params; ++i) {
        if (device)
            CU(cudaFree(all[i]));
        else
            free(all[i]);
    }
}

/* Device outputs to host, after the stream has run. */
static void io_download(io *h, const io *d, const sizes *z, cudaStream_t s) {
    CU(cudaMemcpyAsync(h->expert, d->expert, z->nTK * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    CU(cudaMemcpyAsync(h->slot, d->slot, z->nTK * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    CU(cudaMemcpyAsync(h->weight, d->weight, z->nTK * sizeof(float), cudaMemcpyDeviceToHost, s));
    CU(cudaMemcpyAsync(h->route, d->route, z->nTE * sizeof(float), cudaMemcpyDeviceToHost, s));
    CU(cudaMemcpyAsync(h->dlogits, d->dlogits, z->nTE * sizeof(float), cudaMemcpyDeviceToHost, s));
    CU(cudaMemcpyAsync(h->dx, d->dx, z->nTD * sizeof(float), cudaMemcpyDeviceToHost, s));
    for (int i = 0; i < z->n_params; ++i)
        CU(cudaMemcpyAsync(h->pgrad[i], d->pgrad[i], z->np[i] * sizeof(float), cudaMemcpyDeviceToHost, s));
    CU(cudaStreamSynchronize(s));
}

/* The inputs every call shares. */
typedef struct inputs {
    float *logits, *x, *params[MOE_MAX_PLUGIN_TENSORS], *dweight, *droute, *dx0, *pgrad0[MOE_MAX_PLUGIN_TENSORS];
    int32_t *ids;
} inputs;

static moe_router_fwd_args fwd_args(const rh_router *r, const tcase *c, int capacity, const inputs *in, float *const *params,
                                    const io *o, const sizes *z) {
    moe_router_fwd_args a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.T = c->T;
    a.E = c->E;
    a.k_out = r->info.k_out;
    a.capacity = capacity;
    a.d_model = c->d_model;
    a.logits = in->logits;
    a.x = in->x;
    a.token_ids = in->ids;
    a.params = params;
    a.buffers = NULL;
    a.expert = o->expert;
    a.weight = o->weight;
    a.slot = z->owns ? o->slot : NULL;
    a.route_logits = z->perturbs ? o->route : NULL;
    return a;
}

/* Backward inputs `fo` (a forward's outputs), outputs in `o`. */
static moe_router_bwd_args bwd_args(const rh_router *r, const tcase *c, int capacity, const inputs *in,
                                    float *const *params, const io *fo, io *o, const sizes *z) {
    moe_router_bwd_args a;
    memset(&a, 0, sizeof a);
    a.struct_size = sizeof a;
    a.T = c->T;
    a.E = c->E;
    a.k_out = r->info.k_out;
    a.capacity = capacity;
    a.d_model = c->d_model;
    a.logits = in->logits;
    a.x = in->x;
    a.token_ids = in->ids;
    a.params = params;
    a.buffers = NULL;
    a.expert = fo->expert;
    a.weight = fo->weight;
    a.slot = z->owns ? fo->slot : NULL;
    a.route_logits = z->perturbs ? fo->route : NULL;
    a.dweight = in->dweight;
    a.d_route_logits = z->perturbs ? in->droute : NULL;
    a.dlogits = o->dlogits;
    a.dx = o->dx;
    a.param_grads = o->pgrad;
    return a;
}

static moe_context make_ctx(moe_device_kind dev, void *stream, void *ws, size_t ws_bytes, moe_rng_key key,
                            int training, char *msg, size_t cap) {
    moe_context x;
    memset(&x, 0, sizeof x);
    x.struct_size = sizeof x;
    x.device = dev;
    x.stream = stream;
    x.workspace = ws;
    x.workspace_bytes = ws_bytes;
    x.rng = key;
    x.training = training;
    x.world_size = 1;
    x.msg = msg;
    x.msg_cap = cap;
    msg[0] = '\0';
    return x;
}

/* ---- one case ---------------------------------------------------------- */

typedef struct dev_inputs {
    inputs in;     /* device copies */
    io fwd_in;     /* the CPU forward's outputs, uploaded for backward */
    void *ws;      /* workspace + guard */
    size_t ws_bytes;
} dev_inputs;

static void upload(void *dst, const void *src, size_t bytes, cudaStream_t s) {
    CU(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
}

/* Fresh outputs for one CUDA forward + backward: poison the outputs, reset
 * the accumulated gradients to their start values. */
static void prepare_device_outputs(io *d, const inputs *h, const sizes *z, int poison, cudaStream_t s) {
    CU(cudaMemsetAsync(d->expert, poison, z->nTK * sizeof(int32_t), s));
    CU(cudaMemsetAsync(d->slot, poison, z->nTK * sizeof(int32_t), s));
    CU(cudaMemsetAsync(d->weight, poison, z->nTK * sizeof(float), s));
    CU(cudaMemsetAsync(d->route, poison, z->nTE * sizeof(float), s));
    CU(cudaMemsetAsync(d->dlogits, poison, z->nTE * sizeof(float), s));
    upload(d->dx, h->dx0, z->nTD * sizeof(float), s);
    for (int i = 0; i < z->n_params; ++i) upload(d->pgrad[i], h->pgrad0[i], z->np[i] * sizeof(float), s);
}

static int guard_intact(const dev_inputs *dv, cudaStream_t s) {
    unsigned char g[GUARD_BYTES];
    CU(cudaMemcpyAsync(g, (char *)dv->ws + dv->ws_bytes, GUARD_BYTES, cudaMemcpyDeviceToHost, s));
    CU(cudaStreamSynchronize(s));
    for (int i = 0; i < GUARD_BYTES; ++i)
        if (g[i] != GUARD_BYTE) return 0;
    return 1;
}

static void report(int ok, const tcase *c, const char *extra, double err) {
    if (ok)
        ++g_passed;
    else
        ++g_failed;
    char dm[32] = "";
    if (c->d_model != D_MODEL) snprintf(dm, sizeof dm, " d_model=%d", c->d_model);
    printf("%s %s %s T=%d E=%d K=%d%s%s%s max_err=%.3g%s\n", ok ? "PASS" : "FAIL", c->plugin, c->setting, c->T, c->E,
           c->K, dm, c->training ? " train" : " eval", c->ties ? " ties" : "", err, extra);
    fflush(stdout);
}

static void run_case(const moe_router_plugin_v1_t *p, const tcase *c, uint64_t seed, cudaStream_t stream) {
    rh_router r;
    moe_status st = rh_create(&r, p, rh_dims(c->E, c->K, c->d_model, VOCAB, c->T, CAPACITY_FACTOR), c->opts, c->n_opts);
    if (st != MOE_OK) {
        fprintf(stderr, "  create: %s\n", r.msg);
        report(0, c, " (create failed)", INFINITY);
        return;
    }
    if (!p->cuda || !p->cuda->forward || !p->cuda->backward) {
        report(0, c, " (the plugin has no CUDA table)", INFINITY);
        rh_destroy(&r);
        return;
    }
    const int T = c->T, E = c->E, k = r.info.k_out;
    const sizes z = sizes_for(&r, T, c->d_model);
    const int capacity = (int)ceil(CAPACITY_FACTOR * T * c->K / E);
    const moe_rng_key key = {seed ^ 0x5EEDull, 7, 3, MOE_RNG_STREAM_ROUTER};

    /* Inputs. */
    moe_test_rng rng = {seed * 0x9E3779B97F4A7C15ull + 17};
    inputs h;
    memset(&h, 0, sizeof h);
    h.logits = host_alloc(z.nTE * sizeof(float));
    h.x = host_alloc(z.nTD * sizeof(float));
    h.ids = host_alloc((size_t)T * sizeof(int32_t));
    h.dweight = host_alloc(z.nTK * sizeof(float));
    h.droute = host_alloc(z.nTE * sizeof(float));
    h.dx0 = host_alloc(z.nTD * sizeof(float));
    fill_logits(&rng, h.logits, T, E, c->ties);
    moe_test_fill(&rng, h.x, z.nTD, -1.0f, 1.0f);
    for (int t = 0; t < T; ++t) h.ids[t] = (int32_t)(moe_test_next(&rng) % VOCAB);
    moe_test_fill(&rng, h.droute, z.nTE, -1.0f, 1.0f);
    moe_test_fill(&rng, h.dx0, z.nTD, -1.0f, 1.0f);
    for (int i = 0; i < z.n_params; ++i) {
        /* Random rather than the declared init (zeros for w_noise), so that
         * learned sigma varies from element to element. */
        h.params[i] = r.params[i];
        moe_test_fill(&rng, h.params[i], z.np[i], -0.3f, 0.3f);
        h.pgrad0[i] = host_alloc(z.np[i] * sizeof(float));
        moe_test_fill(&rng, h.pgrad0[i], z.np[i], -1.0f, 1.0f);
    }

    /* CPU forward. */
    io cpu;
    io_alloc(&cpu, &z, 0);
    char hmsg[1024], dmsg[1024];
    moe_context hctx = make_ctx(MOE_DEVICE_CPU, NULL, r.workspace, r.info.workspace_bytes, key, c->training, hmsg,
                                sizeof hmsg);
    const size_t saved_bytes = r.info.saved_bytes;
    void *h_saved = saved_bytes ? host_alloc(saved_bytes) : NULL;
    if (h_saved) memset(h_saved, 0xA5, saved_bytes);
    moe_router_fwd_args fa = fwd_args(&r, c, capacity, &h, h.params, &cpu, &z);
    fa.saved = h_saved;
    st = p->cpu->forward(r.state, &hctx, &fa);
    if (st != MOE_OK) {
        fprintf(stderr, "  CPU forward: %s\n", hmsg);
        report(0, c, " (CPU forward failed)", INFINITY);
        goto out_cpu;
    }
    /* dweight: random where the CPU's expert is >= 0, 0 where it is -1. */
    for (size_t i = 0; i < z.nTK; ++i) h.dweight[i] = cpu.expert[i] >= 0 ? moe_test_uniform(&rng, -1.0f, 1.0f) : 0.0f;

    /* CPU backward on the CPU forward's outputs. */
    for (size_t i = 0; i < z.nTE; ++i) cpu.dlogits[i] = NAN;
    memcpy(cpu.dx, h.dx0, z.nTD * sizeof(float));
    for (int i = 0; i < z.n_params; ++i) memcpy(cpu.pgrad[i], h.pgrad0[i], z.np[i] * sizeof(float));
    hctx = make_ctx(MOE_DEVICE_CPU, NULL, r.workspace, r.info.workspace_bytes, key, c->training, hmsg, sizeof hmsg);
    moe_router_bwd_args ba = bwd_args(&r, c, capacity, &h, h.params, &cpu, &cpu, &z);
    ba.saved = h_saved;
    st = p->cpu->backward(r.state, &hctx, &ba);
    if (st != MOE_OK) {
        fprintf(stderr, "  CPU backward: %s\n", hmsg);
        report(0, c, " (CPU backward failed)", INFINITY);
        goto out_cpu;
    }

    /* Device copies of the inputs and of the CPU forward's outputs. */
    dev_inputs dv;
    memset(&dv, 0, sizeof dv);
    dv.in.logits = dev_alloc(z.nTE * sizeof(float));
    dv.in.x = dev_alloc(z.nTD * sizeof(float));
    dv.in.ids = dev_alloc((size_t)T * sizeof(int32_t));
    dv.in.dweight = dev_alloc(z.nTK * sizeof(float));
    dv.in.droute = dev_alloc(z.nTE * sizeof(float));
    upload(dv.in.logits, h.logits, z.nTE * sizeof(float), stream);
    upload(dv.in.x, h.x, z.nTD * sizeof(float), stream);
    upload(dv.in.ids, h.ids, (size_t)T * sizeof(int32_t), stream);
    upload(dv.in.dweight, h.dweight, z.nTK * sizeof(float), stream);
    upload(dv.in.droute, h.droute, z.nTE * sizeof(float), stream);
    for (int i = 0; i < z.n_params; ++i) {
        dv.in.params[i] = dev_alloc(z.np[i] * sizeof(float));
        upload(dv.in.params[i], h.params[i], z.np[i] * sizeof(float), stream);
    }
    io_alloc(&dv.fwd_in, &z, 1);
    upload(dv.fwd_in.expert, cpu.expert, z.nTK * sizeof(int32_t), stream);
    upload(dv.fwd_in.slot, cpu.slot, z.nTK * sizeof(int32_t), stream);
    upload(dv.fwd_in.weight, cpu.weight, z.nTK * sizeof(float), stream);
    upload(dv.fwd_in.route, cpu.route, z.nTE * sizeof(float), stream);
    dv.ws_bytes = r.info.workspace_bytes;
    dv.ws = dev_alloc(dv.ws_bytes + GUARD_BYTES);
    CU(cudaMemsetAsync(dv.ws, 0, dv.ws_bytes, stream));
    CU(cudaMemsetAsync((char *)dv.ws + dv.ws_bytes, GUARD_BYTE, GUARD_BYTES, stream));
    void *d_saved = saved_bytes ? dev_alloc(saved_bytes) : NULL;
    if (d_saved) CU(cudaMemsetAsync(d_saved, 0xA5, saved_bytes, stream));

    /* Two CUDA runs: compared with the CPU, then with each other. */
    io dout, gpu[2];
    io_alloc(&dout, &z, 1);
    io_alloc(&gpu[0], &z, 0);
    io_alloc(&gpu[1], &z, 0);
    int ok = 1;
    char extra[256] = "";
    for (int run = 0; run < 2 && ok; ++run) {
        prepare_device_outputs(&dout, &h, &z, run ? 0x5A : 0xFF, stream);
        /* The second run is told that the host checks the inputs (as the
         * model's training steps are), so it takes the paths without the
         * flags and the wait; its outputs must still be the first run's. */
        moe_context dctx = make_ctx(MOE_DEVICE_CUDA, stream, dv.ws, dv.ws_bytes, key, c->training, dmsg, sizeof dmsg);
        dctx.inputs_checked = run;
        moe_router_fwd_args dfa = fwd_args(&r, c, capacity, &dv.in, dv.in.params, &dout, &z);
        dfa.saved = run ? d_saved : NULL;
        st = p->cuda->forward(r.state, &dctx, &dfa);
        if (st == MOE_OK) {
            CU(cudaStreamSynchronize(stream));
            dctx = make_ctx(MOE_DEVICE_CUDA, stream, dv.ws, dv.ws_bytes, key, c->training, dmsg, sizeof dmsg);
            dctx.inputs_checked = run;
            moe_router_bwd_args dba = bwd_args(&r, c, capacity, &dv.in, dv.in.params, &dv.fwd_in, &dout, &z);
            dba.saved = run ? d_saved : NULL;
            st = p->cuda->backward(r.state, &dctx, &dba);
            if (st != MOE_OK) fprintf(stderr, "  CUDA backward (run %d) returned %d: %s\n", run, (int)st, dmsg);
        } else {
            fprintf(stderr, "  CUDA forward (run %d) returned %d: %s\n", run, (int)st, dmsg);
        }
        cudaError_t late = cudaStreamSynchronize(stream);
        if (late != cudaSuccess) {
            fprintf(stderr, "  after the CUDA calls: %s (%s)\n", cudaGetErrorString(late), cudaGetErrorName(late));
            report(0, c, " (device error)", INFINITY);
            printf("%d passed, %d failed (stopped: the device is in an error state)\n", g_passed, g_failed);
            exit(1);
        }
        if (st != MOE_OK) {
            ok = 0;
            snprintf(extra, sizeof extra, " (CUDA call failed)");
            break;
        }
        io_download(&gpu[run], &dout, &z, stream);
    }

    double fwd_err = 0.0, bwd_err = 0.0;
    int near_ties = 0;
    if (ok) {
        const io *g = &gpu[0];
        /* Decisions. */
        unsigned char *skip = host_alloc((size_t)T);
        for (int t = 0; t < T && ok; ++t) {
            const int32_t *ce = cpu.expert + (size_t)t * k, *ge = g->expert + (size_t)t * k;
            if (memcmp(ce, ge, (size_t)k * sizeof(int32_t)) == 0) continue;
            int explained = c->near_ties_ok;
            if (explained) {
                /* The device's choice must be the top-K of its own l' ... */
                int32_t own[256];
                moe_topk_row(g->route + (size_t)t * E, E, k, own);
                explained = memcmp(own, ge, (size_t)k * sizeof(int32_t)) == 0;
                /* ... and the swapped experts tie to within 8 ulps in the CPU's l'. */
                const float *lp = cpu.route + (size_t)t * E;
                for (int j = 0; j < k && explained; ++j) {
                    if (ce[j] == ge[j]) continue;
                    if (ge[j] < 0 || ge[j] >= E) {
                        explained = 0;
                        break;
                    }
                    float a = lp[ce[j]], b = lp[ge[j]];
                    explained = fabsf(a - b) <= 8.0f * FLT_EPSILON * fmaxf(fabsf(a), fabsf(b));
                }
            }
            if (explained) {
                skip[t] = 1;
                ++near_ties;
                continue;
            }
            ok = 0;
            for (int j = 0; j < k; ++j)
                if (ce[j] != ge[j]) {
                    fprintf(stderr, "  expert[t=%d, j=%d]: CPU %d, CUDA %d\n", t, j, ce[j], ge[j]);
                    break;
                }
            print_row("logits", h.logits + (size_t)t * E, E);
            if (z.perturbs) {
                print_row("CPU l'", cpu.route + (size_t)t * E, E);
                print_row("CUDA l'", g->route + (size_t)t * E, E);
            }
            snprintf(extra, sizeof extra, " (experts differ at token %d)", t);
        }
        if (ok && z.owns) {
            for (size_t i = 0; i < z.nTK; ++i)
                if (cpu.slot[i] != g->slot[i]) {
                    fprintf(stderr, "  slot[t=%zu, j=%zu]: CPU %d, CUDA %d (expert %d)\n", i / k, i % k, cpu.slot[i],
                            g->slot[i], cpu.expert[i]);
                    snprintf(extra, sizeof extra, " (slots differ)");
                    ok = 0;
                    break;
                }
        }
        /* Weights and route_logits. */
        size_t worst = 0;
        double ew = max_abs_err(cpu.weight, g->weight, z.nTK, skip, (size_t)k, &worst);
        if (ew > TOL_FWD) fprintf(stderr, "  weight[%zu]: CPU %.9g, CUDA %.9g\n", worst, cpu.weight[worst], g->weight[worst]);
        double er = 0.0;
        if (z.perturbs) {
            er = max_abs_err(cpu.route, g->route, z.nTE, NULL, 1, &worst);
            if (er > TOL_FWD)
                fprintf(stderr, "  route_logits[%zu]: CPU %.9g, CUDA %.9g\n", worst, cpu.route[worst], g->route[worst]);
        }
        fwd_err = fmax(ew, er);
        if (fwd_err > TOL_FWD && ok) {
            ok = 0;
            snprintf(extra, sizeof extra, " (forward values differ)");
        }
        free(skip);
        /* Gradients. */
        double ed = rel_err(cpu.dlogits, g->dlogits, z.nTE), ex = rel_err(cpu.dx, g->dx, z.nTD), ep = 0.0;
        for (int i = 0; i < z.n_params; ++i) ep = fmax(ep, rel_err(cpu.pgrad[i], g->pgrad[i], z.np[i]));
        bwd_err = fmax(ed, fmax(ex, ep));
        if (bwd_err > TOL_BWD) {
            fprintf(stderr, "  relative errors: dlogits %.3g, dx %.3g, param grads %.3g\n", ed, ex, ep);
            if (ed > TOL_BWD) {
                size_t w = 0;
                max_abs_err(cpu.dlogits, g->dlogits, z.nTE, NULL, 1, &w);
                fprintf(stderr, "  worst dlogits[t=%zu, e=%zu]: CPU %.9g, CUDA %.9g\n", w / E, w % E, cpu.dlogits[w],
                        g->dlogits[w]);
            }
            if (ok) snprintf(extra, sizeof extra, " (gradients differ)");
            ok = 0;
        }
        /* Determinism: every output bitwise equal across the two runs. */
        const io *g1 = &gpu[1];
        int same = memcmp(g->expert, g1->expert, z.nTK * sizeof(int32_t)) == 0 &&
                   memcmp(g->weight, g1->weight, z.nTK * sizeof(float)) == 0 &&
                   (!z.owns || memcmp(g->slot, g1->slot, z.nTK * sizeof(int32_t)) == 0) &&
                   (!z.perturbs || memcmp(g->route, g1->route, z.nTE * sizeof(float)) == 0) &&
                   memcmp(g->dlogits, g1->dlogits, z.nTE * sizeof(float)) == 0 &&
                   memcmp(g->dx, g1->dx, z.nTD * sizeof(float)) == 0;
        for (int i = 0; i < z.n_params; ++i) same = same && memcmp(g->pgrad[i], g1->pgrad[i], z.np[i] * sizeof(float)) == 0;
        if (!same) {
            fprintf(stderr, "  two CUDA runs differ (nondeterminism, or an output element left unwritten)\n");
            if (ok) snprintf(extra, sizeof extra, " (not deterministic)");
            ok = 0;
        }
        if (!guard_intact(&dv, stream)) {
            fprintf(stderr, "  the CUDA path wrote past the %zu-byte workspace query() asked for\n", dv.ws_bytes);
            if (ok) snprintf(extra, sizeof extra, " (workspace overrun)");
            ok = 0;
        }
        if (ok) {
            size_t eq = count_bitwise_equal(cpu.weight, g->weight, z.nTK);
            char nt[32] = "";
            if (near_ties) snprintf(nt, sizeof nt, ", near_ties=%d", near_ties);
            snprintf(extra, sizeof extra, " (fwd %.2g, bwd %.2g, weights bitwise equal %.1f%%%s)", fwd_err, bwd_err,
                     z.nTK ? 100.0 * (double)eq / (double)z.nTK : 100.0, nt);
        }
    }
    report(ok, c, extra, fmax(fwd_err, bwd_err));

    io_free(&dout, &z, 1);
    io_free(&gpu[0], &z, 0);
    io_free(&gpu[1], &z, 0);
    io_free(&dv.fwd_in, &z, 1);
    CU(cudaFree(dv.ws));
    if (d_saved) CU(cudaFree(d_saved));
    CU(cudaFree(dv.in.logits));
    CU(cudaFree(dv.in.x));
    CU(cudaFree(dv.in.ids));
    CU(cudaFree(dv.in.dweight));
    CU(cudaFree(dv.in.droute));
    for (int i = 0; i < z.n_params; ++i) CU(cudaFree(dv.in.params[i]));
out_cpu:
    free(h_saved);
    io_free(&cpu, &z, 0);
    free(h.logits);
    free(h.x);
    free(h.ids);
    free(h.dweight);
    free(h.droute);
    free(h.dx0);
    for (int i = 0; i < z.n_params; ++i) free(h.pgrad0[i]);
    rh_destroy(&r);
}

/* ---- bad inputs: the CUDA path answers as the CPU path does ------------- */

typedef struct call_result {
    moe_status st;
    char msg[1024];
} call_result;

static int same_answer(const char *what, const call_result *h, const call_result *d) {
    int ok = h->st != MOE_OK && h->st == d->st && strcmp(h->msg, d->msg) == 0;
    if (!ok)
        fprintf(stderr, "  %s: CPU %d \"%s\", CUDA %d \"%s\"\n", what, (int)h->st, h->msg, (int)d->st, d->msg);
    return ok;
}

static int all_bytes(const void *p, size_t n, unsigned char b) {
    const unsigned char *q = p;
    for (size_t i = 0; i < n; ++i)
        if (q[i] != b) return 0;
    return 1;
}

/* forward with a NaN logit at (5, 3) (or, for hash with key = "token", an id
 * outside the vocabulary at token 5), backward with the NaN logit, and
 * backward with an expert entry out of range at (3, 1). */
static void run_bad_inputs(const moe_router_plugin_v1_t *p, const tcase *c, uint64_t seed, cudaStream_t stream) {
    rh_router r;
    if (rh_create(&r, p, rh_dims(c->E, c->K, c->d_model, VOCAB, c->T, CAPACITY_FACTOR), c->opts, c->n_opts) != MOE_OK ||
        !p->cuda) {
        report(0, c, " (bad inputs: create failed or no CUDA table)", INFINITY);
        if (r.state) rh_destroy(&r);
        return;
    }
    const int T = c->T, E = c->E, k = r.info.k_out;
    const sizes z = sizes_for(&r, T, c->d_model);
    const int capacity = (int)ceil(CAPACITY_FACTOR * T * c->K / E);
    const moe_rng_key key = {seed, 1, 0, MOE_RNG_STREAM_ROUTER};
    const int is_hash = strcmp(c->plugin, "hash") == 0;
    const int hash_ids = is_hash && strcmp(c->setting, "key=token") == 0; /* position mode reads no ids */

    moe_test_rng rng = {seed + 99};
    inputs h;
    memset(&h, 0, sizeof h);
    h.logits = host_alloc(z.nTE * sizeof(float));
    h.x = host_alloc(z.nTD * sizeof(float));
    h.ids = host_alloc((size_t)T * sizeof(int32_t));
    h.dweight = host_alloc(z.nTK * sizeof(float));
    h.droute = host_alloc(z.nTE * sizeof(float));
    fill_logits(&rng, h.logits, T, E, 0);
    moe_test_fill(&rng, h.x, z.nTD, -1.0f, 1.0f);
    for (int t = 0; t < T; ++t) h.ids[t] = (int32_t)(moe_test_next(&rng) % VOCAB);
    moe_test_fill(&rng, h.dweight, z.nTK, -1.0f, 1.0f);
    for (int i = 0; i < z.n_params; ++i) h.params[i] = r.params[i];

    /* A clean CPU forward gives backward's expert / weight inputs. */
    io cpu;
    io_alloc(&cpu, &z, 0);
    call_result hr, dr;
    moe_context hctx = make_ctx(MOE_DEVICE_CPU, NULL, r.workspace, r.info.workspace_bytes, key, c->training, hr.msg,
                                sizeof hr.msg);
    moe_router_fwd_args fa = fwd_args(&r, c, capacity, &h, h.params, &cpu, &z);
    int ok = p->cpu->forward(r.state, &hctx, &fa) == MOE_OK;
    if (!ok) fprintf(stderr, "  clean CPU forward failed: %s\n", hr.msg);

    dev_inputs dv;
    memset(&dv, 0, sizeof dv);
    dv.in.logits = dev_alloc(z.nTE * sizeof(float));
    dv.in.x = dev_alloc(z.nTD * sizeof(float));
    dv.in.ids = dev_alloc((size_t)T * sizeof(int32_t));
    dv.in.dweight = dev_alloc(z.nTK * sizeof(float));
    for (int i = 0; i < z.n_params; ++i) {
        dv.in.params[i] = dev_alloc(z.np[i] * sizeof(float));
        upload(dv.in.params[i], h.params[i], z.np[i] * sizeof(float), stream);
    }
    io_alloc(&dv.fwd_in, &z, 1);
    io dout;
    io_alloc(&dout, &z, 1);
    dv.ws_bytes = r.info.workspace_bytes;
    dv.ws = dev_alloc(dv.ws_bytes);
    upload(dv.in.x, h.x, z.nTD * sizeof(float), stream);
    upload(dv.in.dweight, h.dweight, z.nTK * sizeof(float), stream);
    io outs;
    io_alloc(&outs, &z, 0);

    /* 1. forward on the bad input. */
    if (hash_ids)
        h.ids[5] = VOCAB + 3;
    else
        h.logits[5 * E + 3] = NAN;
    upload(dv.in.logits, h.logits, z.nTE * sizeof(float), stream);
    upload(dv.in.ids, h.ids, (size_t)T * sizeof(int32_t), stream);
    if (ok && (hash_ids || !is_hash)) {
        io scratch;
        io_alloc(&scratch, &z, 0);
        hctx = make_ctx(MOE_DEVICE_CPU, NULL, r.workspace, r.info.workspace_bytes, key, c->training, hr.msg,
                        sizeof hr.msg);
        fa = fwd_args(&r, c, capacity, &h, h.params, &scratch, &z);
        hr.st = p->cpu->forward(r.state, &hctx, &fa);
        io_free(&scratch, &z, 0);
        CU(cudaMemsetAsync(dout.expert, 0xFF, z.nTK * sizeof(int32_t), stream));
        CU(cudaMemsetAsync(dout.weight, 0xFF, z.nTK * sizeof(float), stream));
        moe_context dctx = make_ctx(MOE_DEVICE_CUDA, stream, dv.ws, dv.ws_bytes, key, c->training, dr.msg, sizeof dr.msg);
        moe_router_fwd_args dfa = fwd_args(&r, c, capacity, &dv.in, dv.in.params, &dout, &z);
        dr.st = p->cuda->forward(r.state, &dctx, &dfa);
        CU(cudaStreamSynchronize(stream));
        ok = same_answer("forward on a bad input", &hr, &dr);
        CU(cudaMemcpy(outs.expert, dout.expert, z.nTK * sizeof(int32_t), cudaMemcpyDeviceToHost));
        CU(cudaMemcpy(outs.weight, dout.weight, z.nTK * sizeof(float), cudaMemcpyDeviceToHost));
        if (!all_bytes(outs.expert, z.nTK * sizeof(int32_t), 0xFF) || !all_bytes(outs.weight, z.nTK * sizeof(float), 0xFF)) {
            fprintf(stderr, "  the failed CUDA forward wrote expert or weight\n");
            ok = 0;
        }
    }

    /* 2. backward with the NaN logit (hash reads no logits: skipped). */
    upload(dv.fwd_in.expert, cpu.expert, z.nTK * sizeof(int32_t), stream);
    upload(dv.fwd_in.slot, cpu.slot, z.nTK * sizeof(int32_t), stream);
    upload(dv.fwd_in.weight, cpu.weight, z.nTK * sizeof(float), stream);
    upload(dv.fwd_in.route, cpu.route, z.nTE * sizeof(float), stream);
    for (int pass = 0; pass < 2 && ok && !hash_ids; ++pass) {
        if (pass == 1) {
            /* 3. backward with an expert entry out of range (clean logits). */
            h.logits[5 * E + 3] = 0.5f;
            upload(dv.in.logits, h.logits, z.nTE * sizeof(float), stream);
            cpu.expert[3 * k + (k > 1 ? 1 : 0)] = E + 5;
            upload(dv.fwd_in.expert, cpu.expert, z.nTK * sizeof(int32_t), stream);
        }
        io bo;
        io_alloc(&bo, &z, 0);
        hctx = make_ctx(MOE_DEVICE_CPU, NULL, r.workspace, r.info.workspace_bytes, key, c->training, hr.msg,
                        sizeof hr.msg);
        moe_router_bwd_args ba = bwd_args(&r, c, capacity, &h, h.params, &cpu, &bo, &z);
        hr.st = p->cpu->backward(r.state, &hctx, &ba);
        io_free(&bo, &z, 0);
        moe_context dctx = make_ctx(MOE_DEVICE_CUDA, stream, dv.ws, dv.ws_bytes, key, c->training, dr.msg, sizeof dr.msg);
        moe_router_bwd_args dba = bwd_args(&r, c, capacity, &dv.in, dv.in.params, &dv.fwd_in, &dout, &z);
        dr.st = p->cuda->backward(r.state, &dctx, &dba);
        CU(cudaStreamSynchronize(stream));
        if (hr.st == MOE_OK) {
            /* This setting does not check (its backward reads no logits, or no
             * expert entries): the CUDA path must agree that the call is fine. */
            if (dr.st != MOE_OK) {
                fprintf(stderr, "  backward pass %d: CPU OK, CUDA %d \"%s\"\n", pass, (int)dr.st, dr.msg);
                ok = 0;
            }
        } else {
            ok = same_answer(pass ? "backward with a bad expert entry" : "backward with a NaN logit", &hr, &dr);
        }
    }
    report(ok, c, " (bad inputs: same status and message)", 0.0);

    io_free(&outs, &z, 0);
    io_free(&dout, &z, 1);
    io_free(&dv.fwd_in, &z, 1);
    CU(cudaFree(dv.ws));
    CU(cudaFree(dv.in.logits));
    CU(cudaFree(dv.in.x));
    CU(cudaFree(dv.in.ids));
    CU(cudaFree(dv.in.dweight));
    for (int i = 0; i < z.n_params; ++i) CU(cudaFree(dv.in.params[i]));
    io_free(&cpu, &z, 0);
    free(h.logits);
    free(h.x);
    free(h.ids);
    free(h.dweight);
    free(h.droute);
    rh_destroy(&r);
}

/* ---- the settings ------------------------------------------------------- */

typedef struct setting {
    const char *plugin;
    const char *label;
    moe_option opts[3];
    int n_opts;
    int training;
    int near_ties_ok;
    int big; /* expert choice: also T = 16384 and T = 30000 (two and three rounds of merging sorted chunks), E = 12 and 3 */
    int wide; /* noisy_topk, learned noise in training: also the wide_cases */
} setting;

/* noisy_topk's learned noise reads x [T, d_model]: its tile kernels at the
 * training shape (d_model 256, E 8) with a last tile cut short, fewer
 * tokens per tile (E 16, 32), and the shapes that take the global-memory
 * kernels (d_model not a multiple of 4; a tile too large for shared memory). */
static const struct {
    int T, E, K, d_model;
} wide_cases[] = {
    {4133, 8, 2, 256}, {8192, 8, 2, 256}, {300, 16, 2, 256}, {77, 32, 1, 128}, {100, 8, 2, 1030}, {300, 8, 2, 2048},
};

int main(void) {
    int n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e != cudaSuccess || n_dev == 0) {
        printf("no CUDA device (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "cudaGetDeviceCount reports 0");
        return 77;
    }
    struct cudaDeviceProp prop;
    CU(cudaGetDeviceProperties(&prop, 0));
    CU(cudaSetDevice(0));
    int rt = 0, drv = 0;
    CU(cudaRuntimeGetVersion(&rt));
    CU(cudaDriverGetVersion(&drv));
    printf("device 0: %s, compute capability %d.%d, %d SMs; runtime %d, driver %d\n", prop.name, prop.major,
           prop.minor, prop.multiProcessorCount, rt, drv);

    uint64_t seed;
    const char *env = getenv("MOE_TEST_SEED");
    if (env && *env) {
        seed = strtoull(env, NULL, 0);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seed = ((uint64_t)ts.tv_sec * 1000003u) ^ (uint64_t)ts.tv_nsec;
    }
    printf("seed %" PRIu64 " (MOE_TEST_SEED=%" PRIu64 " repeats this run)\n", seed, seed);
    fflush(stdout);

    /* A non-blocking stream: a plugin that launched on the legacy default
     * stream instead of ctx->stream would race with the test's copies. */
    cudaStream_t stream;
    CU(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    const setting settings[] = {
        {"top1", "gate=softmax", {rh_opt_str("gate", "softmax")}, 1, 1, 0, 0, 0},
        {"top1", "gate=none", {rh_opt_str("gate", "none")}, 1, 1, 0, 0, 0},
        {"topk_hard", "weight=uniform", {rh_opt_str("weight", "uniform")}, 1, 1, 0, 0, 0},
        {"topk_hard", "weight=st", {rh_opt_str("weight", "st")}, 1, 1, 0, 0, 0},
        {"topk_hard", "weight=one", {rh_opt_str("weight", "one")}, 1, 1, 0, 0, 0},
        {"softk", "normalize=softmax,temperature=1", {rh_opt_str("normalize", "softmax")}, 1, 1, 0, 0, 0},
        {"softk", "normalize=softmax,temperature=0.7",
         {rh_opt_str("normalize", "softmax"), rh_opt_float("temperature", 0.7)}, 2, 1, 0, 0, 0},
        {"softk", "normalize=sum,temperature=1", {rh_opt_str("normalize", "sum")}, 1, 1, 0, 0, 0},
        {"softk", "normalize=sum,temperature=0.7", {rh_opt_str("normalize", "sum"), rh_opt_float("temperature", 0.7)},
         2, 1, 0, 0, 0},
        {"hash", "key=token", {rh_opt_str("key", "token")}, 1, 1, 0, 0, 0},
        {"hash", "key=position", {rh_opt_str("key", "position")}, 1, 1, 0, 0, 0},
        {"expert_choice", "max_per_token=0", {rh_opt_int("max_per_token", 0)}, 1, 1, 0, 1, 0},
        {"expert_choice", "max_per_token=2", {rh_opt_int("max_per_token", 2)}, 1, 1, 0, 1, 0},
        {"noisy_topk", "learned=true", {rh_opt_bool("learned", 1)}, 1, 1, 1, 0, 1},
        {"noisy_topk", "learned=true", {rh_opt_bool("learned", 1)}, 1, 0, 0, 0, 0},
        {"noisy_topk", "learned=false,noise_std=1", {rh_opt_bool("learned", 0)}, 1, 1, 0, 0, 0},
        {"noisy_topk", "learned=false,noise_std=1", {rh_opt_bool("learned", 0)}, 1, 0, 0, 0, 0},
    };
    const int n_settings = (int)(sizeof settings / sizeof settings[0]);
    const int Ts[] = {1, 37, 4096}, Es[] = {8, 64}, Ks[] = {1, 2};
    const char *quick_env = getenv("MOE_TEST_QUICK");
    const int quick = quick_env && *quick_env && strcmp(quick_env, "0") != 0;
    const int n_T = quick ? 2 : 3;
    if (quick) printf("MOE_TEST_QUICK: T <= 37 only\n");

    uint64_t case_seed = seed;
    for (int si = 0; si < n_settings; ++si) {
        const setting *s = &settings[si];
        const moe_router_plugin_v1_t *p = rh_try_load(s->plugin);
        tcase c;
        memset(&c, 0, sizeof c);
        c.plugin = s->plugin;
        c.setting = s->label;
        memcpy(c.opts, s->opts, sizeof c.opts);
        c.n_opts = s->n_opts;
        c.training = s->training;
        c.near_ties_ok = s->near_ties_ok;
        c.d_model = D_MODEL;
        if (!p) {
            c.T = 0;
            report(0, &c, " (cannot load the plugin)", INFINITY);
            continue;
        }
        for (int ti = 0; ti < n_T; ++ti)
            for (int ei = 0; ei < 2; ++ei)
                for (int ki = 0; ki < 2; ++ki) {
                    c.T = Ts[ti];
                    c.E = Es[ei];
                    c.K = Ks[ki];
                    c.ties = 0;
                    run_case(p, &c, ++case_seed, stream);
                }
        /* Exact ties: small and large. */
        c.K = 2;
        c.ties = 1;
        c.T = 37;
        c.E = 8;
        run_case(p, &c, ++case_seed, stream);
        if (!quick) {
            c.T = 4096;
            c.E = 64;
            run_case(p, &c, ++case_seed, stream);
        }
        if (s->big && !quick) {
            c.ties = 0;
            c.T = 16384;
            c.E = 64;
            run_case(p, &c, ++case_seed, stream);
            c.T = 30000;
            c.E = 8;
            run_case(p, &c, ++case_seed, stream);
            c.ties = 1;
            run_case(p, &c, ++case_seed, stream);
        }
        if (s->big && !quick) {
            /* Expert choice's fused select (at most 8 chunks of 1024 tokens an
             * expert, one launch): the training shape (C = 2560 and 1280), a
             * last chunk cut short, C >= T, E = 40 (its rows then assigned by a
             * launch of their own), E = 3 over three chunks. */
            static const struct {
                int T, E, K, ties;
            } fused_cases[] = {{8192, 8, 2, 0}, {8192, 8, 1, 0}, {8192, 8, 2, 1}, {4133, 8, 2, 0},
                               {5000, 4, 4, 0}, {2000, 40, 2, 0}, {3000, 3, 1, 0}};
            for (size_t f = 0; f < sizeof fused_cases / sizeof fused_cases[0]; ++f) {
                c.T = fused_cases[f].T;
                c.E = fused_cases[f].E;
                c.K = fused_cases[f].K;
                c.ties = fused_cases[f].ties;
                run_case(p, &c, ++case_seed, stream);
            }
            c.K = 2;
        }
        if (s->wide && !quick) {
            c.ties = 0;
            for (size_t w = 0; w < sizeof wide_cases / sizeof wide_cases[0]; ++w) {
                c.T = wide_cases[w].T;
                c.E = wide_cases[w].E;
                c.K = wide_cases[w].K;
                c.d_model = wide_cases[w].d_model;
                run_case(p, &c, ++case_seed, stream);
            }
            c.d_model = D_MODEL;
        }
        if (s->big) {
            /* E not a power of two: expert choice's lane groups (a power of
             * two of lanes a token) have lanes without an expert. */
            c.ties = 0;
            c.T = quick ? 37 : 3000;
            c.E = 12;
            c.K = 2;
            run_case(p, &c, ++case_seed, stream);
            c.ties = 1;
            c.T = 37;
            c.E = 3;
            run_case(p, &c, ++case_seed, stream);
        }
        c.ties = 0;
        c.T = 37;
        c.E = 8;
        c.K = 2;
        run_bad_inputs(p, &c, ++case_seed, stream);
    }

    CU(cudaStreamDestroy(stream));
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
