/*
 * Every backward op of the CPU backend against central finite differences of
 * its forward, and the adjoint identity <f(a), b> = <a, f^T(b)> for the
 * linear maps (rope, dispatch). Then determinism of the backwards that sum
 * over rows (attention, embedding).
 *
 * The probe loss is L = sum(dy .* f(x)) with a random dy, so dL/dx is what
 * the backward computes from dy. The loss is summed in double; the
 * perturbation is in float, so eps = 1e-3 and the error is measured relative
 * to the largest gradient component.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "test_util.h"

static moe_test_rng rng = {0x5DEECE66DULL};

#define FD_EPS 1e-3f
#define FD_TOL 2e-3 /* observed errors are ~1e-4; a wrong term is usually >1e-2 */

static float *randv(size_t n, float lo, float hi) {
    float *x = malloc((n ? n : 1) * sizeof *x);
    moe_test_fill(&rng, x, n, lo, hi);
    return x;
}

static float *copyv(const float *x, size_t n) {
    float *y = malloc((n ? n : 1) * sizeof *y);
    memcpy(y, x, n * sizeof *y);
    return y;
}

static double dot(const float *a, const float *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; ++i) s += (double)a[i] * b[i];
    return s;
}

/* The probe loss as a function of whatever the context holds. */
typedef double (*loss_fn)(void *ctx);

/* Central differences of loss(ctx) in each element of x (which loss reads
 * through ctx), against the analytic gradient: max |num - ana| / max |ana|. */
static void check_grad(const char *what, loss_fn loss, void *ctx, float *x, const float *grad,
                       size_t n) {
    double max_diff = 0.0, max_grad = 0.0;
    for (size_t i = 0; i < n; ++i) {
        float saved = x[i];
        x[i] = saved + FD_EPS;
        double lp = loss(ctx);
        x[i] = saved - FD_EPS;
        double lm = loss(ctx);
        x[i] = saved;
        /* divide by the step actually taken: saved +- eps is rounded to float */
        double num = (lp - lm) / ((double)(saved + FD_EPS) - (double)(saved - FD_EPS));
        max_diff = fmax(max_diff, fabs(num - grad[i]));
        max_grad = fmax(max_grad, fabs((double)grad[i]));
    }
    double rel = max_grad > 0.0 ? max_diff / max_grad : max_diff;
    printf("  %-28s relative error %.2e (max|grad| %.3g)\n", what, rel, max_grad);
    CHECK_MSG(max_grad > 0.0 && rel < FD_TOL, "%s: max|num-ana| = %g, max|grad| = %g", what,
              max_diff, max_grad);
}

/* Runs an accumulating backward: `acc` starts at random values and the
 * gradient is what the backward added. Returns the prior values. */
static float *random_prior(float *acc, size_t n) {
    moe_test_fill(&rng, acc, n, -1, 1);
    return copyv(acc, n);
}
static void subtract_prior(float *acc, const float *prior, size_t n) {
    for (size_t i = 0; i < n; ++i) acc[i] -= prior[i];
}

static moe_backend *be;

/* ------------------------------------------------------------------ */
/* LayerNorm, RMSNorm                                                  */
/* ------------------------------------------------------------------ */

typedef struct {
    int T, d;
    float *x, *g, *b, *y, *mean, *rstd, *dy;
} norm_ctx;

static double layernorm_loss(void *p) {
    norm_ctx *c = p;
    be->layernorm_fwd(be, c->x, c->g, c->b, c->y, c->mean, c->rstd, c->T, c->d, 1e-5f);
    return dot(c->dy, c->y, (size_t)c->T * c->d);
}

static double rmsnorm_loss(void *p) {
    norm_ctx *c = p;
    be->rmsnorm_fwd(be, c->x, c->g, c->y, c->rstd, c->T, c->d, 1e-5f);
    return dot(c->dy, c->y, (size_t)c->T * c->d);
}

