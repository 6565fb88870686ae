/*
 * Run results and `moehost report` (report.h).
 */
#include "runtime/report.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/config_schema.h"
#include "runtime/fsutil.h"
#include "runtime/stats.h"
#include "runtime/toml_reader.h"

#define PATH_CAP 4096

static int fail(char *err, size_t errcap, const char *fmt, ...) {
    if (err && errcap > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errcap, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* ============================ run results ============================ */

const char *const moe_result_names[MOE_RES_COUNT] = {
    "val_loss",        "val_ppl",       "val_bpc",       "val_acc",        "train_loss",
    "tokens_per_s",    "ms_per_step",   "drop_rate",     "token_drop_rate", "load_cv",
    "used_capacity",   "router_entropy", "combine_entropy", "aux_loss",     "best_val_loss",
    "best_val_ppl",    "best_step",     "train_time_s",  "peak_mem_gb",
};

static double number(const json_t *obj, const char *key) {
    const json_t *v = obj ? json_object_get(obj, key) : NULL;
    return json_is_number(v) ? json_number_value(v) : NAN;
}

int moe_run_results_read(const char *run_dir, double v[MOE_RES_COUNT], char *err, size_t errcap) {
    for (int i = 0; i < MOE_RES_COUNT; ++i) v[i] = NAN;
    char path[PATH_CAP + 32];
    snprintf(path, sizeof path, "%s/summary.json", run_dir);
    if (!moe_file_exists(path)) return 0;
    json_error_t je;
    json_t *s = json_load_file(path, 0, &je);
    if (!s) return fail(err, errcap, "%s:%d: not valid JSON: %s", path, je.line, je.text);
    const json_t *final = json_object_get(s, "final"), *best = json_object_get(s, "best");
    static const struct {
        int col;
        const char *key;
    } from_final[] = {
        { MOE_RES_VAL_LOSS, "val_loss" },        { MOE_RES_VAL_PPL, "val_ppl" },
        { MOE_RES_VAL_BPC, "val_bpc" },          { MOE_RES_VAL_ACC, "val_acc" },
        { MOE_RES_TRAIN_LOSS, "train_loss" },    { MOE_RES_DROP_RATE, "drop_rate" },
        { MOE_RES_TOKEN_DROP_RATE, "token_drop_rate" }, { MOE_RES_LOAD_CV, "load_cv" },
        { MOE_RES_USED_CAPACITY, "used_capacity" }, { MOE_RES_ROUTER_ENTROPY, "router_entropy" },
        { MOE_RES_COMBINE_ENTROPY, "combine_entropy" }, { MOE_RES_AUX_LOSS, "aux_loss" },
    };
    for (size_t i = 0; i < sizeof from_final / sizeof from_final[0]; ++i)
        v[from_final[i].col] = number(final, from_final[i].key);
    v[MOE_RES_TOKENS_PER_S] = number(s, "tokens_per_s");
    v[MOE_RES_TRAIN_TIME_S] = number(s, "train_time_s");
    v[MOE_RES_PEAK_MEM_GB] = number(s, "peak_mem_gb");
    double steps = number(s, "steps");
    v[MOE_RES_MS_PER_STEP] = steps > 0 ? 1e3 * v[MOE_RES_TRAIN_TIME_S] / steps : NAN;
    v[MOE_RES_BEST_VAL_LOSS] = number(best, "val_loss");
    v[MOE_RES_BEST_VAL_PPL] = number(best, "val_ppl");
    v[MOE_RES_BEST_STEP] = number(best, "step");
    json_decref(s);
    return 1;
}

void moe_format_exact(double value, char *buf, size_t cap) {
    if (isnan(value)) {
        snprintf(buf, cap, "%s", "");
        return;
    }
    if (isinf(value)) {
        snprintf(buf, cap, "%s", value < 0 ? "-inf" : "inf");
        return;
    }
    if (value == floor(value) && fabs(value) < 1e15) { /* whole numbers as such: 30, not 3e+01 */
        snprintf(buf, cap, "%.0f", value);
        return;
    }
    for (int precision = 1; precision <= 17; ++precision) {
        snprintf(buf, cap, "%.*g", precision, value);
        if (strtod(buf, NULL) == value) return;
    }
}

/* ============================ the report ============================ */

typedef struct run_info {
    char name[256];
    char dir[PATH_CAP];
    int finished;
    double v[MOE_RES_COUNT];
    int n_evals;
    long long *steps;
    double *val_loss;
    int n_experts;   /* of the load below; 0 = none */
    double *load;    /* final kept assignments per expert, layers averaged, / their mean */
    int n_keys;
    char **keys;     /* "moe.capacity_factor" */
    char **vals;     /* "1.25" */
    int group;
} run_info;

typedef struct report {
    const char *dir;
    char fig[PATH_CAP];
    run_info *runs;
    int n_runs, n_finished;
    /* configurations of the finished runs */
    int n_groups;
    char (*labels)[512];
    char **varying;
    int n_varying;
} report;

static void run_info_free(run_info *r) {
    free(r->steps);
    free(r->val_loss);
    free(r->load);
    for (int i = 0; i < r->n_keys; ++i) {
        free(r->keys[i]);
        free(r->vals[i]);
    }
    free(r->keys);
    free(r->vals);
}

static char *dup_text(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static int by_name(const void *a, const void *b) {
    return strcmp(((const run_info *)a)->name, ((const run_info *)b)->name);
}

static int dir_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* step and val_loss of every line of metrics.jsonl. */
static int read_evals(run_info *r, char *err, size_t errcap) {
    char path[PATH_CAP + 32];
    snprintf(path, sizeof path, "%s/metrics.jsonl", r->dir);
    FILE *f = fopen(path, "rb");
    if (!f) return fail(err, errcap, "cannot read '%s': %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0, room = 0;
    int rc = 0;
    while (getline(&line, &cap, f) > 0) {
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        if (!o) continue; /* a line cut short by a crash; the run rewrites it on resume */
        const json_t *step = json_object_get(o, "step"), *loss = json_object_get(o, "val_loss");
        if (json_is_integer(step) && json_is_number(loss)) {
            if ((size_t)r->n_evals == room) {
                room = room ? 2 * room : 64;
                long long *s = realloc(r->steps, room * sizeof *s);
                if (s) r->steps = s;
                double *l = realloc(r->val_loss, room * sizeof *l);
                if (l) r->val_loss = l;
                if (!s || !l) {
                    json_decref(o);
                    rc = fail(err, errcap, "out of memory");
                    break;
                }
            }
            r->steps[r->n_evals] = json_integer_value(step);
            r->val_loss[r->n_evals++] = json_number_value(loss);
        }
        json_decref(o);
    }
    free(line);
    fclose(f);
    return rc;
}

/* Final per-expert kept counts from summary.json, layers averaged, relative to their mean. */
static void read_load(run_info *r) {
    char path[PATH_CAP + 32];
    snprintf(path, sizeof path, "%s/summary.json", r->dir);
    json_error_t je;
    json_t *s = json_load_file(path, 0, &je);
    const json_t *layers = s ? json_object_get(json_object_get(s, "final"), "layers") : NULL;
    size_t n_layers = json_is_array(layers) ? json_array_size(layers) : 0;
    int E = 0;
    if (n_layers > 0) {
        const json_t *c = json_object_get(json_array_get(layers, 0), "expert_counts");
        E = json_is_array(c) ? (int)json_array_size(c) : 0;
    }
    double *load = E > 0 ? calloc((size_t)E, sizeof *load) : NULL;
    int ok = load != NULL;
    for (size_t l = 0; l < n_layers && ok; ++l) {
        const json_t *c = json_object_get(json_array_get(layers, l), "expert_counts");
        if (!json_is_array(c) || (int)json_array_size(c) != E) ok = 0;
        for (int e = 0; e < E && ok; ++e) load[e] += json_number_value(json_array_get(c, (size_t)e)) / n_layers;
    }
    double mean = 0.0;
    for (int e = 0; e < E && ok; ++e) mean += load[e] / E;
    if (ok && mean > 0) {
        for (int e = 0; e < E; ++e) load[e] /= mean;
        r->load = load;
        r->n_experts = E;
    } else {
        free(load);
    }
    json_decref(s);
}

static void value_text(const moe_toml_value *v, char *buf, size_t cap) {
    switch (v->type) {
    case MOE_TOML_BOOL: snprintf(buf, cap, "%s", v->i ? "true" : "false"); return;
    case MOE_TOML_INT: snprintf(buf, cap, "%lld", (long long)v->i); return;
    case MOE_TOML_FLOAT: moe_cfg_format_float(v->f, buf, cap); return;
    case MOE_TOML_STRING: snprintf(buf, cap, "%s", v->s); return;
    case MOE_TOML_ARRAY: snprintf(buf, cap, "[...]"); return;
    }
    buf[0] = '\0';
}

/* The run's resolved config.toml as "table.key" -> value text. */
static void read_config(run_info *r) {
    char path[PATH_CAP + 32], err[512];
    snprintf(path, sizeof path, "%s/config.toml", r->dir);
    moe_toml_doc doc;
    if (!moe_file_exists(path) || moe_toml_parse_file(path, &doc, err, sizeof err) != 0) return;
    r->keys = calloc((size_t)doc.n_entries + 1, sizeof *r->keys);
    r->vals = calloc((size_t)doc.n_entries + 1, sizeof *r->vals);
    for (int i = 0; r->keys && r->vals && i < doc.n_entries; ++i) {
        char key[512], val[2048];
        snprintf(key, sizeof key, "%s.%s", doc.entries[i].table, doc.entries[i].key);
        value_text(&doc.entries[i].value, val, sizeof val);
        r->keys[r->n_keys] = dup_text(key);
        r->vals[r->n_keys] = dup_text(val);
        if (r->keys[r->n_keys] && r->vals[r->n_keys]) r->n_keys++;
    }
    moe_toml_doc_free(&doc);
}

static const char *config_value(const run_info *r, const char *key) {
    for (int i = 0; i < r->n_keys; ++i)
        if (strcmp(r->keys[i], key) == 0) return r->vals[i];
    return "(unset)";
}

static int ignored_key(const char *key) {
    return strcmp(key, "run.name") == 0 || strcmp(key, "run.seed") == 0 || strcmp(key, "run.out_dir") == 0;
}

/* "softk", "CF 1.25", "E=8", "noise_std=0.1". */
static void label_part(const char *key, const char *value, char *buf, size_t cap) {
    if (strcmp(key, "router.plugin") == 0) {
        const char *slash = strrchr(value, '/');
        const char *base = slash ? slash + 1 : value;
        size_t n = strlen(base);
        if (n > 3 && strcmp(base + n - 3, ".so") == 0) n -= 3;
        snprintf(buf, cap, "%.*s", (int)n, base);
    } else if (strcmp(key, "moe.capacity_factor") == 0) {
        snprintf(buf, cap, "CF %s", value);
    } else if (strcmp(key, "moe.num_experts") == 0) {
        snprintf(buf, cap, "E=%s", value);
    } else if (strcmp(key, "moe.top_k") == 0) {
        snprintf(buf, cap, "K=%s", value);
    } else {
        const char *dot = strchr(key, '.');
        snprintf(buf, cap, "%s=%s", dot ? dot + 1 : key, value);
    }
}

/* Configurations: finished runs that differ only in name, seed and out_dir. */
static int make_groups(report *R, char *err, size_t errcap) {
    /* Keys in the order of the first finished run, then any others. */
    int cap = 0;
    for (int i = 0; i < R->n_runs; ++i) cap += R->runs[i].n_keys;
    R->varying = calloc((size_t)cap + 1, sizeof *R->varying);
    R->labels = calloc((size_t)R->n_finished + 1, sizeof *R->labels);
    if (!R->varying || !R->labels) return fail(err, errcap, "out of memory");
    const run_info *first = NULL;
    for (int i = 0; i < R->n_runs && !first; ++i)
        if (R->runs[i].finished) first = &R->runs[i];
    for (int i = 0; i < R->n_runs; ++i) {
        const run_info *r = &R->runs[i];
        if (!r->finished) continue;
        for (int k = 0; k < r->n_keys; ++k) {
            const char *key = r->keys[k];
            if (ignored_key(key)) continue;
            int known = 0;
            for (int j = 0; j < R->n_varying; ++j) known |= strcmp(R->varying[j], key) == 0;
            if (known) continue;
            int varies = 0;
            for (int j = 0; j < R->n_runs; ++j)
                if (R->runs[j].finished && strcmp(config_value(&R->runs[j], key), config_value(first, key)) != 0)
                    varies = 1;
            if (varies) R->varying[R->n_varying++] = (char *)key;
        }
    }
    /* The router first in labels: "softk, CF 1.25". */
    for (int k = 1; k < R->n_varying; ++k)
        if (strcmp(R->varying[k], "router.plugin") == 0) {
            char *router = R->varying[k];
            memmove(&R->varying[1], &R->varying[0], (size_t)k * sizeof R->varying[0]);
            R->varying[0] = router;
        }
    /* Group ids in order of first appearance. */
    int *rep = calloc((size_t)R->n_finished + 1, sizeof *rep); /* a run of each group */
    if (!rep) return fail(err, errcap, "out of memory");
    for (int i = 0; i < R->n_runs; ++i) {
        run_info *r = &R->runs[i];
        r->group = -1;
        if (!r->finished) continue;
        for (int g = 0; g < R->n_groups && r->group < 0; ++g) {
            int same = 1;
            for (int k = 0; k < R->n_varying && same; ++k)
                same = strcmp(config_value(r, R->varying[k]), config_value(&R->runs[rep[g]], R->varying[k])) == 0;
            if (same) r->group = g;
        }
        if (r->group >= 0) continue;
        int g = R->n_groups++;
        rep[g] = i;
        r->group = g;
        char *label = R->labels[g];
        size_t used = 0;
        label[0] = '\0';
        for (int k = 0; k < R->n_varying; ++k) {
            char part[256];
            label_part(R->varying[k], config_value(r, R->varying[k]), part, sizeof part);
            int w = snprintf(label + used, sizeof R->labels[g] - used, "%s%s", used ? ", " : "", part);
            if (w > 0 && (size_t)w < sizeof R->labels[g] - used) used += (size_t)w;
        }
        if (R->n_varying == 0) {
            char a[200], b[200];
            label_part("router.plugin", config_value(r, "router.plugin"), a, sizeof a);
            label_part("moe.capacity_factor", config_value(r, "moe.capacity_factor"), b, sizeof b);
            snprintf(label, sizeof R->labels[g], "%s, %s", a, b);
        }
    }
    free(rep);
    return 0;
}

static int read_runs(report *R, char *err, size_t errcap) {
    DIR *d = opendir(R->dir);
    if (!d) return fail(err, errcap, "cannot open '%s': %s", R->dir, strerror(errno));
    struct dirent *e;
    int room = 0, rc = 0;
    while ((e = readdir(d)) != NULL && rc == 0) {
        if (e->d_name[0] == '.' || strlen(e->d_name) >= sizeof R->runs[0].name) continue;
        char path[PATH_CAP + 300], metrics[PATH_CAP + 400];
        snprintf(path, sizeof path, "%s/%s", R->dir, e->d_name);
        snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", path);
        if (!dir_exists(path) || !moe_file_exists(metrics) || strlen(path) >= PATH_CAP) continue;
        if (R->n_runs == room) {
            room = room ? 2 * room : 32;
            run_info *more = realloc(R->runs, (size_t)room * sizeof *more);
            if (!more) {
                rc = fail(err, errcap, "out of memory");
                break;
            }
            R->runs = more;
        }
        run_info *r = &R->runs[R->n_runs++];
        memset(r, 0, sizeof *r);
        r->group = -1;
        snprintf(r->name, sizeof r->name, "%s", e->d_name);
        memcpy(r->dir, path, strlen(path) + 1); /* shorter than PATH_CAP: checked above */
    }
    closedir(d);
    if (rc != 0) return rc;
    if (R->n_runs > 1) qsort(R->runs, (size_t)R->n_runs, sizeof *R->runs, by_name);
    for (int i = 0; i < R->n_runs && rc == 0; ++i) {
        run_info *r = &R->runs[i];
        int got = moe_run_results_read(r->dir, r->v, err, errcap);
        if (got < 0) return -1;
        r->finished = got == 1;
        R->n_finished += r->finished;
        rc = read_evals(r, err, errcap);
        if (r->finished) {
            read_load(r);
            read_config(r);
        }
    }
    return rc;
}

/* ---- gnuplot files ---- */

/* A gnuplot double-quoted string. */
static void gp_string(FILE *f, const char *s) {
    fputc('"', f);
    for (const char *c = s; *c; ++c) {
        if (*c == '"' || *c == '\\') fputc('\\', f);
        fputc(*c, f);
    }
    fputc('"', f);
}

static FILE *open_fig(const report *R, const char *file, char *path, size_t path_cap, char *err, size_t errcap) {
    snprintf(path, path_cap, "%s/%s", R->fig, file);
    return moe_atomic_open(path, err, errcap);
}

static void gp_header(FILE *f, const char *png, int width, int height, const char *about) {
    fprintf(f,
            "# %s\n"
            "# Written by `moehost report`: edit it, then run `gnuplot %.*s.gp` in this folder to redraw.\n"
            "if (strstrt(GPVAL_TERMINALS, \"pngcairo\") > 0) {\n"
            "    set terminal pngcairo size %d,%d noenhanced font \",10\"\n"
            "} else {\n"
            "    set terminal png size %d,%d noenhanced\n"
            "}\n"
            "set output \"%s\"\n"
            "set grid\n",
            about, (int)(strlen(png) - 4), png, width, height, width, height, png);
}

static const int point_types[] = { 7, 5, 9, 11, 13, 15, 4, 6, 8, 10, 12, 14 };
#define N_POINT_TYPES ((int)(sizeof point_types / sizeof point_types[0]))

static int write_frontier(const report *R, char *err, size_t errcap) {
    char path[PATH_CAP + 64];
    FILE *f = open_fig(R, "frontier.dat", path, sizeof path, err, errcap);
    if (!f) return -1;
    fputs("# Routing frontier: one block per configuration (gnuplot: index i), over its runs (seeds).\n"
          "# columns: tokens_per_s_mean tokens_per_s_std val_ppl_mean val_ppl_std n\n",
          f);
    double *x = calloc((size_t)R->n_runs + 1, sizeof *x), *y = calloc((size_t)R->n_runs + 1, sizeof *y);
    for (int g = 0; g < R->n_groups && x && y; ++g) {
        int n = 0;
        for (int i = 0; i < R->n_runs; ++i)
            if (R->runs[i].finished && R->runs[i].group == g) {
                x[n] = R->runs[i].v[MOE_RES_TOKENS_PER_S];
                y[n++] = R->runs[i].v[MOE_RES_VAL_PPL];
            }
        moe_stats sx, sy;
        moe_stats_of(x, n, &sx);
        moe_stats_of(y, n, &sy);
        fprintf(f, "%s# %s\n%.10g %.10g %.10g %.10g %d\n", g ? "\n\n" : "", R->labels[g], sx.mean,
                sx.n > 1 ? sx.std : 0.0, sy.mean, sy.n > 1 ? sy.std : 0.0, sy.n);
    }
    free(x);
    free(y);
    if (moe_atomic_commit(f, path, err, errcap) != 0) return -1;

    if (!(f = open_fig(R, "frontier.gp", path, sizeof path, err, errcap))) return -1;
    gp_header(f, "frontier.png", 1100, 680, "Routing frontier: final validation perplexity against training throughput.");
    fputs("set title \"Routing frontier: validation perplexity vs training throughput\\n"
          "(final evaluation; mean over seeds, error bars +/- 1 std)\"\n"
          "set xlabel \"training throughput (tokens/s)\"\n"
          "set ylabel \"validation perplexity (exp of nats/token)\"\n"
          "set key outside right top box title \"configuration\"\n"
          "set offsets graph 0.08, graph 0.08, graph 0.08, graph 0.08\n"
          "plot \\\n",
          f);
    for (int g = 0; g < R->n_groups; ++g) {
        fprintf(f, "    \"frontier.dat\" index %d using 1:3:2:4 with xyerrorbars pt %d ps 1.6 lw 2 title ", g,
                point_types[g % N_POINT_TYPES]);
        gp_string(f, R->labels[g]);
        fputs(g + 1 < R->n_groups ? ", \\\n" : "\n", f);
    }
    return moe_atomic_commit(f, path, err, errcap);
}

static int write_overlay(const report *R, char *err, size_t errcap) {
    char path[PATH_CAP + 64];
    FILE *f = open_fig(R, "overlay.dat", path, sizeof path, err, errcap);
    if (!f) return -1;
    fputs("# Validation loss by step: one block per run (gnuplot: index i).\n# columns: step val_loss\n", f);
    for (int i = 0; i < R->n_runs; ++i) {
        fprintf(f, "%s# %s\n", i ? "\n\n" : "", R->runs[i].name);
        for (int k = 0; k < R->runs[i].n_evals; ++k)
            fprintf(f, "%lld %.10g\n", R->runs[i].steps[k], R->runs[i].val_loss[k]);
        if (R->runs[i].n_evals == 0) fputs("nan nan\n", f);
    }
    if (moe_atomic_commit(f, path, err, errcap) != 0) return -1;

    if (!(f = open_fig(R, "overlay.gp", path, sizeof path, err, errcap))) return -1;
    int height = 640 + (R->n_runs > 30 ? 14 * (R->n_runs - 30) : 0);
    gp_header(f, "overlay.png", 1150, height, "Validation loss against training step, one line per run.");
    fputs("set title \"Validation loss during training (one line per run; a colour per configuration)\"\n"
          "set xlabel \"training step\"\n"
          "set ylabel \"validation loss (nats/token)\"\n"
          "set key outside right top font \",8\"\n"
          "plot \\\n",
          f);
    int extra = R->n_groups;
    for (int i = 0; i < R->n_runs; ++i) {
        int color = R->runs[i].group >= 0 ? R->runs[i].group + 1 : ++extra;
        fprintf(f, "    \"overlay.dat\" index %d using 1:2 with linespoints lc %d pt %d ps 0.7 lw 1.5 title ", i,
                color, point_types[i % N_POINT_TYPES]);
        gp_string(f, R->runs[i].name);
        fputs(i + 1 < R->n_runs ? ", \\\n" : "\n", f);
    }
    return moe_atomic_commit(f, path, err, errcap);
}

static int write_load(const report *R, int *rows_out, char *err, size_t errcap) {
    int rows = 0, max_e = 0;
    double max_load = 2.0;
    for (int i = 0; i < R->n_runs; ++i)
        if (R->runs[i].n_experts > 0) {
            rows++;
            if (R->runs[i].n_experts > max_e) max_e = R->runs[i].n_experts;
            for (int e = 0; e < R->runs[i].n_experts; ++e)
                if (R->runs[i].load[e] > max_load) max_load = R->runs[i].load[e];
        }
    *rows_out = rows;
    if (rows == 0) return 0;
    char path[PATH_CAP + 64];
    FILE *f = open_fig(R, "expert_load.dat", path, sizeof path, err, errcap);
    if (!f) return -1;
    fputs("# Per-expert load at the final evaluation: kept assignments per expert, averaged over layers,\n"
          "# divided by their mean (1 = an even share); NaN past a run's last expert.\n"
          "# A row per run, a column per expert.\n",
          f);
    /* gnuplot's matrix format counts rows across comments as new blocks: names first. */
    for (int i = 0, row = 0; i < R->n_runs; ++i)
        if (R->runs[i].n_experts > 0) fprintf(f, "# row %d: %s\n", row++, R->runs[i].name);
    for (int i = 0; i < R->n_runs; ++i) {
        const run_info *r = &R->runs[i];
        if (r->n_experts == 0) continue;
        for (int e = 0; e < max_e; ++e) {
            if (e < r->n_experts) fprintf(f, "%s%.6g", e ? " " : "", r->load[e]);
            else fprintf(f, "%sNaN", e ? " " : "");
        }
        fputc('\n', f);
    }
    if (moe_atomic_commit(f, path, err, errcap) != 0) return -1;

    if (!(f = open_fig(R, "expert_load.gp", path, sizeof path, err, errcap))) return -1;
    int height = 260 + 22 * rows;
    if (height < 480) height = 480;
    gp_header(f, "expert_load.png", 1100, height, "Per-expert load of each run at the final evaluation.");
    fprintf(f,
            "set title \"Per-expert load at the final evaluation (kept assignments, mean over layers)\"\n"
            "set xlabel \"expert index\"\n"
            "set ylabel \"run\"\n"
            "set cblabel \"load / even share (1 = balanced)\"\n"
            "set grid noxtics noytics\n"
            "set xrange [-0.5:%g]\n"
            "set yrange [%g:-0.5]\n"
            "set cbrange [0:%g]\n"
            "set palette defined (0 \"#2166ac\", 1 \"#f7f7f7\", %g \"#b2182b\")\n",
            max_e - 0.5, rows - 0.5, max_load, max_load);
    if (max_e <= 32) fputs("set xtics 1\n", f);
    fputs("set ytics (", f);
    for (int i = 0, row = 0; i < R->n_runs; ++i) {
        if (R->runs[i].n_experts == 0) continue;
        fputs(row ? ", " : "", f);
        gp_string(f, R->runs[i].name);
        fprintf(f, " %d", row++);
    }
    fputs(") font \",8\"\n", f);
    fputs("plot \"expert_load.dat\" matrix with image title \"\"\n", f);
    return moe_atomic_commit(f, path, err, errcap);
}

/* ---- capacity.jsonl ---- */

typedef struct cap_point {
    long long E, K;
    double cf, drop, tps;
    int n;
} cap_point;

static int by_ekcf(const void *a, const void *b) {
    const cap_point *x = a, *y = b;
    if (x->E != y->E) return x->E < y->E ? -1 : 1;
    if (x->K != y->K) return x->K < y->K ? -1 : 1;
    return x->cf < y->cf ? -1 : x->cf > y->cf;
}

static int read_capacity(const char *path, cap_point **out, int *n_out, char *err, size_t errcap) {
    FILE *f = fopen(path, "rb");
    if (!f) return fail(err, errcap, "cannot read '%s': %s", path, strerror(errno));
    cap_point *pts = NULL;
    int n = 0, room = 0, lineno = 0, rc = 0;
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0 && rc == 0) {
        lineno++;
        if (strspn(line, " \t\r\n") == strlen(line)) continue;
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        if (!o) {
            rc = fail(err, errcap, "%s:%d: not a JSON object: %s", path, lineno, je.text);
            break;
        }
        static const char *const need[] = { "E", "K", "capacity_factor", "drop_rate", "tokens_per_s" };
        for (int k = 0; k < 5 && rc == 0; ++k)
            if (!json_is_number(json_object_get(o, need[k])))
                rc = fail(err, errcap, "%s:%d: '%s' is missing or not a number (a line needs E, K, capacity_factor, "
                                       "drop_rate, tokens_per_s)",
                          path, lineno, need[k]);
        if (rc == 0) {
            cap_point p = { (long long)number(o, "E"), (long long)number(o, "K"), number(o, "capacity_factor"),
                            number(o, "drop_rate"), number(o, "tokens_per_s"), 1 };
            int merged = 0;
            for (int i = 0; i < n && !merged; ++i)
                if (pts[i].E == p.E && pts[i].K == p.K && pts[i].cf == p.cf) { /* repeats: mean */
                    pts[i].drop += p.drop;
                    pts[i].tps += p.tps;
                    pts[i].n++;
                    merged = 1;
                }
            if (!merged) {
                if (n == room) {
                    room = room ? 2 * room : 64;
                    cap_point *more = realloc(pts, (size_t)room * sizeof *more);
                    if (!more) rc = fail(err, errcap, "out of memory");
                    else pts = more;
                }
                if (rc == 0) pts[n++] = p;
            }
        }
        json_decref(o);
    }
    free(line);
    fclose(f);
    if (rc == 0 && n == 0) rc = fail(err, errcap, "%s holds no measurements", path);
    if (rc != 0) {
        free(pts);
        return -1;
    }
    for (int i = 0; i < n; ++i) {
        pts[i].drop /= pts[i].n;
        pts[i].tps /= pts[i].n;
    }
    qsort(pts, (size_t)n, sizeof *pts, by_ekcf);
    *out = pts;
    *n_out = n;
    return 0;
}

static int write_capacity(const report *R, const cap_point *pts, int n, int *n_lines, char *err, size_t errcap) {
    char path[PATH_CAP + 64];
    FILE *f = open_fig(R, "capacity.dat", path, sizeof path, err, errcap);
    if (!f) return -1;
    fputs("# Capacity microbenchmark (capacity.jsonl): one block per (E, K) (gnuplot: index i).\n"
          "# columns: capacity_factor drop_rate tokens_per_s\n",
          f);
    int blocks = 0;
    for (int i = 0; i < n; ++i) {
        if (i == 0 || pts[i].E != pts[i - 1].E || pts[i].K != pts[i - 1].K)
            fprintf(f, "%s# E=%lld K=%lld\n", blocks++ ? "\n\n" : "", pts[i].E, pts[i].K);
        fprintf(f, "%.10g %.10g %.10g\n", pts[i].cf, pts[i].drop, pts[i].tps);
    }
    *n_lines = blocks;
    if (moe_atomic_commit(f, path, err, errcap) != 0) return -1;
    static const struct {
        const char *file, *png, *title, *ylabel;
        int col;
    } figs[2] = {
        { "capacity_drop_rate.gp", "capacity_drop_rate.png", "Dropped assignments against the capacity factor",
          "drop rate (dropped / routed assignments)", 2 },
        { "capacity_tokens_per_s.gp", "capacity_tokens_per_s.png", "Throughput against the capacity factor",
          "throughput (tokens/s)", 3 },
    };
    for (int k = 0; k < 2; ++k) {
        if (!(f = open_fig(R, figs[k].file, path, sizeof path, err, errcap))) return -1;
        gp_header(f, figs[k].png, 1000, 640, figs[k].title);
        fprintf(f,
                "set title \"%s (one line per E experts, top-K)\"\n"
                "set xlabel \"capacity factor CF (capacity = CF * T * K / E)\"\n"
                "set ylabel \"%s\"\n"
                "set key outside right top\n"
                "plot \\\n",
                figs[k].title, figs[k].ylabel);
        for (int i = 0, b = 0; i < n; ++i) {
            if (i > 0 && pts[i].E == pts[i - 1].E && pts[i].K == pts[i - 1].K) continue;
            fprintf(f, "    \"capacity.dat\" index %d using 1:%d with linespoints pt %d lw 2 title \"E=%lld, K=%lld\"%s\n",
                    b, figs[k].col, point_types[b % N_POINT_TYPES], pts[i].E, pts[i].K,
                    b + 1 < blocks ? ", \\" : "");
            b++;
        }
        if (moe_atomic_commit(f, path, err, errcap) != 0) return -1;
    }
    return 0;
}

/* ---- running gnuplot ---- */

static int find_program(const char *name, char *buf, size_t cap) {
    const char *path = getenv("PATH");
    if (!path || !*path) path = "/usr/bin:/bin";
    while (*path) {
        const char *colon = strchr(path, ':');
        size_t len = colon ? (size_t)(colon - path) : strlen(path);
        snprintf(buf, cap, "%.*s/%s", (int)(len ? len : 1), len ? path : ".", name);
        struct stat st;
        if (stat(buf, &st) == 0 && S_ISREG(st.st_mode) && access(buf, X_OK) == 0) return 0;
        path += len;
        if (*path == ':') ++path;
    }
    return -1;
}

static int is_png(const char *path) {
    static const unsigned char sig[8] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n' };
    unsigned char head[8];
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    size_t n = fread(head, 1, sizeof head, f);
    fclose(f);
    return n == sizeof head && memcmp(head, sig, sizeof sig) == 0;
}

/* gnuplot SCRIPT in the figures folder, output appended to gnuplot.log;
 * then the PNG must be there. */
static int draw(const report *R, const char *gnuplot, const char *script, const char *png, char *err,
                size_t errcap) {
    char log_path[PATH_CAP + 32], png_path[PATH_CAP + 64];
    snprintf(log_path, sizeof log_path, "%s/gnuplot.log", R->fig);
    snprintf(png_path, sizeof png_path, "%s/%s", R->fig, png);
    unlink(png_path);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) return fail(err, errcap, "cannot start gnuplot: %s", strerror(errno));
    if (pid == 0) {
        int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
            close(fd);
        }
        if (chdir(R->fig) != 0) _exit(126);
        execl(gnuplot, "gnuplot", script, (char *)NULL);
        dprintf(STDERR_FILENO, "cannot run %s: %s\n", gnuplot, strerror(errno));
        _exit(127);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR) return fail(err, errcap, "waiting for gnuplot: %s", strerror(errno));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return fail(err, errcap, "gnuplot failed on %s/%s (exit status %d); see %s", R->fig, script,
                    WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), log_path);
    if (!is_png(png_path))
        return fail(err, errcap, "gnuplot ran %s/%s but wrote no PNG %s; see %s", R->fig, script, png_path,
                    log_path);
    return 0;
}

