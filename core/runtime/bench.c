#include "runtime/bench.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/session.h"

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

int moe_bench_train(const moe_config *cfg, const moe_bench_train_options *opt, char *err, size_t errcap) {
    moe_session s;
    if (moe_session_open(&s, cfg, err, errcap) != 0) return -1;
    moe_backend *be = s.be;
    int S = cfg->model.seq_len, rc = -1;
    int32_t *x = malloc((size_t)s.B * S * sizeof(int32_t));
    int32_t *y = malloc((size_t)s.B * S * sizeof(int32_t));
    float *ms = calloc((size_t)opt->steps, sizeof(float));
    void *ev0 = be->event_create(be), *ev1 = be->event_create(be);
    double loss = 0.0, norm = 0.0;

    for (int i = 0; i < opt->warmup; ++i)
        if (moe_session_train_step(&s, cfg, i + 1, x, y, &loss, &norm, err, errcap) != 0) goto done;
    be->sync(be);
    for (int i = 0; i < opt->steps; ++i) {
        be->event_record(be, ev0);
        if (moe_session_train_step(&s, cfg, opt->warmup + i + 1, x, y, &loss, &norm, err, errcap) != 0) goto done;
        be->event_record(be, ev1);
        ms[i] = be->event_elapsed_ms(be, ev0, ev1);
    }
    qsort(ms, (size_t)opt->steps, sizeof *ms, cmp_float);
    {
        double median = ms[opt->steps / 2], lo = ms[0], hi = ms[opt->steps - 1];
        double tokens = (double)s.B * S * cfg->train.grad_accum;
        double flops = moe_model_train_flops(&s.model, s.B) * cfg->train.grad_accum;
        double tflops = flops / (median * 1e-3) / 1e12;
        double peak = be->measure_gemm_tflops(be);
        json_t *o = json_object();
        json_object_set_new(o, "router", json_string(s.lib.api->name));
        json_object_set_new(o, "device", json_string(be->name));
        json_object_set_new(o, "precision", json_string(be->device == MOE_DEVICE_CUDA ? cfg->train.precision : "fp32"));
        json_object_set_new(o, "batch", json_integer(s.B));
        json_object_set_new(o, "seq_len", json_integer(S));
        json_object_set_new(o, "timed_steps", json_integer(opt->steps));
        json_object_set_new(o, "ms_per_step_median", json_real(median));
        json_object_set_new(o, "ms_per_step_min", json_real(lo));
        json_object_set_new(o, "ms_per_step_max", json_real(hi));
        json_object_set_new(o, "tokens_per_s", json_real(tokens / (median * 1e-3)));
        json_object_set_new(o, "train_flops_per_step", json_real(flops));
        json_object_set_new(o, "achieved_tflops", json_real(tflops));
        json_object_set_new(o, "measured_gemm_tflops", json_real(peak));
        json_object_set_new(o, "mfu", json_real(peak > 0 ? tflops / peak : 0.0));
        json_object_set_new(o, "last_loss", json_real(loss));
        if (opt->json) {
            char *text = json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(6));
            printf("%s\n", text);
            free(text);
        } else {
            printf("%-14s %-5s %-5s %6s %12s %10s %12s %9s %8s\n", "router", "dev", "prec", "batch", "ms/step(med)",
                   "[min,max]", "tokens/s", "TFLOP/s", "MFU");
            printf("%-14s %-5s %-5s %6d %12.3f [%.2f,%.2f] %12.0f %9.3f %7.2f%%\n", s.lib.api->name, be->name,
                   json_string_value(json_object_get(o, "precision")), s.B, median, lo, hi, tokens / (median * 1e-3),
                   tflops, peak > 0 ? 100.0 * tflops / peak : 0.0);
            printf("(%d warm-up + %d timed steps; MFU against a measured %.1f TFLOP/s GEMM)\n", opt->warmup,
                   opt->steps, peak);
        }
        json_decref(o);
    }
    rc = 0;
done:
    be->event_destroy(be, ev0);
    be->event_destroy(be, ev1);
    free(x);
    free(y);
    free(ms);
    moe_session_close(&s);
    return rc;
}
