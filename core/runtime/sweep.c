/*
 * Sweeps (sweep.h): reading [sweep], expanding and checking the grid,
 * running the points as child processes, and the summaries.
 */
#include "runtime/sweep.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "moe/router_util.h"
#include "runtime/config_schema.h"
#include "runtime/fsutil.h"
#include "runtime/plugin_loader.h"
#include "runtime/report.h"
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

static void make_short_names(moe_sweep *sw);

static const char *const reserved_keys[] = { "seeds", "name", "parallel", "csv" };
#define N_RESERVED ((int)(sizeof reserved_keys / sizeof reserved_keys[0]))

/* ============================ reading [sweep] ============================ */

static void describe(const moe_toml_value *v, char *buf, size_t cap) {
    char text[MOE_CFG_QUOTED_CAP];
    switch (v->type) {
    case MOE_TOML_BOOL: snprintf(buf, cap, "%s", v->i ? "true" : "false"); return;
    case MOE_TOML_INT: snprintf(buf, cap, "%lld", (long long)v->i); return;
    case MOE_TOML_FLOAT: moe_cfg_format_float(v->f, buf, cap); return;
    case MOE_TOML_STRING:
        moe_cfg_quote(v->s, text, sizeof text);
        snprintf(buf, cap, "%s", text);
        return;
    case MOE_TOML_ARRAY: snprintf(buf, cap, "a list"); return;
    }
    snprintf(buf, cap, "?");
}

