/*
 * moehost: the command-line front of MoE Routing Bench.
 *
 *   moehost --config X.toml [--set section.key=value ...] [--resume]   train, or run the sweep of X
 *   moehost train --config X.toml [...]                                 one run ([sweep] ignored)
 *   moehost report DIR                                                  figures of an experiment
 *   moehost prepare --out DIR [--tokenizer char|gpt2 --bpe-dir DIR] [--shard-tokens N] FILE...
 *   moehost plugins                                                     list routers
 *   moehost config --doc                                                config reference
 */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "runtime/bench.h"
#include "runtime/bench_config.h"
#include "runtime/bench_routing.h"
#include "runtime/config.h"
#include "runtime/data.h"
#include "runtime/plugin_loader.h"
#include "runtime/report.h"
#include "runtime/sweep.h"
#include "runtime/train.h"

#ifndef MOE_VERSION
#define MOE_VERSION "dev"
#endif

#define ERR_CAP 4096
#define MAX_SETS 256

static void usage(FILE *out) {
    fprintf(out,
            "MoE Routing Bench %s\n"
            "\n"
            "usage:\n"
            "  moehost --config FILE [--set section.key=value ...] [--resume] [--quiet]\n"
            "                [--stop-after STEP]\n"
            "      train and evaluate as FILE says; results go to <run.out_dir>/<run.name>/\n"
            "      --resume continues from the run's last checkpoint; --stop-after ends the run\n"
            "      after the first evaluation at or past STEP, as an interruption would.\n"
            "      When FILE has a [sweep] table, run every point of the sweep instead (one\n"
            "      `moehost train` process each, into <run.out_dir>/<experiment>/<point>/):\n"
            "      finished points are skipped and interrupted ones resumed; then summary.csv,\n"
            "      summary.md and the figures. --set sweep.seeds=[42] (or sweep.parallel, sweep.name,\n"
            "      sweep.csv, or an axis: --set 'sweep.router.plugin=[\"top1\"]') changes the [sweep]\n"
            "      table (docs/experiments.md)\n"
            "  moehost train --config FILE [...]\n"
            "      one run of FILE's base config, a [sweep] table ignored\n"
            "  moehost report DIR\n"
            "      figures of the runs in DIR (and of DIR/capacity.jsonl) into DIR/figures/ with\n"
            "      gnuplot: routing frontier, validation-loss overlay, per-expert load, capacity curves\n"
            "  moehost prepare --out DIR [--tokenizer char|gpt2] [--bpe-dir DIR] [--shard-tokens N] FILE...\n"
            "      tokenize text files into token shards plus vocab.json; gpt2 (byte-level BPE)\n"
            "      reads encoder.json and vocab.bpe from --bpe-dir (scripts/setup_data.sh --gpt2)\n"
            "  moehost bench train --config FILE [--set ...] [--warmup N] [--steps N] [--json]\n"
            "                [--breakdown]\n"
            "      time training steps only (median of N after warm-up), tokens/s, TFLOP/s, MFU;\n"
            "      --breakdown then runs N more steps with every backend op timed and prints ms\n"
            "      and calls per op and step, sorted, against the measured step\n"
            "  moehost bench capacity|topk|dispatch-combine [--device D] [--router R] [--tokens T]\n"
            "                [--hidden d] [--experts 64,128,256] [--k 1,2,4] [--cf 0.9,1.0,1.25]\n"
            "                [--iters N] [--warmup N] [--out FILE.jsonl]\n"
            "      routing microbenchmarks (the seed's experiment B): drop rate, ms, tokens/s and\n"
            "      bw_GiBps_strict against the measured copy bandwidth, one JSON line per point\n"
            "  moehost plugins\n"
            "      list the router plugins found, with their options\n"
            "  moehost config --doc\n"
            "      print the reference of every config key (docs/config.md)\n"
            "  moehost --version | --help\n"
            "\n"
            "Router plugins are found through MOE_PLUGIN_PATH, then beside this program, then in the\n"
            "build and install folders; router.plugin may also be a path to a .so.\n",
            MOE_VERSION);
}

static int fail(const char *msg) {
    fprintf(stderr, "moehost: error: %s\n", msg);
    return 1;
}

/* ---- config from the command line ---- */

/* Arguments shared by the commands that run a config: --config FILE and any
 * number of --set section.key=value. Other arguments are handed to
 * `extra`, which returns how many it consumed (0 = unknown). */
typedef int (*extra_arg_fn)(int argc, char **argv, int i, void *ctx);

typedef struct config_args {
    const char *config;
    const char *sets[MAX_SETS];
    int n_sets;
} config_args;

