/*
 * `moehost prepare`: shard headers byte by byte, ids split across shards,
 * vocab.json, uint16 and uint32 ids, stale shards removed on a re-prepare,
 * and a prepared folder loading the same tokens as the text it came from.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data_test_files.h"
#include "runtime/data.h"
#include "test_util.h"

static char err[512];
static char tmp_dir[64];

static uint64_t le_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = v << 8 | p[i];
    return v;
}

static int prepare_one(const char *input, const char *out_dir, long long shard_tokens) {
    const char *inputs[1] = {input};
    err[0] = '\0';
    int rc = moe_prepare(inputs, 1, out_dir, "char", shard_tokens, err, sizeof err);
    if (rc != 0) fprintf(stderr, "moe_prepare: %s\n", err);
    return rc;
}

/* Same stream, split and vocabulary whichever way the data was opened. */
static void check_same_dataset(const moe_dataset *a, const moe_dataset *b) {
    CHECK(a->n_tokens == b->n_tokens);
    CHECK(a->n_train == b->n_train);
    CHECK(a->vocab_size == b->vocab_size);
    CHECK(a->tokenizer == b->tokenizer);
    CHECK(a->chars_per_token == b->chars_per_token);
    CHECK(a->vocab.size == b->vocab.size);
    if (a->vocab.size == b->vocab.size && a->vocab.size > 0)
        CHECK(memcmp(a->vocab.codepoints, b->vocab.codepoints,
                     (size_t)a->vocab.size * sizeof *a->vocab.codepoints) == 0);
    if (a->n_tokens == b->n_tokens && a->n_tokens > 0)
        CHECK(memcmp(a->tokens, b->tokens, a->n_tokens * sizeof *a->tokens) == 0);
}

/* "hello world" three times: 33 tokens, vocab ' ' d e h l o r w (ids 0..7),
 * one copy = 3 2 4 4 5 0 7 5 6 4 1. With 10 tokens a shard: 10+10+10+3. */
static void test_small_shards(void) {
    char text_path[128], out[128];
    snprintf(text_path, sizeof text_path, "%s/hello.txt", tmp_dir);
    snprintf(out, sizeof out, "%s/hello_shards", tmp_dir);
    const char *text = "hello worldhello worldhello world";
    CHECK(test_write_file(text_path, text, 33) == 0);
    CHECK(prepare_one(text_path, out, 10) == 0);

    size_t n = 0;
    unsigned char *shard = test_read_file(test_path(out, "tokens_000.bin"), &n);
    CHECK(shard != NULL && n == 64 + 10 * 2);
    if (shard && n == 84) {
        CHECK(memcmp(shard, "MOETOKS\0", 8) == 0);
        const unsigned char version[4] = {1, 0, 0, 0}, tokenizer[4] = {1, 0, 0, 0};
        const unsigned char vocab_size[4] = {8, 0, 0, 0}, bytes_per_id[4] = {2, 0, 0, 0};
        const unsigned char ten[8] = {10, 0, 0, 0, 0, 0, 0, 0};
        CHECK(memcmp(shard + 8, version, 4) == 0);
        CHECK(memcmp(shard + 12, tokenizer, 4) == 0);
        CHECK(memcmp(shard + 16, vocab_size, 4) == 0);
        CHECK(memcmp(shard + 20, bytes_per_id, 4) == 0);
        CHECK(memcmp(shard + 24, ten, 8) == 0); /* tokens */
        CHECK(memcmp(shard + 32, ten, 8) == 0); /* characters */
        int reserved_zero = 1;
        for (int i = 40; i < 64; ++i) reserved_zero &= shard[i] == 0;
        CHECK(reserved_zero);
        /* "hello worl" as little-endian uint16 */
        const unsigned char ids[20] = {3, 0, 2, 0, 4, 0, 4, 0, 5, 0, 0, 0, 7, 0, 5, 0, 6, 0, 4, 0};
        CHECK(memcmp(shard + 64, ids, 20) == 0);
    }
    free(shard);

    /* The last shard holds tokens 30..32 = copy positions 8, 9, 10 = r l d = 6 4 1. */
    shard = test_read_file(test_path(out, "tokens_003.bin"), &n);
    CHECK(shard != NULL && n == 64 + 3 * 2);
    if (shard && n == 70) {
        CHECK(le_u64(shard + 24) == 3 && le_u64(shard + 32) == 3);
        const unsigned char ids[6] = {6, 0, 4, 0, 1, 0};
        CHECK(memcmp(shard + 64, ids, 6) == 0);
    }
    free(shard);
    CHECK(!test_file_exists(test_path(out, "tokens_004.bin")));
    CHECK(!test_file_exists(test_path(out, "tokens_000.bin.tmp")));

    json_error_t jerr;
    json_t *vocab_json = json_load_file(test_path(out, "vocab.json"), 0, &jerr);
    CHECK(vocab_json != NULL);
    if (vocab_json) {
        CHECK(strcmp(json_string_value(json_object_get(vocab_json, "tokenizer")), "char") == 0);
        const json_t *list = json_object_get(vocab_json, "vocab");
        const char *want[8] = {" ", "d", "e", "h", "l", "o", "r", "w"};
        CHECK(json_array_size(list) == 8);
        for (size_t i = 0; i < 8 && i < json_array_size(list); ++i)
            CHECK(strcmp(json_string_value(json_array_get(list, i)), want[i]) == 0);
        json_decref(vocab_json);
    }

    /* val_fraction 0.25: n_train = floor(33 * 0.75) = floor(24.75) = 24. */
    moe_dataset from_text, from_shards;
    CHECK(moe_dataset_open(&from_text, text_path, 0.25, 4, err, sizeof err) == 0);
    CHECK(moe_dataset_open(&from_shards, out, 0.25, 4, err, sizeof err) == 0);
    CHECK(from_shards.n_tokens == 33 && from_shards.n_train == 24);
    CHECK(from_shards.chars_per_token == 1.0);
    CHECK(from_shards.tokenizer == MOE_TOKENIZER_CHAR);
    check_same_dataset(&from_text, &from_shards);
    moe_dataset_close(&from_shards);

    /* Re-prepared with the default shard size: one shard, the old 001..003 gone. */
    CHECK(prepare_one(text_path, out, 0) == 0);
    CHECK(test_file_exists(test_path(out, "tokens_000.bin")));
    CHECK(!test_file_exists(test_path(out, "tokens_001.bin")));
    CHECK(!test_file_exists(test_path(out, "tokens_003.bin")));
    CHECK(moe_dataset_open(&from_shards, out, 0.25, 4, err, sizeof err) == 0);
    check_same_dataset(&from_text, &from_shards);
    moe_dataset_close(&from_shards);
    moe_dataset_close(&from_text);
}

