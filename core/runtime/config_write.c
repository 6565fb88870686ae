/*
 * moe_config_write: the resolved config as a TOML file with every key, so a
 * run folder records exactly what ran and can be re-run from it. The file is
 * written beside its final name and renamed into place, so a crash never
 * leaves a half-written config behind.
 */
#include "config.h"
#include "config_schema.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int fail(char *err, size_t errcap, const char *fmt, ...) {
    if (err && errcap > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errcap, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* Quote a string field, reading at most its array size even if a caller
 * left it without a terminating NUL. */
static void write_quoted_field(FILE *f, const char *field, size_t size) {
    char value[MOE_CFG_STR], quoted[MOE_CFG_QUOTED_CAP];
    size_t max_len = size < sizeof value ? size - 1 : sizeof value - 1;
    snprintf(value, sizeof value, "%.*s", (int)max_len, field);
    moe_cfg_quote(value, quoted, sizeof quoted);
    fputs(quoted, f);
}

static void write_schema_value(FILE *f, const moe_config *cfg, const moe_cfg_key *k) {
    const char *field = (const char *)cfg + k->offset;
    char number[64];
    switch (k->type) {
    case MOE_CFG_BOOL: fputs(*(const int *)(const void *)field ? "true" : "false", f); return;
    case MOE_CFG_INT:
        if (k->size == sizeof(int64_t))
            fprintf(f, "%lld", (long long)*(const int64_t *)(const void *)field);
        else
            fprintf(f, "%d", *(const int *)(const void *)field);
        return;
    case MOE_CFG_FLOAT:
        moe_cfg_format_float(*(const double *)(const void *)field, number, sizeof number);
        fputs(number, f);
        return;
    case MOE_CFG_STRING: write_quoted_field(f, field, k->size); return;
    }
}

/* Bare keys are A-Za-z0-9_-; anything else a plugin option was named with
 * (TOML allows "quoted keys") is written quoted. */
static void write_key(FILE *f, const char *key) {
    int bare = key[0] != '\0';
    for (const char *p = key; *p; ++p)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_' ||
              *p == '-'))
            bare = 0;
    if (bare) {
        fputs(key, f);
        return;
    }
    char quoted[MOE_CFG_QUOTED_CAP];
    moe_cfg_quote(key, quoted, sizeof quoted);
    fputs(quoted, f);
}

static void write_router_options(FILE *f, const moe_router_cfg *r) {
    char number[64];
    for (int i = 0; i < r->n_opts && i < MOE_CFG_MAX_ROUTER_OPTS; ++i) {
        write_key(f, r->opt_keys[i]);
        fputs(" = ", f);
        switch (r->opts[i].type) {
        case MOE_OPT_BOOL: fputs(r->opts[i].i ? "true" : "false", f); break;
        case MOE_OPT_INT: fprintf(f, "%lld", (long long)r->opts[i].i); break;
        case MOE_OPT_FLOAT:
            moe_cfg_format_float(r->opts[i].f, number, sizeof number);
            fputs(number, f);
            break;
        case MOE_OPT_STRING: write_quoted_field(f, r->opt_strs[i], sizeof r->opt_strs[i]); break;
        }
        fputc('\n', f);
    }
}

static void write_toml(FILE *f, const moe_config *cfg) {
    fputs("# Resolved configuration: every key, defaults included.\n", f);
    for (int s = 0; s < moe_cfg_n_sections; ++s) {
        const char *section = moe_cfg_sections[s].name;
        fprintf(f, "\n[%s]\n", section);
        for (int i = 0; i < moe_cfg_n_keys; ++i) {
            if (strcmp(moe_cfg_keys[i].section, section) != 0) continue;
            fprintf(f, "%s = ", moe_cfg_keys[i].key);
            write_schema_value(f, cfg, &moe_cfg_keys[i]);
            fputc('\n', f);
        }
        if (strcmp(section, "router") == 0) write_router_options(f, &cfg->router);
    }
}

int moe_config_write(const moe_config *cfg, const char *path, char *err, size_t errcap) {
    size_t tmp_cap = strlen(path) + sizeof ".tmp";
    char *tmp = malloc(tmp_cap);
    if (!tmp) return fail(err, errcap, "out of memory writing %s", path);
    snprintf(tmp, tmp_cap, "%s.tmp", path);

    FILE *f = fopen(tmp, "w");
    if (!f) {
        int rc = fail(err, errcap, "cannot create %s: %s", tmp, strerror(errno));
        free(tmp);
        return rc;
    }
    write_toml(f, cfg);
    /* fsync before rename: otherwise a crash can leave the new name pointing
     * at an empty file on some file systems. */
    int ok = !ferror(f) && fflush(f) == 0 && fsync(fileno(f)) == 0;
    int saved_errno = errno;
    if (fclose(f) != 0 && ok) {
        ok = 0;
        saved_errno = errno;
    }
    if (!ok) {
        int rc = fail(err, errcap, "error writing %s: %s", tmp, strerror(saved_errno));
        remove(tmp);
        free(tmp);
        return rc;
    }
    if (rename(tmp, path) != 0) {
        int rc = fail(err, errcap, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        remove(tmp);
        free(tmp);
        return rc;
    }
    free(tmp);
    return 0;
}