static int parse_config_args(int argc, char **argv, config_args *ca, extra_arg_fn extra, void *ctx) {
    ca->config = NULL;
    ca->n_sets = 0;
    for (int i = 0; i < argc; ++i) {
        const char *a = argv[i];
        int used;
        if (strcmp(a, "--config") == 0 && i + 1 < argc) ca->config = argv[++i];
        else if (strncmp(a, "--config=", 9) == 0) ca->config = a + 9;
        else if (strcmp(a, "--set") == 0 && i + 1 < argc) {
            if (ca->n_sets == MAX_SETS) return fail("too many --set options");
            ca->sets[ca->n_sets++] = argv[++i];
        } else if ((used = extra(argc, argv, i, ctx)) > 0) i += used - 1;
        else if (used < 0) return 1;
        else {
            char msg[512];
            snprintf(msg, sizeof msg, "unknown argument '%s' (see moehost --help)", a);
            return fail(msg);
        }
    }
    if (!ca->config) return fail("no config given: moehost --config FILE.toml (see configs/quickstart.toml)");
    return 0;
}

static int load_config(const config_args *ca, moe_config *cfg) {
    char err[ERR_CAP];
    if (moe_config_load(cfg, ca->config, ca->sets, ca->n_sets, err, sizeof err) != 0) return fail(err);
    if (moe_config_validate(cfg, err, sizeof err) != 0) return fail(err);
    return 0;
}

static int load_config_args(int argc, char **argv, moe_config *cfg, extra_arg_fn extra, void *ctx) {
    static config_args ca;
    if (parse_config_args(argc, argv, &ca, extra, ctx) != 0) return 1;
    return load_config(&ca, cfg);
}

/* ---- train ---- */

/* A whole number >= min from a command-line word, or -1 after reporting. */
static long long parse_count(const char *flag, const char *word, long long min) {
    char *end = NULL;
    long long v = strtoll(word, &end, 10);
    if (!end || *end != '\0' || end == word || v < min) {
        fprintf(stderr, "moehost: error: %s needs a whole number >= %lld, got '%s'\n", flag, min, word);
        return -1;
    }
    return v;
}

/* Extra-argument handlers return the words consumed, 0 for an unknown
 * argument, or -1 for a known one with a bad value (already reported). */
static int train_arg(int argc, char **argv, int i, void *ctx) {
    moe_train_options *opt = ctx;
    if (strcmp(argv[i], "--resume") == 0) return opt->resume = 1, 1;
    if (strcmp(argv[i], "--quiet") == 0) return opt->quiet = 1, 1;
    if (strcmp(argv[i], "--stop-after") == 0 && i + 1 < argc)
        return (opt->stop_after = parse_count("--stop-after", argv[i + 1], 1)) < 0 ? -1 : 2;
    return 0;
}

/* One run of the config (`moehost train`, and each point of a sweep). */
static int train_one(const config_args *ca, const moe_train_options *opt) {
    static moe_config cfg;
    if (load_config(ca, &cfg) != 0) return 1;
    char err[ERR_CAP];
    if (moe_train_run(&cfg, opt, err, sizeof err) != 0) return fail(err);
    return 0;
}

static int cmd_train(int argc, char **argv) {
    static config_args ca;
    moe_train_options opt = {0, 0, 0};
    if (parse_config_args(argc, argv, &ca, train_arg, &opt) != 0) return 1;
    return train_one(&ca, &opt);
}