/* Several inputs are one stream: "hello " + "world" = "hello world". */
static void test_concatenated_inputs(void) {
    char a[128], b[128], out[128];
    snprintf(a, sizeof a, "%s/part_a.txt", tmp_dir);
    snprintf(b, sizeof b, "%s/part_b.txt", tmp_dir);
    snprintf(out, sizeof out, "%s/parts/nested", tmp_dir); /* made with its parent */
    CHECK(test_write_file(a, "hello ", 6) == 0);
    CHECK(test_write_file(b, "world", 5) == 0);
    const char *inputs[2] = {a, b};
    CHECK(moe_prepare(inputs, 2, out, "char", 100, err, sizeof err) == 0);
    size_t n = 0;
    unsigned char *shard = test_read_file(test_path(out, "tokens_000.bin"), &n);
    CHECK(shard != NULL && n == 64 + 11 * 2);
    if (shard && n == 86) {
        const unsigned char ids[22] = {3, 0, 2, 0, 4, 0, 4, 0, 5, 0, 0, 0,
                                       7, 0, 5, 0, 6, 0, 4, 0, 1, 0};
        CHECK(le_u64(shard + 24) == 11);
        CHECK(memcmp(shard + 64, ids, 22) == 0);
    }
    free(shard);
}

/* U+0000 and a 2-byte character survive vocab.json: "a\0b\xC3\xA9" has
 * the vocabulary U+0000 a b U+00E9 (ids 0..3) and the ids 1 0 2 3. */
static void test_nul_and_multibyte_vocab(void) {
    char text_path[128], out[128];
    snprintf(text_path, sizeof text_path, "%s/nul.txt", tmp_dir);
    snprintf(out, sizeof out, "%s/nul_shards", tmp_dir);
    CHECK(test_write_file(text_path, "a\0b\xC3\xA9", 5) == 0);
    CHECK(prepare_one(text_path, out, 0) == 0);
    moe_dataset ds;
    /* 4 tokens, val_fraction 0.5: 2 and 2, enough for seq_len 1. */
    CHECK(moe_dataset_open(&ds, out, 0.5, 1, err, sizeof err) == 0);
    CHECK(ds.vocab_size == 4 && ds.vocab.size == 4);
    if (ds.vocab.size == 4) {
        CHECK(ds.vocab.codepoints[0] == 0 && ds.vocab.codepoints[1] == 'a');
        CHECK(ds.vocab.codepoints[2] == 'b' && ds.vocab.codepoints[3] == 0xE9);
    }
    const uint32_t want[4] = {1, 0, 2, 3};
    CHECK(ds.n_tokens == 4 && memcmp(ds.tokens, want, sizeof want) == 0);
    moe_dataset_close(&ds);
}

