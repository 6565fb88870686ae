/*
 * The schema helpers behind the config layer (core/runtime/config_schema.h):
 * float and string formatting that must read back exactly, range text and
 * checks, word lists, and the typo distance used for suggestions.
 */
#include "runtime/config_schema.h"
#include "runtime/toml_reader.h"
#include "test_util.h"

static void check_float_text(double value, const char *expected) {
    char buf[64];
    moe_cfg_format_float(value, buf, sizeof buf);
    CHECK_MSG(strcmp(buf, expected) == 0, "%.17g -> %s, expected %s", value, buf, expected);
}

/* The text, parsed by the TOML reader, gives back a float equal to value. */
static int reads_back(double value) {
    char buf[64], text[96], err[256];
    moe_cfg_format_float(value, buf, sizeof buf);
    snprintf(text, sizeof text, "x = %s\n", buf);
    moe_toml_doc doc;
    if (moe_toml_parse_string(text, "float", &doc, err, sizeof err) != 0) {
        fprintf(stderr, "%s does not parse: %s\n", buf, err);
        return 0;
    }
    int ok = doc.n_entries == 1 && doc.entries[0].value.type == MOE_TOML_FLOAT &&
             (isnan(value) ? isnan(doc.entries[0].value.f) : doc.entries[0].value.f == value);
    if (!ok) fprintf(stderr, "%.17g written as %s reads back differently\n", value, buf);
    moe_toml_doc_free(&doc);
    return ok;
}

static void test_format_float(void) {
    check_float_text(0.1, "0.1");
    check_float_text(256.0, "256.0");
    check_float_text(10000.0, "10000.0");
    check_float_text(1e-5, "1e-5");
    check_float_text(3e-4, "0.0003");
    check_float_text(1e20, "1e20");
    check_float_text(-2.5e-300, "-2.5e-300");
    check_float_text(0.0, "0.0");
    check_float_text(-0.0, "-0.0");
    check_float_text(123456.789, "123456.789");
    check_float_text(1.0 / 3.0, "0.3333333333333333");
    check_float_text(INFINITY, "inf");
    check_float_text(-INFINITY, "-inf");
    check_float_text(NAN, "nan");

    /* Random bit patterns over the whole double range, and values next to
     * powers of ten, where log10 rounding could pick the wrong exponent. */
    moe_test_rng rng = { 0x9E3779B97F4A7C15ULL };
    int bad = 0;
    for (int i = 0; i < 20000; ++i) {
        uint64_t bits = moe_test_next(&rng);
        double value;
        memcpy(&value, &bits, sizeof value);
        if (!isfinite(value)) continue;
        bad += !reads_back(value);
    }
    for (int e = -6; e <= 17; ++e) {
        double p = pow(10.0, e);
        bad += !reads_back(nextafter(p, 0)) + !reads_back(p) + !reads_back(nextafter(p, INFINITY));
    }
    CHECK_MSG(bad == 0, "%d values did not read back", bad);
}

static void test_quote(void) {
    char buf[MOE_CFG_QUOTED_CAP];
    moe_cfg_quote("plain", buf, sizeof buf);
    CHECK(strcmp(buf, "\"plain\"") == 0);
    moe_cfg_quote("a\"b\\c\td\n\x01", buf, sizeof buf);
    CHECK_MSG(strcmp(buf, "\"a\\\"b\\\\c\\td\\n\\u0001\"") == 0, "%s", buf);

    /* Cut to the buffer, marked, and never inside a UTF-8 character. */
    char small[12];
    moe_cfg_quote("abcdefghijklmnop", small, sizeof small);
    CHECK_MSG(strcmp(small, "\"abcdef...\"") == 0, "%s", small); /* 11 chars + NUL: full */
    moe_cfg_quote("abcde\xc3\xa9zzzzzzzz", small, sizeof small);
    CHECK_MSG(strcmp(small, "\"abcde...\"") == 0, "%s", small);
    moe_cfg_quote("abcd\xc3\xa9zzzzzzzz", small, sizeof small);
    CHECK_MSG(strcmp(small, "\"abcd\xc3\xa9...\"") == 0, "%s", small);
    moe_cfg_quote("exactly8", small, sizeof small); /* 10 chars + NUL fit in 12 */
    CHECK_MSG(strcmp(small, "\"exactly8\"") == 0, "%s", small);
}