/* `moehost --config X`: the sweep of X when it has a [sweep] table, else one run. */
static int cmd_run(int argc, char **argv) {
    static config_args ca;
    moe_train_options opt = {0, 0, 0};
    if (parse_config_args(argc, argv, &ca, train_arg, &opt) != 0) return 1;
    char err[ERR_CAP];
    /* A [bench] table: a routing microbenchmark, then its report. */
    static moe_bench_config bc;
    int bench = moe_bench_config_load(ca.config, ca.sets, ca.n_sets, &bc, err, sizeof err);
    if (bench < 0) return fail(err);
    if (bench) {
        if (moe_bench_config_run(&bc, err, sizeof err) != 0) return fail(err);
        if (!opt.quiet) fprintf(stderr, "results in %s\n", bc.result_file);
        if (moe_report_make(bc.result_dir, err, sizeof err) != 0) return fail(err);
        return 0;
    }
    static moe_sweep sw;
    int has = moe_sweep_load(ca.config, &sw, err, sizeof err);
    if (has < 0) return fail(err);
    /* --set sweep.KEY=... changes the [sweep] table; the others go to every run. */
    static config_args run_args, sweep_args;
    run_args.config = sweep_args.config = ca.config;
    run_args.n_sets = sweep_args.n_sets = 0;
    for (int i = 0; i < ca.n_sets; ++i) {
        const char *s = ca.sets[i];
        while (*s == ' ' || *s == '\t') ++s;
        if (strncmp(s, "sweep.", 6) == 0) sweep_args.sets[sweep_args.n_sets++] = ca.sets[i];
        else run_args.sets[run_args.n_sets++] = ca.sets[i];
    }
    if (has == 0) return train_one(&ca, &opt); /* a --set sweep.* is refused there */
    if (run_args.n_sets > MAX_SETS - (MOE_SWEEP_MAX_AXES + 3)) {
        moe_sweep_free(&sw);
        return fail("too many --set options for a sweep (each run also gets the sweep's own)");
    }
    int rc = 1;
    moe_sweep_plan plan;
    if (opt.resume) {
        fail("--resume: a sweep resumes its interrupted runs by itself; run the same command without --resume");
    } else if (moe_sweep_apply_sets(&sw, sweep_args.sets, sweep_args.n_sets, err, sizeof err) != 0) {
        fail(err);
    } else if (moe_sweep_plan_make(&plan, &sw, ca.config, run_args.sets, run_args.n_sets, 1, err, sizeof err) != 0) {
        fail(err);
    } else {
        moe_sweep_options so = {opt.stop_after, opt.quiet, 1};
        rc = moe_sweep_run(&plan, &so, err, sizeof err);
        if (rc < 0) rc = fail(err);
        moe_sweep_plan_free(&plan);
    }
    moe_sweep_free(&sw);
    return rc;
}

/* ---- report ---- */

static int cmd_report(int argc, char **argv) {
    if (argc != 1 || argv[0][0] == '-')
        return fail("usage: moehost report DIR (an experiment folder, e.g. runs/expA)");
    char err[ERR_CAP];
    if (moe_report_make(argv[0], err, sizeof err) != 0) return fail(err);
    return 0;
}

/* ---- bench ---- */

static int bench_train_arg(int argc, char **argv, int i, void *ctx) {
    moe_bench_train_options *opt = ctx;
    long long v;
    if (strcmp(argv[i], "--warmup") == 0 && i + 1 < argc)
        return (v = parse_count("--warmup", argv[i + 1], 0)) < 0 ? -1 : (opt->warmup = (int)v, 2);
    if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc)
        return (v = parse_count("--steps", argv[i + 1], 1)) < 0 ? -1 : (opt->steps = (int)v, 2);
    if (strcmp(argv[i], "--json") == 0) return opt->json = 1, 1;
    if (strcmp(argv[i], "--breakdown") == 0) return opt->breakdown = 1, 1;
    return 0;
}

/* "64,128,256" into ints / doubles; 0 on success. */
static int parse_int_list(const char *flag, const char *text, int *out, int *n) {
    char buf[512], *save = NULL;
    snprintf(buf, sizeof buf, "%s", text);
    *n = 0;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        long long v = parse_count(flag, tok, 1);
        if (v < 0) return -1;
        if (*n == MOE_BENCH_MAX_GRID || v > 1 << 20) {
            fprintf(stderr, "moehost: error: %s takes at most %d values, each <= 2^20\n", flag, MOE_BENCH_MAX_GRID);
            return -1;
        }
        out[(*n)++] = (int)v;
    }
    return *n ? 0 : (fprintf(stderr, "moehost: error: %s needs a list like 1,2,4\n", flag), -1);
}

static int parse_float_list(const char *flag, const char *text, double *out, int *n) {
    char buf[512], *save = NULL;
    snprintf(buf, sizeof buf, "%s", text);
    *n = 0;
    for (char *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *end = NULL;
        double v = strtod(tok, &end);
        if (!end || *end || !(v > 0.0 && v <= 1024.0) || *n == MOE_BENCH_MAX_GRID) {
            fprintf(stderr, "moehost: error: %s needs up to %d numbers in (0, 1024], got '%s'\n", flag,
                    MOE_BENCH_MAX_GRID, tok);
            return -1;
        }
        out[(*n)++] = v;
    }
    return *n ? 0 : -1;
}