/* 65536 distinct characters (U+10000..U+1FFFF, 4 bytes each) do not fit
 * uint16 ids, so the shard stores uint32: vocab size 65536 = 00 00 01 00. */
static void test_uint32_ids(void) {
    char text_path[128], out[128];
    snprintf(text_path, sizeof text_path, "%s/wide.txt", tmp_dir);
    snprintf(out, sizeof out, "%s/wide_shards", tmp_dir);
    enum { N = 65536 };
    unsigned char *text = malloc(4 * N);
    for (uint32_t i = 0; i < N; ++i) {
        uint32_t cp = 0x10000 + (N - 1 - i); /* descending, so id = N-1-i */
        text[4 * i + 0] = (unsigned char)(0xF0 | (cp >> 18));
        text[4 * i + 1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        text[4 * i + 2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        text[4 * i + 3] = (unsigned char)(0x80 | (cp & 0x3F));
    }
    CHECK(test_write_file(text_path, text, 4 * N) == 0);
    free(text);
    CHECK(prepare_one(text_path, out, 0) == 0);
    size_t n = 0;
    unsigned char *shard = test_read_file(test_path(out, "tokens_000.bin"), &n);
    CHECK(shard != NULL && n == 64 + (size_t)N * 4);
    if (shard && n == 64 + (size_t)N * 4) {
        const unsigned char vocab_size[4] = {0, 0, 1, 0}, bytes_per_id[4] = {4, 0, 0, 0};
        CHECK(memcmp(shard + 16, vocab_size, 4) == 0);
        CHECK(memcmp(shard + 20, bytes_per_id, 4) == 0);
        /* First id 65535 = FF FF 00 00, last id 0. */
        const unsigned char first[4] = {0xFF, 0xFF, 0, 0}, last[4] = {0, 0, 0, 0};
        CHECK(memcmp(shard + 64, first, 4) == 0);
        CHECK(memcmp(shard + n - 4, last, 4) == 0);
    }
    free(shard);
    moe_dataset ds;
    CHECK(moe_dataset_open(&ds, out, 0.5, 8, err, sizeof err) == 0);
    CHECK(ds.vocab_size == N && ds.n_tokens == N);
    if (ds.n_tokens == N) CHECK(ds.tokens[0] == N - 1 && ds.tokens[N - 1] == 0);
    moe_dataset_close(&ds);
}

static void test_tinystories(void) {
    if (!test_file_exists(MOE_TEST_DATA)) {
        printf("note: %s absent; skipping the TinyStories checks\n", MOE_TEST_DATA);
        return;
    }
    char out[128];
    snprintf(out, sizeof out, "%s/tinystories", tmp_dir);
    /* Under 800k tokens at 100k a shard: 8 shards, the last one partial. */
    CHECK(prepare_one(MOE_TEST_DATA, out, 100000) == 0);
    CHECK(test_file_exists(test_path(out, "tokens_007.bin")));
    CHECK(!test_file_exists(test_path(out, "tokens_008.bin")));
    moe_dataset from_text, from_shards;
    CHECK(moe_dataset_open(&from_text, MOE_TEST_DATA, 0.1, 256, err, sizeof err) == 0);
    CHECK(moe_dataset_open(&from_shards, out, 0.1, 256, err, sizeof err) == 0);
    CHECK(from_shards.vocab_size == 80);
    check_same_dataset(&from_text, &from_shards);
    moe_dataset_close(&from_text);
    moe_dataset_close(&from_shards);
}

static void test_errors(void) {
    char missing[128], empty[128], out[128];
    snprintf(missing, sizeof missing, "%s/no_such_input.txt", tmp_dir);
    snprintf(empty, sizeof empty, "%s/empty.txt", tmp_dir);
    snprintf(out, sizeof out, "%s/error_out", tmp_dir);
    CHECK(test_write_file(empty, "", 0) == 0);
    const char *inputs[2] = {missing, empty};

    err[0] = '\0';
    CHECK(moe_prepare(inputs, 1, out, "char", 0, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "no_such_input.txt") != NULL, "%s", err);
    err[0] = '\0';
    CHECK(moe_prepare(inputs + 1, 1, out, "char", 0, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "empty") != NULL, "%s", err);
    err[0] = '\0';
    CHECK(moe_prepare(inputs + 1, 1, out, "gpt2", 0, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "gpt2") != NULL, "%s", err);
    CHECK(moe_prepare(inputs, 0, out, "char", 0, err, sizeof err) == -1);
    CHECK(!test_file_exists(test_path(out, "tokens_000.bin")));
}

int main(void) {
    test_make_temp_dir(tmp_dir);
    test_small_shards();
    test_concatenated_inputs();
    test_nul_and_multibyte_vocab();
    test_uint32_ids();
    test_tinystories();
    test_errors();
    test_remove_tree(tmp_dir);
    return moe_test_summary("test_data_prepare");
}
