/*
 * Optimizer tests.
 *   - moe_newton_schulz5 against the same quintic iteration in double
 *     precision, for wide and tall matrices, and its effect: singular values
 *     pushed into the band the Muon coefficients are designed for.
 *   - which tensors Muon takes.
 *   - one Muon step of a training session against a double-precision
 *     recomputation of the update from the session's own gradient.
 *   - gradient accumulation: a step with grad_accum = 2 equals the mean of the
 *     two micro-batch gradients followed by AdamW.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/backend.h"
#include "runtime/config_extra.h"
#include "runtime/optim.h"
#include "runtime/session.h"
#include "test_util.h"

/* The iteration of optim.c, written again from its definition in double. */
static void ns5_reference(double *X, int r, int c, int steps) {
    const double a = 3.4445, b = -4.7750, cc = 2.0315;
    double norm = 0.0;
    for (int i = 0; i < r * c; ++i) norm += X[i] * X[i];
    norm = sqrt(norm);
    for (int i = 0; i < r * c; ++i) X[i] /= norm + 1e-7;
    int wide = r <= c, n = wide ? r : c;
    double *A = calloc((size_t)n * n, sizeof *A), *B = calloc((size_t)n * n, sizeof *B);
    double *Y = calloc((size_t)r * c, sizeof *Y);
    for (int s = 0; s < steps; ++s) {
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) {
                double acc = 0.0;
                if (wide) for (int k = 0; k < c; ++k) acc += X[i * c + k] * X[j * c + k];
                else for (int k = 0; k < r; ++k) acc += X[k * c + i] * X[k * c + j];
                A[i * n + j] = acc;
            }
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) {
                double acc = 0.0;
                for (int k = 0; k < n; ++k) acc += A[i * n + k] * A[k * n + j];
                B[i * n + j] = b * A[i * n + j] + cc * acc;
            }
        for (int i = 0; i < r; ++i)
            for (int j = 0; j < c; ++j) {
                double acc = 0.0;
                if (wide) for (int k = 0; k < n; ++k) acc += B[i * n + k] * X[k * c + j];
                else for (int k = 0; k < n; ++k) acc += X[i * c + k] * B[k * n + j];
                Y[i * c + j] = acc;
            }
        for (int i = 0; i < r * c; ++i) X[i] = a * X[i] + Y[i];
    }
    free(A);
    free(B);
    free(Y);
}

static void test_newton_schulz(moe_backend *be) {
    moe_test_rng rng = {42};
    int shapes[2][2] = {{6, 10}, {10, 6}};
    for (int s = 0; s < 2; ++s) {
        int r = shapes[s][0], c = shapes[s][1], n = r < c ? r : c;
        float *X = malloc((size_t)r * c * sizeof *X);
        double *R = malloc((size_t)r * c * sizeof *R);
        moe_test_fill(&rng, X, (size_t)r * c, -1.0f, 1.0f);
        for (int i = 0; i < r * c; ++i) R[i] = X[i];
        float *a = malloc((size_t)n * n * sizeof *a), *b = malloc((size_t)n * n * sizeof *b);
        float *y = malloc((size_t)r * c * sizeof *y);
        moe_newton_schulz5(be, X, r, c, 5, a, b, y);
        ns5_reference(R, r, c, 5);
        double err = 0.0;
        for (int i = 0; i < r * c; ++i) err = fmax(err, fabs(X[i] - R[i]));
        CHECK_MSG(err < 1e-4, "%dx%d: max |float - double| = %g", r, c, err);
        /* Gram matrix of the short side: the quintic maps every singular value
         * of the normalised input into roughly [0.7, 1.2], so the diagonal
         * (squared singular directions) stays in [0.45, 1.45] and the
         * off-diagonal is small compared with the input's. */
        for (int i = 0; i < n; ++i) {
            double d = 0.0;
            for (int k = 0; k < (r <= c ? c : r); ++k) {
                double v = r <= c ? X[i * c + k] : X[k * c + i];
                d += v * v;
            }
            CHECK_MSG(d > 0.45 && d < 1.45, "%dx%d: gram[%d][%d] = %g", r, c, i, i, d);
        }
        free(X);
        free(R);
        free(a);
        free(b);
        free(y);
    }
}

