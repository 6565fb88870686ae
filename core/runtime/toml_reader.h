/*
 * TOML reading behind a small C API (the implementation wraps toml++ in the
 * project's one C++ file, toml_reader.cpp).
 *
 * A document comes back flat: one entry per key, named by the table that
 * holds it ("" for top-level keys) and the key, with its value and source
 * position, in document order. Configs only use one level of tables, so
 * nested tables ([a.b], inline tables inside a table) and arrays of tables
 * ([[a]]) are reported as errors rather than flattened.
 */
#ifndef MOE_TOML_READER_H
#define MOE_TOML_READER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moe_toml_type {
    MOE_TOML_BOOL = 1,
    MOE_TOML_INT = 2,
    MOE_TOML_FLOAT = 3,
    MOE_TOML_STRING = 4,
    MOE_TOML_ARRAY = 5
} moe_toml_type;

/* One value. Arrays hold scalars only (items never have type ARRAY). */
typedef struct moe_toml_value {
    moe_toml_type type;
    int64_t i;                   /* BOOL (0/1) and INT */
    double f;                    /* FLOAT */
    char *s;                     /* STRING, NUL-terminated */
    struct moe_toml_value *items; /* ARRAY: n_items scalars */
    int n_items;
} moe_toml_value;

typedef struct moe_toml_entry {
    char *table;                 /* "" for a key outside any table */
    char *key;
    moe_toml_value value;
    int line, column;            /* where the key is written, 1-based */
} moe_toml_entry;

/* A table header ([run]) or a top-level inline table (run = {...}); listed
 * separately so an empty table still shows up. */
typedef struct moe_toml_table {
    char *name;
    int line, column;
} moe_toml_table;

typedef struct moe_toml_doc {
    moe_toml_entry *entries;     /* sorted by (line, column) */
    int n_entries;
    moe_toml_table *tables;      /* sorted by (line, column) */
    int n_tables;
} moe_toml_doc;

/* Parse a file. 0 ok; -1 with "FILE:LINE:COL: description" in err (or
 * "FILE: cannot open: reason"). On error doc is left empty. */
int moe_toml_parse_file(const char *path, moe_toml_doc *doc, char *err, size_t errcap);

/* Parse text held in memory; source_name stands in for the file name in
 * error messages. Same results as moe_toml_parse_file. */
int moe_toml_parse_string(const char *text, const char *source_name, moe_toml_doc *doc, char *err,
                          size_t errcap);

/* Release everything a parse allocated; leaves doc empty. Safe on an empty doc. */
void moe_toml_doc_free(moe_toml_doc *doc);

#ifdef __cplusplus
}
#endif
#endif