static void test_norm_grads(void) {
    enum { T = 4, d = 21 };
    norm_ctx c = {T, d, randv(T * d, -1.5f, 2), randv(d, 0.5f, 1.5f), randv(d, -0.5f, 0.5f),
                  malloc(T * d * sizeof(float)), malloc(T * sizeof(float)),
                  malloc(T * sizeof(float)), randv(T * d, -1, 1)};
    float dx[T * d], dg[d], db[d];
    float *px = random_prior(dx, T * d), *pg = random_prior(dg, d), *pb = random_prior(db, d);
    layernorm_loss(&c); /* mean, rstd for the backward */
    be->layernorm_bwd(be, c.x, c.g, c.mean, c.rstd, c.dy, dx, dg, db, T, d);
    subtract_prior(dx, px, T * d);
    subtract_prior(dg, pg, d);
    subtract_prior(db, pb, d);
    check_grad("layernorm dx", layernorm_loss, &c, c.x, dx, T * d);
    check_grad("layernorm dg", layernorm_loss, &c, c.g, dg, d);
    check_grad("layernorm db", layernorm_loss, &c, c.b, db, d);
    free(px), free(pg), free(pb);

    px = random_prior(dx, T * d), pg = random_prior(dg, d);
    rmsnorm_loss(&c);
    be->rmsnorm_bwd(be, c.x, c.g, c.rstd, c.dy, dx, dg, T, d);
    subtract_prior(dx, px, T * d);
    subtract_prior(dg, pg, d);
    check_grad("rmsnorm dx", rmsnorm_loss, &c, c.x, dx, T * d);
    check_grad("rmsnorm dg", rmsnorm_loss, &c, c.g, dg, d);
    free(px), free(pg);
    free(c.x), free(c.g), free(c.b), free(c.y), free(c.mean), free(c.rstd), free(c.dy);
}

/* ------------------------------------------------------------------ */
/* Activations                                                         */
/* ------------------------------------------------------------------ */

typedef struct {
    moe_act_kind kind;
    int T, n;
    float *in, *out, *dout;
} act_ctx;

static double act_loss(void *p) {
    act_ctx *c = p;
    be->act_fwd(be, c->kind, c->in, c->out, c->T, c->n);
    return dot(c->dout, c->out, (size_t)c->T * c->n);
}

static void test_act_grads(void) {
    enum { T = 3, n = 11 };
    const char *names[] = {"gelu", "silu", "swiglu"};
    for (int kind = MOE_ACT_GELU; kind <= MOE_ACT_SWIGLU; ++kind) {
        int in_width = kind == MOE_ACT_SWIGLU ? 2 * n : n;
        act_ctx c = {(moe_act_kind)kind, T, n, randv(T * in_width, -4, 4),
                     malloc(T * n * sizeof(float)), randv(T * n, -1, 1)};
        float *din = randv(T * in_width, 7, 8); /* overwritten */
        be->act_bwd(be, c.kind, c.in, c.dout, din, T, n);
        check_grad(names[kind], act_loss, &c, c.in, din, (size_t)T * in_width);
        free(c.in), free(c.out), free(c.dout), free(din);
    }
}

/* ------------------------------------------------------------------ */
/* RoPE: a rotation, so rope_bwd must be its transpose                 */
/* ------------------------------------------------------------------ */

static void test_rope_adjoint(void) {
    enum { B = 2, S = 5, H = 3, hd = 8 };
    size_t n = (size_t)B * S * 3 * H * hd;
    float *a = randv(n, -1, 1), *b = randv(n, -1, 1);
    float *ra = copyv(a, n), *rb = copyv(b, n);
    be->rope_fwd(be, ra, B, S, H, hd, 100.0f);
    be->rope_bwd(be, rb, B, S, H, hd, 100.0f);
    double lhs = dot(ra, b, n), rhs = dot(a, rb, n);
    CHECK_MSG(fabs(lhs - rhs) < 1e-5 * (1.0 + fabs(lhs)),
              "<rope(a),b> = %.9g, <a,rope_bwd(b)> = %.9g", lhs, rhs);
    /* and it is not trivially the identity */
    CHECK(memcmp(ra, a, n * sizeof *a) != 0);
    /* v parts of the gradient pass through untouched */
    int v_same = 1;
    for (int bs = 0; bs < B * S; ++bs)
        v_same &= memcmp(rb + (size_t)bs * 3 * H * hd + 2 * H * hd,
                         b + (size_t)bs * 3 * H * hd + 2 * H * hd, (size_t)H * hd * sizeof *b) == 0;
    CHECK(v_same);
    free(a), free(b), free(ra), free(rb);
}