static char *dup_text(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static int is_plain_folder_name(const char *name) {
    return name[0] != '\0' && !strchr(name, '/') && strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

/* Where an axis was written: "FILE:LINE: [sweep]", or "--set sweep.KEY:". */
static void axis_where(const moe_sweep *sw, const moe_sweep_axis *ax, char *buf, size_t cap) {
    if (ax->line > 0) snprintf(buf, cap, "%s:%d: [sweep]", sw->source, ax->line);
    else snprintf(buf, cap, "--set sweep.%s:", ax->key);
}

/* The same, in parentheses after a message: "(FILE:LINE)" or "(--set sweep.KEY)". */
static void source_note(const moe_sweep *sw, const char *key, int line, char *buf, size_t cap) {
    if (line > 0) snprintf(buf, cap, "%s:%d", sw->source, line);
    else snprintf(buf, cap, "--set sweep.%s", key);
}

/* An unknown key without a dot: a typo of a reserved key, or a config key
 * written without its section and quotes. */
static int unknown_reserved(const char *where, const char *key, char *err, size_t errcap) {
    const char *best = NULL;
    int best_d = 3;
    for (int i = 0; i < N_RESERVED; ++i) {
        int d = moe_cfg_edit_distance(key, reserved_keys[i]);
        if (d < best_d) {
            best = reserved_keys[i];
            best_d = d;
        }
    }
    if (best)
        return fail(err, errcap,
                    "%sunknown key '%s' in [sweep]; did you mean '%s'? [sweep] takes seeds, name, parallel, csv "
                    "and grid axes written as quoted config keys, e.g. \"moe.capacity_factor\" = [1.0, 1.25]",
                    where, key, best);
    for (int i = 0; i < moe_cfg_n_keys; ++i)
        if (strcmp(moe_cfg_keys[i].key, key) == 0)
            return fail(err, errcap,
                        "%sunknown key '%s' in [sweep]; to sweep over %s.%s write the axis as a quoted "
                        "section.key: \"%s.%s\" = [...]",
                        where, key, moe_cfg_keys[i].section, key, moe_cfg_keys[i].section, key);
    return fail(err, errcap,
                "%sunknown key '%s' in [sweep]; [sweep] takes seeds, name, parallel, csv and grid axes written "
                "as quoted config keys, e.g. \"moe.capacity_factor\" = [1.0, 1.25]",
                where, key);
}

static int read_seeds(moe_sweep *sw, const moe_toml_entry *e, const char *where, char *err, size_t errcap) {
    const moe_toml_value *v = &e->value;
    char got[MOE_CFG_QUOTED_CAP];
    if (v->type != MOE_TOML_ARRAY) {
        describe(v, got, sizeof got);
        return fail(err, errcap, "%sseeds = %s is not a list; write seeds = [42, 43, 44]", where, got);
    }
    if (v->n_items == 0)
        return fail(err, errcap, "%sseeds is an empty list; list at least one seed, or remove the key to use "
                                 "run.seed",
                    where);
    sw->seeds = calloc((size_t)v->n_items, sizeof *sw->seeds);
    if (!sw->seeds) return fail(err, errcap, "%sout of memory", where);
    for (int i = 0; i < v->n_items; ++i) {
        const moe_toml_value *it = &v->items[i];
        if (it->type != MOE_TOML_INT || it->i < 0) {
            describe(it, got, sizeof got);
            return fail(err, errcap, "%sseeds: item %d (%s) is not a whole number >= 0", where, i + 1, got);
        }
        for (int j = 0; j < i; ++j)
            if (sw->seeds[j] == it->i)
                return fail(err, errcap, "%sseeds lists %lld twice; each seed once", where, (long long)it->i);
        sw->seeds[i] = it->i;
    }
    sw->n_seeds = v->n_items;
    sw->seeds_line = e->line;
    return 0;
}

static int read_reserved(moe_sweep *sw, const moe_toml_entry *e, const char *where, char *err, size_t errcap) {
    const moe_toml_value *v = &e->value;
    char got[MOE_CFG_QUOTED_CAP];
    describe(v, got, sizeof got);
    if (strcmp(e->key, "seeds") == 0) return read_seeds(sw, e, where, err, errcap);
    if (strcmp(e->key, "name") == 0) {
        if (v->type != MOE_TOML_STRING || !is_plain_folder_name(v->s) || strlen(v->s) >= sizeof sw->name)
            return fail(err, errcap,
                        "%sname = %s must be a plain folder name (a string, not empty, no '/', at most %zu "
                        "bytes); the runs go to <run.out_dir>/<name>/",
                        where, got, sizeof sw->name - 1);
        snprintf(sw->name, sizeof sw->name, "%s", v->s);
        sw->name_line = e->line;
        return 0;
    }
    if (strcmp(e->key, "parallel") == 0) {
        if (v->type != MOE_TOML_INT || v->i < 1 || v->i > 256)
            return fail(err, errcap, "%sparallel = %s must be a whole number in [1, 256] (runs at once)", where,
                        got);
        sw->parallel = (int)v->i;
        return 0;
    }
    /* csv */
    if (v->type != MOE_TOML_STRING || (strcmp(v->s, "standard") != 0 && strcmp(v->s, "noise") != 0))
        return fail(err, errcap, "%scsv = %s is not one of: \"standard\", \"noise\"", where, got);
    snprintf(sw->csv, sizeof sw->csv, "%s", v->s);
    return 0;
}

static int read_axis(moe_sweep *sw, const moe_toml_entry *e, const char *where, char *err, size_t errcap) {
    const char *key = e->key;
    const moe_toml_value *v = &e->value;
    const char *dot = strchr(key, '.');
    char got[MOE_CFG_QUOTED_CAP];
    if (strlen(key) >= MOE_SWEEP_KEY)
        return fail(err, errcap, "%saxis \"%.60s...\": the key is too long", where, key);
    if (dot == key || dot[1] == '\0' || strchr(dot + 1, '.'))
        return fail(err, errcap,
                    "%saxis \"%s\" does not name a config key; write it as \"section.key\", e.g. "
                    "\"moe.capacity_factor\" = [1.0, 1.25]",
                    where, key);
    if (strncmp(key, "sweep.", 6) == 0)
        return fail(err, errcap, "%saxis \"%s\": [sweep] itself cannot be swept", where, key);
    if (strcmp(key, "run.seed") == 0)
        return fail(err, errcap, "%saxis \"run.seed\": list the seeds as seeds = [...] instead", where);
    if (strcmp(key, "run.name") == 0 || strcmp(key, "run.out_dir") == 0)
        return fail(err, errcap,
                    "%saxis \"%s\": the sweep sets run.name and run.out_dir of every run (<run.out_dir>/<name>/"
                    "<point>); name the experiment folder with name = \"...\"",
                    where, key);
    if (v->type != MOE_TOML_ARRAY) {
        describe(v, got, sizeof got);
        return fail(err, errcap, "%saxis \"%s\" = %s is not a list; a grid axis lists its values: \"%s\" = [%s]",
                    where, key, got, key, got);
    }
    if (v->n_items == 0)
        return fail(err, errcap, "%saxis \"%s\" is an empty list; give it at least one value (or remove it)",
                    where, key);
    if (sw->n_axes == MOE_SWEEP_MAX_AXES)
        return fail(err, errcap, "%saxis \"%s\": too many axes; at most %d", where, key, MOE_SWEEP_MAX_AXES);
    moe_sweep_axis *a = &sw->axes[sw->n_axes++];
    snprintf(a->key, sizeof a->key, "%s", key);
    a->line = e->line;
    a->texts = calloc((size_t)v->n_items, sizeof *a->texts);
    a->labels = calloc((size_t)v->n_items, sizeof *a->labels);
    a->is_string = calloc((size_t)v->n_items, sizeof *a->is_string);
    if (!a->texts || !a->labels || !a->is_string) return fail(err, errcap, "%sout of memory", where);
    a->n_values = v->n_items;
    for (int i = 0; i < v->n_items; ++i) {
        const moe_toml_value *it = &v->items[i];
        if (it->type == MOE_TOML_STRING && strlen(it->s) >= MOE_CFG_STR)
            return fail(err, errcap, "%saxis \"%s\": item %d is %zu bytes long; at most %d fit", where, key, i + 1,
                        strlen(it->s), MOE_CFG_STR - 1);
        describe(it, got, sizeof got);
        a->texts[i] = dup_text(got);
        a->labels[i] = dup_text(it->type == MOE_TOML_STRING ? it->s : got);
        a->is_string[i] = it->type == MOE_TOML_STRING;
        if (!a->texts[i] || !a->labels[i]) return fail(err, errcap, "%sout of memory", where);
        for (int j = 0; j < i; ++j)
            if (strcmp(a->texts[j], a->texts[i]) == 0)
                return fail(err, errcap, "%saxis \"%s\" lists %s twice; each value once", where, key, got);
    }
    return 0;
}

int moe_sweep_load(const char *path, moe_sweep *sw, char *err, size_t errcap) {
    memset(sw, 0, sizeof *sw);
    moe_toml_doc doc;
    if (moe_toml_parse_file(path, &doc, err, errcap) != 0) {
        if (strstr(err, "nested table [sweep.")) {
            size_t used = strlen(err);
            snprintf(err + used, errcap - used,
                     "; in [sweep], write a grid axis as a quoted key: \"router.plugin\" = [\"top1\", \"softk\"]");
        }
        return -1;
    }
    int found = 0;
    for (int t = 0; t < doc.n_tables; ++t)
        if (strcmp(doc.tables[t].name, MOE_SWEEP_SECTION) == 0) {
            found = 1;
            sw->line = doc.tables[t].line;
        }
    for (int i = 0; i < doc.n_entries && !found; ++i)
        if (strcmp(doc.entries[i].table, MOE_SWEEP_SECTION) == 0) {
            found = 1;
            sw->line = doc.entries[i].line;
        }
    if (!found) {
        moe_toml_doc_free(&doc);
        return 0;
    }
    if (strlen(path) >= sizeof sw->source) {
        moe_toml_doc_free(&doc);
        return fail(err, errcap, "config path '%.60s...' is too long", path);
    }
    snprintf(sw->source, sizeof sw->source, "%s", path);
    snprintf(sw->csv, sizeof sw->csv, "standard");
    sw->parallel = 1;
    int rc = 0;
    for (int i = 0; i < doc.n_entries && rc == 0; ++i) {
        const moe_toml_entry *e = &doc.entries[i];
        if (strcmp(e->table, MOE_SWEEP_SECTION) != 0) continue;
        char where[MOE_CFG_STR + 64];
        snprintf(where, sizeof where, "%s:%d: [sweep] ", path, e->line);
        int reserved = 0;
        for (int k = 0; k < N_RESERVED; ++k) reserved |= strcmp(e->key, reserved_keys[k]) == 0;
        if (reserved) rc = read_reserved(sw, e, where, err, errcap);
        else if (strchr(e->key, '.')) rc = read_axis(sw, e, where, err, errcap);
        else rc = unknown_reserved(where, e->key, err, errcap);
    }
    moe_toml_doc_free(&doc);
    if (rc != 0) {
        moe_sweep_free(sw);
        return -1;
    }
    make_short_names(sw);
    return 1;
}

void moe_sweep_free(moe_sweep *sw) {
    for (int a = 0; a < sw->n_axes; ++a) {
        moe_sweep_axis *ax = &sw->axes[a];
        for (int i = 0; i < ax->n_values; ++i) {
            if (ax->texts) free(ax->texts[i]);
            if (ax->labels) free(ax->labels[i]);
        }
        free(ax->texts);
        free(ax->labels);
        free(ax->is_string);
    }
    free(sw->seeds);
    memset(sw, 0, sizeof *sw);
}

int moe_sweep_apply_sets(moe_sweep *sw, const char *const *sets, int n_sets, char *err, size_t errcap) {
    for (int i = 0; i < n_sets; ++i) {
        const char *text = sets[i], *eq = strchr(text, '=');
        char key[MOE_SWEEP_KEY + 8], where[MOE_SWEEP_KEY + 32];
        while (*text == ' ' || *text == '\t') ++text;
        size_t klen = eq ? (size_t)(eq - text) : strlen(text);
        while (klen > 0 && (text[klen - 1] == ' ' || text[klen - 1] == '\t')) --klen;
        if (!eq || klen <= 6 || strncmp(text, "sweep.", 6) != 0 || klen - 6 >= sizeof key)
            return fail(err, errcap, "--set '%s': expected sweep.key=value, e.g. --set 'sweep.seeds=[42]'", sets[i]);
        snprintf(key, sizeof key, "%.*s", (int)(klen - 6), text + 6);
        snprintf(where, sizeof where, "--set sweep.%s: ", key);
        const char *value = eq + 1;
        while (*value == ' ' || *value == '\t') ++value;
        size_t vlen = strlen(value);
        while (vlen > 0 && (value[vlen - 1] == ' ' || value[vlen - 1] == '\t')) --vlen;
        char *toml = malloc(vlen + 8), *bare = malloc(vlen + 1);
        if (!toml || !bare) {
            free(toml);
            free(bare);
            return fail(err, errcap, "out of memory");
        }
        snprintf(toml, vlen + 8, "v = %.*s\n", (int)vlen, value);
        snprintf(bare, vlen + 1, "%.*s", (int)vlen, value);
        /* A TOML value, else the text as a string (as config --set does). */
        moe_toml_doc doc;
        char ignored[256];
        int is_toml = moe_toml_parse_string(toml, "--set", &doc, ignored, sizeof ignored) == 0 && doc.n_entries == 1 &&
                      doc.n_tables == 0;
        moe_toml_entry e;
        memset(&e, 0, sizeof e);
        e.table = MOE_SWEEP_SECTION;
        e.key = key;
        if (is_toml) e.value = doc.entries[0].value;
        else {
            e.value.type = MOE_TOML_STRING;
            e.value.s = bare;
        }
        int reserved = 0, rc;
        for (int k = 0; k < N_RESERVED; ++k) reserved |= strcmp(key, reserved_keys[k]) == 0;
        if (reserved) {
            if (strcmp(key, "seeds") == 0) {
                free(sw->seeds);
                sw->seeds = NULL;
                sw->n_seeds = 0;
            }
            rc = read_reserved(sw, &e, where, err, errcap);
        } else if (strchr(key, '.')) {
            /* Replace the axis in place (the grid keeps its order), or add one at the end. */
            int old = -1;
            for (int a = 0; a < sw->n_axes; ++a)
                if (strcmp(sw->axes[a].key, key) == 0) old = a;
            moe_sweep_axis saved;
            memset(&saved, 0, sizeof saved);
            if (old >= 0) {
                saved = sw->axes[old];
                memmove(&sw->axes[old], &sw->axes[old + 1], (size_t)(sw->n_axes - old - 1) * sizeof saved);
                sw->n_axes--;
            }
            rc = read_axis(sw, &e, where, err, errcap);
            if (old >= 0 && rc == 0) {
                moe_sweep_axis fresh = sw->axes[sw->n_axes - 1];
                memmove(&sw->axes[old + 1], &sw->axes[old], (size_t)(sw->n_axes - 1 - old) * sizeof fresh);
                sw->axes[old] = fresh;
            }
            if (old >= 0) { /* the replaced axis' values */
                for (int v = 0; v < saved.n_values; ++v) {
                    free(saved.texts[v]);
                    free(saved.labels[v]);
                }
                free(saved.texts);
                free(saved.labels);
                free(saved.is_string);
            }
        } else {
            rc = unknown_reserved(where, key, err, errcap);
        }
        if (is_toml) moe_toml_doc_free(&doc);
        free(toml);
        free(bare);
        if (rc != 0) return -1;
    }
    make_short_names(sw);
    return 0;
}

/* ============================ the plan ============================ */

/* "capacity_factor" -> "cf", "noise_std" -> "ns", "lr" -> "lr". */
static void abbreviate(const char *axis_key, char *buf, size_t cap) {
    const char *key = strchr(axis_key, '.') + 1;
    if (!strchr(key, '_')) {
        snprintf(buf, cap, "%s", key);
        return;
    }
    size_t n = 0;
    for (const char *p = key; *p && n + 1 < cap; ++p)
        if (*p != '_' && (p == key || p[-1] == '_')) buf[n++] = *p;
    buf[n] = '\0';
}

/* A value as part of a folder name: a plugin path becomes its file name
 * without .so; characters other than letters, digits and ._+- become '_'. */
static void name_part(const char *label, char *buf, size_t cap) {
    const char *slash = strrchr(label, '/');
    const char *s = slash ? slash + 1 : label;
    size_t len = strlen(s);
    if (len > 3 && strcmp(s + len - 3, ".so") == 0) len -= 3;
    size_t n = 0;
    for (size_t i = 0; i < len && n + 1 < cap; ++i) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                 c == '_' || c == '+' || c == '-';
        buf[n++] = ok ? c : '_';
    }
    buf[n] = '\0';
    if (n == 0) snprintf(buf, cap, "empty");
}

/* The key of a "section.key=value" override, trimmed. */
static void set_key(const char *set, char *buf, size_t cap) {
    const char *eq = strchr(set, '=');
    size_t n = eq ? (size_t)(eq - set) : strlen(set);
    while (n > 0 && (set[n - 1] == ' ' || set[n - 1] == '\t')) --n;
    while (n > 0 && (*set == ' ' || *set == '\t')) ++set, --n;
    snprintf(buf, cap, "%.*s", (int)n, set);
}

int moe_sweep_point_sets(const moe_sweep_plan *plan, int p, char sets[][MOE_SWEEP_SET_CAP]) {
    const moe_sweep *sw = plan->sw;
    const moe_sweep_point *pt = &plan->points[p];
    char quoted[MOE_CFG_QUOTED_CAP];
    int n = 0;
    for (int a = 0; a < sw->n_axes; ++a)
        snprintf(sets[n++], MOE_SWEEP_SET_CAP, "%s=%s", sw->axes[a].key, sw->axes[a].texts[pt->value[a]]);
    snprintf(sets[n++], MOE_SWEEP_SET_CAP, "run.seed=%lld", (long long)pt->seed);
    moe_cfg_quote(pt->name, quoted, sizeof quoted);
    snprintf(sets[n++], MOE_SWEEP_SET_CAP, "run.name=%s", quoted);
    moe_cfg_quote(plan->dir, quoted, sizeof quoted);
    snprintf(sets[n++], MOE_SWEEP_SET_CAP, "run.out_dir=%s", quoted);
    return n;
}

/* "key = label, key = label" of a point, for messages. */
static void point_values_text(const moe_sweep_plan *plan, int p, char *buf, size_t cap) {
    const moe_sweep *sw = plan->sw;
    size_t used = 0;
    buf[0] = '\0';
    for (int a = 0; a < sw->n_axes; ++a) {
        int w = snprintf(buf + used, cap - used, "%s%s = %s", a ? ", " : "", sw->axes[a].key,
                         sw->axes[a].texts[plan->points[p].value[a]]);
        if (w < 0 || (size_t)w >= cap - used) return;
        used += (size_t)w;
    }
    snprintf(buf + used, cap - used, "%srun.seed = %lld", used ? ", " : "", (long long)plan->points[p].seed);
}

/* Load the base config with the user's overrides and `extra` more. */
static int load_with(moe_config *cfg, const moe_sweep_plan *plan, char extra[][MOE_SWEEP_SET_CAP], int n_extra,
                     char *err, size_t errcap) {
    int n = plan->n_user_sets + n_extra;
    const char **sets = calloc((size_t)n + 1, sizeof *sets);
    if (!sets) return fail(err, errcap, "out of memory");
    for (int i = 0; i < plan->n_user_sets; ++i) sets[i] = plan->user_sets[i];
    for (int i = 0; i < n_extra; ++i) sets[plan->n_user_sets + i] = extra[i];
    int rc = moe_config_load(cfg, plan->config_path, sets, n, err, errcap);
    free(sets);
    return rc;
}

static int check_user_sets(const moe_sweep *sw, const char *const *sets, int n, char *err, size_t errcap) {
    for (int i = 0; i < n; ++i) {
        char key[MOE_SWEEP_KEY];
        set_key(sets[i], key, sizeof key);
        char note[MOE_CFG_STR + 160];
        for (int a = 0; a < sw->n_axes; ++a)
            if (strcmp(key, sw->axes[a].key) == 0) {
                source_note(sw, sw->axes[a].key, sw->axes[a].line, note, sizeof note);
                return fail(err, errcap,
                            "--set %s: \"%s\" is an axis of the sweep (%s); change its list there, or with "
                            "--set 'sweep.%s=[...]'",
                            key, key, note, key);
            }
        if (strcmp(key, "run.seed") == 0 && sw->n_seeds > 0) {
            source_note(sw, "seeds", sw->seeds_line, note, sizeof note);
            return fail(err, errcap, "--set run.seed: the sweep's seeds come from seeds = [...] (%s); change "
                                     "the list there, or with --set 'sweep.seeds=[...]'",
                        note);
        }
        if (strcmp(key, "run.name") == 0 && sw->name[0]) {
            source_note(sw, "name", sw->name_line, note, sizeof note);
            return fail(err, errcap,
                        "--set run.name: the sweep names its runs, and its folder is name = \"%s\" (%s); "
                        "change that instead (--set sweep.name=...)",
                        sw->name, note);
        }
    }
    return 0;
}

/* "--set moe.top_k: message" -> "message". */
static const char *strip_set_prefix(const char *msg, const char *key) {
    char prefix[MOE_SWEEP_KEY + 16];
    snprintf(prefix, sizeof prefix, "--set %s: ", key);
    size_t n = strlen(prefix);
    return strncmp(msg, prefix, n) == 0 ? msg + n : msg;
}

static int check_axis_values(moe_sweep_plan *plan, moe_config *tmp, char *err, size_t errcap) {
    const moe_sweep *sw = plan->sw;
    char msg[2048];
    char (*one)[MOE_SWEEP_SET_CAP] = malloc(sizeof *one);
    if (!one) return fail(err, errcap, "out of memory");
    int rc = 0;
    for (int a = 0; a < sw->n_axes && rc == 0; ++a) {
        const moe_sweep_axis *ax = &sw->axes[a];
        char where[MOE_CFG_STR + 160];
        axis_where(sw, ax, where, sizeof where);
        for (int v = 0; v < ax->n_values && rc == 0; ++v) {
            snprintf(one[0], MOE_SWEEP_SET_CAP, "%s=%s", ax->key, ax->texts[v]);
            if (load_with(tmp, plan, one, 1, msg, sizeof msg) != 0)
                rc = fail(err, errcap, "%s axis \"%s\", value %d (%s): %s", where, ax->key, v + 1, ax->texts[v],
                          strip_set_prefix(msg, ax->key));
        }
    }
    free(one);
    return rc;
}


/* ---- grid expansion ---- */

static void expand_grid(moe_sweep_plan *plan, int64_t base_seed) {
    const moe_sweep *sw = plan->sw;
    int n_seeds = sw->n_seeds > 0 ? sw->n_seeds : 1;
    int p = 0;
    for (int g = 0; g < plan->n_groups; ++g) {
        int value[MOE_SWEEP_MAX_AXES] = {0}, rem = g;
        for (int a = sw->n_axes - 1; a >= 0; --a) { /* the last axis varies fastest */
            value[a] = rem % sw->axes[a].n_values;
            rem /= sw->axes[a].n_values;
        }
        for (int s = 0; s < n_seeds; ++s, ++p) {
            moe_sweep_point *pt = &plan->points[p];
            memcpy(pt->value, value, sizeof value);
            pt->group = g;
            pt->seed = sw->n_seeds > 0 ? sw->seeds[s] : base_seed;
            pt->noise_std = NAN;
            pt->aux_loss_weight = NAN;
        }
    }
}

static void make_names(moe_sweep_plan *plan) {
    const moe_sweep *sw = plan->sw;
    const size_t cap = sizeof plan->points[0].name;
    for (int p = 0; p < plan->n_points; ++p) {
        moe_sweep_point *pt = &plan->points[p];
        char name[4 * MOE_CFG_STR], part[MOE_CFG_STR];
        size_t used = 0;
        name[0] = '\0';
        for (int a = 0; a < sw->n_axes; ++a) {
            const moe_sweep_axis *ax = &sw->axes[a];
            name_part(ax->labels[pt->value[a]], part, sizeof part);
            int w = snprintf(name + used, sizeof name - used, "%s%s%s", used ? "-" : "",
                             ax->is_string[pt->value[a]] ? "" : ax->short_name, part);
            if (w > 0 && (size_t)w < sizeof name - used) used += (size_t)w;
        }
        snprintf(name + used, sizeof name - used, "%ss%lld", used ? "-" : "", (long long)pt->seed);
        if (strlen(name) >= cap) snprintf(name + cap - 16, 16, "-p%d", p + 1);
        snprintf(pt->name, cap, "%.*s", (int)(cap - 1), name);
    }
    /* Values that read the same in a folder name ("a/x.so" and "x"): number those points. */
    if (plan->n_points < 1) return;
    int *clash = calloc((size_t)plan->n_points, sizeof *clash);
    if (!clash) return;
    for (int p = 0; p < plan->n_points; ++p)
        for (int q = p + 1; q < plan->n_points; ++q)
            if (strcmp(plan->points[p].name, plan->points[q].name) == 0) clash[p] = clash[q] = 1;
    for (int p = 0; p < plan->n_points; ++p) {
        if (!clash[p]) continue;
        char *name = plan->points[p].name;
        size_t len = strlen(name);
        if (len > cap - 16) len = cap - 16;
        snprintf(name + len, cap - len, "-p%d", p + 1);
    }
    free(clash);
}

/* ---- checking every point ---- */

typedef struct plugin_entry {
    char name[MOE_CFG_STR];
    moe_router_lib lib;
} plugin_entry;

/* A message about point p, at the line of the router axis it names (an
 * option 'x' of "router.x", or the plugin), else at the [sweep] header. */
static int point_error(const moe_sweep_plan *plan, int p, const char *msg, char *err, size_t errcap) {
    const moe_sweep *sw = plan->sw;
    char values[2048];
    int line = sw->line;
    for (int a = 0; a < sw->n_axes; ++a) {
        char quoted[MOE_SWEEP_KEY + 4];
        if (strncmp(sw->axes[a].key, "router.", 7) != 0) continue;
        snprintf(quoted, sizeof quoted, "'%s'", sw->axes[a].key + 7);
        size_t len = strlen(sw->axes[a].key);
        if (sw->axes[a].line > 0 &&
            (strstr(msg, quoted) || (strncmp(msg, sw->axes[a].key, len) == 0 && msg[len] == ' ')))
            line = sw->axes[a].line;
    }
    point_values_text(plan, p, values, sizeof values);
    return fail(err, errcap, "%s:%d: [sweep] point %d/%d \"%s\" (%s): %s", sw->source, line, p + 1, plan->n_points,
                plan->points[p].name, values, msg);
}

/* The router options of a point's config against its plugin's table; with
 * csv = "noise", also the noise_std the plugin will use. */
static int check_router(moe_sweep_plan *plan, int p, const moe_config *cfg, plugin_entry *cache, int *n_cache,
                        char *err, size_t errcap) {
    char msg[2048];
    int found = -1;
    for (int i = 0; i < *n_cache; ++i)
        if (strcmp(cache[i].name, cfg->router.plugin) == 0) found = i;
    if (found < 0) {
        plugin_entry *e = &cache[*n_cache];
        char detail[1500];
        if (moe_router_lib_open(&e->lib, cfg->router.plugin, detail, sizeof detail) != 0) {
            snprintf(msg, sizeof msg, "router.plugin = '%.255s': %s", cfg->router.plugin, detail);
            return point_error(plan, p, msg, err, errcap);
        }
        snprintf(e->name, sizeof e->name, "%s", cfg->router.plugin);
        found = (*n_cache)++;
    }
    const moe_router_plugin_v1_t *api = cache[found].lib.api;
    int n_spec = api->n_options > 0 ? api->n_options : 0;
    moe_option *resolved = calloc((size_t)n_spec + 1, sizeof *resolved);
    if (!resolved) return fail(err, errcap, "out of memory");
    char detail[1024];
    int rc = 0;
    if (moe_options_resolve(api->options, n_spec, cfg->router.opts, cfg->router.n_opts, resolved, detail,
                            sizeof detail) != MOE_OK) {
        snprintf(msg, sizeof msg, "router '%s': %s", api->name, detail);
        rc = point_error(plan, p, msg, err, errcap);
    } else if (strcmp(plan->sw->csv, "noise") == 0) {
        for (int j = 0; j < n_spec; ++j)
            if (strcmp(api->options[j].key, "noise_std") == 0) plan->points[p].noise_std = resolved[j].f;
        if (isnan(plan->points[p].noise_std)) {
            snprintf(msg, sizeof msg,
                     "csv = \"noise\" reports router.noise_std, but router '%s' has no noise_std option (use "
                     "noisy_topk, or csv = \"standard\")",
                     api->name);
            rc = point_error(plan, p, msg, err, errcap);
        }
    }
    free(resolved);
    return rc;
}

int moe_sweep_plan_make(moe_sweep_plan *plan, const moe_sweep *sw, const char *config_path,
                        const char *const *user_sets, int n_user_sets, int check_plugins, char *err,
                        size_t errcap) {
    memset(plan, 0, sizeof *plan);
    plan->sw = sw;
    plan->config_path = config_path;
    plan->user_sets = user_sets;
    plan->n_user_sets = n_user_sets;
    if (check_user_sets(sw, user_sets, n_user_sets, err, errcap) != 0) return -1;

    moe_config *cfg = malloc(sizeof *cfg);
    char (*sets)[MOE_SWEEP_SET_CAP] = calloc(MOE_SWEEP_MAX_AXES + 3, sizeof *sets);
    plugin_entry *cache = NULL;
    int n_cache = 0, rc = -1;
    if (!cfg || !sets) {
        fail(err, errcap, "out of memory");
        goto done;
    }
    /* The base: the file (its [sweep] table skipped) and the user's overrides. */
    if (load_with(cfg, plan, NULL, 0, err, errcap) != 0) goto done;
    snprintf(plan->experiment, sizeof plan->experiment, "%s", sw->name[0] ? sw->name : cfg->run.name);
    if ((size_t)snprintf(plan->dir, sizeof plan->dir, "%s/%s", cfg->run.out_dir, plan->experiment) >=
        sizeof plan->dir) {
        fail(err, errcap, "%s:%d: [sweep] the experiment folder %s/%s is longer than %zu bytes; use a shorter "
                          "run.out_dir or name",
             sw->source, sw->line, cfg->run.out_dir, plan->experiment, sizeof plan->dir - 1);
        goto done;
    }
    int64_t base_seed = cfg->run.seed;

    if (check_axis_values(plan, cfg, err, errcap) != 0) goto done;

    long long groups = 1;
    for (int a = 0; a < sw->n_axes; ++a) {
        groups *= sw->axes[a].n_values;
        if (groups > MOE_SWEEP_MAX_POINTS) break;
    }
    long long points = groups * (sw->n_seeds > 0 ? sw->n_seeds : 1);
    if (points > MOE_SWEEP_MAX_POINTS) {
        fail(err, errcap, "%s:%d: [sweep] the grid has more than %d runs; split the sweep", sw->source, sw->line,
             MOE_SWEEP_MAX_POINTS);
        goto done;
    }
    plan->n_groups = (int)groups;
    plan->n_points = (int)points;
    plan->points = calloc((size_t)plan->n_points, sizeof *plan->points);
    cache = calloc((size_t)plan->n_points, sizeof *cache);
    if (!plan->points || !cache) {
        fail(err, errcap, "out of memory");
        goto done;
    }
    expand_grid(plan, base_seed);
    make_names(plan);

    /* Every point's whole config, as its run will load it. */
    char msg[2048];
    for (int p = 0; p < plan->n_points; ++p) {
        int n = moe_sweep_point_sets(plan, p, sets);
        if (load_with(cfg, plan, sets, n, msg, sizeof msg) != 0) {
            point_error(plan, p, msg, err, errcap);
            goto done;
        }
        plan->points[p].aux_loss_weight = cfg->moe.aux_loss_weight;
        if (check_plugins && check_router(plan, p, cfg, cache, &n_cache, err, errcap) != 0) goto done;
    }
    rc = 0;

done:
    for (int i = 0; i < n_cache; ++i) moe_router_lib_close(&cache[i].lib);
    free(cache);
    free(sets);
    free(cfg);
    if (rc != 0) moe_sweep_plan_free(plan);
    return rc;
}

void moe_sweep_plan_free(moe_sweep_plan *plan) {
    free(plan->points);
    plan->points = NULL;
    plan->n_points = plan->n_groups = 0;
}

/* ============================ running ============================ */

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The step a checkpoint holds (checkpoint.h: magic[8], u32, u32, u64 step), or -1. */
static long long checkpoint_step(const char *path) {
    unsigned char head[24];
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    size_t n = fread(head, 1, sizeof head, f);
    fclose(f);
    if (n != sizeof head || memcmp(head, "MOECKPT", 8) != 0) return -1;
    unsigned long long step = 0;
    for (int i = 7; i >= 0; --i) step = (step << 8) | head[16 + i];
    return (long long)step;
}

/* The last non-empty line of a log file. */
static void last_line(const char *path, char *buf, size_t cap) {
    buf[0] = '\0';
    FILE *f = fopen(path, "rb");
    if (!f) return;
    char tail[4096];
    long size = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : 0;
    long from = size > (long)sizeof tail - 1 ? size - (long)sizeof tail + 1 : 0;
    size_t n = fseek(f, from, SEEK_SET) == 0 ? fread(tail, 1, sizeof tail - 1, f) : 0;
    fclose(f);
    tail[n] = '\0';
    while (n > 0 && (tail[n - 1] == '\n' || tail[n - 1] == '\r' || tail[n - 1] == ' ')) tail[--n] = '\0';
    char *start = tail + n;
    while (start > tail && start[-1] != '\n' && start[-1] != '\r') --start;
    snprintf(buf, cap, "%s", start);
}

/* Shell-quoted for the log's header line, so it can be pasted. */
static void append_arg(char *buf, size_t cap, const char *arg) {
    size_t used = strlen(buf);
    int plain = arg[0] != '\0';
    for (const char *c = arg; *c; ++c)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/=+:,", *c)) plain = 0;
    if (plain) {
        snprintf(buf + used, cap - used, " %s", arg);
        return;
    }
    if (used + 3 < cap) {
        buf[used++] = ' ';
        buf[used++] = '\'';
    }
    for (const char *c = arg; *c && used + 5 < cap; ++c) {
        if (*c == '\'') {
            memcpy(buf + used, "'\\''", 4);
            used += 4;
        } else buf[used++] = *c;
    }
    if (used + 2 < cap) buf[used++] = '\'';
    buf[used] = '\0';
}

/* Start point p as `moehost train` with its overrides; output to train.log. */
static int launch(const moe_sweep_plan *plan, const moe_sweep_options *opt, int p, int resume, pid_t *pid,
                  char *err, size_t errcap) {
    const moe_sweep_point *pt = &plan->points[p];
    char dir[PATH_CAP], log_path[PATH_CAP + 16], stop[32];
    snprintf(dir, sizeof dir, "%s/%s", plan->dir, pt->name);
    snprintf(log_path, sizeof log_path, "%s/train.log", dir);
    if (moe_mkdirs(dir, err, errcap) != 0) return -1;
    char (*sets)[MOE_SWEEP_SET_CAP] = calloc(MOE_SWEEP_MAX_AXES + 3, sizeof *sets);
    int n_max = 12 + 2 * (plan->n_user_sets + MOE_SWEEP_MAX_AXES + 3); /* 4 + 2 per --set + 4 flags + NULL */
    char **argv = calloc((size_t)n_max, sizeof *argv);
    size_t header_cap = 64 * 1024;
    char *header = malloc(header_cap);
    int fd = -1, rc = -1;
    if (!sets || !argv || !header) {
        fail(err, errcap, "out of memory");
        goto done;
    }
    int n_sets = moe_sweep_point_sets(plan, p, sets), argc = 0;
    argv[argc++] = "moehost";
    argv[argc++] = "train";
    argv[argc++] = "--config";
    argv[argc++] = (char *)plan->config_path;
    for (int i = 0; i < plan->n_user_sets; ++i) {
        argv[argc++] = "--set";
        argv[argc++] = (char *)plan->user_sets[i];
    }
    for (int i = 0; i < n_sets; ++i) {
        argv[argc++] = "--set";
        argv[argc++] = sets[i];
    }
    if (resume) argv[argc++] = "--resume";
    if (opt->stop_after > 0) {
        snprintf(stop, sizeof stop, "%lld", opt->stop_after);
        argv[argc++] = "--stop-after";
        argv[argc++] = stop;
    }
    if (opt->quiet) argv[argc++] = "--quiet";
    argv[argc] = NULL;

    snprintf(header, header_cap, "== sweep %s, run %d/%d, %s:", plan->experiment, p + 1, plan->n_points,
             resume ? "resumed" : "started");
    for (int i = 0; i < argc; ++i) append_arg(header, header_cap, argv[i]);
    size_t hl = strlen(header);
    if (hl + 2 < header_cap) memcpy(header + hl, "\n", 2);

    fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
        fail(err, errcap, "cannot write '%s': %s", log_path, strerror(errno));
        goto done;
    }
    if (write(fd, header, strlen(header)) < 0) {
        fail(err, errcap, "cannot write '%s': %s", log_path, strerror(errno));
        goto done;
    }
    pid_t parent = getpid();
    fflush(stdout);
    fflush(stderr);
    pid_t child = fork();
    if (child < 0) {
        fail(err, errcap, "cannot start a process: %s", strerror(errno));
        goto done;
    }
    if (child == 0) {
        /* Die with the sweep: a sweep killed and started again must not find
         * its old runs still writing. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(126);
        int null_fd = open("/dev/null", O_RDONLY);
        if (null_fd >= 0) dup2(null_fd, STDIN_FILENO);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        execv("/proc/self/exe", argv);
        dprintf(STDERR_FILENO, "moehost: error: cannot run /proc/self/exe: %s\n", strerror(errno));
        _exit(127);
    }
    *pid = child;
    rc = 0;
done:
    if (fd >= 0) close(fd);
    free(header);
    free(argv);
    free(sets);
    return rc;
}

static int take_lock(const char *dir, int *fd_out, char *err, size_t errcap) {
    char path[PATH_CAP + 16];
    snprintf(path, sizeof path, "%s/.sweep.lock", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return fail(err, errcap, "cannot open '%s': %s", path, strerror(errno));
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    if (fcntl(fd, F_SETLK, &fl) != 0) {
        struct flock who = fl;
        long holder = fcntl(fd, F_GETLK, &who) == 0 && who.l_type != F_UNLCK ? (long)who.l_pid : -1;
        close(fd);
        if (holder > 0)
            return fail(err, errcap,
                        "another sweep (process %ld) is running in '%s'; wait for it to end, or stop it, before "
                        "starting this one",
                        holder, dir);
        return fail(err, errcap, "cannot lock '%s': %s", path, strerror(errno));
    }
    *fd_out = fd;
    return 0;
}

typedef struct running_run {
    pid_t pid;
    int point;
    double t0;
} running_run;

static void print_point(const moe_sweep_plan *plan, int p, const char *fmt, ...) {
    int width = snprintf(NULL, 0, "%d", plan->n_points);
    printf("[%*d/%d] %s: ", width, p + 1, plan->n_points, plan->points[p].name);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

typedef struct tally {
    int skipped, started, resumed, finished, failed, stopped;
} tally;

static void reap(const moe_sweep_plan *plan, const running_run *r, int status, tally *t) {
    const moe_sweep_point *pt = &plan->points[r->point];
    char dir[PATH_CAP], path[PATH_CAP + 32], line[1024], msg[512];
    double secs = now_seconds() - r->t0;
    snprintf(dir, sizeof dir, "%s/%s", plan->dir, pt->name);
    snprintf(path, sizeof path, "%s/train.log", dir);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
        double v[MOE_RES_COUNT];
        int got = moe_run_results_read(dir, v, msg, sizeof msg);
        if (got == 1) {
            t->finished++;
            print_point(plan, r->point, "finished in %.1f s (val_loss %.4f, val_ppl %.4g)", secs, v[MOE_RES_VAL_LOSS],
                        v[MOE_RES_VAL_PPL]);
            return;
        }
        if (got == 0) {
            char ckpt[PATH_CAP + 32];
            snprintf(ckpt, sizeof ckpt, "%s/checkpoint.bin", dir);
            t->stopped++;
            print_point(plan, r->point, "stopped after step %lld (--stop-after); run the sweep again to resume it",
                        checkpoint_step(ckpt));
            return;
        }
        t->failed++;
        print_point(plan, r->point, "failed: %s", msg);
        return;
    }
    t->failed++;
    last_line(path, line, sizeof line);
    if (WIFSIGNALED(status))
        print_point(plan, r->point, "failed (killed by signal %d) after %.1f s: %s; log: %s", WTERMSIG(status), secs,
                    line[0] ? line : "(no output)", path);
    else
        print_point(plan, r->point, "failed (exit status %d) after %.1f s: %s; log: %s", WEXITSTATUS(status), secs,
                    line[0] ? line : "(no output)", path);
}

int moe_sweep_run(const moe_sweep_plan *plan, const moe_sweep_options *opt, char *err, size_t errcap) {
    const moe_sweep *sw = plan->sw;
    int lock_fd = -1;
    if (moe_mkdirs(plan->dir, err, errcap) != 0) return -1;
    if (take_lock(plan->dir, &lock_fd, err, errcap) != 0) return -1;
    int parallel = sw->parallel > 0 ? sw->parallel : 1;
    if (parallel > plan->n_points) parallel = plan->n_points;
    printf("sweep %s (%s): %d run%s = %d grid point%s x %d seed%s, %d at a time, in %s/\n", plan->experiment,
           plan->config_path, plan->n_points, plan->n_points == 1 ? "" : "s", plan->n_groups,
           plan->n_groups == 1 ? "" : "s", sw->n_seeds > 0 ? sw->n_seeds : 1, sw->n_seeds > 1 ? "s" : "", parallel,
           plan->dir);
    fflush(stdout);

    running_run *slots = calloc((size_t)parallel, sizeof *slots);
    if (!slots) {
        close(lock_fd);
        return fail(err, errcap, "out of memory");
    }
    tally t = {0, 0, 0, 0, 0, 0};
    int next = 0, running = 0;
    while (next < plan->n_points || running > 0) {
        while (running < parallel && next < plan->n_points) {
            int p = next++;
            char dir[PATH_CAP], summary[PATH_CAP + 32], ckpt[PATH_CAP + 32], metrics[PATH_CAP + 32], msg[1024];
            snprintf(dir, sizeof dir, "%s/%s", plan->dir, plan->points[p].name);
            snprintf(summary, sizeof summary, "%s/summary.json", dir);
            snprintf(ckpt, sizeof ckpt, "%s/checkpoint.bin", dir);
            snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", dir);
            if (moe_file_exists(summary)) {
                t.skipped++;
                print_point(plan, p, "skipped (finished earlier: summary.json)");
                continue;
            }
            int resume = moe_file_exists(ckpt);
            const char *note = "";
            if (!resume && moe_file_exists(metrics)) {
                /* Stopped after writing an evaluation but before its checkpoint:
                 * nothing to resume from, so that line is stale. */
                unlink(metrics);
                note = " (again: the last attempt ended before its first checkpoint)";
            }
            pid_t pid;
            if (launch(plan, opt, p, resume, &pid, msg, sizeof msg) != 0) {
                t.failed++;
                print_point(plan, p, "failed to start: %s", msg);
                continue;
            }
            int slot = 0;
            while (slots[slot].pid != 0) ++slot;
            slots[slot].pid = pid;
            slots[slot].point = p;
            slots[slot].t0 = now_seconds();
            running++;
            if (resume) {
                t.resumed++;
                print_point(plan, p, "resumed from the checkpoint at step %lld", checkpoint_step(ckpt));
            } else {
                t.started++;
                print_point(plan, p, "started%s", note);
            }
        }
        if (running == 0) break;
        int status = 0;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0) {
            if (errno == EINTR) continue;
            break; /* ECHILD: nothing left to wait for */
        }
        for (int s = 0; s < parallel; ++s)
            if (slots[s].pid == pid) {
                reap(plan, &slots[s], status, &t);
                slots[s].pid = 0;
                running--;
            }
    }
    free(slots);

    int n_done = 0, rc = 0;
    char msg[2048];
    if (moe_sweep_write_summaries(plan, &n_done, msg, sizeof msg) != 0) {
        fprintf(stderr, "moehost: error: %s\n", msg);
        rc = 1;
    } else {
        printf("summary: %s/summary.csv, summary.md%s (%d of %d runs finished)\n", plan->dir,
               strcmp(sw->csv, "noise") == 0 ? ", " MOE_SWEEP_NOISE_CSV : "", n_done, plan->n_points);
    }
    if (opt->report && n_done > 0 && moe_report_make(plan->dir, msg, sizeof msg) != 0)
        fprintf(stderr, "moehost: warning: no figures: %s\n", msg);
    char stopped[64] = "";
    if (t.stopped) snprintf(stopped, sizeof stopped, ", %d stopped (--stop-after)", t.stopped);
    printf("sweep %s: %d skipped, %d started, %d resumed; %d finished, %d failed%s\n", plan->experiment, t.skipped,
           t.started, t.resumed, t.finished, t.failed, stopped);
    fflush(stdout);
    close(lock_fd);
    return t.failed > 0 || rc != 0 ? 1 : 0;
}