static void test_ranges_and_lists(void) {
    moe_cfg_range at_least_one = { 1, 0, MOE_CFG_HAS_MIN };
    moe_cfg_range open_unit = { 0, 1, MOE_CFG_HAS_MIN | MOE_CFG_HAS_MAX | MOE_CFG_MIN_OPEN | MOE_CFG_MAX_OPEN };
    moe_cfg_range half_open = { 0, 1, MOE_CFG_HAS_MIN | MOE_CFG_HAS_MAX | MOE_CFG_MAX_OPEN };
    moe_cfg_range none = { 0, 0, 0 };
    char text[64];
    CHECK(moe_cfg_in_range(&at_least_one, 1) && !moe_cfg_in_range(&at_least_one, 0.999));
    CHECK(!moe_cfg_in_range(&open_unit, 0) && moe_cfg_in_range(&open_unit, 0.5) && !moe_cfg_in_range(&open_unit, 1));
    CHECK(moe_cfg_in_range(&half_open, 0) && !moe_cfg_in_range(&half_open, 1));
    CHECK(!moe_cfg_in_range(&at_least_one, NAN) && moe_cfg_in_range(&none, -1e300));
    moe_cfg_range_text(&at_least_one, text, sizeof text);
    CHECK(strcmp(text, ">= 1") == 0);
    moe_cfg_range_text(&open_unit, text, sizeof text);
    CHECK(strcmp(text, "(0, 1)") == 0);
    moe_cfg_range_text(&half_open, text, sizeof text);
    CHECK(strcmp(text, "[0, 1)") == 0);
    moe_cfg_range_text(&none, text, sizeof text);
    CHECK(strcmp(text, "") == 0);

    CHECK(moe_cfg_word_in_list("gelu|silu|swiglu", "silu") && moe_cfg_word_in_list("gelu|silu|swiglu", "swiglu"));
    CHECK(!moe_cfg_word_in_list("gelu|silu|swiglu", "glu") && !moe_cfg_word_in_list("gelu|silu|swiglu", ""));
    moe_cfg_list_text("gelu|silu|swiglu", ", ", text, sizeof text);
    CHECK(strcmp(text, "gelu, silu, swiglu") == 0);
    char tiny[8];
    moe_cfg_list_text("gelu|silu|swiglu", ", ", tiny, sizeof tiny);
    CHECK(strlen(tiny) < sizeof tiny);
}

static void test_edit_distance_and_lookup(void) {
    CHECK(moe_cfg_edit_distance("d_model", "d_model") == 0);
    CHECK(moe_cfg_edit_distance("dmodel", "d_model") == 1);
    CHECK(moe_cfg_edit_distance("modle", "model") == 1); /* swapped neighbours */
    CHECK(moe_cfg_edit_distance("kitten", "sitting") == 3);
    CHECK(moe_cfg_edit_distance("", "abc") == 3);

    const moe_cfg_key *k = moe_cfg_find_key("moe", "top_k");
    CHECK(k && k->type == MOE_CFG_INT && k->offset == offsetof(moe_config, moe.top_k) && k->size == sizeof(int));
    k = moe_cfg_find_key("eval", "max_tokens");
    CHECK(k && k->size == sizeof(int64_t));
    CHECK(moe_cfg_find_key("model", "top_k") == NULL);
    CHECK(moe_cfg_find_section("router") && !moe_cfg_find_section("sweep"));

    /* Every key belongs to a listed section and appears once. */
    for (int i = 0; i < moe_cfg_n_keys; ++i) {
        CHECK_MSG(moe_cfg_find_section(moe_cfg_keys[i].section) != NULL, "%s", moe_cfg_keys[i].section);
        CHECK_MSG(moe_cfg_find_key(moe_cfg_keys[i].section, moe_cfg_keys[i].key) == &moe_cfg_keys[i], "%s.%s",
                  moe_cfg_keys[i].section, moe_cfg_keys[i].key);
    }
}

int main(void) {
    test_format_float();
    test_quote();
    test_ranges_and_lists();
    test_edit_distance_and_lookup();
    return moe_test_summary("test_config_schema");
}
