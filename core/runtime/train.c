#include "runtime/train.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "model/model.h"
#include "runtime/checkpoint.h"
#include "runtime/data.h"
#include "runtime/fsutil.h"
#include "runtime/metrics.h"
#include "runtime/plugin_loader.h"
#include "runtime/session.h"

#ifndef M_LN2
#define M_LN2 0.69314718055994530942
#endif

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Peak resident memory of this process in GiB. */
static double peak_mem_gib(void) {
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0) return 0.0;
    return (double)ru.ru_maxrss * 1024.0 / (1024.0 * 1024.0 * 1024.0);
}

/* Keep only the metrics lines of evaluations at or before `step`: after a
 * crash between writing a metrics line and its checkpoint, the resumed run
 * writes that evaluation again. */
static int truncate_metrics(const char *path, long long step, char *err, size_t errcap) {
    if (!moe_file_exists(path)) return 0;
    FILE *in = fopen(path, "rb");
    if (!in) {
        snprintf(err, errcap, "cannot read '%s'", path);
        return -1;
    }
    FILE *out = moe_atomic_open(path, err, errcap);
    if (!out) {
        fclose(in);
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, in)) > 0) {
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        long long s = o ? json_integer_value(json_object_get(o, "step")) : -1;
        json_decref(o);
        if (o && s <= step) fwrite(line, 1, (size_t)n, out);
    }
    free(line);
    fclose(in);
    return moe_atomic_commit(out, path, err, errcap);
}

static int append_json_line(const char *path, json_t *obj, char *err, size_t errcap) {
    char *text = json_dumps(obj, JSON_COMPACT | JSON_REAL_PRECISION(17));
    FILE *f = fopen(path, "ab");
    int ok = text && f && fprintf(f, "%s\n", text) > 0 && fflush(f) == 0 && fsync(fileno(f)) == 0;
    if (f) fclose(f);
    free(text);
    if (!ok) snprintf(err, errcap, "cannot append to '%s'", path);
    return ok ? 0 : -1;
}

/* The last evaluation already in metrics.jsonl (a run resumed after its
 * final step has nothing new to add to the summary). NULL if none. */
static json_t *read_last_metrics(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    json_t *last = NULL;
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        if (o) {
            json_decref(last);
            last = o;
        }
    }
    free(line);
    fclose(f);
    return last;
}

static int write_json_file(const char *path, json_t *obj, char *err, size_t errcap) {
    FILE *f = moe_atomic_open(path, err, errcap);
    if (!f) return -1;
    json_dumpf(obj, f, JSON_INDENT(2) | JSON_REAL_PRECISION(17));
    fputc('\n', f);
    return moe_atomic_commit(f, path, err, errcap);
}

/* ---- evaluation over the validation windows ---- */

typedef struct eval_result {
    double loss, acc;
    long long targets;
    moe_layer_accum *layers;
} eval_result;

static int evaluate(moe_model *m, const moe_dataset *ds, const moe_config *cfg, int eval_B, eval_result *r,
                    char *err, size_t errcap) {
    int S = m->S;
    size_t W = moe_dataset_val_windows(ds, S, cfg->eval.max_tokens);
    int32_t *x = malloc((size_t)eval_B * S * sizeof(int32_t));
    int32_t *y = malloc((size_t)eval_B * S * sizeof(int32_t));
    double loss_sum = 0.0;
    long long correct = 0, targets = 0;
    int rc = 0;
    for (int l = 0; l < m->n_layers; ++l) moe_layer_accum_init(&r->layers[l], cfg->moe.num_experts);
    /* Routing statistics come from host copies of each layer's routing: on
     * for evaluation only. Each forward with a result reads the router
     * checks too (moe_model_forward), so a bad router stops here. */
    moe_model_set_collect_stats(m, 1);
    for (size_t w0 = 0; w0 < W && rc == 0; w0 += (size_t)eval_B) {
        int B = (int)((W - w0) < (size_t)eval_B ? (W - w0) : (size_t)eval_B);
        for (int b = 0; b < B; ++b) moe_dataset_val_window(ds, w0 + (size_t)b, S, x + (size_t)b * S, y + (size_t)b * S);
        moe_forward_result fr;
        rc = moe_model_forward(m, x, y, B, 0, 0, &fr, err, errcap);
        if (rc) break;
        loss_sum += fr.loss * (double)fr.n_targets;
        correct += fr.n_correct;
        targets += fr.n_targets;
        for (int l = 0; l < m->n_layers; ++l) moe_layer_accum_add(&r->layers[l], &m->blocks[l].moe.stats);
    }
    moe_model_set_collect_stats(m, 0);
    free(x);
    free(y);
    r->loss = targets ? loss_sum / (double)targets : 0.0;
    r->acc = targets ? (double)correct / (double)targets : 0.0;
    r->targets = targets;
    return rc;
}