static void test_tensor_split(void) {
    struct { const char *name; int ndim; int muon; } cases[] = {
        {"wte", 2, 0},
        {"wpe", 2, 0},
        {"lm_head", 2, 0},
        {"layer0.attn.wqkv", 2, 1},
        {"layer0.attn.wo", 2, 1},
        {"layer0.attn.bqkv", 1, 0},
        {"layer0.norm1.g", 1, 0},
        {"layer1.moe.gate.w", 2, 1},
        {"layer1.moe.experts.w1", 3, 1},
        {"layer1.moe.experts.b1", 2, 0},
        {"layer1.moe.router.w_noise", 2, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
        moe_param_entry e;
        memset(&e, 0, sizeof e);
        snprintf(e.name, sizeof e.name, "%s", cases[i].name);
        e.ndim = cases[i].ndim;
        CHECK_MSG(moe_optimizer_is_muon_tensor(&e) == cases[i].muon, "%s", cases[i].name);
    }
}

/* A tiny config over a temp text file. */
static char g_text[256];
static void tiny_config(moe_config *c, const char *optimizer, int accum) {
    moe_config_defaults(c);
    snprintf(c->data.path, sizeof c->data.path, "%s", g_text);
    snprintf(c->run.device, sizeof c->run.device, "cpu");
    snprintf(c->router.plugin, sizeof c->router.plugin, "%s/softk.so", MOE_TEST_PLUGIN_DIR);
    snprintf(c->train.optimizer, sizeof c->train.optimizer, "%s", optimizer);
    c->model.d_model = 16;
    c->model.n_layers = 1;
    c->model.n_heads = 2;
    c->model.seq_len = 8;
    c->moe.num_experts = 4;
    c->moe.top_k = 2;
    c->moe.d_ff = 12;
    c->train.batch_size = 3;
    c->train.grad_accum = accum;
    c->train.warmup_steps = 0;
    c->train.steps = 10;
    c->train.grad_clip = 0.0;   /* keep the update a plain function of the gradient */
    c->train.weight_decay = 0.0;
    c->train.lr = 1e-2;
}

static void test_grad_accum(void) {
    static moe_config c;
    char err[1024];
    tiny_config(&c, "adamw", 2);
    moe_session s;
    int rc = moe_session_open(&s, &c, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc) return;
    size_t n = s.model.params.total;
    float *p0 = malloc(n * sizeof(float)), *g = malloc(n * sizeof(float)), *g1 = malloc(n * sizeof(float));
    memcpy(p0, s.model.params.values, n * sizeof(float));
    int S = c.model.seq_len, B = s.B;
    int32_t *x = malloc((size_t)B * S * sizeof(int32_t)), *y = malloc((size_t)B * S * sizeof(int32_t));

    /* By hand: micro-batches 1 and 2 of step 1, each gradient alone. */
    moe_forward_result fr;
    double l1, l2;
    moe_model_zero_grads(&s.model);
    moe_dataset_train_batch(&s.ds, (uint64_t)c.run.seed, 1, B, S, x, y);
    CHECK(moe_model_forward(&s.model, x, y, B, 1, 1, &fr, err, sizeof err) == 0);
    l1 = fr.loss;
    CHECK(moe_model_backward(&s.model, 1, err, sizeof err) == 0);
    memcpy(g1, s.model.params.grads, n * sizeof(float));
    moe_model_zero_grads(&s.model);
    moe_dataset_train_batch(&s.ds, (uint64_t)c.run.seed, 2, B, S, x, y);
    CHECK(moe_model_forward(&s.model, x, y, B, 1, 2, &fr, err, sizeof err) == 0);
    l2 = fr.loss;
    CHECK(moe_model_backward(&s.model, 2, err, sizeof err) == 0);
    for (size_t i = 0; i < n; ++i) g[i] = 0.5f * (g1[i] + s.model.params.grads[i]);

    /* The session's step from the same starting point. */
    memcpy(s.model.params.values, p0, n * sizeof(float));
    double loss = 0.0, norm = 0.0;
    CHECK(moe_session_train_step(&s, &c, 1, x, y, &loss, &norm, err, sizeof err) == 0);
    CHECK_CLOSE(loss, 0.5 * (l1 + l2), 1e-12, 1e-12);
    double worst = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; ++i) {
        worst = fmax(worst, fabs(s.model.params.grads[i] - g[i]));
        scale = fmax(scale, fabs(g[i]));
    }
    CHECK_MSG(worst <= 1e-6 * scale, "accumulated gradient differs from the mean by %g (scale %g)", worst, scale);
    /* AdamW's first step moves every parameter with a non-zero gradient by
     * lr_1 * g / (|g| + eps) ~ lr_1 in the direction of -g, lr_1 being the
     * schedule's rate at step 1. */
    float lr1 = (float)moe_learning_rate(&c.train, 1);
    int moved_right = 0, with_grad = 0;
    for (size_t i = 0; i < n; ++i) {
        if (fabsf(g[i]) < 1e-4f) continue; /* eps = 1e-8 then changes the step by < 1e-4 */
        with_grad++;
        float step = s.model.params.values[i] - p0[i];
        moved_right += fabsf(step + lr1 * (g[i] > 0 ? 1.0f : -1.0f)) < 1e-3f * lr1;
    }
    CHECK_MSG(moved_right == with_grad, "%d of %d parameters took AdamW's first step", moved_right, with_grad);
    free(p0);
    free(g);
    free(g1);
    free(x);
    free(y);
    moe_session_close(&s);
}