/* Point names put a short name before each number: the initials of the key
 * ("cf1.25" for capacity_factor), or the whole key when it is one word
 * ("lr0.001"); axes whose initials clash use their key names. */
static void make_short_names(moe_sweep *sw) {
    char abbr[MOE_SWEEP_MAX_AXES][MOE_SWEEP_KEY];
    for (int a = 0; a < sw->n_axes; ++a) abbreviate(sw->axes[a].key, abbr[a], sizeof abbr[a]);
    for (int a = 0; a < sw->n_axes; ++a) {
        int clash = 0, same_key = 0;
        const char *key = strchr(sw->axes[a].key, '.') + 1;
        for (int b = 0; b < sw->n_axes; ++b) {
            if (b == a) continue;
            clash |= strcmp(abbr[a], abbr[b]) == 0;
            same_key |= strcmp(strchr(sw->axes[b].key, '.') + 1, key) == 0;
        }
        if (!clash) snprintf(sw->axes[a].short_name, MOE_SWEEP_KEY, "%.*s", MOE_SWEEP_KEY - 1, abbr[a]);
        else if (!same_key) snprintf(sw->axes[a].short_name, MOE_SWEEP_KEY, "%.*s", MOE_SWEEP_KEY - 1, key);
        else {
            memcpy(sw->axes[a].short_name, sw->axes[a].key, sizeof sw->axes[a].short_name);
            for (char *c = sw->axes[a].short_name; *c; ++c)
                if (*c == '.') *c = '_';
        }
    }
}