/* ---- progress display ---- */

static void progress_line(long long step, long long steps, double loss, double tok_s, double eta_s) {
    int eta = (int)(eta_s + 0.5);
    fprintf(stderr, "\rstep %lld/%lld | loss %.4f | %.0f tok/s | ETA %dh%02dm%02ds   ", step, steps, loss, tok_s,
            eta / 3600, (eta / 60) % 60, eta % 60);
    fflush(stderr);
}

/* ================================= run ================================== */

int moe_train_run(const moe_config *cfg, const moe_train_options *opt, char *err, size_t errcap) {
    int rc = -1;
    char run_dir[2048], path_metrics[2200], path_ckpt[2200], path_summary[2200], path_config[2200];

    snprintf(run_dir, sizeof run_dir, "%s/%s", cfg->run.out_dir, cfg->run.name);
    snprintf(path_metrics, sizeof path_metrics, "%s/metrics.jsonl", run_dir);
    snprintf(path_ckpt, sizeof path_ckpt, "%s/checkpoint.bin", run_dir);
    snprintf(path_summary, sizeof path_summary, "%s/summary.json", run_dir);
    snprintf(path_config, sizeof path_config, "%s/config.toml", run_dir);

    /* Never overwrite a user's results. */
    if (opt->resume && !moe_file_exists(path_ckpt)) {
        snprintf(err, errcap, "nothing to resume: no checkpoint at '%s'; run without --resume to start this run",
                 path_ckpt);
        return -1;
    }
    if (!opt->resume && (moe_file_exists(path_ckpt) || moe_file_exists(path_metrics) || moe_file_exists(path_summary))) {
        snprintf(err, errcap,
                 "'%s' already holds results of a run; pass --resume to continue it, or choose another "
                 "run.name or run.out_dir (e.g. --set run.name=...)",
                 run_dir);
        return -1;
    }

    moe_session ses;
    moe_layer_accum *layers = NULL;
    int32_t *bx = NULL, *by = NULL;
    json_t *last = NULL;
    if (moe_session_open(&ses, cfg, err, errcap) != 0) return -1;
    moe_dataset *ds = &ses.ds;
    moe_backend *be = ses.be;
    moe_model *model = &ses.model;
    int B = ses.B, eval_B = ses.eval_B;
    if (moe_mkdirs(run_dir, err, errcap) != 0) goto done;

    moe_progress prog = {0, 0, 0.0, INFINITY, 0};
    if (opt->resume) {
        if (moe_checkpoint_load(path_ckpt, model, &prog, err, errcap) != 0) goto done;
        if (truncate_metrics(path_metrics, (long long)prog.step, err, errcap) != 0) goto done;
        if (!opt->quiet)
            fprintf(stderr, "resuming %s from step %llu\n", run_dir, (unsigned long long)prog.step);
    }
    if (moe_config_write(cfg, path_config, err, errcap) != 0) goto done;

    int S = cfg->model.seq_len;
    long long steps = cfg->train.steps;
    bx = malloc((size_t)B * S * sizeof(int32_t));
    by = malloc((size_t)B * S * sizeof(int32_t));
    layers = calloc((size_t)model->n_layers, sizeof *layers);
    int tty = !opt->quiet && isatty(STDERR_FILENO);
    double wall_start = now_seconds();
    double interval_loss = 0.0, interval_seconds = 0.0, grad_norm = 0.0;
    long long interval_steps = 0, interval_tokens = 0;

    for (long long step = (long long)prog.step + 1; step <= steps; ++step) {
        /* ---- one training step: the only time tokens/s counts ---- */
        double t0 = now_seconds();
        double lr = moe_learning_rate(&cfg->train, step), loss = 0.0;
        if (moe_session_train_step(&ses, cfg, step, bx, by, &loss, &grad_norm, err, errcap) != 0) goto done;
        be->sync(be);
        double dt = now_seconds() - t0;

        prog.step = (uint64_t)step;
        prog.tokens_seen += (uint64_t)B * S * cfg->train.grad_accum;
        prog.train_seconds += dt;
        interval_loss += loss;
        interval_seconds += dt;
        interval_steps++;
        interval_tokens += (long long)B * S * cfg->train.grad_accum;

        if (!opt->quiet && (tty || step % cfg->train.log_interval == 0)) {
            double tok_s = interval_seconds > 0 ? interval_tokens / interval_seconds : 0.0;
            double eta = prog.train_seconds / (double)step * (double)(steps - step);
            if (tty) progress_line(step, steps, loss, tok_s, eta);
            else fprintf(stderr, "step %lld/%lld loss %.4f lr %.3g %.0f tok/s\n", step, steps, loss, lr, tok_s);
        }

        /* ---- evaluation, metrics line, checkpoint ---- */
        if (step % cfg->eval.interval != 0 && step != steps) continue;
        eval_result ev = {0, 0, 0, layers};
        if (evaluate(model, ds, cfg, eval_B, &ev, err, errcap) != 0) goto done;
        if (moe_session_check_device(&ses, err, errcap) != 0) goto done;
        if (ev.loss < prog.best_val_loss) {
            prog.best_val_loss = ev.loss;
            prog.best_step = (uint64_t)step;
        }
        json_t *o = json_object();
        json_object_set_new(o, "step", json_integer(step));
        json_object_set_new(o, "tokens_seen", json_integer((json_int_t)prog.tokens_seen));
        json_object_set_new(o, "lr", json_real(lr));
        json_object_set_new(o, "train_loss", json_real(interval_loss / (double)interval_steps));
        json_object_set_new(o, "val_loss", json_real(ev.loss));
        json_object_set_new(o, "val_ppl", json_real(exp(ev.loss)));
        json_object_set_new(o, "val_bpc", json_real(ev.loss / M_LN2 / ds->chars_per_token));
        json_object_set_new(o, "val_acc", json_real(ev.acc));
        json_object_set_new(o, "val_tokens", json_integer(ev.targets));
        json_object_set_new(o, "grad_norm", json_real(grad_norm));
        json_object_set_new(o, "tokens_per_s", json_real(interval_tokens / interval_seconds));
        json_object_set_new(o, "ms_per_step", json_real(1e3 * interval_seconds / (double)interval_steps));
        json_object_set_new(o, "peak_mem_gb", json_real(peak_mem_gib()));
        moe_metrics_put_routing(o, layers, model->n_layers);
        for (int l = 0; l < model->n_layers; ++l) moe_layer_accum_free(&layers[l]);
        int wrc = append_json_line(path_metrics, o, err, errcap);
        json_decref(last);
        last = o;
        if (wrc != 0 || moe_checkpoint_save(path_ckpt, model, &prog, err, errcap) != 0) goto done;
        if (!opt->quiet) {
            if (tty) fputc('\n', stderr);
            fprintf(stderr, "eval step %lld: val_loss %.4f ppl %.3f acc %.3f drop %.3f load_cv %.3f\n", step, ev.loss,
                    exp(ev.loss), ev.acc, json_real_value(json_object_get(o, "drop_rate")),
                    json_real_value(json_object_get(o, "load_cv")));
        }
        interval_loss = interval_seconds = 0.0;
        interval_steps = interval_tokens = 0;
        if (opt->stop_after > 0 && step >= opt->stop_after && step < steps) {
            if (!opt->quiet) fprintf(stderr, "stopped after step %lld (--stop-after); continue with --resume\n", step);
            rc = 0;
            goto done;
        }
    }

    /* ---- summary ---- */
    if (!last) last = read_last_metrics(path_metrics);
    {
        json_t *s = json_object();
        json_object_set_new(s, "run", json_string(cfg->run.name));
        json_object_set_new(s, "router", json_string(ses.lib.api->name));
        json_object_set_new(s, "router_path", json_string(ses.lib.path));
        json_object_set_new(s, "device", json_string(be->name));
        json_object_set_new(s, "steps", json_integer((json_int_t)prog.step));
        json_object_set_new(s, "n_params", json_integer((json_int_t)model->params.total));
        json_object_set_new(s, "tokens_seen", json_integer((json_int_t)prog.tokens_seen));
        json_object_set_new(s, "train_time_s", json_real(prog.train_seconds));
        json_object_set_new(s, "wall_time_s", json_real(now_seconds() - wall_start));
        json_object_set_new(s, "tokens_per_s", json_real(prog.train_seconds > 0 ? prog.tokens_seen / prog.train_seconds : 0));
        json_object_set_new(s, "peak_mem_gb", json_real(peak_mem_gib()));
        json_t *best = json_object();
        json_object_set_new(best, "val_loss", json_real(prog.best_val_loss));
        json_object_set_new(best, "val_ppl", json_real(exp(prog.best_val_loss)));
        json_object_set_new(best, "step", json_integer((json_int_t)prog.best_step));
        json_object_set_new(s, "best", best);
        if (last) json_object_set(s, "final", last);
        int src = write_json_file(path_summary, s, err, errcap);
        json_decref(s);
        if (src != 0) goto done;
        if (!opt->quiet) fprintf(stderr, "results in %s\n", run_dir);
    }
    rc = 0;

done:
    json_decref(last);
    free(bx);
    free(by);
    free(layers);
    moe_session_close(&ses);
    return rc;
}
