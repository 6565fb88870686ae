/*
 * The TOML reader (core/runtime/toml_reader.h): values, types, positions and
 * order of the flat entry list, and the errors for shapes the config layer
 * does not use.
 */
#include "runtime/toml_reader.h"
#include "test_util.h"

#include <unistd.h>

#define CHECK_HAS(text, part) CHECK_MSG(strstr((text), (part)) != NULL, "'%s' not in: %s", (part), (text))

static const moe_toml_entry *find_entry(const moe_toml_doc *doc, const char *table, const char *key) {
    for (int i = 0; i < doc->n_entries; ++i)
        if (strcmp(doc->entries[i].table, table) == 0 && strcmp(doc->entries[i].key, key) == 0)
            return &doc->entries[i];
    return NULL;
}

static void test_values_and_positions(void) {
    /* Keys deliberately out of alphabetical order: the reader must give them
     * back in the order written, with the line and column of each key. */
    const char *text = "top = 1\n"                 /* line 1 */
                       "\n"
                       "[zeta]\n"                  /* line 3 */
                       "  b_int = -42\n"           /* line 4, column 3 */
                       "a_float = 2.5e-3\n"        /* line 5 */
                       "c_bool = false\n"          /* line 6 */
                       "d_str = \"h\\u00e9llo\\n\"\n" /* line 7 */
                       "\n"
                       "[alpha]\n"                 /* line 9 */
                       "grid = [1, 2.5, \"x\", true]\n" /* line 10 */
                       "empty = []\n"              /* line 11 */
                       "[beta]\n";                 /* line 12: an empty table */
    moe_toml_doc doc;
    char err[256] = "";
    int rc = moe_toml_parse_string(text, "mem.toml", &doc, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc != 0) return;

    CHECK(doc.n_entries == 7);
    const char *order[] = { "top", "b_int", "a_float", "c_bool", "d_str", "grid", "empty" };
    for (int i = 0; i < 7 && i < doc.n_entries; ++i) CHECK_MSG(strcmp(doc.entries[i].key, order[i]) == 0, "%d", i);

    const moe_toml_entry *e = find_entry(&doc, "", "top");
    CHECK(e && e->value.type == MOE_TOML_INT && e->value.i == 1 && e->line == 1 && e->column == 1);
    e = find_entry(&doc, "zeta", "b_int");
    CHECK(e && e->value.type == MOE_TOML_INT && e->value.i == -42 && e->line == 4 && e->column == 3);
    e = find_entry(&doc, "zeta", "a_float");
    CHECK(e && e->value.type == MOE_TOML_FLOAT && e->value.f == 2.5e-3 && e->line == 5);
    e = find_entry(&doc, "zeta", "c_bool");
    CHECK(e && e->value.type == MOE_TOML_BOOL && e->value.i == 0 && e->line == 6);
    e = find_entry(&doc, "zeta", "d_str");
    CHECK(e && e->value.type == MOE_TOML_STRING && strcmp(e->value.s, "h\xc3\xa9llo\n") == 0 && e->line == 7);

    e = find_entry(&doc, "alpha", "grid");
    CHECK(e && e->value.type == MOE_TOML_ARRAY && e->value.n_items == 4 && e->line == 10);
    if (e && e->value.n_items == 4) {
        CHECK(e->value.items[0].type == MOE_TOML_INT && e->value.items[0].i == 1);
        CHECK(e->value.items[1].type == MOE_TOML_FLOAT && e->value.items[1].f == 2.5);
        CHECK(e->value.items[2].type == MOE_TOML_STRING && strcmp(e->value.items[2].s, "x") == 0);
        CHECK(e->value.items[3].type == MOE_TOML_BOOL && e->value.items[3].i == 1);
    }
    e = find_entry(&doc, "alpha", "empty");
    CHECK(e && e->value.type == MOE_TOML_ARRAY && e->value.n_items == 0);

    CHECK(doc.n_tables == 3);
    if (doc.n_tables == 3) {
        CHECK(strcmp(doc.tables[0].name, "zeta") == 0 && doc.tables[0].line == 3);
        CHECK(strcmp(doc.tables[1].name, "alpha") == 0 && doc.tables[1].line == 9);
        CHECK(strcmp(doc.tables[2].name, "beta") == 0 && doc.tables[2].line == 12);
    }
    moe_toml_doc_free(&doc);
    CHECK(doc.n_entries == 0 && doc.entries == NULL && doc.n_tables == 0 && doc.tables == NULL);
    moe_toml_doc_free(&doc); /* freeing an empty doc is harmless */
}