/* ------------------------------------------------------------------ */
/* Attention                                                           */
/* ------------------------------------------------------------------ */

typedef struct {
    int B, S, H, hd;
    float *qkv, *out, *probs, *dout;
} attn_ctx;

static double attention_loss(void *p) {
    attn_ctx *c = p;
    be->attention_fwd(be, c->qkv, c->out, c->probs, c->B, c->S, c->H, c->hd);
    return dot(c->dout, c->out, (size_t)c->B * c->S * c->H * c->hd);
}

static void test_attention_grad(void) {
    enum { B = 2, S = 5, H = 2, hd = 4 };
    size_t nqkv = (size_t)B * S * 3 * H * hd, nout = (size_t)B * S * H * hd;
    attn_ctx c = {B, S, H, hd, randv(nqkv, -1, 1), malloc(nout * sizeof(float)),
                  malloc((size_t)B * H * S * S * sizeof(float)), randv(nout, -1, 1)};
    float *dqkv = randv(nqkv, 7, 8); /* overwritten */
    attention_loss(&c);
    be->attention_bwd(be, c.qkv, c.probs, c.dout, dqkv, B, S, H, hd);
    check_grad("attention dqkv", attention_loss, &c, c.qkv, dqkv, nqkv);
    free(c.qkv), free(c.out), free(c.probs), free(c.dout), free(dqkv);
}

/* ------------------------------------------------------------------ */
/* Embedding                                                           */
/* ------------------------------------------------------------------ */

typedef struct {
    const int32_t *ids;
    int B, S, d;
    float *wte, *wpe, *out, *dout;
} embed_ctx;

static double embed_loss(void *p) {
    embed_ctx *c = p;
    be->embed_fwd(be, c->ids, c->wte, c->wpe, c->out, c->B, c->S, c->d);
    return dot(c->dout, c->out, (size_t)c->B * c->S * c->d);
}

static void test_embed_grad(void) {
    enum { V = 7, B = 2, S = 5, d = 20 };
    static const int32_t ids[B * S] = {3, 0, 6, 3, 3, 1, 1, 5, 2, 0}; /* repeats, and id 4 unused */
    embed_ctx c = {ids, B, S, d, randv(V * d, -1, 1), randv(S * d, -1, 1),
                   malloc(B * S * d * sizeof(float)), randv(B * S * d, -1, 1)};
    float dwte[V * d], dwpe[S * d];
    float *pt = random_prior(dwte, V * d), *pp = random_prior(dwpe, S * d);
    be->embed_bwd(be, ids, c.dout, dwte, dwpe, B, S, d, V);
    subtract_prior(dwte, pt, V * d);
    subtract_prior(dwpe, pp, S * d);
    check_grad("embedding dwte", embed_loss, &c, c.wte, dwte, V * d);
    check_grad("embedding dwpe", embed_loss, &c, c.wpe, dwpe, S * d);
    int unused_zero = 1;
    for (int i = 0; i < d; ++i) unused_zero &= dwte[4 * d + i] == 0.0f;
    CHECK_MSG(unused_zero, "embedding: an unused id got a gradient");
    /* without wpe the token gradient is the same */
    float dwte2[V * d];
    memset(dwte2, 0, sizeof dwte2);
    be->embed_bwd(be, ids, c.dout, dwte2, NULL, B, S, d, V);
    double err = 0.0;
    for (int i = 0; i < V * d; ++i) err = fmax(err, fabs(dwte2[i] - dwte[i]));
    CHECK_MSG(err < 1e-6, "embed_bwd without dwpe: %g", err);
    free(pt), free(pp), free(c.wte), free(c.wpe), free(c.out), free(c.dout);
}

/* ------------------------------------------------------------------ */
/* Cross-entropy                                                       */
/* ------------------------------------------------------------------ */

