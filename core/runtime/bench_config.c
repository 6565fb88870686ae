#include "runtime/bench_config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/fsutil.h"
#include "runtime/toml_reader.h"

#define BENCH_TABLE "bench"

static const char *const bench_keys = "kind, name, out_dir, device, router, tokens, hidden, experts, k, "
                                      "capacity_factors, iters, warmup, seed";

/* Apply one key = value of [bench]. `where` names it in messages. */
static int apply(moe_bench_config *bc, const moe_toml_entry *e, const char *where, char *err, size_t errcap) {
    const char *k = e->key;
    const moe_toml_value *v = &e->value;
    moe_bench_routing_options *o = &bc->opt;
    struct { const char *key; char *dst; size_t cap; const char *choices; } strs[] = {
        {"kind", bc->kind, sizeof bc->kind, "capacity|topk|dispatch-combine"},
        {"name", bc->name, sizeof bc->name, NULL},
        {"out_dir", bc->out_dir, sizeof bc->out_dir, NULL},
        {"device", bc->device, sizeof bc->device, "auto|cpu|cuda"},
        {"router", bc->router, sizeof bc->router, NULL},
    };
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; ++i) {
        if (strcmp(k, strs[i].key) != 0) continue;
        if (v->type != MOE_TOML_STRING || !*v->s) {
            snprintf(err, errcap, "%s: bench.%s must be a non-empty string", where, k);
            return -1;
        }
        if (strs[i].choices) {
            char pat[64];
            snprintf(pat, sizeof pat, "|%s|", strs[i].choices);
            char word[80];
            snprintf(word, sizeof word, "|%s|", v->s);
            if (!strstr(pat, word)) {
                snprintf(err, errcap, "%s: bench.%s = \"%s\" is not one of %s", where, k, v->s, strs[i].choices);
                return -1;
            }
        }
        if (strlen(v->s) >= strs[i].cap) {
            snprintf(err, errcap, "%s: bench.%s is too long", where, k);
            return -1;
        }
        snprintf(strs[i].dst, strs[i].cap, "%s", v->s);
        return 0;
    }
    struct { const char *key; long long *dst64; int *dst; long long min, max; } ints[] = {
        {"tokens", &o->tokens, NULL, 1, 1LL << 26},
        {"hidden", NULL, &o->d, 1, 1 << 20},
        {"iters", NULL, &o->iters, 1, 100000},
        {"warmup", NULL, &o->warmup, 0, 100000},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; ++i) {
        if (strcmp(k, ints[i].key) != 0) continue;
        if (v->type != MOE_TOML_INT || v->i < ints[i].min || v->i > ints[i].max) {
            snprintf(err, errcap, "%s: bench.%s must be an integer in [%lld, %lld]", where, k, ints[i].min,
                     ints[i].max);
            return -1;
        }
        if (ints[i].dst64) *ints[i].dst64 = v->i;
        else *ints[i].dst = (int)v->i;
        return 0;
    }
    if (strcmp(k, "seed") == 0) {
        if (v->type != MOE_TOML_INT || v->i < 0) {
            snprintf(err, errcap, "%s: bench.seed must be an integer >= 0", where);
            return -1;
        }
        o->seed = (unsigned long long)v->i;
        return 0;
    }
    int is_cf = strcmp(k, "capacity_factors") == 0;
    if (strcmp(k, "experts") == 0 || strcmp(k, "k") == 0 || is_cf) {
        if (v->type != MOE_TOML_ARRAY || v->n_items < 1 || v->n_items > MOE_BENCH_MAX_GRID) {
            snprintf(err, errcap, "%s: bench.%s must be a list of 1 to %d numbers", where, k, MOE_BENCH_MAX_GRID);
            return -1;
        }
        for (int i = 0; i < v->n_items; ++i) {
            const moe_toml_value *it = &v->items[i];
            if (is_cf) {
                double f = it->type == MOE_TOML_INT ? (double)it->i : it->type == MOE_TOML_FLOAT ? it->f : -1.0;
                if (!(f > 0.0 && f <= 1024.0)) {
                    snprintf(err, errcap, "%s: bench.capacity_factors[%d] must be a number in (0, 1024]", where, i);
                    return -1;
                }
                o->cfs[i] = f;
            } else {
                if (it->type != MOE_TOML_INT || it->i < 1 || it->i > 4096) {
                    snprintf(err, errcap, "%s: bench.%s[%d] must be an integer in [1, 4096]", where, k, i);
                    return -1;
                }
                (strcmp(k, "k") == 0 ? o->ks : o->experts)[i] = (int)it->i;
            }
        }
        if (is_cf) o->n_cf = v->n_items;
        else if (strcmp(k, "k") == 0) o->n_k = v->n_items;
        else o->n_experts = v->n_items;
        return 0;
    }
    snprintf(err, errcap, "%s: unknown key bench.%s; [bench] takes: %s", where, k, bench_keys);
    return -1;
}

