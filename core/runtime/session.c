#include "runtime/session.h"

#ifdef MOE_HAVE_CUDA_BACKEND
#include "backend/cuda/cuda_backend.h"
#endif

#include <math.h>
#include <stdio.h>
#include <string.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

double moe_learning_rate(const moe_train_cfg *t, long long step) {
    if (t->warmup_steps > 0 && step <= t->warmup_steps) return t->lr * (double)step / t->warmup_steps;
    long long span = t->steps - t->warmup_steps;
    double progress = span > 0 ? (double)(step - t->warmup_steps) / (double)span : 1.0;
    if (progress > 1.0) progress = 1.0;
    double cosine = 0.5 * (1.0 + cos(M_PI * progress));
    return t->lr * (t->min_lr_ratio + (1.0 - t->min_lr_ratio) * cosine);
}

int moe_session_train_step(moe_session *s, const moe_config *cfg, long long step, int32_t *x, int32_t *y,
                           double *loss, double *grad_norm, char *err, size_t errcap) {
    const moe_train_cfg *tc = &cfg->train;
    moe_backend *be = s->be;
    moe_model *m = &s->model;
    double lr = moe_learning_rate(tc, step);
    int accum = tc->grad_accum > 0 ? tc->grad_accum : 1;
    double loss_sum = 0.0;
    moe_model_zero_grads(m);
    /* Micro-batch i of step t is numbered (t-1)*accum + i + 1: its data,
     * dropout and router noise are keyed by that number, so accum = 1 is
     * exactly the plain step. The forwards leave their results on the
     * device (nothing waits until moe_model_collect below). */
    for (int i = 0; i < accum; ++i) {
        uint64_t micro = (uint64_t)(step - 1) * (uint64_t)accum + (uint64_t)i + 1;
        moe_dataset_train_batch(&s->ds, (uint64_t)cfg->run.seed, micro, s->B, cfg->model.seq_len, x, y);
        if (moe_model_forward(m, x, y, s->B, 1, micro, NULL, err, errcap) != 0) return -1;
        if (moe_model_backward(m, micro, err, errcap) != 0) return -1;
    }
    /* Each micro-batch's gradient is a mean over its tokens; average them. */
    if (accum > 1) be->scale(be, m->params.grads, 1.0f / (float)accum, m->params.total);
    /* Clipping and the update; the gradient norm lands in the model's
     * results block. */
    moe_optimizer_step(&s->opt, tc, m, lr, step);

    /* The step's one wait: losses, gradient norm and every router check in
     * one copy. A failed check or a non-finite value is reported after the
     * optimizer has run; the caller stops the run then, and nothing of this
     * step is saved. */
    double norm = 0.0;
    if (moe_model_collect(m, &norm, err, errcap) != 0) return -1;
    if (moe_session_check_device(s, err, errcap) != 0) return -1;
    for (int i = 0; i < m->n_results; ++i) {
        double l = m->results_out[i].loss;
        if (!isfinite(l)) {
            snprintf(err, errcap, "training diverged at step %lld (loss %g); lower train.lr or raise train.warmup_steps",
                     step, l);
            return -1;
        }
        loss_sum += l;
    }
    if (!isfinite(norm)) {
        snprintf(err, errcap, "gradient norm is %g at step %lld; lower train.lr or raise train.warmup_steps", norm,
                 step);
        return -1;
    }
    *loss = loss_sum / accum;
    *grad_norm = norm;
    return 0;
}