/* bench capacity | topk | dispatch-combine */
static int cmd_bench_routing(const char *what, int argc, char **argv) {
    moe_bench_routing_options o;
    moe_bench_routing_defaults(&o);
    o.what = what;
    if (strcmp(what, "dispatch-combine") == 0) { /* the reference point */
        o.n_experts = 1, o.experts[0] = 128;
        o.n_k = 1, o.ks[0] = 2;
        o.n_cf = 1, o.cfs[0] = 1.25;
    } else if (strcmp(what, "topk") == 0) {
        o.n_cf = 1, o.cfs[0] = 1.0;
    }
    for (int i = 0; i < argc; ++i) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        long long n;
        if (!v) {
            char msg[256];
            snprintf(msg, sizeof msg, "'%s' needs a value (see moehost --help)", a);
            return fail(msg);
        }
        if (strcmp(a, "--device") == 0) o.device = v;
        else if (strcmp(a, "--router") == 0) o.router = v;
        else if (strcmp(a, "--out") == 0) o.out = v;
        else if (strcmp(a, "--tokens") == 0) {
            if ((n = parse_count(a, v, 1)) < 0) return 1;
            o.tokens = n;
        } else if (strcmp(a, "--hidden") == 0) {
            if ((n = parse_count(a, v, 1)) < 0 || n > 1 << 20) return n < 0 ? 1 : fail("--hidden must be <= 2^20");
            o.d = (int)n;
        } else if (strcmp(a, "--iters") == 0) {
            if ((n = parse_count(a, v, 1)) < 0) return 1;
            o.iters = (int)n;
        } else if (strcmp(a, "--warmup") == 0) {
            if ((n = parse_count(a, v, 0)) < 0) return 1;
            o.warmup = (int)n;
        } else if (strcmp(a, "--experts") == 0) {
            if (parse_int_list(a, v, o.experts, &o.n_experts) != 0) return 1;
        } else if (strcmp(a, "--k") == 0) {
            if (parse_int_list(a, v, o.ks, &o.n_k) != 0) return 1;
        } else if (strcmp(a, "--cf") == 0) {
            if (parse_float_list(a, v, o.cfs, &o.n_cf) != 0) return 1;
        } else {
            char msg[256];
            snprintf(msg, sizeof msg, "unknown option '%s' for bench %s (see moehost --help)", a, what);
            return fail(msg);
        }
        ++i;
    }
    char err[ERR_CAP];
    if (moe_bench_routing(&o, err, sizeof err) != 0) return fail(err);
    return 0;
}

static int cmd_bench(int argc, char **argv) {
    if (argc >= 1 && (strcmp(argv[0], "capacity") == 0 || strcmp(argv[0], "topk") == 0 ||
                      strcmp(argv[0], "dispatch-combine") == 0))
        return cmd_bench_routing(argv[0], argc - 1, argv + 1);
    if (argc < 1 || strcmp(argv[0], "train") != 0) {
        char msg[256];
        snprintf(msg, sizeof msg,
                 "unknown benchmark '%s' (available: train, capacity, topk, dispatch-combine)", argc ? argv[0] : "");
        return fail(msg);
    }
    static moe_config cfg;
    moe_bench_train_options opt = {10, 50, 0, 0};
    if (load_config_args(argc - 1, argv + 1, &cfg, bench_train_arg, &opt) != 0) return 1;
    if (opt.warmup < 0 || opt.steps < 1) return fail("bench train needs --warmup >= 0 and --steps >= 1");
    char err[ERR_CAP];
    if (moe_bench_train(&cfg, &opt, err, sizeof err) != 0) return fail(err);
    return 0;
}

/* ---- prepare ---- */

static int cmd_prepare(int argc, char **argv) {
    const char *out = NULL, *tokenizer = "char", *bpe_dir = NULL;
    long long shard_tokens = 0;
    const char **inputs = calloc((size_t)argc + 1, sizeof *inputs);
    int n_inputs = 0;
    for (int i = 0; i < argc; ++i) {
        if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) out = argv[++i];
        else if (strcmp(argv[i], "--tokenizer") == 0 && i + 1 < argc) tokenizer = argv[++i];
        else if (strcmp(argv[i], "--bpe-dir") == 0 && i + 1 < argc) bpe_dir = argv[++i];
        else if (strcmp(argv[i], "--shard-tokens") == 0 && i + 1 < argc) shard_tokens = atoll(argv[++i]);
        else if (argv[i][0] == '-') {
            char msg[512];
            snprintf(msg, sizeof msg, "unknown option '%s' for prepare (see moehost --help)", argv[i]);
            free(inputs);
            return fail(msg);
        } else inputs[n_inputs++] = argv[i];
    }
    int rc = 0;
    char err[ERR_CAP];
    if (!out) rc = fail("prepare needs --out DIR");
    else if (n_inputs == 0) rc = fail("prepare needs at least one text file");
    else if (strcmp(tokenizer, "char") != 0 && strcmp(tokenizer, "gpt2") != 0) {
        snprintf(err, sizeof err, "tokenizer '%s' is not available (available: char, gpt2)", tokenizer);
        rc = fail(err);
    } else if (bpe_dir && strcmp(tokenizer, "gpt2") != 0) {
        rc = fail("--bpe-dir goes with --tokenizer gpt2");
    } else {
        moe_prepare_opts opts = {tokenizer, bpe_dir, shard_tokens};
        if (moe_prepare_with(inputs, n_inputs, out, &opts, err, sizeof err) != 0) rc = fail(err);
        else fprintf(stderr, "prepared %d file(s) into %s\n", n_inputs, out);
    }
    free(inputs);
    return rc;
}