/* ============================ summaries ============================ */

static void csv_field(FILE *f, const char *s) {
    if (!strpbrk(s, ",\"\r\n")) {
        fputs(s, f);
        return;
    }
    fputc('"', f);
    for (const char *c = s; *c; ++c) {
        if (*c == '"') fputc('"', f);
        fputc(*c, f);
    }
    fputc('"', f);
}

static void csv_number(FILE *f, double v) {
    char text[64];
    moe_format_exact(v, text, sizeof text);
    fputs(text, f);
}

/* A statistic for the Markdown tables: 4 significant digits, no exponent
 * for the large values (tokens/s). */
static void md_number(double v, char *buf, size_t cap) {
    double a = fabs(v);
    if (!isfinite(v)) snprintf(buf, cap, "—");
    else if (a >= 1e4) snprintf(buf, cap, "%.0f", v);
    else snprintf(buf, cap, "%.4g", v);
}

static void md_stats(const moe_stats *s, char *buf, size_t cap) {
    char m[48], sd[48], lo[48], hi[48];
    if (s->n == 0) {
        snprintf(buf, cap, "—");
        return;
    }
    md_number(s->mean, m, sizeof m);
    if (s->n == 1) {
        snprintf(buf, cap, "%s", m);
        return;
    }
    md_number(s->std, sd, sizeof sd);
    md_number(s->lo, lo, sizeof lo);
    md_number(s->hi, hi, sizeof hi);
    snprintf(buf, cap, "%s ± %s [%s, %s]", m, sd, lo, hi);
}