typedef struct {
    int T, V;
    const int32_t *targets;
    float grad_scale;
    float *logits, *losses;
    int32_t *correct;
} xent_ctx;

/* dlogits = grad_scale * (softmax - onehot) is the gradient of grad_scale * sum(losses). */
static double xent_loss(void *p) {
    xent_ctx *c = p;
    be->xent_fwd_bwd(be, c->logits, c->targets, c->T, c->V, c->losses, c->correct, NULL, 0.0f);
    double s = 0.0;
    for (int t = 0; t < c->T; ++t) s += c->losses[t];
    return c->grad_scale * s;
}

static void test_xent_grad(void) {
    enum { T = 4, V = 9 };
    static const int32_t targets[T] = {2, -1, 8, 0};
    float losses[T];
    int32_t correct[T];
    xent_ctx c = {T, V, targets, 0.37f, randv(T * V, -2, 2), losses, correct};
    float *dl = randv(T * V, 7, 8); /* overwritten */
    be->xent_fwd_bwd(be, c.logits, targets, T, V, losses, correct, dl, c.grad_scale);
    check_grad("xent dlogits", xent_loss, &c, c.logits, dl, T * V);
    free(c.logits), free(dl);
}

/* ------------------------------------------------------------------ */
/* Bias and dropout: linear maps                                       */
/* ------------------------------------------------------------------ */

typedef struct {
    int T, N;
    float *y0, *y, *b, *dy;
} bias_ctx;

static double bias_loss(void *p) {
    bias_ctx *c = p;
    memcpy(c->y, c->y0, (size_t)c->T * c->N * sizeof *c->y);
    be->add_bias(be, c->y, c->b, c->T, c->N);
    return dot(c->dy, c->y, (size_t)c->T * c->N);
}

static void test_bias_grad(void) {
    enum { T = 6, N = 19 };
    bias_ctx c = {T, N, randv(T * N, -1, 1), malloc(T * N * sizeof(float)), randv(N, -1, 1),
                  randv(T * N, -1, 1)};
    float db[N];
    float *prior = random_prior(db, N);
    be->bias_grad(be, c.dy, db, T, N);
    subtract_prior(db, prior, N);
    check_grad("bias_grad", bias_loss, &c, c.b, db, N);
    free(prior), free(c.y0), free(c.y), free(c.b), free(c.dy);
}

/* A linear layer: L = <dY, X W + b>; linear_bwd's dX, and what it adds to
 * dW and db, against central differences. */
typedef struct {
    int T, K, N;
    float *X, *W, *b, *Y, *dY;
} linear_ctx;

static double linear_loss(void *p) {
    linear_ctx *c = p;
    be->gemm_bias(be, 0, 0, c->T, c->N, c->K, c->X, c->K, 0, c->W, c->N, 0, c->b, 0, NULL, c->Y, c->N, 0, 1);
    return dot(c->dY, c->Y, (size_t)c->T * c->N);
}

static void test_linear_grads(void) {
    linear_ctx c = {.T = 7, .K = 5, .N = 6};
    const size_t nX = (size_t)c.T * c.K, nW = (size_t)c.K * c.N, nY = (size_t)c.T * c.N;
    c.X = randv(nX, -1, 1), c.W = randv(nW, -1, 1), c.b = randv((size_t)c.N, -1, 1), c.dY = randv(nY, -1, 1);
    c.Y = malloc(nY * sizeof(float));
    float *dX = malloc(nX * sizeof(float)), *dW = malloc(nW * sizeof(float)), *db = malloc((size_t)c.N * sizeof(float));
    float *pW = random_prior(dW, nW), *pb = random_prior(db, (size_t)c.N);
    be->linear_bwd(be, c.X, c.W, c.dY, dX, dW, db, c.T, c.K, c.N);
    subtract_prior(dW, pW, nW), subtract_prior(db, pb, (size_t)c.N);
    check_grad("linear_bwd dX", linear_loss, &c, c.X, dX, nX);
    check_grad("linear_bwd dW", linear_loss, &c, c.W, dW, nW);
    check_grad("linear_bwd db", linear_loss, &c, c.b, db, (size_t)c.N);
    free(c.X), free(c.W), free(c.b), free(c.dY), free(c.Y), free(dX), free(dW), free(db), free(pW), free(pb);
}