/* ---- plugins ---- */

static const char *type_name(moe_opt_type t) {
    switch (t) {
    case MOE_OPT_BOOL: return "bool";
    case MOE_OPT_INT: return "int";
    case MOE_OPT_FLOAT: return "float";
    case MOE_OPT_STRING: return "string";
    }
    return "?";
}

static void print_plugin(const moe_router_lib *lib) {
    const moe_router_plugin_v1_t *p = lib->api;
    printf("%-14s ABI v%d  cpu:%s cuda:%s  %s\n", p->name, lib->abi_version, p->cpu ? "yes" : "no",
           p->cuda ? "yes" : "no", p->description ? p->description : "");
    printf("  %s\n", lib->path);
    for (int i = 0; i < p->n_options; ++i) {
        const moe_option_spec *o = &p->options[i];
        printf("    %-16s %-6s default %-10s", o->key, type_name(o->type), o->default_value);
        if (o->choices) printf(" one of %s", o->choices);
        if (o->min < o->max) printf(" in [%g, %g]", o->min, o->max);
        printf("  %s\n", o->help ? o->help : "");
    }
}

static int cmd_plugins(void) {
    char dirs[MOE_MAX_SEARCH_DIRS][MOE_PATH_MAX];
    int n = moe_plugin_search_dirs(dirs, MOE_MAX_SEARCH_DIRS), found = 0;
    for (int i = 0; i < n; ++i) {
        DIR *d = opendir(dirs[i]);
        if (!d) continue;
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            size_t len = strlen(e->d_name);
            if (len < 4 || strcmp(e->d_name + len - 3, ".so") != 0) continue;
            char path[MOE_PATH_MAX + 300], err[ERR_CAP];
            snprintf(path, sizeof path, "%.1023s/%.255s", dirs[i], e->d_name);
            moe_router_lib lib;
            if (moe_router_lib_open_file(&lib, path, err, sizeof err) == 0) {
                print_plugin(&lib);
                moe_router_lib_close(&lib);
                found++;
            } else printf("(skipped) %s\n", err);
        }
        closedir(d);
    }
    if (!found) {
        fprintf(stderr, "moehost: no router plugins found; searched:");
        for (int i = 0; i < n; ++i) fprintf(stderr, " %s", dirs[i]);
        fprintf(stderr, "\n");
        return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 1;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0) {
#ifdef MOE_HAVE_CUDA_BACKEND
        printf("moehost %s (router ABI %s; backends: cpu, cuda; %d CUDA device(s) visible)\n", MOE_VERSION,
               MOE_ROUTER_ABI_SUPPORTED, moe_cuda_device_count());
#else
        printf("moehost %s (router ABI %s; backends: cpu)\n", MOE_VERSION, MOE_ROUTER_ABI_SUPPORTED);
#endif
        return 0;
    }
    if (strcmp(cmd, "train") == 0) return cmd_train(argc - 2, argv + 2);
    if (strcmp(cmd, "prepare") == 0) return cmd_prepare(argc - 2, argv + 2);
    if (strcmp(cmd, "plugins") == 0) return cmd_plugins();
    if (strcmp(cmd, "config") == 0) {
        if (argc == 3 && strcmp(argv[2], "--doc") == 0) {
            moe_config_print_doc(stdout);
            return 0;
        }
        return fail("usage: moehost config --doc");
    }
    if (strcmp(cmd, "bench") == 0) return cmd_bench(argc - 2, argv + 2);
    if (strcmp(cmd, "report") == 0) return cmd_report(argc - 2, argv + 2);
    if (cmd[0] == '-') return cmd_run(argc - 1, argv + 1);
    char msg[256];
    snprintf(msg, sizeof msg, "unknown command '%s' (see moehost --help)", cmd);
    return fail(msg);
}