static void md_cell(FILE *f, const char *s) {
    fputs("| ", f);
    for (const char *c = s; *c; ++c) {
        if (*c == '|') fputc('\\', f);
        fputc(*c, f);
    }
    fputc(' ', f);
}

typedef struct point_results {
    int ok;
    double v[MOE_RES_COUNT];
} point_results;

static int write_csv(const moe_sweep_plan *plan, const point_results *res, char *err, size_t errcap) {
    const moe_sweep *sw = plan->sw;
    char path[PATH_CAP + 32];
    snprintf(path, sizeof path, "%s/summary.csv", plan->dir);
    FILE *f = moe_atomic_open(path, err, errcap);
    if (!f) return -1;
    for (int a = 0; a < sw->n_axes; ++a) {
        csv_field(f, sw->axes[a].key);
        fputc(',', f);
    }
    fputs("seed,run", f);
    for (int i = 0; i < MOE_RES_COUNT; ++i) fprintf(f, ",%s", moe_result_names[i]);
    fputc('\n', f);
    for (int p = 0; p < plan->n_points; ++p) {
        if (!res[p].ok) continue;
        const moe_sweep_point *pt = &plan->points[p];
        for (int a = 0; a < sw->n_axes; ++a) {
            csv_field(f, sw->axes[a].labels[pt->value[a]]);
            fputc(',', f);
        }
        fprintf(f, "%lld,", (long long)pt->seed);
        csv_field(f, pt->name);
        for (int i = 0; i < MOE_RES_COUNT; ++i) {
            fputc(',', f);
            csv_number(f, res[p].v[i]);
        }
        fputc('\n', f);
    }
    return moe_atomic_commit(f, path, err, errcap);
}

