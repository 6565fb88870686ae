#include "runtime/bench.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/timed_backend.h"
#include "runtime/session.h"

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static int cmp_stat(const void *a, const void *b) {
    const moe_timed_op_stat *x = a, *y = b;
    return (x->ms < y->ms) - (x->ms > y->ms); /* descending */
}

/* `steps` more training steps (numbered from first_step) with every op timed;
 * adds "breakdown" to o. */
static int run_breakdown(moe_session *s, const moe_config *cfg, int steps, long long first_step, int32_t *x,
                         int32_t *y, void *ev0, void *ev1, json_t *o, char *err, size_t errcap) {
    moe_backend *be = s->be;
    double loss = 0.0, norm = 0.0, step_ms = 0.0;
    moe_timed_backend_reset(be);
    moe_timed_backend_enable(be, 1);
    for (int i = 0; i < steps; ++i) {
        be->event_record(be, ev0);
        if (moe_session_train_step(s, cfg, first_step + i, x, y, &loss, &norm, err, errcap) != 0) return -1;
        be->event_record(be, ev1);
        step_ms += be->event_elapsed_ms(be, ev0, ev1);
        /* The step has waited for the device at its end: reading its pairs
         * now waits for nothing more, and keeps the pool small. */
        if (moe_timed_backend_collect(be) != 0) {
            snprintf(err, errcap, "bench train --breakdown: cannot create more timing events");
            return -1;
        }
    }
    moe_timed_backend_enable(be, 0);
    moe_timed_op_stat st[MOE_TIMED_MAX_OPS];
    int n = moe_timed_backend_stats(be, st, MOE_TIMED_MAX_OPS);
    qsort(st, (size_t)n, sizeof *st, cmp_stat);
    double step = step_ms / steps, sum = 0.0;
    for (int i = 0; i < n; ++i) sum += st[i].ms / steps;
    json_t *b = json_object(), *ops = json_array();
    json_object_set_new(b, "steps", json_integer(steps));
    json_object_set_new(b, "ms_per_step_mean", json_real(step));
    json_object_set_new(b, "ops_ms_per_step", json_real(sum));
    json_object_set_new(b, "unattributed_ms_per_step", json_real(step - sum));
    for (int i = 0; i < n; ++i) {
        json_t *r = json_object();
        json_object_set_new(r, "op", json_string(st[i].op));
        json_object_set_new(r, "calls_per_step", json_real((double)st[i].calls / steps));
        json_object_set_new(r, "ms_per_step", json_real(st[i].ms / steps));
        json_object_set_new(r, "pct", json_real(step > 0 ? 100.0 * st[i].ms / steps / step : 0.0));
        json_array_append_new(ops, r);
    }
    json_object_set_new(b, "ops", ops);
    json_object_set_new(o, "breakdown", b);
    return 0;
}

static void print_breakdown(const json_t *b) {
    double step = json_real_value(json_object_get(b, "ms_per_step_mean"));
    double sum = json_real_value(json_object_get(b, "ops_ms_per_step"));
    double pct = step > 0 ? 100.0 / step : 0.0;
    size_t i;
    json_t *r;
    printf("\nTime per op (%d more steps, each op between two events on the stream; %.3f ms/step with timing on):\n",
           (int)json_integer_value(json_object_get(b, "steps")), step);
    printf("%-22s %10s %10s %8s\n", "op", "calls/step", "ms/step", "% step");
    json_array_foreach(json_object_get(b, "ops"), i, r)
        printf("%-22s %10.1f %10.3f %7.1f%%\n", json_string_value(json_object_get(r, "op")),
               json_real_value(json_object_get(r, "calls_per_step")), json_real_value(json_object_get(r, "ms_per_step")),
               json_real_value(json_object_get(r, "pct")));
    printf("%-22s %10s %10.3f %7.1f%%\n", "sum of ops", "", sum, sum * pct);
    printf("%-22s %10s %10.3f %7.1f%%\n", "step (measured)", "", step, step > 0 ? 100.0 : 0.0);
    printf("%-22s %10s %10.3f %7.1f%%\n", "unattributed", "", step - sum, (step - sum) * pct);
    printf("(unattributed: host overhead and idle gaps between ops, copies and zeroing, router plugin kernels)\n");
}

int moe_bench_train(const moe_config *cfg, const moe_bench_train_options *opt, char *err, size_t errcap) {
    moe_session s;
    if (moe_session_open_wrapped(&s, cfg, opt->breakdown ? moe_timed_backend_wrap : NULL, err, errcap) != 0) return -1;
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
        if (opt->breakdown && run_breakdown(&s, cfg, opt->steps, (long long)opt->warmup + opt->steps + 1, x, y, ev0,
                                            ev1, o, err, errcap) != 0) {
            json_decref(o);
            goto done;
        }
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
            if (opt->breakdown) print_breakdown(json_object_get(o, "breakdown"));
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