static void test_muon_step(void) {
    static moe_config c;
    char err[1024];
    tiny_config(&c, "muon", 1);
    moe_session s;
    int rc = moe_session_open(&s, &c, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc) return;
    size_t n = s.model.params.total;
    float *p0 = malloc(n * sizeof(float));
    memcpy(p0, s.model.params.values, n * sizeof(float));
    int S = c.model.seq_len, B = s.B;
    int32_t *x = malloc((size_t)B * S * sizeof(int32_t)), *y = malloc((size_t)B * S * sizeof(int32_t));
    double loss, norm;
    CHECK(moe_session_train_step(&s, &c, 1, x, y, &loss, &norm, err, sizeof err) == 0);
    /* After step 1 the momentum buffer is the gradient and the Nesterov
     * update is g + mu g; recompute the Muon step of one wide and one tall
     * matrix in double. */
    int checked = 0;
    for (int i = 0; i < s.model.params.n; ++i) {
        const moe_param_entry *e = &s.model.params.entries[i];
        if (!moe_optimizer_is_muon_tensor(e) || e->ndim != 2) continue;
        int r = (int)e->shape[0], cc = (int)e->shape[1];
        double *U = malloc((size_t)r * cc * sizeof *U);
        const float *g = s.model.params.grads + e->offset;
        for (int k = 0; k < r * cc; ++k) U[k] = (1.0 + c.train.muon_momentum) * g[k];
        ns5_reference(U, r, cc, c.train.muon_ns_steps);
        double lr = moe_learning_rate(&c.train, 1) * c.train.muon_lr / c.train.lr;
        lr *= sqrt(r > cc ? (double)r / cc : 1.0);
        double worst = 0.0, size = 0.0;
        for (int k = 0; k < r * cc; ++k) {
            double want = p0[e->offset + k] - lr * U[k];
            worst = fmax(worst, fabs(want - s.model.params.values[e->offset + k]));
            size = fmax(size, fabs(lr * U[k]));
        }
        /* Five quintic steps amplify float rounding (the iteration does not
         * contract), so float and double agree to about 1% of the update;
         * a wrong learning rate or shape scale is off by 40% or more. */
        CHECK_MSG(worst < 0.02 * size, "%s: max |muon - reference| = %g for an update of %g", e->name, worst, size);
        free(U);
        checked++;
    }
    CHECK_MSG(checked >= 3, "only %d Muon matrices checked", checked);
    free(p0);
    free(x);
    free(y);
    moe_session_close(&s);
}

int main(void) {
    moe_backend *be = moe_backend_cpu_create(1);
    test_newton_schulz(be);
    moe_backend_destroy(be);
    test_tensor_split();

    snprintf(g_text, sizeof g_text, "/tmp/moe_test_optim_XXXXXX");
    int fd = mkstemp(g_text);
    CHECK(fd >= 0);
    FILE *f = fdopen(fd, "w");
    for (int i = 0; i < 200; ++i) fprintf(f, "the cat sat on the mat %d times. ", i % 7);
    fclose(f);
    test_grad_accum();
    test_muon_step();
    unlink(g_text);
    return moe_test_summary("test_optim");
}