static int write_noise_csv(const moe_sweep_plan *plan, const point_results *res, char *err, size_t errcap) {
    char path[PATH_CAP + 64];
    snprintf(path, sizeof path, "%s/%s", plan->dir, MOE_SWEEP_NOISE_CSV);
    FILE *f = moe_atomic_open(path, err, errcap);
    if (!f) return -1;
    fputs("seed,noise_std,load_balancing_weight,val_loss,val_accuracy,val_perplexity,training_time_minutes,"
          "peak_memory_gb,best_val_perplexity,expert_usage_cv\n",
          f);
    for (int p = 0; p < plan->n_points; ++p) {
        if (!res[p].ok) continue;
        const moe_sweep_point *pt = &plan->points[p];
        const double *v = res[p].v;
        double row[7] = { v[MOE_RES_VAL_LOSS],     v[MOE_RES_VAL_ACC],      v[MOE_RES_VAL_PPL],
                          v[MOE_RES_TRAIN_TIME_S] / 60.0, v[MOE_RES_PEAK_MEM_GB], v[MOE_RES_BEST_VAL_PPL],
                          v[MOE_RES_LOAD_CV] };
        char ns[64], lbw[64];
        moe_cfg_format_float(pt->noise_std, ns, sizeof ns); /* 0.0 as the study wrote it, not 0 */
        moe_cfg_format_float(pt->aux_loss_weight, lbw, sizeof lbw);
        fprintf(f, "%lld,%s,%s", (long long)pt->seed, ns, lbw);
        for (int i = 0; i < 7; ++i) {
            fputc(',', f);
            csv_number(f, row[i]);
        }
        fputc('\n', f);
    }
    return moe_atomic_commit(f, path, err, errcap);
}

