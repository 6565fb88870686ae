#include "runtime/session.h"

#include <stdio.h>
#include <string.h>

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

int moe_session_open(moe_session *s, const moe_config *cfg, char *err, size_t errcap) {
    memset(s, 0, sizeof *s);
    if (moe_dataset_open(&s->ds, cfg->data.path, cfg->data.val_fraction, cfg->model.seq_len, err, errcap) != 0)
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
        moe_model_create(&s->model, cfg, s->be, V, s->B > s->eval_B ? s->B : s->eval_B, s->lib.api, err, errcap) != 0) {
        moe_session_close(s);
        return -1;
    }
    return 0;
}

void moe_session_close(moe_session *s) {
    if (s->model.be) moe_model_destroy(&s->model);
    if (s->be) moe_backend_destroy(s->be);
    if (s->lib.handle) moe_router_lib_close(&s->lib);
    moe_dataset_close(&s->ds);
    memset(s, 0, sizeof *s);
}
