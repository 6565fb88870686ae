/*
 * Loading and checking a moe_config: defaults from the schema, then the TOML
 * file, then `--set` overrides, then the checks that involve several keys.
 * Every message starts with where the offending value came from
 * ("FILE:LINE: " or "--set section.key: ") and ends with how to fix it.
 * Writing the config and its Markdown reference live in config_write.c and
 * config_doc.c.
 */
/* realpath() is an XSI function; the build's _POSIX_C_SOURCE alone hides it. */
#define _XOPEN_SOURCE 700

#include "config.h"
#include "config_extra.h"
#include "config_schema.h"
#include "toml_reader.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Where a key's current value came from, so a check that fails later (for
 * example top_k > num_experts) can still name the line to edit. */
typedef enum origin_kind { FROM_DEFAULT = 0, FROM_FILE, FROM_SET } origin_kind;
typedef struct origin {
    origin_kind kind;
    int line; /* FROM_FILE only */
} origin;

/* One moe_config_load call in progress. */
typedef struct loader {
    moe_config *cfg;
    origin origins[MOE_CFG_MAX_KEYS]; /* by index into moe_cfg_keys */
    char *err;
    size_t errcap;
} loader;

/* Room for "FILE:LINE: " with a MOE_CFG_STR file name. */
#define WHERE_CAP (MOE_CFG_STR + 80)