/* The statistics of one result over the runs of grid point g. */
static void group_stats(const moe_sweep_plan *plan, const point_results *res, int g, int col, moe_stats *s) {
    double *x = calloc((size_t)plan->n_points, sizeof *x);
    int n = 0;
    if (x)
        for (int p = 0; p < plan->n_points; ++p)
            if (plan->points[p].group == g && res[p].ok) x[n++] = res[p].v[col];
    moe_stats_of(x, n, s);
    free(x);
}

static int first_of_group(const moe_sweep_plan *plan, int g) {
    for (int p = 0; p < plan->n_points; ++p)
        if (plan->points[p].group == g) return p;
    return 0;
}

static void write_noise_md(FILE *f, const moe_sweep_plan *plan, const point_results *res) {
    fprintf(f,
            "\n## Routing-noise study\n\n"
            "The study's table: best validation perplexity (mean ± std over seeds), expert-usage CV (`load_cv` "
            "of the final evaluation, mean) and training time (mean, minutes) per condition; "
            "`%s` holds the runs in the study's CSV format.\n\n"
            "| noise_std | load_balancing_weight | n | Best Val PPL (mean ± std) | Expert Usage CV (mean) | Avg time "
            "(min) |\n|---:|---:|---:|---:|---:|---:|\n",
            MOE_SWEEP_NOISE_CSV);
    for (int g = 0; g < plan->n_groups; ++g) {
        const moe_sweep_point *pt = &plan->points[first_of_group(plan, g)];
        moe_stats ppl, cv, minutes;
        group_stats(plan, res, g, MOE_RES_BEST_VAL_PPL, &ppl);
        group_stats(plan, res, g, MOE_RES_LOAD_CV, &cv);
        group_stats(plan, res, g, MOE_RES_TRAIN_TIME_S, &minutes);
        char ns[64], lbw[64];
        moe_cfg_format_float(pt->noise_std, ns, sizeof ns);
        moe_cfg_format_float(pt->aux_loss_weight, lbw, sizeof lbw);
        if (ppl.n == 0) {
            fprintf(f, "| %s | %s | 0 | — | — | — |\n", ns, lbw);
            continue;
        }
        fprintf(f, "| %s | %s | %d | %.2f ± %.2f | %.4f | %.2f |\n", ns, lbw, ppl.n, ppl.mean,
                ppl.n > 1 ? ppl.std : 0.0, cv.mean, minutes.mean / 60.0);
    }
    fputs("\n### Per seed\n", f);
    for (int g = 0; g < plan->n_groups; ++g) {
        const moe_sweep_point *pt = &plan->points[first_of_group(plan, g)];
        char ns[64], lbw[64];
        moe_cfg_format_float(pt->noise_std, ns, sizeof ns);
        moe_cfg_format_float(pt->aux_loss_weight, lbw, sizeof lbw);
        fprintf(f, "\n#### noise_std=%s, load_balancing_weight=%s\n\n| Seed | Best Val PPL | Expert Usage CV |\n"
                   "|---:|---:|---:|\n",
                ns, lbw);
        for (int p = 0; p < plan->n_points; ++p) {
            if (plan->points[p].group != g || !res[p].ok) continue;
            fprintf(f, "| %lld | %.2f | %.4f |\n", (long long)plan->points[p].seed, res[p].v[MOE_RES_BEST_VAL_PPL],
                    res[p].v[MOE_RES_LOAD_CV]);
        }
    }
}

