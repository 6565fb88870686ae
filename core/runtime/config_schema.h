/*
 * The config schema (private to the config layer): one table describing
 * every key of moe_config, and the small helpers that read it. Loading,
 * validation, writing and the Markdown reference are all driven by this
 * table, so a key is added in exactly one place (config_schema.c).
 */
#ifndef MOE_CONFIG_SCHEMA_H
#define MOE_CONFIG_SCHEMA_H

#include <stddef.h>

#include "config.h"

typedef enum moe_cfg_type {
    MOE_CFG_BOOL,   /* stored in an int, 0/1 */
    MOE_CFG_INT,    /* stored in an int or an int64_t: the key's size says which */
    MOE_CFG_FLOAT,  /* stored in a double */
    MOE_CFG_STRING  /* stored in a char array of the key's size */
} moe_cfg_type;

/* Numeric bounds. Which ends exist and whether they are included is in
 * `flags`, so one struct covers ">= 0", "> 0" and "[0, 1)". */
enum {
    MOE_CFG_HAS_MIN = 1,
    MOE_CFG_HAS_MAX = 2,
    MOE_CFG_MIN_OPEN = 4, /* min itself is not allowed */
    MOE_CFG_MAX_OPEN = 8  /* max itself is not allowed */
};
typedef struct moe_cfg_range {
    double min, max;
    unsigned flags;
} moe_cfg_range;

typedef struct moe_cfg_key {
    const char *section;
    const char *key;
    moe_cfg_type type;
    size_t offset;          /* of the field in moe_config */
    size_t size;            /* of the field: picks int vs int64_t, bounds string length */
    double default_number;  /* BOOL, INT, FLOAT */
    const char *default_string; /* STRING */
    const char *choices;    /* STRING: "a|b|c"; NULL = any text */
    const char *not_built;  /* STRING: "x|y", values known to the project but not in this build */
    moe_cfg_range range;    /* INT, FLOAT */
    const char *doc;        /* one line, Markdown */
} moe_cfg_key;

typedef struct moe_cfg_section {
    const char *name;
    const char *doc;
} moe_cfg_section;

/* Upper bound on the table size, so callers can keep per-key arrays on the stack. */
#define MOE_CFG_MAX_KEYS 96

extern const moe_cfg_key moe_cfg_keys[];
extern const int moe_cfg_n_keys;
extern const moe_cfg_section moe_cfg_sections[];
extern const int moe_cfg_n_sections;

const moe_cfg_key *moe_cfg_find_key(const char *section, const char *key);
const moe_cfg_section *moe_cfg_find_section(const char *name);

/* 1 when value is one of the '|'-separated words in list. */
int moe_cfg_word_in_list(const char *list, const char *value);
/* The '|'-separated list written with a separator, e.g. "learned, rope". */
void moe_cfg_list_text(const char *list, const char *separator, char *buf, size_t cap);

int moe_cfg_in_range(const moe_cfg_range *r, double value);
/* ">= 0", "> 0", "[0, 1)"; "" when the range has no bounds. */
void moe_cfg_range_text(const moe_cfg_range *r, char *buf, size_t cap);

/* Edits (insert, delete, substitute, swap two neighbours) between two
 * byte strings, for "did you mean" suggestions. */
int moe_cfg_edit_distance(const char *a, const char *b);

/* Shortest text that reads back as the same double, always a TOML float
 * ("0.1", "1e-05", "256.0", "inf", "nan"). */
void moe_cfg_format_float(double value, char *buf, size_t cap);

/* A TOML basic string with quotes and escapes. When it does not fit, it is
 * cut and ends in `..."`, which is what error messages want; writers pass a
 * buffer of MOE_CFG_QUOTED_CAP bytes for strings of a config field. */
#define MOE_CFG_QUOTED_CAP (6 * MOE_CFG_STR + 8)
void moe_cfg_quote(const char *s, char *buf, size_t cap);

/* The key's default written as a TOML value. */
void moe_cfg_default_text(const moe_cfg_key *k, char *buf, size_t cap);

#endif