moe_backend *moe_backend_for_config(const moe_config *cfg, char *err, size_t errcap) {
    int want_cuda = strcmp(cfg->run.device, "cuda") == 0;
#ifdef MOE_HAVE_CUDA_BACKEND
    if (want_cuda || (strcmp(cfg->run.device, "auto") == 0 && moe_cuda_device_count() > 0)) {
        moe_precision prec = strcmp(cfg->train.precision, "fp32") == 0 ? MOE_PRECISION_FP32 : MOE_PRECISION_BF16;
        moe_backend *be = moe_backend_cuda_create(0, prec, err, errcap);
        if (!be) {
            char why[1024];
            snprintf(why, sizeof why, "%s", err);
            snprintf(err, errcap, "run.device = \"%s\": %s; set run.device = \"cpu\" to train on the CPU",
                     cfg->run.device, why);
        }
        return be;
    }
#else
    if (want_cuda) {
        snprintf(err, errcap,
                 "%s: run.device = \"cuda\", but this moehost was built without the CUDA backend (not available "
                 "in this build); set run.device = \"cpu\" or \"auto\", or rebuild with the CUDA toolkit",
                 cfg->source);
        return NULL;
    }
#endif
    moe_backend *be = moe_backend_cpu_create(cfg->run.threads);
    if (!be) snprintf(err, errcap, "cannot create the CPU backend (out of memory)");
    return be;
}

int moe_session_check_device(moe_session *s, char *err, size_t errcap) {
#ifdef MOE_HAVE_CUDA_BACKEND
    if (s->be && s->be->device == MOE_DEVICE_CUDA && moe_cuda_backend_check(s->be, err, errcap) != 0) {
        char why[1024];
        snprintf(why, sizeof why, "%s", err);
        snprintf(err, errcap, "CUDA backend: %s", why);
        return -1;
    }
#else
    (void)s;
    (void)err;
    (void)errcap;
#endif
    return 0;
}

int moe_session_open(moe_session *s, const moe_config *cfg, char *err, size_t errcap) {
    return moe_session_open_wrapped(s, cfg, NULL, err, errcap);
}

static int wrap_backend(moe_session *s, moe_backend *(*wrap)(moe_backend *), char *err, size_t errcap) {
    if (!wrap) return 0;
    moe_backend *w = wrap(s->be);
    if (!w) {
        snprintf(err, errcap, "cannot wrap the %s backend (out of memory)", s->be->name);
        return -1;
    }
    s->be = w;
    return 0;
}

int moe_session_open_wrapped(moe_session *s, const moe_config *cfg, moe_backend *(*wrap)(moe_backend *inner),
                             char *err, size_t errcap) {
    memset(s, 0, sizeof *s);
    if (moe_dataset_open_with(&s->ds, cfg->data.path, cfg->data.tokenizer, cfg->data.bpe_dir, cfg->data.val_fraction,
                              cfg->model.seq_len, err, errcap) != 0)
        return -1;
    int V = cfg->model.vocab_size > 0 ? cfg->model.vocab_size : s->ds.vocab_size;
    if (V < s->ds.vocab_size) {
        snprintf(err, errcap,
                 "%s: model.vocab_size = %d is smaller than the data's vocabulary (%d tokens); set it to 0 to "
                 "take the data's",
                 cfg->source, V, s->ds.vocab_size);
        moe_session_close(s);
        return -1;
    }
    s->B = cfg->train.batch_size;
    s->eval_B = cfg->eval.batch_size > 0 ? cfg->eval.batch_size : s->B;
    if (moe_router_lib_open(&s->lib, cfg->router.plugin, err, errcap) != 0 ||
        !(s->be = moe_backend_for_config(cfg, err, errcap)) ||
        wrap_backend(s, wrap, err, errcap) != 0 ||
        moe_model_create(&s->model, cfg, s->be, V, s->B > s->eval_B ? s->B : s->eval_B, s->lib.api, err, errcap) != 0 ||
        moe_optimizer_init(&s->opt, &cfg->train, &s->model, err, errcap) != 0) {
        moe_session_close(s);
        return -1;
    }
    return 0;
}

void moe_session_close(moe_session *s) {
    if (s->be) moe_optimizer_free(&s->opt, s->be);
    if (s->model.be) moe_model_destroy(&s->model);
    if (s->be) moe_backend_destroy(s->be);
    if (s->lib.handle) moe_router_lib_close(&s->lib);
    moe_dataset_close(&s->ds);
    memset(s, 0, sizeof *s);
}