static int fail(char *err, size_t errcap, const char *fmt, ...) {
    if (err && errcap > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errcap, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* dst gets src and zeros after it, so equal configs are equal byte for byte. */
static int store_string(char *dst, size_t cap, const char *src) {
    size_t n = strlen(src);
    if (n >= cap) return -1;
    memset(dst, 0, cap);
    memcpy(dst, src, n);
    return 0;
}

static void where_text(const moe_config *cfg, const char *section, const char *key, origin o, char *buf,
                       size_t cap) {
    if (o.kind == FROM_FILE)
        snprintf(buf, cap, "%s:%d: ", cfg->source, o.line);
    else if (o.kind == FROM_SET)
        snprintf(buf, cap, "--set %s.%s: ", section, key);
    else if (cfg->source[0])
        snprintf(buf, cap, "%s: ", cfg->source);
    else
        buf[0] = '\0';
}

static void section_list_text(char *buf, size_t cap) {
    size_t used = 0;
    buf[0] = '\0';
    for (int s = 0; s < moe_cfg_n_sections; ++s) {
        int n = snprintf(buf + used, cap - used, "%s[%s]", s ? ", " : "", moe_cfg_sections[s].name);
        if (n < 0 || (size_t)n >= cap - used) return;
        used += (size_t)n;
    }
}

/* ---- reading and writing fields through the schema ---- */

static int64_t read_int(const moe_config *cfg, const moe_cfg_key *k) {
    const char *p = (const char *)cfg + k->offset;
    if (k->size == sizeof(int64_t)) return *(const int64_t *)(const void *)p;
    return *(const int *)(const void *)p;
}

static void write_int(moe_config *cfg, const moe_cfg_key *k, int64_t value) {
    char *p = (char *)cfg + k->offset;
    if (k->size == sizeof(int64_t))
        *(int64_t *)(void *)p = value;
    else
        *(int *)(void *)p = (int)value;
}

static double read_float(const moe_config *cfg, const moe_cfg_key *k) {
    return *(const double *)(const void *)((const char *)cfg + k->offset);
}

static const char *read_string(const moe_config *cfg, const moe_cfg_key *k) {
    return (const char *)cfg + k->offset;
}

/* ---- messages about one value ---- */

static const char *type_name(moe_cfg_type t) {
    switch (t) {
    case MOE_CFG_BOOL: return "a boolean (true or false)";
    case MOE_CFG_INT: return "an integer";
    case MOE_CFG_FLOAT: return "a number";
    case MOE_CFG_STRING: return "a string";
    }
    return "?";
}

static void describe_value(const moe_toml_value *v, char *buf, size_t cap) {
    char text[96];
    switch (v->type) {
    case MOE_TOML_BOOL: snprintf(buf, cap, "a boolean (%s)", v->i ? "true" : "false"); return;
    case MOE_TOML_INT: snprintf(buf, cap, "an integer (%lld)", (long long)v->i); return;
    case MOE_TOML_FLOAT:
        moe_cfg_format_float(v->f, text, sizeof text);
        snprintf(buf, cap, "a float (%s)", text);
        return;
    case MOE_TOML_STRING:
        moe_cfg_quote(v->s, text, sizeof text);
        snprintf(buf, cap, "a string (%s)", text);
        return;
    case MOE_TOML_ARRAY: snprintf(buf, cap, "an array"); return;
    }
    snprintf(buf, cap, "a value of unknown type");
}

static int type_error(const moe_cfg_key *k, const moe_toml_value *v, int from_set, const char *where, char *err,
                      size_t errcap) {
    char got[160], example[MOE_CFG_QUOTED_CAP];
    describe_value(v, got, sizeof got);
    moe_cfg_default_text(k, example, sizeof example);
    if (from_set && k->type == MOE_CFG_STRING)
        return fail(err, errcap,
                    "%s%s.%s must be %s, got %s; to pass text that looks like another type, quote it "
                    "for the shell: --set %s.%s='\"text\"'",
                    where, k->section, k->key, type_name(k->type), got, k->section, k->key);
    if (from_set)
        return fail(err, errcap, "%s%s.%s must be %s, got %s; e.g. --set %s.%s=%s", where, k->section, k->key,
                    type_name(k->type), got, k->section, k->key, example);
    return fail(err, errcap, "%s%s.%s must be %s, got %s; e.g. %s = %s", where, k->section, k->key,
                type_name(k->type), got, k->key, example);
}

static int choice_error(const moe_cfg_key *k, const char *value, const char *where, char *err, size_t errcap) {
    char quoted[96], allowed[160];
    moe_cfg_quote(value, quoted, sizeof quoted);
    moe_cfg_list_text(k->choices, ", ", allowed, sizeof allowed);
    if (k->not_built && moe_cfg_word_in_list(k->not_built, value))
        return fail(err, errcap, "%s%s.%s = %s is not available in this build; use one of: %s", where, k->section,
                    k->key, quoted, allowed);
    return fail(err, errcap, "%s%s.%s = %s is not one of: %s", where, k->section, k->key, quoted, allowed);
}

static int range_error(const moe_cfg_key *k, const char *value_text, const char *where, char *err,
                       size_t errcap) {
    char range[64];
    moe_cfg_range_text(&k->range, range, sizeof range);
    int two_sided = (k->range.flags & MOE_CFG_HAS_MIN) && (k->range.flags & MOE_CFG_HAS_MAX);
    return fail(err, errcap, "%s%s.%s = %s is out of range; it must be %s%s", where, k->section, k->key,
                value_text, two_sided ? "in " : "", range);
}

/* Range, finiteness and choices of the value now stored in cfg. Loading
 * runs it right after storing; moe_config_validate runs it on every key,
 * since a caller may have filled the struct by hand. */
static int check_value(const moe_config *cfg, const moe_cfg_key *k, const char *where, char *err, size_t errcap) {
    char text[64];
    switch (k->type) {
    case MOE_CFG_BOOL: return 0;
    case MOE_CFG_INT: {
        int64_t value = read_int(cfg, k);
        snprintf(text, sizeof text, "%lld", (long long)value);
        return moe_cfg_in_range(&k->range, (double)value) ? 0 : range_error(k, text, where, err, errcap);
    }
    case MOE_CFG_FLOAT: {
        double value = read_float(cfg, k);
        moe_cfg_format_float(value, text, sizeof text);
        if (!isfinite(value))
            return fail(err, errcap, "%s%s.%s = %s is not a finite number; give a finite value", where,
                        k->section, k->key, text);
        return moe_cfg_in_range(&k->range, value) ? 0 : range_error(k, text, where, err, errcap);
    }
    case MOE_CFG_STRING: {
        const char *value = read_string(cfg, k);
        if (k->choices && !moe_cfg_word_in_list(k->choices, value)) return choice_error(k, value, where, err, errcap);
        return 0;
    }
    }
    return 0;
}

/* Convert a TOML value to the key's type and store it; type errors only. */
static int store_value(moe_config *cfg, const moe_cfg_key *k, const moe_toml_value *v, int from_set,
                       const char *where, char *err, size_t errcap) {
    switch (k->type) {
    case MOE_CFG_BOOL:
        if (v->type != MOE_TOML_BOOL) return type_error(k, v, from_set, where, err, errcap);
        write_int(cfg, k, v->i ? 1 : 0);
        return 0;
    case MOE_CFG_INT:
        if (v->type != MOE_TOML_INT) return type_error(k, v, from_set, where, err, errcap);
        if (k->size != sizeof(int64_t) && (v->i < INT_MIN || v->i > INT_MAX))
            return fail(err, errcap, "%s%s.%s = %lld does not fit in a 32-bit integer; it must be at most %d",
                        where, k->section, k->key, (long long)v->i, INT_MAX);
        write_int(cfg, k, v->i);
        return 0;
    case MOE_CFG_FLOAT: {
        /* An integer is a fine way to write a number: lr = 1, rope_theta = 10000. */
        if (v->type != MOE_TOML_FLOAT && v->type != MOE_TOML_INT)
            return type_error(k, v, from_set, where, err, errcap);
        double value = v->type == MOE_TOML_INT ? (double)v->i : v->f;
        *(double *)(void *)((char *)cfg + k->offset) = value;
        return 0;
    }
    case MOE_CFG_STRING:
        if (v->type != MOE_TOML_STRING) return type_error(k, v, from_set, where, err, errcap);
        if (store_string((char *)cfg + k->offset, k->size, v->s) != 0) {
            if (k->choices) return choice_error(k, v->s, where, err, errcap);
            return fail(err, errcap, "%s%s.%s is %zu bytes long; at most %zu fit, shorten it", where, k->section,
                        k->key, strlen(v->s), k->size - 1);
        }
        return 0;
    }
    return 0;
}

/* ---- unknown names ---- */

/* The schema key closest to `key`: an exact match in another section, or a
 * likely typo (a few edits away, fewer for short keys). Ties go to the
 * section the user wrote. */
static const moe_cfg_key *suggest_key(const char *section, const char *key) {
    int len = (int)strlen(key), threshold = len / 3 > 1 ? len / 3 : 1;
    const moe_cfg_key *best = NULL;
    int best_distance = threshold + 1;
    for (int i = 0; i < moe_cfg_n_keys; ++i) {
        const moe_cfg_key *k = &moe_cfg_keys[i];
        int d = moe_cfg_edit_distance(key, k->key);
        int same_section = section && strcmp(k->section, section) == 0;
        if (d < best_distance || (d == best_distance && best && same_section && strcmp(best->section, section) != 0)) {
            best = k;
            best_distance = d;
        }
    }
    return best;
}

static int unknown_key(const char *section, const char *key, const char *where, char *err, size_t errcap) {
    const moe_cfg_key *best = suggest_key(section, key);
    if (best && strcmp(best->section, section) == 0)
        return fail(err, errcap, "%sunknown key '%s' in [%s]; did you mean '%s'?", where, key, section, best->key);
    if (best)
        return fail(err, errcap, "%sunknown key '%s' in [%s]; did you mean '%s'? It belongs in [%s]", where, key,
                    section, best->key, best->section);
    char valid[1024];
    size_t used = 0;
    valid[0] = '\0';
    for (int i = 0; i < moe_cfg_n_keys; ++i) {
        if (strcmp(moe_cfg_keys[i].section, section) != 0) continue;
        int n = snprintf(valid + used, sizeof valid - used, "%s%s", used ? ", " : "", moe_cfg_keys[i].key);
        if (n < 0 || (size_t)n >= sizeof valid - used) break;
        used += (size_t)n;
    }
    return fail(err, errcap, "%sunknown key '%s' in [%s]; valid keys: %s", where, key, section, valid);
}

static int check_section(const char *name, const char *where, char *err, size_t errcap) {
    if (moe_cfg_find_section(name)) return 0;
    if (strcmp(name, "sweep") == 0)
        return fail(err, errcap,
                    "%s[sweep] belongs to sweeps: `moehost --config FILE` on a file with a [sweep] table takes "
                    "--set sweep.KEY=VALUE; one run (`moehost train`, or a file without [sweep]) has none",
                    where);
    const moe_cfg_section *best = NULL;
    int len = (int)strlen(name), best_distance = (len / 3 > 1 ? len / 3 : 1) + 1;
    for (int s = 0; s < moe_cfg_n_sections; ++s) {
        int d = moe_cfg_edit_distance(name, moe_cfg_sections[s].name);
        if (d < best_distance) {
            best = &moe_cfg_sections[s];
            best_distance = d;
        }
    }
    if (best) return fail(err, errcap, "%sunknown section [%s]; did you mean [%s]?", where, name, best->name);
    char sections[256];
    section_list_text(sections, sizeof sections);
    return fail(err, errcap, "%sunknown section [%s]; valid sections: %s", where, name, sections);
}

/* ---- router options: kept as written, the plugin checks them ---- */

static int set_router_option(moe_config *cfg, const char *key, const moe_toml_value *v, origin o,
                             const char *where, char *err, size_t errcap) {
    moe_router_cfg *r = &cfg->router;
    if (v->type == MOE_TOML_ARRAY)
        return fail(err, errcap, "%srouter.%s is an array; router options take a single value", where, key);
    if (key[0] == '\0') return fail(err, errcap, "%s[router] has an option with an empty name; name it", where);
    if (strlen(key) >= sizeof r->opt_keys[0])
        return fail(err, errcap, "%srouter option name '%s' is too long; at most %zu characters", where, key,
                    sizeof r->opt_keys[0] - 1);
    if (v->type == MOE_TOML_STRING && strlen(v->s) >= sizeof r->opt_strs[0])
        return fail(err, errcap, "%srouter.%s is %zu bytes long; at most %zu fit, shorten it", where, key,
                    strlen(v->s), sizeof r->opt_strs[0] - 1);
    int index = -1;
    for (int i = 0; i < r->n_opts; ++i)
        if (strcmp(r->opt_keys[i], key) == 0) index = i;
    if (index < 0) {
        if (r->n_opts == MOE_CFG_MAX_ROUTER_OPTS)
            return fail(err, errcap, "%srouter.%s: too many [router] options; at most %d", where, key,
                        MOE_CFG_MAX_ROUTER_OPTS);
        index = r->n_opts++;
    }
    moe_option *opt = &r->opts[index];
    store_string(r->opt_keys[index], sizeof r->opt_keys[index], key);
    memset(r->opt_strs[index], 0, sizeof r->opt_strs[index]);
    memset(opt, 0, sizeof *opt);
    switch (v->type) {
    case MOE_TOML_BOOL: opt->type = MOE_OPT_BOOL; break;
    case MOE_TOML_INT: opt->type = MOE_OPT_INT; break;
    case MOE_TOML_FLOAT: opt->type = MOE_OPT_FLOAT; break;
    case MOE_TOML_STRING: opt->type = MOE_OPT_STRING; break;
    case MOE_TOML_ARRAY: break; /* refused above */
    }
    /* Integers and booleans also fill f, so a plugin reading a float option
     * written as `temperature = 1` needs no special case. */
    opt->i = v->type == MOE_TOML_BOOL || v->type == MOE_TOML_INT ? v->i : 0;
    opt->f = v->type == MOE_TOML_FLOAT ? v->f : (double)opt->i;
    if (v->type == MOE_TOML_STRING) store_string(r->opt_strs[index], sizeof r->opt_strs[index], v->s);
    r->opt_line[index] = o.kind == FROM_FILE ? o.line : 0;
    moe_config_fix_pointers(cfg);
    return 0;
}

/* ---- applying one value, from the file or from --set ---- */

static int apply_value(loader *L, const char *section, const char *key, const moe_toml_value *v, origin o) {
    char where[WHERE_CAP];
    where_text(L->cfg, section, key, o, where, sizeof where);
    if (strcmp(section, "router") == 0 && strcmp(key, "plugin") != 0)
        return set_router_option(L->cfg, key, v, o, where, L->err, L->errcap);
    const moe_cfg_key *k = moe_cfg_find_key(section, key);
    if (!k) return unknown_key(section, key, where, L->err, L->errcap);
    if (store_value(L->cfg, k, v, o.kind == FROM_SET, where, L->err, L->errcap) != 0) return -1;
    L->origins[k - moe_cfg_keys] = o;
    return check_value(L->cfg, k, where, L->err, L->errcap);
}

static int apply_file(loader *L, const char *path) {
    moe_toml_doc doc;
    if (moe_toml_parse_file(path, &doc, L->err, L->errcap) != 0) return -1;
    char where[WHERE_CAP], sections[256];
    int rc = 0;
    for (int t = 0; t < doc.n_tables && rc == 0; ++t) {
        /* [sweep] describes a set of runs, not one: runtime/sweep.c reads it. */
        if (strcmp(doc.tables[t].name, MOE_SWEEP_SECTION) == 0) continue;
        snprintf(where, sizeof where, "%s:%d: ", path, doc.tables[t].line);
        rc = check_section(doc.tables[t].name, where, L->err, L->errcap);
    }
    for (int e = 0; e < doc.n_entries && rc == 0; ++e) {
        const moe_toml_entry *entry = &doc.entries[e];
        origin o = { FROM_FILE, entry->line };
        if (strcmp(entry->table, MOE_SWEEP_SECTION) == 0) continue;
        if (entry->table[0] == '\0') {
            snprintf(where, sizeof where, "%s:%d: ", path, entry->line);
            const moe_cfg_key *home = suggest_key(NULL, entry->key);
            section_list_text(sections, sizeof sections);
            if (home && strcmp(home->key, entry->key) == 0)
                rc = fail(L->err, L->errcap, "%skey '%s' is outside any section; move it under [%s]", where,
                          entry->key, home->section);
            else
                rc = fail(L->err, L->errcap, "%skey '%s' is outside any section; put it under one of %s", where,
                          entry->key, sections);
            break;
        }
        rc = apply_value(L, entry->table, entry->key, &entry->value, o);
    }
    moe_toml_doc_free(&doc);
    return rc;
}

/* A relative data.path written in a file means "next to the file" when
 * something is there; the result is made absolute so the written config
 * works from any folder. Otherwise it stays relative to the working
 * directory (see config.h). */
static int resolve_data_path(loader *L, const char *config_path) {
    moe_config *cfg = L->cfg;
    const char *data_path = cfg->data.path;
    if (data_path[0] == '\0' || data_path[0] == '/') return 0;
    const char *slash = strrchr(config_path, '/');
    int dir_len = slash ? (int)(slash - config_path) : 1;
    const char *dir = slash ? config_path : ".";
    size_t cap = (size_t)dir_len + strlen(data_path) + 2;
    char *joined = malloc(cap);
    if (!joined) return fail(L->err, L->errcap, "out of memory resolving data.path");
    snprintf(joined, cap, "%.*s/%s", dir_len, dir, data_path);
    struct stat st;
    char *absolute = stat(joined, &st) == 0 ? realpath(joined, NULL) : NULL;
    free(joined);
    if (!absolute) return 0;
    int rc = 0;
    if (store_string(cfg->data.path, sizeof cfg->data.path, absolute) != 0) {
        const moe_cfg_key *k = moe_cfg_find_key("data", "path");
        rc = fail(L->err, L->errcap,
                  "%s:%d: data.path resolves to %s, longer than %zu bytes; use a shorter path (e.g. a symbolic "
                  "link)",
                  cfg->source, L->origins[k - moe_cfg_keys].line, absolute, sizeof cfg->data.path - 1);
    }
    free(absolute);
    return rc;
}

/* "section.key=value": the value is read as TOML when it is a valid TOML
 * value, else taken as text, so `--set router.plugin=softk` needs no quotes. */
static int apply_override(loader *L, const char *text) {
    const char *eq = strchr(text, '=');
    if (!eq)
        return fail(L->err, L->errcap, "--set '%s': expected section.key=value, e.g. --set model.d_model=512", text);
    const char *name_begin = text, *name_end = eq;
    while (*name_begin == ' ' || *name_begin == '\t') ++name_begin;
    while (name_end > name_begin && (name_end[-1] == ' ' || name_end[-1] == '\t')) --name_end;
    char name[192];
    if ((size_t)(name_end - name_begin) >= sizeof name)
        return fail(L->err, L->errcap, "--set '%.60s...': the key is too long", text);
    memcpy(name, name_begin, (size_t)(name_end - name_begin));
    name[name_end - name_begin] = '\0';

    const char *value_begin = eq + 1, *value_end = eq + strlen(eq);
    while (*value_begin == ' ' || *value_begin == '\t') ++value_begin;
    while (value_end > value_begin && (value_end[-1] == ' ' || value_end[-1] == '\t')) --value_end;
    size_t value_len = (size_t)(value_end - value_begin);

    char *dot = strchr(name, '.');
    if (!dot || dot == name || dot[1] == '\0') {
        const moe_cfg_key *home = suggest_key(NULL, dot ? dot + 1 : name);
        if (!dot && home && strcmp(home->key, name) == 0)
            return fail(L->err, L->errcap, "--set '%s': missing section; write --set %s.%s=%.*s", text,
                        home->section, name, (int)value_len, value_begin);
        return fail(L->err, L->errcap, "--set '%s': expected section.key=value, e.g. --set model.d_model=512",
                    text);
    }
    *dot = '\0';
    const char *section = name, *key = dot + 1;
    char where[WHERE_CAP];
    snprintf(where, sizeof where, "--set %s.%s: ", section, key);
    if (strchr(key, '.'))
        return fail(L->err, L->errcap, "%snested keys are not supported; use section.key", where);
    if (check_section(section, where, L->err, L->errcap) != 0) return -1;

    char *toml_text = malloc(value_len + 8), *bare = malloc(value_len + 1);
    if (!toml_text || !bare) {
        free(toml_text);
        free(bare);
        return fail(L->err, L->errcap, "out of memory reading --set %s.%s", section, key);
    }
    snprintf(toml_text, value_len + 8, "v = %.*s\n", (int)value_len, value_begin);
    memcpy(bare, value_begin, value_len);
    bare[value_len] = '\0';

    moe_toml_doc doc;
    char ignored[256];
    int is_toml = moe_toml_parse_string(toml_text, "--set", &doc, ignored, sizeof ignored) == 0 &&
                  doc.n_entries == 1 && doc.n_tables == 0 && strcmp(doc.entries[0].key, "v") == 0;
    moe_toml_value as_text = { MOE_TOML_STRING, 0, 0.0, bare, NULL, 0 };
    origin o = { FROM_SET, 0 };
    int rc = apply_value(L, section, key, is_toml ? &doc.entries[0].value : &as_text, o);
    moe_toml_doc_free(&doc);
    free(toml_text);
    free(bare);
    return rc;
}

/* ---- checks across keys ---- */

typedef struct checker {
    const moe_config *cfg;
    const origin *origins; /* NULL when called from moe_config_validate */
    char *err;
    size_t errcap;
} checker;

/* Where to point the user: the first of the named keys ("moe.top_k") that
 * was set explicitly, else just the file. */
static void blame(const checker *c, const char *first, const char *second, char *buf, size_t cap) {
    const char *names[2] = { first, second };
    origin none = { FROM_DEFAULT, 0 };
    for (int n = 0; n < 2 && c->origins; ++n) {
        if (!names[n]) continue;
        char section[32];
        const char *dot = strchr(names[n], '.');
        snprintf(section, sizeof section, "%.*s", (int)(dot - names[n]), names[n]);
        const moe_cfg_key *k = moe_cfg_find_key(section, dot + 1);
        if (k && c->origins[k - moe_cfg_keys].kind != FROM_DEFAULT) {
            where_text(c->cfg, k->section, k->key, c->origins[k - moe_cfg_keys], buf, cap);
            return;
        }
    }
    where_text(c->cfg, "", "", none, buf, cap);
}

static int is_plain_folder_name(const char *name) {
    return name[0] != '\0' && !strchr(name, '/') && strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

static int check_across_keys(const checker *c) {
    const moe_config *cfg = c->cfg;
    char where[WHERE_CAP];
    const moe_model_cfg *m = &cfg->model;
    const moe_moe_cfg *moe = &cfg->moe;

    if (moe->top_k > moe->num_experts) {
        blame(c, "moe.top_k", "moe.num_experts", where, sizeof where);
        return fail(c->err, c->errcap, "%smoe.top_k = %d exceeds moe.num_experts = %d; choose top_k <= num_experts",
                    where, moe->top_k, moe->num_experts);
    }
    if (m->n_heads > 0 && m->d_model % m->n_heads != 0) {
        int below = m->d_model - m->d_model % m->n_heads, above = below + m->n_heads;
        blame(c, "model.d_model", "model.n_heads", where, sizeof where);
        if (below > 0)
            return fail(c->err, c->errcap,
                        "%smodel.d_model = %d is not a multiple of model.n_heads = %d; choose d_model = %d or %d, "
                        "or another n_heads",
                        where, m->d_model, m->n_heads, below, above);
        return fail(c->err, c->errcap,
                    "%smodel.d_model = %d is not a multiple of model.n_heads = %d; choose d_model = %d, or fewer "
                    "heads",
                    where, m->d_model, m->n_heads, above);
    }
    if (strcmp(m->pos, "rope") == 0 && m->n_heads > 0 && (m->d_model / m->n_heads) % 2 != 0) {
        blame(c, "model.pos", "model.d_model", where, sizeof where);
        return fail(c->err, c->errcap,
                    "%smodel.pos = \"rope\" needs an even head dimension, but d_model / n_heads = %d / %d = %d; "
                    "change d_model or n_heads, or use pos = \"learned\"",
                    where, m->d_model, m->n_heads, m->d_model / m->n_heads);
    }
    if (!is_plain_folder_name(cfg->run.name)) {
        char quoted[96];
        moe_cfg_quote(cfg->run.name, quoted, sizeof quoted);
        blame(c, "run.name", NULL, where, sizeof where);
        return fail(c->err, c->errcap,
                    "%srun.name = %s must be a plain folder name (not empty, no '/', not '.' or '..'); results go "
                    "to out_dir/name/",
                    where, quoted);
    }
    if (cfg->run.out_dir[0] == '\0') {
        blame(c, "run.out_dir", NULL, where, sizeof where);
        return fail(c->err, c->errcap, "%srun.out_dir is empty; use \".\" for the working directory", where);
    }
    if (cfg->router.plugin[0] == '\0') {
        blame(c, "router.plugin", NULL, where, sizeof where);
        return fail(c->err, c->errcap,
                    "%srouter.plugin is empty; name a router plugin (`moehost plugins` lists them) or the path of "
                    "a plugin .so",
                    where);
    }
    return 0;
}

/* ---- public API ---- */

void moe_config_fix_pointers(moe_config *cfg) {
    moe_router_cfg *r = &cfg->router;
    for (int i = 0; i < r->n_opts && i < MOE_CFG_MAX_ROUTER_OPTS; ++i) {
        r->opts[i].key = r->opt_keys[i];
        r->opts[i].s = r->opts[i].type == MOE_OPT_STRING ? r->opt_strs[i] : NULL;
    }
}

void moe_config_defaults(moe_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    for (int i = 0; i < moe_cfg_n_keys; ++i) {
        const moe_cfg_key *k = &moe_cfg_keys[i];
        switch (k->type) {
        case MOE_CFG_BOOL:
        case MOE_CFG_INT: write_int(cfg, k, (int64_t)k->default_number); break;
        case MOE_CFG_FLOAT: *(double *)(void *)((char *)cfg + k->offset) = k->default_number; break;
        case MOE_CFG_STRING: store_string((char *)cfg + k->offset, k->size, k->default_string); break;
        }
    }
    moe_config_fix_pointers(cfg);
}

static int load_into(loader *L, const char *path, const char *const *overrides, int n_overrides) {
    moe_config *cfg = L->cfg;
    if (path) {
        if (store_string(cfg->source, sizeof cfg->source, path) != 0)
            return fail(L->err, L->errcap, "config path '%.60s...' is too long; at most %zu bytes", path,
                        sizeof cfg->source - 1);
        if (apply_file(L, path) != 0) return -1;
        const moe_cfg_key *data_path = moe_cfg_find_key("data", "path");
        if (L->origins[data_path - moe_cfg_keys].kind == FROM_FILE && resolve_data_path(L, path) != 0) return -1;
    }
    for (int i = 0; i < n_overrides; ++i)
        if (apply_override(L, overrides[i]) != 0) return -1;

    if (cfg->data.path[0] == '\0') {
        const moe_cfg_key *k = moe_cfg_find_key("data", "path");
        char where[WHERE_CAP];
        where_text(cfg, k->section, k->key, L->origins[k - moe_cfg_keys], where, sizeof where);
        return fail(L->err, L->errcap,
                    "%sdata.path is not set; point it at a text file or a folder made by `moehost prepare` "
                    "(path = \"...\" under [data], or --set data.path=...)",
                    where);
    }
    checker c = { cfg, L->origins, L->err, L->errcap };
    return check_across_keys(&c);
}

int moe_config_load(moe_config *cfg, const char *path, const char *const *overrides, int n_overrides, char *err,
                    size_t errcap) {
    loader L;
    memset(&L, 0, sizeof L);
    L.cfg = cfg;
    L.err = err;
    L.errcap = errcap;
    moe_config_defaults(cfg);
    int rc = load_into(&L, path, overrides, n_overrides);
    moe_config_fix_pointers(cfg);
    return rc;
}

int moe_config_validate(const moe_config *cfg, char *err, size_t errcap) {
    char where[WHERE_CAP];
    origin none = { FROM_DEFAULT, 0 };
    for (int i = 0; i < moe_cfg_n_keys; ++i) {
        where_text(cfg, moe_cfg_keys[i].section, moe_cfg_keys[i].key, none, where, sizeof where);
        if (moe_cfg_keys[i].type == MOE_CFG_STRING &&
            !memchr(read_string(cfg, &moe_cfg_keys[i]), '\0', moe_cfg_keys[i].size))
            return fail(err, errcap, "%s%s.%s is not NUL-terminated", where, moe_cfg_keys[i].section,
                        moe_cfg_keys[i].key);
        if (check_value(cfg, &moe_cfg_keys[i], where, err, errcap) != 0) return -1;
    }
    if (cfg->router.n_opts < 0 || cfg->router.n_opts > MOE_CFG_MAX_ROUTER_OPTS)
        return fail(err, errcap, "router.n_opts = %d is outside 0..%d", cfg->router.n_opts, MOE_CFG_MAX_ROUTER_OPTS);
    checker c = { cfg, NULL, err, errcap };
    return check_across_keys(&c);
}