static void expect_parse_error(const char *text, const char *part1, const char *part2) {
    moe_toml_doc doc;
    char err[512] = "";
    int rc = moe_toml_parse_string(text, "bad.toml", &doc, err, sizeof err);
    CHECK_MSG(rc == -1, "parsed: %s", text);
    CHECK(doc.n_entries == 0 && doc.entries == NULL && doc.n_tables == 0);
    CHECK_HAS(err, part1);
    if (part2) CHECK_HAS(err, part2);
    moe_toml_doc_free(&doc);
}

static void test_errors(void) {
    expect_parse_error("[a]\nx = 1\ny = = 2\n", "bad.toml:3:", NULL);
    expect_parse_error("[a]\nx = 1\nx = 2\n", "bad.toml:3:", NULL); /* duplicate key */
    expect_parse_error("s = \"unterminated\n", "bad.toml:1:", NULL);
    expect_parse_error("[a]\nx = 1\n[a.b]\ny = 2\n", "nested table [a.b] is not supported", "bad.toml:3:");
    expect_parse_error("[a]\nx = 1\nin = { y = 2 }\n", "nested table [a.in] is not supported", "bad.toml:3:");
    expect_parse_error("[[runs]]\nx = 1\n", "array of tables [[runs]] is not supported", "bad.toml:1:");
    expect_parse_error("[a]\ngrid = [[1, 2], [3]]\n", "a.grid: nested arrays are not supported", "bad.toml:2:");
    expect_parse_error("[a]\nwhen = 1979-05-27\n", "a.when: dates and times are not supported", "bad.toml:2:");

    moe_toml_doc doc;
    char err[512] = "";
    CHECK(moe_toml_parse_file("/nonexistent/folder/x.toml", &doc, err, sizeof err) == -1);
    CHECK_HAS(err, "/nonexistent/folder/x.toml: cannot open");
    CHECK_HAS(err, "No such file");

    /* A tiny error buffer is cut, never overrun (ASan would see it). */
    char tiny[8];
    CHECK(moe_toml_parse_string("x = = 1", "bad.toml", &doc, tiny, sizeof tiny) == -1);
    CHECK(strlen(tiny) == sizeof tiny - 1);
}

static void test_parse_file(void) {
    char dir[] = "/tmp/moe_toml_test_XXXXXX";
    if (!mkdtemp(dir)) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    char path[256];
    snprintf(path, sizeof path, "%s/t.toml", dir);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    fputs("# comment\n[model]\nd_model = 512\n", f);
    fclose(f);
    moe_toml_doc doc;
    char err[512] = "";
    CHECK_MSG(moe_toml_parse_file(path, &doc, err, sizeof err) == 0, "%s", err);
    CHECK(doc.n_entries == 1 && strcmp(doc.entries[0].table, "model") == 0 && doc.entries[0].value.i == 512 &&
          doc.entries[0].line == 3);
    moe_toml_doc_free(&doc);

    f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    fputs("[model]\nd_model = 512\nn_heads 4\n", f);
    fclose(f);
    CHECK(moe_toml_parse_file(path, &doc, err, sizeof err) == -1);
    char expected[300];
    snprintf(expected, sizeof expected, "%s:3:", path);
    CHECK_HAS(err, expected);
    remove(path);
    rmdir(dir);
}

int main(void) {
    test_values_and_positions();
    test_errors();
    test_parse_file();
    return moe_test_summary("test_config_toml");
}
