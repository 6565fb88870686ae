#include "runtime/optim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Quintic Newton-Schulz coefficients of Muon: chosen to push every singular
 * value of the normalised update towards 1 in five steps. */
#define NS_A 3.4445f
#define NS_B (-4.7750f)
#define NS_C 2.0315f

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

int moe_optimizer_is_muon_tensor(const moe_param_entry *e) {
    if (e->ndim < 2) return 0;                                   /* norms, biases */
    if (strcmp(e->name, "wte") == 0 || strcmp(e->name, "wpe") == 0 || strcmp(e->name, "lm_head") == 0) return 0;
    if (strstr(e->name, ".router.")) return 0;                   /* plugin parameters: AdamW */
    return ends_with(e->name, ".w") || ends_with(e->name, ".w1") || ends_with(e->name, ".w2") ||
           ends_with(e->name, ".wa") || ends_with(e->name, ".wb") || ends_with(e->name, ".wo") ||
           ends_with(e->name, ".wqkv");
}

/* rows x cols of one matrix of an entry (the last two dims). */
static void matrix_shape(const moe_param_entry *e, int *rows, int *cols, int *count) {
    *rows = (int)e->shape[e->ndim - 2];
    *cols = (int)e->shape[e->ndim - 1];
    *count = (int)(e->numel / ((size_t)*rows * *cols));
}

int moe_optimizer_init(moe_optimizer *o, const moe_train_cfg *tc, moe_model *m, char *err, size_t errcap) {
    memset(o, 0, sizeof *o);
    o->muon = strcmp(tc->optimizer, "muon") == 0;
    if (!o->muon) return 0;
    moe_backend *be = m->be;
    const moe_param_set *ps = &m->params;
    o->use_muon = calloc((size_t)ps->n, 1);
    size_t max_numel = 1, max_side = 1, max_mat = 1;
    for (int i = 0; i < ps->n; ++i) {
        const moe_param_entry *e = &ps->entries[i];
        if (!moe_optimizer_is_muon_tensor(e)) continue;
        o->use_muon[i] = 1;
        int r, c, k;
        matrix_shape(e, &r, &c, &k);
        size_t side = (size_t)(r < c ? r : c);
        if (e->numel > max_numel) max_numel = e->numel;
        if (side > max_side) max_side = side;
        if ((size_t)r * c > max_mat) max_mat = (size_t)r * c;
    }
    o->u = be->alloc(be, max_numel * sizeof(float));
    o->a = be->alloc(be, max_side * max_side * sizeof(float));
    o->b = be->alloc(be, max_side * max_side * sizeof(float));
    o->y = be->alloc(be, max_mat * sizeof(float));
    if (!o->use_muon || !o->u || !o->a || !o->b || !o->y) {
        snprintf(err, errcap, "out of memory for the Muon optimizer's scratch");
        return -1;
    }
    return 0;
}

void moe_optimizer_free(moe_optimizer *o, moe_backend *be) {
    if (o->muon) {
        be->free(be, o->u);
        be->free(be, o->a);
        be->free(be, o->b);
        be->free(be, o->y);
    }
    free(o->use_muon);
    memset(o, 0, sizeof *o);
}

/* X <- a X + (b A + c A^2) X with A = X X^T (rows <= cols), or the same
 * polynomial applied from the right with A = X^T X (rows > cols): both are
 * the odd polynomial a X + b X X^T X + c X X^T X X^T X. */
void moe_newton_schulz5(moe_backend *be, float *X, int rows, int cols, int steps, float *a, float *b, float *y) {
    double norm = sqrt(be->sumsq(be, X, (size_t)rows * cols));
    be->scale(be, X, (float)(1.0 / (norm + 1e-7)), (size_t)rows * cols);
    int wide = rows <= cols, n = wide ? rows : cols;
    for (int s = 0; s < steps; ++s) {
        if (wide) be->gemm(be, 0, 1, n, n, cols, 1.0f, X, cols, X, cols, 0.0f, a, n);  /* A = X X^T */
        else be->gemm(be, 1, 0, n, n, rows, 1.0f, X, cols, X, cols, 0.0f, a, n);       /* A = X^T X */
        be->gemm(be, 0, 0, n, n, n, NS_C, a, n, a, n, 0.0f, b, n);                    /* B = c A A */
        be->axpy(be, NS_B, a, b, (size_t)n * n);                                      /* B += b A */
        if (wide) be->gemm(be, 0, 0, rows, cols, n, 1.0f, b, n, X, cols, 0.0f, y, cols); /* Y = B X */
        else be->gemm(be, 0, 0, rows, cols, n, 1.0f, X, cols, b, n, 0.0f, y, cols);      /* Y = X B */
        be->scale(be, X, NS_A, (size_t)rows * cols);
        be->axpy(be, 1.0f, y, X, (size_t)rows * cols);                                /* X = a X + Y */
    }
}

void moe_optimizer_step(moe_optimizer *o, const moe_train_cfg *tc, moe_model *m, double lr, long long t) {
    moe_backend *be = m->be;
    moe_param_set *ps = &m->params;
    if (!o->muon) {
        /* The global norm only; AdamW applies the clipping factor as it
         * reads each gradient, which saves a pass over all of them. */
        be->clip_grad_norm(be, ps->grads, ps->total, 0.0, m->grad_norm);
        be->adamw(be, ps->values, ps->grads, ps->adam_m, ps->adam_v, ps->decay_mask, ps->total, (float)lr,
                  (float)tc->beta1, (float)tc->beta2, (float)tc->eps, (float)tc->weight_decay, t, m->grad_norm,
                  tc->grad_clip);
        return;
    }
    be->clip_grad_norm(be, ps->grads, ps->total, tc->grad_clip, m->grad_norm);
    double muon_lr = lr * tc->muon_lr / tc->lr; /* follow the same warm-up and decay */
    float mu = (float)tc->muon_momentum;
    for (int i = 0; i < ps->n; ++i) {
        const moe_param_entry *e = &ps->entries[i];
        float *p = ps->values + e->offset, *g = ps->grads + e->offset;
        float *mom = ps->adam_m + e->offset;
        if (!o->use_muon[i]) {
            be->adamw(be, p, g, mom, ps->adam_v + e->offset, ps->decay_mask + e->offset, e->numel, (float)lr,
                      (float)tc->beta1, (float)tc->beta2, (float)tc->eps, (float)tc->weight_decay, t, NULL, 0.0);
            continue;
        }
        /* Nesterov momentum: mom = mu mom + g; u = g + mu mom. */
        be->scale(be, mom, mu, e->numel);
        be->axpy(be, 1.0f, g, mom, e->numel);
        be->copy(be, o->u, g, e->numel * sizeof(float));
        be->axpy(be, mu, mom, o->u, e->numel);
        int rows, cols, count;
        matrix_shape(e, &rows, &cols, &count);
        /* Tall matrices get larger steps so the update's RMS matches wide ones. */
        float shape_scale = (float)sqrt(rows > cols ? (double)rows / cols : 1.0);
        if (e->decay && tc->weight_decay > 0) be->scale(be, p, (float)(1.0 - muon_lr * tc->weight_decay), e->numel);
        for (int k = 0; k < count; ++k) {
            float *u = o->u + (size_t)k * rows * cols;
            moe_newton_schulz5(be, u, rows, cols, tc->muon_ns_steps, o->a, o->b, o->y);
            be->axpy(be, (float)(-muon_lr) * shape_scale, u, p + (size_t)k * rows * cols, (size_t)rows * cols);
        }
    }
}
