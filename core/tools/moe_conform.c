/*
 * moe-conform: check a router plugin against the contract of <moe/router.h>.
 *
 *   moe-conform PLUGIN.so [--device cpu|cuda] [--option key=value ...] [--quick]
 *               [--seed N] [--skip CHECK ...] [--timeout SECONDS] [--no-fork]
 *
 * Loads the plugin with the host's own loader (core/runtime/plugin_loader.c),
 * runs the checks of conform_checks.c and prints one row per check: its name,
 * PASS, FAIL or SKIP, and a detail. The exit status is 0 only when no check
 * failed (skips are allowed), 1 when one did, 2 for a usage error.
 *
 * Each group of checks runs in a child process, so a plugin that crashes or
 * hangs is reported as a failed row instead of taking the tool down.
 */
#include <dlfcn.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "runtime/plugin_loader.h"
#include "tools/conform.h"

#ifndef MOE_VERSION
#define MOE_VERSION "dev"
#endif

/* ---- rows ---- */

typedef struct row {
    char status[8];
    char name[64];
    char detail[1200];
} row;

#define MAX_ROWS 256
static row rows[MAX_ROWS];
static int n_rows = 0;
static const cf_config *row_cfg = NULL;

static void add_row(const char *status, const char *name, const char *detail) {
    if (n_rows == MAX_ROWS) return;
    row *r = &rows[n_rows++];
    snprintf(r->name, sizeof r->name, "%s", name);
    if (row_cfg && strcmp(status, "SKIP") != 0 && cf_skipped(row_cfg, name)) {
        snprintf(r->status, sizeof r->status, "SKIP");
        snprintf(r->detail, sizeof r->detail, "skipped with --skip (was %s: %.1100s)", status, detail);
        return;
    }
    snprintf(r->status, sizeof r->status, "%s", status);
    snprintf(r->detail, sizeof r->detail, "%s", detail);
}