/* The experts' MLP: L = <dY, ffn_fwd(X, w1, b1, w2, b2)> over `batch`
 * experts, for each activation; ffn_bwd's dX, and what it adds to dw1,
 * db1, dw2, db2, against central differences. */
typedef struct {
    moe_act_kind kind;
    int batch, C, d, n, hin;
    float *X, *w1, *b1, *w2, *b2, *H, *A, *Y, *dY;
} ffn_ctx;

static double ffn_loss(void *p) {
    ffn_ctx *c = p;
    be->ffn_fwd(be, c->kind, c->X, c->w1, c->b1, c->w2, c->b2, c->H, c->A, c->Y, c->batch, c->C, c->d, c->n);
    return dot(c->dY, c->Y, (size_t)c->batch * c->C * c->d);
}

static void test_ffn_grads(void) {
    static const char *names[] = {"ffn gelu", "ffn silu", "ffn swiglu"};
    for (int kind = 0; kind < 3; ++kind) {
        ffn_ctx c = {.kind = (moe_act_kind)kind, .batch = 3, .C = 5, .d = 6, .n = 7};
        c.hin = kind == MOE_ACT_SWIGLU ? 2 * c.n : c.n;
        const size_t nX = (size_t)c.batch * c.C * c.d, nw1 = (size_t)c.batch * c.d * c.hin;
        const size_t nw2 = (size_t)c.batch * c.n * c.d, nb1 = (size_t)c.batch * c.hin, nb2 = (size_t)c.batch * c.d;
        const size_t nH = (size_t)c.batch * c.C * c.hin, nA = (size_t)c.batch * c.C * c.n;
        c.X = randv(nX, -1, 1), c.w1 = randv(nw1, -0.7f, 0.7f), c.b1 = randv(nb1, -0.5f, 0.5f);
        c.w2 = randv(nw2, -0.7f, 0.7f), c.b2 = randv(nb2, -0.5f, 0.5f), c.dY = randv(nX, -1, 1);
        c.H = malloc(nH * sizeof(float)), c.A = malloc(nA * sizeof(float)), c.Y = malloc(nX * sizeof(float));
        float *dA = malloc(nA * sizeof(float)), *dH = malloc(nH * sizeof(float)), *dX = malloc(nX * sizeof(float));
        float *dw1 = malloc(nw1 * sizeof(float)), *db1 = malloc(nb1 * sizeof(float));
        float *dw2 = malloc(nw2 * sizeof(float)), *db2 = malloc(nb2 * sizeof(float));
        float *p1 = random_prior(dw1, nw1), *p2 = random_prior(db1, nb1);
        float *p3 = random_prior(dw2, nw2), *p4 = random_prior(db2, nb2);
        ffn_loss(&c); /* the forward ffn_bwd reads */
        be->ffn_bwd(be, c.kind, c.X, c.w1, c.w2, c.H, c.A, c.dY, dA, dH, dX, dw1, db1, dw2, db2, c.batch, c.C, c.d,
                    c.n, 1);
        subtract_prior(dw1, p1, nw1), subtract_prior(db1, p2, nb1);
        subtract_prior(dw2, p3, nw2), subtract_prior(db2, p4, nb2);
        char what[64];
        snprintf(what, sizeof what, "%s dX", names[kind]);
        check_grad(what, ffn_loss, &c, c.X, dX, nX);
        snprintf(what, sizeof what, "%s dw1", names[kind]);
        check_grad(what, ffn_loss, &c, c.w1, dw1, nw1);
        snprintf(what, sizeof what, "%s db1", names[kind]);
        check_grad(what, ffn_loss, &c, c.b1, db1, nb1);
        snprintf(what, sizeof what, "%s dw2", names[kind]);
        check_grad(what, ffn_loss, &c, c.w2, dw2, nw2);
        snprintf(what, sizeof what, "%s db2", names[kind]);
        check_grad(what, ffn_loss, &c, c.b2, db2, nb2);
        /* accumulate_dw = 0: dw1 and dw2 written over what they held */
        free(random_prior(dw1, nw1)), free(random_prior(dw2, nw2));
        be->ffn_bwd(be, c.kind, c.X, c.w1, c.w2, c.H, c.A, c.dY, dA, dH, dX, dw1, db1, dw2, db2, c.batch, c.C, c.d,
                    c.n, 0);
        snprintf(what, sizeof what, "%s dw1 (written over)", names[kind]);
        check_grad(what, ffn_loss, &c, c.w1, dw1, nw1);
        snprintf(what, sizeof what, "%s dw2 (written over)", names[kind]);
        check_grad(what, ffn_loss, &c, c.w2, dw2, nw2);
        free(c.X), free(c.w1), free(c.b1), free(c.w2), free(c.b2), free(c.dY), free(c.H), free(c.A), free(c.Y);
        free(dA), free(dH), free(dX), free(dw1), free(db1), free(dw2), free(db2);
        free(p1), free(p2), free(p3), free(p4);
    }
}