static int write_md(const moe_sweep_plan *plan, const point_results *res, int n_done, char *err, size_t errcap) {
    const moe_sweep *sw = plan->sw;
    static const int cols[] = { MOE_RES_VAL_PPL, MOE_RES_VAL_LOSS, MOE_RES_TOKENS_PER_S, MOE_RES_DROP_RATE,
                                MOE_RES_LOAD_CV };
    const int n_cols = (int)(sizeof cols / sizeof cols[0]);
    char path[PATH_CAP + 32], cell[256];
    snprintf(path, sizeof path, "%s/summary.md", plan->dir);
    FILE *f = moe_atomic_open(path, err, errcap);
    if (!f) return -1;
    fprintf(f, "# Sweep `%s`\n\n", plan->experiment);
    fprintf(f,
            "From `%s`: %d runs (%d grid point%s × %d seed%s), %d with results. Values of each run's final "
            "evaluation; `tokens_per_s` over all its training steps. A cell is the mean ± the standard deviation "
            "over seeds (n − 1 in the denominator) and, in brackets, the 95%% confidence interval of the mean "
            "(Student t with n − 1 degrees of freedom); a single run shows its value. Every run is a row of "
            "`summary.csv`.\n\n",
            plan->config_path, plan->n_points, plan->n_groups, plan->n_groups == 1 ? "" : "s",
            sw->n_seeds > 0 ? sw->n_seeds : 1, sw->n_seeds > 1 ? "s" : "", n_done);
    if (sw->n_axes == 0) fputs("| config ", f);
    for (int a = 0; a < sw->n_axes; ++a) md_cell(f, sw->axes[a].key);
    fputs("| n ", f);
    for (int c = 0; c < n_cols; ++c) fprintf(f, "| %s ", moe_result_names[cols[c]]);
    fputs("|\n", f);
    for (int a = 0; a < (sw->n_axes ? sw->n_axes : 1); ++a) fputs("| --- ", f);
    for (int c = 0; c <= n_cols; ++c) fputs("| ---: ", f);
    fputs("|\n", f);
    for (int g = 0; g < plan->n_groups; ++g) {
        const moe_sweep_point *pt = &plan->points[first_of_group(plan, g)];
        if (sw->n_axes == 0) md_cell(f, "base");
        for (int a = 0; a < sw->n_axes; ++a) md_cell(f, sw->axes[a].labels[pt->value[a]]);
        moe_stats s;
        for (int c = 0; c < n_cols; ++c) {
            group_stats(plan, res, g, cols[c], &s);
            if (c == 0) fprintf(f, "| %d ", s.n);
            md_stats(&s, cell, sizeof cell);
            md_cell(f, cell);
        }
        fputs("|\n", f);
    }
    if (n_done < plan->n_points) {
        fputs("\nWithout results (failed, or not run yet: see their train.log; running the sweep again resumes or "
              "retries them):",
              f);
        for (int p = 0, first = 1; p < plan->n_points; ++p)
            if (!res[p].ok) {
                fprintf(f, "%s `%s`", first ? "" : ",", plan->points[p].name);
                first = 0;
            }
        fputs(".\n", f);
    }
    if (strcmp(sw->csv, "noise") == 0) write_noise_md(f, plan, res);
    return moe_atomic_commit(f, path, err, errcap);
}

int moe_sweep_write_summaries(const moe_sweep_plan *plan, int *n_done, char *err, size_t errcap) {
    point_results *res = calloc((size_t)plan->n_points + 1, sizeof *res);
    if (!res) return fail(err, errcap, "out of memory");
    int done = 0, rc = 0;
    for (int p = 0; p < plan->n_points && rc == 0; ++p) {
        char dir[PATH_CAP];
        snprintf(dir, sizeof dir, "%s/%s", plan->dir, plan->points[p].name);
        char msg[1024];
        int got = moe_run_results_read(dir, res[p].v, msg, sizeof msg);
        if (got < 0) fprintf(stderr, "moehost: warning: %s; run %s left out of the summary\n", msg,
                             plan->points[p].name);
        res[p].ok = got == 1;
        done += got == 1;
    }
    if (rc == 0) rc = write_csv(plan, res, err, errcap);
    if (rc == 0 && strcmp(plan->sw->csv, "noise") == 0) rc = write_noise_csv(plan, res, err, errcap);
    if (rc == 0) rc = write_md(plan, res, done, err, errcap);
    free(res);
    if (n_done) *n_done = done;
    return rc;
}