static void add_rowf(const char *status, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void add_rowf(const char *status, const char *name, const char *fmt, ...) {
    char detail[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    add_row(status, name, detail);
}

/* ---- usage ---- */

static void usage(FILE *out) {
    fprintf(out,
            "moe-conform %s: check a router plugin against the MoE Routing Bench router ABI\n"
            "\n"
            "usage: moe-conform PLUGIN.so [options]\n"
            "  --device cpu|cuda     run the checks on this table (default cpu); cuda also compares the\n"
            "                        cuda table with the cpu table (skipped without CUDA or a GPU)\n"
            "  --option key=value    a [router] option for every instance (repeatable); the value is\n"
            "                        read as true/false, an integer, a number, else a string (quote it,\n"
            "                        '\"1\"', to force a string)\n"
            "  --quick               fewer random shapes (for CI)\n"
            "  --seed N              seed of the random shapes and inputs (default 1)\n"
            "  --skip CHECK          report CHECK as SKIP (e.g. backward.gradcheck for a straight-through\n"
            "                        estimator whose backward is deliberately not forward's gradient)\n"
            "  --timeout SECONDS     limit per group of checks (default 600)\n"
            "  --no-fork             run every check in this process (for a debugger)\n"
            "\n"
            "Checks: abi.* (symbol, version, struct size, entry points, the host's loader),\n"
            "create.* (valid shapes, info, params/buffers specs, top_k > num_experts refused),\n"
            "options.* (spec table, defaults, unknown key, wrong type, out-of-range value),\n"
            "forward.* (indices, weights, unique experts, declared weight sums, owned capacity,\n"
            "route_logits) over random shapes T 0..512, E 1..256, K 1..8, backward.outputs,\n"
            "memory.* (workspace guard, output guards, read-only inputs), determinism.*,\n"
            "backward.gradcheck (central differences), bad_input.* (NaN, Inf, extreme, T = 0),\n"
            "cuda.* (parity with the cpu table). Exit status 0 when nothing failed.\n",
            MOE_VERSION);
}

/* ---- option values ---- */

static char opt_keys[CF_MAX_OPTS][128];
static char opt_strs[CF_MAX_OPTS][512];

static int parse_option(const char *text, moe_option *o, int slot) {
    const char *eq = strchr(text, '=');
    if (!eq || eq == text || (size_t)(eq - text) >= sizeof opt_keys[0]) return -1;
    memcpy(opt_keys[slot], text, (size_t)(eq - text));
    opt_keys[slot][eq - text] = '\0';
    const char *v = eq + 1;
    memset(o, 0, sizeof *o);
    o->key = opt_keys[slot];
    size_t n = strlen(v);
    char *end = NULL;
    if (strcmp(v, "true") == 0 || strcmp(v, "false") == 0) {
        o->type = MOE_OPT_BOOL;
        o->i = v[0] == 't';
        return 0;
    }
    if (n > 0) {
        long long i = strtoll(v, &end, 10);
        if (*end == '\0') {
            o->type = MOE_OPT_INT;
            o->i = i;
            o->f = (double)i;
            return 0;
        }
        double f = strtod(v, &end);
        if (*end == '\0') {
            o->type = MOE_OPT_FLOAT;
            o->f = f;
            return 0;
        }
    }
    if (n >= 2 && (v[0] == '"' || v[0] == '\'') && v[n - 1] == v[0]) {
        v++;
        n -= 2;
    }
    if (n >= sizeof opt_strs[0]) return -1;
    memcpy(opt_strs[slot], v, n);
    opt_strs[slot][n] = '\0';
    o->type = MOE_OPT_STRING;
    o->s = opt_strs[slot];
    return 0;
}

/* ---- the ABI, checked before anything is called ---- */

#define PROBE_MAX_VERSION 16

static int check_abi(const char *path, moe_router_lib *lib, void **handle) {
    static const char *const later[] = {"abi.version", "abi.struct_size", "abi.entry_points", "abi.loader"};
    char err[2048];
    *handle = NULL;
    if (access(path, R_OK) != 0) {
        add_rowf("FAIL", "abi.symbol", "'%s' does not exist or is not readable", path);
        for (int i = 0; i < 4; ++i) add_row("SKIP", later[i], "not run: no plugin file");
        return -1;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        add_rowf("FAIL", "abi.symbol", "cannot load '%s': %s", path, dlerror());
        for (int i = 0; i < 4; ++i) add_row("SKIP", later[i], "not run: the library does not load");
        return -1;
    }
    *handle = h;
    moe_router_plugin_v1_fn fn = (moe_router_plugin_v1_fn)dlsym(h, MOE_ROUTER_SYMBOL_V1);
    int rc = 0;
    if (!fn) {
        int found = 0;
        for (int v = PROBE_MAX_VERSION; v >= 2 && !found; --v) {
            char sym[64];
            snprintf(sym, sizeof sym, "moe_router_plugin_v%d", v);
            if (dlsym(h, sym)) {
                add_rowf("FAIL", "abi.symbol",
                         "exports %s (router ABI version %d) but not %s: this SDK and host support router ABI "
                         "version %s; rebuild the plugin against this SDK",
                         sym, v, MOE_ROUTER_SYMBOL_V1, MOE_ROUTER_ABI_SUPPORTED);
                found = 1;
            }
        }
        if (!found)
            add_rowf("FAIL", "abi.symbol",
                     "missing symbol: exports no %s (a router plugin defines `MOE_EXPORT const struct "
                     "moe_router_plugin_v1 *moe_router_plugin_v1(void)`)",
                     MOE_ROUTER_SYMBOL_V1);
        for (int i = 0; i < 3; ++i) add_row("SKIP", later[i], "not run: no router symbol");
        rc = -1;
    } else {
        add_rowf("PASS", "abi.symbol", "%s exported", MOE_ROUTER_SYMBOL_V1);
        const moe_router_plugin_v1_t *api = fn();
        if (!api) {
            add_rowf("FAIL", "abi.version", "%s() returned NULL", MOE_ROUTER_SYMBOL_V1);
            add_row("SKIP", "abi.struct_size", "not run: no table");
            add_row("SKIP", "abi.entry_points", "not run: no table");
            rc = -1;
        } else {
            if (api->abi_version == MOE_ROUTER_ABI_VERSION) {
                add_rowf("PASS", "abi.version", "router ABI version %u", api->abi_version);
            } else {
                add_rowf("FAIL", "abi.version",
                         "wrong ABI version: the table under %s says abi_version = %u; it must be %d "
                         "(MOE_ROUTER_ABI_VERSION); a version-%u table needs its own symbol",
                         MOE_ROUTER_SYMBOL_V1, api->abi_version, MOE_ROUTER_ABI_VERSION, api->abi_version);
                rc = -1;
            }
            if (api->struct_size >= sizeof(moe_router_plugin_v1_t)) {
                add_rowf("PASS", "abi.struct_size", "%u bytes (this SDK: %zu)", api->struct_size,
                         sizeof(moe_router_plugin_v1_t));
            } else {
                add_rowf("FAIL", "abi.struct_size", "struct_size = %u, smaller than the %zu of router ABI version 1",
                         api->struct_size, sizeof(moe_router_plugin_v1_t));
                rc = -1;
            }
            if (rc != 0) {
                add_row("SKIP", "abi.entry_points", "not run: the table's layout cannot be trusted");
            } else {
                char bad[1024] = "";
                size_t u = 0;
#define MISSING(cond, text)                                                                              \
    do {                                                                                                 \
        if ((cond) && u < sizeof bad) u += (size_t)snprintf(bad + u, sizeof bad - u, "%s%s", u ? "; " : "", text); \
    } while (0)
                MISSING(!api->name || !api->name[0], "name is NULL or empty");
                MISSING(api->name && strlen(api->name) > 63, "name is longer than 63 characters");
                MISSING(!api->description, "description is NULL");
                MISSING(!api->create, "create is NULL");
                MISSING(!api->destroy, "destroy is NULL");
                MISSING(!api->query, "query is NULL");
                MISSING(!api->cpu && !api->cuda, "both cpu and cuda tables are NULL");
                MISSING(api->cpu && !api->cpu->forward, "cpu->forward is NULL");
                MISSING(api->cuda && !api->cuda->forward, "cuda->forward is NULL");
                MISSING(api->n_options < 0 || api->n_options > 1024, "n_options is outside 0..1024");
                MISSING(api->n_options > 0 && !api->options, "n_options > 0 but options is NULL");
#undef MISSING
                if (bad[0]) {
                    add_row("FAIL", "abi.entry_points", bad);
                    rc = -1;
                } else {
                    add_rowf("PASS", "abi.entry_points", "create, destroy, query; tables:%s%s; %d option%s",
                             api->cpu ? " cpu" : "", api->cuda ? " cuda" : "", api->n_options,
                             api->n_options == 1 ? "" : "s");
                }
            }
        }
    }
    /* The host's own loader must agree. */
    if (moe_router_lib_open_file(lib, path, err, sizeof err) != 0) {
        add_row("FAIL", "abi.loader", err);
        return -1;
    }
    if (rc != 0) {
        add_row("FAIL", "abi.loader", "the host's loader accepted a plugin that failed the checks above");
        return -1;
    }
    add_row("PASS", "abi.loader", "the host's loader (moe_router_lib_open_file) accepts it");
    return 0;
}

/* ---- running one group in a child ---- */

static void take_line(char *line, const char *group, char *note, size_t note_cap) {
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
    if (strncmp(line, "NOTE\t", 5) == 0) {
        snprintf(note, note_cap, "%s", line + 5);
        return;
    }
    if (strncmp(line, "ROW\t", 4) != 0) return;
    char *status = line + 4;
    char *name = strchr(status, '\t');
    if (!name) return;
    *name++ = '\0';
    char *detail = strchr(name, '\t');
    if (detail) *detail++ = '\0';
    (void)group;
    add_row(status, name, detail ? detail : "");
}

static void run_group(const cf_config *cfg, const cf_group *g, int no_fork, int timeout) {
    char note[512] = "starting";
    char line[4096];
    if (no_fork) {
        FILE *tmp = tmpfile();
        if (!tmp) {
            add_rowf("FAIL", g->name, "cannot create a temporary file for the results");
            return;
        }
        cf_report_to(tmp);
        g->run(cfg);
        fflush(tmp);
        rewind(tmp);
        while (fgets(line, sizeof line, tmp)) take_line(line, g->name, note, sizeof note);
        fclose(tmp);
        cf_report_to(NULL);
        return;
    }
    int fd[2];
    if (pipe(fd) != 0) {
        add_rowf("FAIL", g->name, "cannot create a pipe for the check process");
        return;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        close(fd[0]);
        close(fd[1]);
        add_rowf("FAIL", g->name, "cannot start a check process");
        return;
    }
    if (pid == 0) {
        close(fd[0]);
        FILE *out = fdopen(fd[1], "w");
        if (!out) _exit(3);
        cf_report_to(out);
        alarm((unsigned)timeout);
        g->run(cfg);
        fclose(out);
        exit(0); /* not _exit: sanitizers report leaks at exit */
    }
    close(fd[1]);
    FILE *in = fdopen(fd[0], "r");
    if (in) {
        while (fgets(line, sizeof line, in)) take_line(line, g->name, note, sizeof note);
        fclose(in);
    } else {
        close(fd[0]);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
    }
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        if (sig == SIGALRM)
            add_rowf("FAIL", g->name, "did not finish within %d s; last step: %s", timeout, note);
        else
            add_rowf("FAIL", g->name, "the plugin crashed: signal %d (%s) during: %s", sig, strsignal(sig), note);
    } else if (WIFEXITED(status) && WEXITSTATUS(status) != 0) {
        add_rowf("FAIL", g->name,
                 "the check process exited with status %d during: %s (a sanitizer report or an exit() in the "
                 "plugin; see the messages above)",
                 WEXITSTATUS(status), note);
    }
}

/* ---- the table ---- */

static int print_table(const cf_config *cfg, const moe_router_lib *lib) {
    int pass = 0, fail = 0, skip = 0;
    size_t w = 5;
    for (int i = 0; i < n_rows; ++i) {
        size_t n = strlen(rows[i].name);
        if (n > w) w = n;
    }
    printf("moe-conform %s: %s\n", MOE_VERSION, cfg->path);
    if (lib && lib->api)
        printf("router '%s' (router ABI v%d): %s\n", lib->api->name, lib->abi_version,
               lib->api->description ? lib->api->description : "");
    if (cfg->n_opts) {
        printf("options:");
        for (int i = 0; i < cfg->n_opts; ++i) {
            const moe_option *o = &cfg->opts[i];
            switch (o->type) {
            case MOE_OPT_BOOL: printf(" %s=%s", o->key, o->i ? "true" : "false"); break;
            case MOE_OPT_INT: printf(" %s=%lld", o->key, (long long)o->i); break;
            case MOE_OPT_FLOAT: printf(" %s=%g", o->key, o->f); break;
            case MOE_OPT_STRING: printf(" %s=\"%s\"", o->key, o->s); break;
            }
        }
        printf("\n");
    }
    printf("\n%-*s  %-6s  %s\n", (int)w, "check", "result", "detail");
    for (size_t i = 0; i < w; ++i) putchar('-');
    printf("  ------  ------\n");
    for (int i = 0; i < n_rows; ++i) {
        printf("%-*s  %-6s  %s\n", (int)w, rows[i].name, rows[i].status, rows[i].detail);
        if (strcmp(rows[i].status, "PASS") == 0) ++pass;
        else if (strcmp(rows[i].status, "FAIL") == 0) ++fail;
        else ++skip;
    }
    printf("\n%d checks: %d passed, %d failed, %d skipped\n", n_rows, pass, fail, skip);
    printf("moe-conform: %s\n", fail ? "FAIL" : "PASS");
    return fail ? 1 : 0;
}

int main(int argc, char **argv) {
    static cf_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.device = MOE_DEVICE_CPU;
    cfg.seed = 1;
    int no_fork = 0, timeout = 600;
    for (int i = 1; i < argc; ++i) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--version") == 0) {
            printf("moe-conform %s (router ABI %s)\n", MOE_VERSION, MOE_ROUTER_ABI_SUPPORTED);
            return 0;
        } else if (strcmp(a, "--device") == 0 && i + 1 < argc) {
            const char *d = argv[++i];
            if (strcmp(d, "cpu") == 0) cfg.device = MOE_DEVICE_CPU;
            else if (strcmp(d, "cuda") == 0) cfg.device = MOE_DEVICE_CUDA;
            else {
                fprintf(stderr, "moe-conform: --device must be cpu or cuda, not '%s'\n", d);
                return 2;
            }
        } else if ((strcmp(a, "--option") == 0 || strcmp(a, "-o") == 0) && i + 1 < argc) {
            if (cfg.n_opts == CF_MAX_OPTS || parse_option(argv[++i], &cfg.opts[cfg.n_opts], cfg.n_opts) != 0) {
                fprintf(stderr, "moe-conform: --option needs key=value (at most %d of them), got '%s'\n", CF_MAX_OPTS,
                        argv[i]);
                return 2;
            }
            cfg.n_opts++;
        } else if (strcmp(a, "--quick") == 0) {
            cfg.quick = 1;
        } else if (strcmp(a, "--seed") == 0 && i + 1 < argc) {
            cfg.seed = strtoull(argv[++i], NULL, 10);
        } else if (strcmp(a, "--skip") == 0 && i + 1 < argc) {
            if (cfg.n_skip == CF_MAX_SKIP) {
                fprintf(stderr, "moe-conform: at most %d --skip\n", CF_MAX_SKIP);
                return 2;
            }
            cfg.skip[cfg.n_skip++] = argv[++i];
        } else if (strcmp(a, "--timeout") == 0 && i + 1 < argc) {
            timeout = atoi(argv[++i]);
            if (timeout < 1) timeout = 1;
        } else if (strcmp(a, "--no-fork") == 0) {
            no_fork = 1;
        } else if (a[0] == '-') {
            fprintf(stderr, "moe-conform: unknown argument '%s' (see --help)\n", a);
            return 2;
        } else if (!cfg.path) {
            cfg.path = a;
        } else {
            fprintf(stderr, "moe-conform: one plugin at a time ('%s' and '%s')\n", cfg.path, a);
            return 2;
        }
    }
    if (!cfg.path) {
        usage(stderr);
        return 2;
    }
    row_cfg = &cfg;
    moe_router_lib lib;
    memset(&lib, 0, sizeof lib);
    void *handle = NULL;
    int rc;
    if (check_abi(cfg.path, &lib, &handle) == 0) {
        cfg.api = lib.api;
        for (int i = 0; i < cf_n_groups; ++i) run_group(&cfg, &cf_groups[i], no_fork, timeout);
        rc = print_table(&cfg, &lib);
    } else {
        add_row("SKIP", "(other checks)", "not run: the plugin does not pass the ABI checks");
        rc = print_table(&cfg, NULL);
    }
    if (lib.handle) moe_router_lib_close(&lib);
    if (handle) dlclose(handle);
    return rc;
}