typedef struct {
    size_t n;
    float p;
    moe_rng_key key;
    float *x, *y, *dy;
} dropout_ctx;

static double dropout_loss(void *p) {
    dropout_ctx *c = p;
    be->dropout_fwd(be, c->x, c->y, c->n, c->p, c->key);
    return dot(c->dy, c->y, c->n);
}

static void test_dropout_grad(void) {
    enum { n = 203 };
    dropout_ctx c = {n, 0.4f, {99, 3, 1, MOE_RNG_STREAM_DROPOUT}, randv(n, -1, 1),
                     malloc(n * sizeof(float)), randv(n, -1, 1)};
    float *dx = randv(n, 7, 8);
    be->dropout_bwd(be, c.dy, dx, n, c.p, c.key);
    check_grad("dropout_bwd", dropout_loss, &c, c.x, dx, n);
    free(c.x), free(c.y), free(c.dy), free(dx);
}

/* ------------------------------------------------------------------ */
/* MoE core: combine weights, combine, dispatch                        */
/* ------------------------------------------------------------------ */

typedef struct {
    int T, K, renorm;
    const int32_t *kept;
    float *weight, *cw, *dcw;
} cw_ctx;

static double combine_weights_loss(void *p) {
    cw_ctx *c = p;
    be->combine_weights(be, c->weight, c->kept, c->T, c->K, c->renorm, c->cw);
    return dot(c->dcw, c->cw, (size_t)c->T * c->K);
}

static void test_combine_weights_grad(void) {
    enum { T = 5, K = 3 };
    /* token 3 keeps nothing (its weights get no gradient), the others 1 to 3 */
    static const int32_t kept[T * K] = {0, 2, 1, -1, 3, 0, 1, -1, -1, -1, -1, -1, 2, 1, -1};
    for (int renorm = 0; renorm < 2; ++renorm) {
        cw_ctx c = {T, K, renorm, kept, randv(T * K, 0.05f, 1), malloc(T * K * sizeof(float)),
                    randv(T * K, -1, 1)};
        float dw[T * K];
        be->combine_weights_bwd(be, c.weight, kept, T, K, renorm, c.dcw, dw);
        check_grad(renorm ? "combine_weights_bwd renorm" : "combine_weights_bwd",
                   combine_weights_loss, &c, c.weight, dw, T * K);
        int dropped_zero = 1;
        for (int a = 0; a < T * K; ++a) dropped_zero &= kept[a] >= 0 || dw[a] == 0.0f;
        CHECK(dropped_zero);
        free(c.weight), free(c.cw), free(c.dcw);
    }
}

typedef struct {
    int T, K, C, E, d;
    const int32_t *kept, *slot;
    float *Ye, *cw, *y, *dy;
} combine_ctx;

static double combine_loss(void *p) {
    combine_ctx *c = p;
    be->combine(be, c->Ye, c->kept, c->slot, c->cw, c->T, c->K, c->C, c->d, NULL, c->y);
    return dot(c->dy, c->y, (size_t)c->T * c->d);
}