int moe_bench_config_load(const char *path, const char *const *sets, int n_sets, moe_bench_config *bc, char *err,
                          size_t errcap) {
    moe_toml_doc doc;
    /* A file that does not parse is no benchmark config; the sweep and run
     * loaders report its error with their own hints. */
    if (moe_toml_parse_file(path, &doc, err, errcap) != 0) return 0;
    int found = 0, rc = 0;
    for (int t = 0; t < doc.n_tables; ++t) found |= strcmp(doc.tables[t].name, BENCH_TABLE) == 0;
    if (!found) {
        moe_toml_doc_free(&doc);
        return 0;
    }
    memset(bc, 0, sizeof *bc);
    moe_bench_routing_defaults(&bc->opt);
    snprintf(bc->kind, sizeof bc->kind, "capacity");
    snprintf(bc->device, sizeof bc->device, "auto");
    snprintf(bc->router, sizeof bc->router, "softk");
    snprintf(bc->name, sizeof bc->name, "bench");
    snprintf(bc->out_dir, sizeof bc->out_dir, "runs");
    for (int i = 0; i < doc.n_entries && rc == 0; ++i) {
        const moe_toml_entry *e = &doc.entries[i];
        char where[1200];
        snprintf(where, sizeof where, "%s:%d", path, e->line);
        if (strcmp(e->table, BENCH_TABLE) != 0) {
            snprintf(err, errcap, "%s: [%s] has no place in a benchmark config (it holds [bench] only)", where,
                     e->table);
            rc = -1;
        } else rc = apply(bc, e, where, err, errcap);
    }
    moe_toml_doc_free(&doc);
    /* --set bench.KEY=VALUE: parse "KEY = VALUE" as TOML. */
    for (int i = 0; i < n_sets && rc == 0; ++i) {
        const char *s = sets[i], *eq = strchr(s, '=');
        char where[300], text[1200];
        snprintf(where, sizeof where, "--set %.200s", s);
        if (strncmp(s, "bench.", 6) != 0 || !eq) {
            snprintf(err, errcap, "%s: a benchmark config takes only --set bench.KEY=VALUE", where);
            return -1;
        }
        snprintf(text, sizeof text, "[bench]\n%.*s = %s\n", (int)(eq - s - 6), s + 6, eq + 1);
        if (moe_toml_parse_string(text, where, &doc, err, errcap) != 0) return -1;
        for (int j = 0; j < doc.n_entries && rc == 0; ++j) rc = apply(bc, &doc.entries[j], where, err, errcap);
        moe_toml_doc_free(&doc);
    }
    if (rc) return -1;
    snprintf(bc->result_dir, sizeof bc->result_dir, "%s/%s", bc->out_dir, bc->name);
    snprintf(bc->result_file, sizeof bc->result_file, "%s/%s.jsonl", bc->result_dir, bc->kind);
    bc->opt.what = bc->kind;
    bc->opt.device = bc->device;
    bc->opt.router = bc->router;
    return 1;
}

int moe_bench_config_run(moe_bench_config *bc, char *err, size_t errcap) {
    if (moe_file_exists(bc->result_file)) {
        snprintf(err, errcap,
                 "'%s' already holds a benchmark result; move it away or choose another bench.name "
                 "(--set bench.name=...)",
                 bc->result_file);
        return -1;
    }
    if (moe_mkdirs(bc->result_dir, err, errcap) != 0) return -1;
    char tmp[700];
    snprintf(tmp, sizeof tmp, "%s.tmp", bc->result_file);
    unlink(tmp);
    bc->opt.out = tmp;
    if (moe_bench_routing(&bc->opt, err, errcap) != 0) {
        unlink(tmp);
        return -1;
    }
    if (rename(tmp, bc->result_file) != 0) {
        snprintf(err, errcap, "cannot move '%s' into place", tmp);
        return -1;
    }
    return 0;
}