int moe_report_make(const char *dir, char *err, size_t errcap) {
    report R;
    memset(&R, 0, sizeof R);
    R.dir = dir;
    cap_point *cap = NULL;
    int n_cap = 0, rc = -1;
    char capacity_path[PATH_CAP + 32];
    snprintf(capacity_path, sizeof capacity_path, "%s/capacity.jsonl", dir);
    if (strlen(dir) + 16 >= sizeof R.fig) return fail(err, errcap, "folder name '%.60s...' is too long", dir);
    snprintf(R.fig, sizeof R.fig, "%s/figures", dir);

    if (read_runs(&R, err, errcap) != 0) goto done;
    int have_capacity = moe_file_exists(capacity_path);
    if (R.n_runs == 0 && !have_capacity) {
        fail(err, errcap,
             "nothing to plot in '%s': no run folders (with metrics.jsonl) and no capacity.jsonl; point report at "
             "an experiment folder, e.g. runs/expA",
             dir);
        goto done;
    }
    if (have_capacity && read_capacity(capacity_path, &cap, &n_cap, err, errcap) != 0) goto done;
    if (R.n_finished > 0 && make_groups(&R, err, errcap) != 0) goto done;
    if (moe_mkdirs(R.fig, err, errcap) != 0) goto done;

    /* Data and scripts first: they stay usable if drawing fails. */
    typedef struct figure {
        const char *script, *png;
        char what[160];
    } figure;
    figure figs[5];
    int n_figs = 0, load_rows = 0, cap_lines = 0;
    if (R.n_finished > 0) {
        if (write_frontier(&R, err, errcap) != 0) goto done;
        figs[n_figs].script = "frontier.gp";
        figs[n_figs].png = "frontier.png";
        snprintf(figs[n_figs++].what, sizeof figs[0].what, "routing frontier, %d configuration%s of %d finished run%s",
                 R.n_groups, R.n_groups == 1 ? "" : "s", R.n_finished, R.n_finished == 1 ? "" : "s");
    }
    if (R.n_runs > 0) {
        if (write_overlay(&R, err, errcap) != 0) goto done;
        figs[n_figs].script = "overlay.gp";
        figs[n_figs].png = "overlay.png";
        snprintf(figs[n_figs++].what, sizeof figs[0].what, "validation loss by step, %d run%s", R.n_runs,
                 R.n_runs == 1 ? "" : "s");
    }
    if (R.n_finished > 0) {
        if (write_load(&R, &load_rows, err, errcap) != 0) goto done;
        if (load_rows > 0) {
            figs[n_figs].script = "expert_load.gp";
            figs[n_figs].png = "expert_load.png";
            snprintf(figs[n_figs++].what, sizeof figs[0].what, "per-expert load, %d run%s", load_rows,
                     load_rows == 1 ? "" : "s");
        }
    }
    if (n_cap > 0) {
        if (write_capacity(&R, cap, n_cap, &cap_lines, err, errcap) != 0) goto done;
        figs[n_figs].script = "capacity_drop_rate.gp";
        figs[n_figs].png = "capacity_drop_rate.png";
        snprintf(figs[n_figs++].what, sizeof figs[0].what, "drop rate against CF, %d (E, K) line%s", cap_lines,
                 cap_lines == 1 ? "" : "s");
        figs[n_figs].script = "capacity_tokens_per_s.gp";
        figs[n_figs].png = "capacity_tokens_per_s.png";
        snprintf(figs[n_figs++].what, sizeof figs[0].what, "tokens/s against CF, %d (E, K) line%s", cap_lines,
                 cap_lines == 1 ? "" : "s");
    }

    char gnuplot[PATH_CAP];
    if (find_program("gnuplot", gnuplot, sizeof gnuplot) != 0) {
        fail(err, errcap,
             "gnuplot was not found on PATH, and it draws the figures (Debian: apt-get install gnuplot-nox); the "
             "data and gnuplot scripts are in %s: run `gnuplot <name>.gp` there once it is installed",
             R.fig);
        goto done;
    }
    for (int i = 0; i < n_figs; ++i) {
        if (draw(&R, gnuplot, figs[i].script, figs[i].png, err, errcap) != 0) goto done;
        printf("report: %s/%s (%s)\n", R.fig, figs[i].png, figs[i].what);
    }
    if (R.n_runs == 0)
        printf("report: frontier, overlay and per-expert load skipped: no run folders (with metrics.jsonl) in %s\n",
               dir);
    else if (R.n_finished == 0)
        printf("report: frontier and per-expert load skipped: no finished run (summary.json) in %s\n", dir);
    if (n_cap == 0) printf("report: capacity curves skipped: no capacity data (%s not found)\n", capacity_path);
    fflush(stdout);
    rc = 0;

done:
    for (int i = 0; i < R.n_runs; ++i) run_info_free(&R.runs[i]);
    free(R.runs);
    free(R.labels);
    free(R.varying);
    free(cap);
    return rc;
}