/* kept/slot from capacity_assign on random choices (with -1s and drops). */
static void random_routing(int T, int K, int E, int C, int32_t *kept, int32_t *slot) {
    int32_t *expert = malloc((size_t)T * K * sizeof *expert), before[16], after[16];
    float *w = randv((size_t)T * K, 0, 1);
    for (int a = 0; a < T * K; ++a)
        expert[a] = (int32_t)(moe_test_next(&rng) % (uint64_t)(E + 1)) - 1;
    be->capacity_assign(be, expert, w, T, K, E, C, 0, kept, slot, before, after);
    free(expert), free(w);
}

static void test_combine_grad(void) {
    enum { T = 8, K = 2, E = 3, C = 4, d = 6 };
    int32_t kept[T * K], slot[T * K];
    random_routing(T, K, E, C, kept, slot);
    combine_ctx c = {T, K, C, E, d, kept, slot, randv(E * C * d, -1, 1), randv(T * K, 0, 1),
                     malloc(T * d * sizeof(float)), randv(T * d, -1, 1)};
    float *dYe = randv(E * C * d, 7, 8), *dcw = randv(T * K, 7, 8); /* overwritten */
    be->combine_bwd(be, c.Ye, kept, slot, c.cw, c.dy, T, K, C, E, d, NULL, dYe, dcw);
    check_grad("combine_bwd dYe", combine_loss, &c, c.Ye, dYe, E * C * d);
    check_grad("combine_bwd dcw", combine_loss, &c, c.cw, dcw, T * K);
    free(c.Ye), free(c.cw), free(c.y), free(c.dy), free(dYe), free(dcw);
}

/* dispatch is linear, so dispatch_bwd must be its transpose. */
static void test_dispatch_adjoint(void) {
    enum { T = 10, K = 2, E = 3, C = 4, d = 5 };
    int32_t kept[T * K], slot[T * K];
    random_routing(T, K, E, C, kept, slot);
    float *x = randv(T * d, -1, 1), *G = randv(E * C * d, -1, 1);
    float *Xe = malloc(E * C * d * sizeof(float));
    float dx[T * d];
    float *prior = random_prior(dx, T * d);
    be->dispatch(be, x, kept, slot, T, K, C, E, d, NULL, Xe);
    be->dispatch_bwd(be, G, kept, slot, T, K, C, d, 1, dx);
    subtract_prior(dx, prior, T * d);
    double lhs = dot(Xe, G, E * C * d), rhs = dot(x, dx, T * d);
    CHECK_MSG(fabs(lhs - rhs) < 1e-5 * (1.0 + fabs(lhs)),
              "<dispatch(x),G> = %.9g, <x,dispatch_bwd(G)> = %.9g", lhs, rhs);
    /* without accumulate: the same sums over whatever dx held (NaN here) */
    float dxo[T * d];
    for (int i = 0; i < T * d; ++i) dxo[i] = NAN;
    be->dispatch_bwd(be, G, kept, slot, T, K, C, d, 0, dxo);
    double ro = dot(x, dxo, T * d);
    CHECK_MSG(fabs(lhs - ro) < 1e-5 * (1.0 + fabs(lhs)),
              "<dispatch(x),G> = %.9g, <x,dispatch_bwd(G, overwrite)> = %.9g", lhs, ro);
    free(x), free(G), free(Xe), free(prior);
}

/* Auxiliary losses: d_lb = alpha d lb / d lb_logits (overwrite),
 * dlogits += beta d z / d logits (accumulate). */
typedef struct {
    int T, E;
    float alpha, beta;
    const float *f;
    float *lb_logits, *logits, *d_lb, *dlogits;
} aux_ctx;

static double aux_lb_loss(void *p) {
    aux_ctx *c = p;
    double lb, z;
    be->aux_losses(be, c->lb_logits, c->logits, c->f, c->T, c->E, c->alpha, c->beta, c->d_lb,
                   c->dlogits, &lb, &z);
    return c->alpha * lb;
}

static double aux_z_loss(void *p) {
    aux_ctx *c = p;
    double lb, z;
    be->aux_losses(be, c->lb_logits, c->logits, c->f, c->T, c->E, c->alpha, c->beta, c->d_lb,
                   c->dlogits, &lb, &z);
    return c->beta * z;
}

static void test_aux_losses_grad(void) {
    enum { T = 6, E = 5 };
    static const float f[E] = {0.35f, 0.05f, 0.2f, 0.25f, 0.15f};
    float scratch_dlb[T * E], scratch_dl[T * E];
    /* the probes write their own gradients into scratch buffers */
    aux_ctx c = {T, E, 0.8f, 0.3f, f, randv(T * E, -2, 2), randv(T * E, -2, 2), scratch_dlb,
                 scratch_dl};
    float d_lb[T * E], dlogits[T * E];
    moe_test_fill(&rng, d_lb, T * E, 7, 8); /* overwritten */
    float *prior = random_prior(dlogits, T * E);
    double lb, z;
    be->aux_losses(be, c.lb_logits, c.logits, f, T, E, c.alpha, c.beta, d_lb, dlogits, &lb, &z);
    subtract_prior(dlogits, prior, T * E);
    check_grad("aux_losses d_lb", aux_lb_loss, &c, c.lb_logits, d_lb, T * E);
    check_grad("aux_losses dlogits (z)", aux_z_loss, &c, c.logits, dlogits, T * E);
    free(prior), free(c.lb_logits), free(c.logits);
}

/* ------------------------------------------------------------------ */
/* Determinism: the backwards that sum contributions from many rows    */
/* ------------------------------------------------------------------ */

static void test_determinism(void) {
    {
        enum { B = 2, S = 64, H = 4, hd = 16 };
        size_t nqkv = (size_t)B * S * 3 * H * hd, nout = (size_t)B * S * H * hd;
        float *qkv = randv(nqkv, -1, 1), *dout = randv(nout, -1, 1);
        float *out = malloc(nout * sizeof(float));
        float *probs = malloc((size_t)B * H * S * S * sizeof(float));
        float *d1 = malloc(nqkv * sizeof(float)), *d2 = malloc(nqkv * sizeof(float));
        be->attention_fwd(be, qkv, out, probs, B, S, H, hd);
        be->attention_bwd(be, qkv, probs, dout, d1, B, S, H, hd);
        be->attention_bwd(be, qkv, probs, dout, d2, B, S, H, hd);
        CHECK_MSG(memcmp(d1, d2, nqkv * sizeof(float)) == 0,
                  "attention_bwd not bitwise reproducible");
        free(qkv), free(dout), free(out), free(probs), free(d1), free(d2);
    }
    {
        enum { V = 10, B = 4, S = 64, d = 48 };
        int32_t ids[B * S];
        for (int i = 0; i < B * S; ++i)
            ids[i] = (int32_t)(moe_test_next(&rng) % V); /* many repeats */
        float *dout = randv(B * S * d, -1, 1);
        float *t1 = calloc(V * d, sizeof(float)), *t2 = calloc(V * d, sizeof(float));
        float *p1 = calloc(S * d, sizeof(float)), *p2 = calloc(S * d, sizeof(float));
        be->embed_bwd(be, ids, dout, t1, p1, B, S, d, V);
        be->embed_bwd(be, ids, dout, t2, p2, B, S, d, V);
        CHECK_MSG(memcmp(t1, t2, V * d * sizeof(float)) == 0 &&
                      memcmp(p1, p2, S * d * sizeof(float)) == 0,
                  "embed_bwd not bitwise reproducible");
        free(dout), free(t1), free(t2), free(p1), free(p2);
    }
}

int main(void) {
    be = moe_backend_cpu_create(2);
    test_norm_grads();
    test_act_grads();
    test_rope_adjoint();
    test_attention_grad();
    test_embed_grad();
    test_xent_grad();
    test_bias_grad();
    test_ffn_grads();
    test_linear_grads();
    test_dropout_grad();
    test_combine_weights_grad();
    test_combine_grad();
    test_dispatch_adjoint();
    test_aux_losses_grad();
    test_determinism();
    moe_backend_destroy(be);
    return moe_test_summary("test_ops_grad");
}
