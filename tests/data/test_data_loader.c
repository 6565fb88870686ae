/*
 * The loader: the train/val split, training batches (deterministic, inside
 * the train split, y = x shifted by one), validation windows, a GPT-2 BPE
 * folder written by hand, and the errors for missing, empty, too short and
 * corrupt data, each naming the file at fault.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bpe_test_vocab.h"
#include "data_test_files.h"
#include "moe/philox.h"
#include "runtime/data.h"
#include "test_util.h"

static char err[512];
static char tmp_dir[64];

/* A text whose token ids equal positions: n distinct characters in
 * ascending order, U+0100, U+0101, ... (2-byte UTF-8 each, all below
 * U+0800). Returns its path. */
static const char *write_identity_text(const char *name, int n) {
    unsigned char *text = malloc(2 * (size_t)n);
    for (int i = 0; i < n; ++i) {
        uint32_t cp = 0x100u + (uint32_t)i;
        text[2 * i] = (unsigned char)(0xC0 | (cp >> 6));
        text[2 * i + 1] = (unsigned char)(0x80 | (cp & 0x3F));
    }
    const char *path = test_path(tmp_dir, name);
    CHECK(test_write_file(path, text, 2 * (size_t)n) == 0);
    free(text);
    return path;
}

static void test_split_sizes(void) {
    moe_dataset ds;
    /* 200 tokens, val 0.25: floor(200 * 0.75) = 150 train, 50 val. */
    CHECK(moe_dataset_open(&ds, write_identity_text("id200.txt", 200), 0.25, 8, err,
                           sizeof err) == 0);
    CHECK(ds.n_tokens == 200 && ds.n_train == 150);
    CHECK(ds.vocab_size == 200 && ds.tokenizer == MOE_TOKENIZER_CHAR);
    CHECK(ds.chars_per_token == 1.0);
    moe_dataset_close(&ds);
    /* 33 tokens, val 0.1: floor(33 * 0.9) = floor(29.7) = 29 train, 4 val. */
    const char *path = test_path(tmp_dir, "hello3.txt");
    CHECK(test_write_file(path, "hello worldhello worldhello world", 33) == 0);
    CHECK(moe_dataset_open(&ds, path, 0.1, 3, err, sizeof err) == 0);
    CHECK(ds.n_tokens == 33 && ds.n_train == 29);
    moe_dataset_close(&ds);
}

static void test_train_batches(void) {
    moe_dataset ds;
    /* ids = positions; 150 train tokens. With S = 8 a window starting at o
     * reads o..o+8, so the valid starts are 0..141 (142 of them). */
    CHECK(moe_dataset_open(&ds, write_identity_text("id200.txt", 200), 0.25, 8, err,
                           sizeof err) == 0);
    enum { B = 16, S = 8, STEPS = 200 };
    int32_t x[B * S], y[B * S], x2[B * S], y2[B * S];
    int min_start = 1000, max_start = -1, shifted = 1, consecutive = 1;
    for (uint64_t step = 0; step < STEPS; ++step) {
        moe_dataset_train_batch(&ds, 1234, step, B, S, x, y);
        for (int b = 0; b < B; ++b) {
            int start = x[b * S];
            if (start < min_start) min_start = start;
            if (start > max_start) max_start = start;
            for (int s = 0; s < S; ++s) {
                consecutive &= x[b * S + s] == start + s;
                shifted &= y[b * S + s] == x[b * S + s] + 1;
            }
        }
    }
    CHECK(consecutive);
    CHECK(shifted);
    /* 3200 draws over 142 starts reach both ends (a miss of either has
     * probability about e^-22) and never a start whose window would touch
     * token 150, the first validation token. */
    CHECK_MSG(min_start == 0 && max_start == 141, "starts %d..%d", min_start, max_start);

    /* A pure function of (seed, step). */
    moe_dataset_train_batch(&ds, 1234, 7, B, S, x, y);
    moe_dataset_train_batch(&ds, 1234, 7, B, S, x2, y2);
    CHECK(memcmp(x, x2, sizeof x) == 0 && memcmp(y, y2, sizeof y) == 0);
    moe_dataset_train_batch(&ds, 1234, 8, B, S, x2, y2);
    CHECK(memcmp(x, x2, sizeof x) != 0);
    moe_dataset_train_batch(&ds, 1235, 7, B, S, x2, y2);
    CHECK(memcmp(x, x2, sizeof x) != 0);

    /* The documented draw: Philox keyed (seed, step, layer 0, DATA stream),
     * elements 2b (low word) and 2b+1 (high word), modulo 142. */
    moe_rng_key key = {.seed = 1234, .step = 7, .layer = 0, .stream = MOE_RNG_STREAM_DATA};
    for (int b = 0; b < B; ++b) {
        uint64_t draw = (uint64_t)moe_rng_u32(key, 2 * (uint64_t)b + 1) << 32 |
                        moe_rng_u32(key, 2 * (uint64_t)b);
        CHECK(x[b * S] == (int32_t)(draw % 142));
    }
    moe_dataset_close(&ds);
}

static void test_val_windows(void) {
    moe_dataset ds;
    /* 20 tokens 0..19, val 0.5: train 0..9, val = 10..19 (10 tokens). */
    CHECK(moe_dataset_open(&ds, write_identity_text("id20.txt", 20), 0.5, 3, err, sizeof err) == 0);
    CHECK(ds.n_train == 10);
    /* S = 3: windows 10..13, 13..16, 16..19 share their ends: (10-1)/3 = 3. */
    CHECK(moe_dataset_val_windows(&ds, 3, 0) == 3);
    const int32_t want_x[3][3] = {{10, 11, 12}, {13, 14, 15}, {16, 17, 18}};
    const int32_t want_y[3][3] = {{11, 12, 13}, {14, 15, 16}, {17, 18, 19}};
    for (size_t i = 0; i < 3; ++i) {
        int32_t x[3], y[3];
        moe_dataset_val_window(&ds, i, 3, x, y);
        CHECK_MSG(memcmp(x, want_x[i], sizeof x) == 0, "window %zu x", i);
        CHECK_MSG(memcmp(y, want_y[i], sizeof y) == 0, "window %zu y", i);
    }
    /* The cap counts targets, 3 a window: 6 -> 2, 5 -> 1, 2 -> 0, 100 -> all 3. */
    CHECK(moe_dataset_val_windows(&ds, 3, 6) == 2);
    CHECK(moe_dataset_val_windows(&ds, 3, 5) == 1);
    CHECK(moe_dataset_val_windows(&ds, 3, 2) == 0);
    CHECK(moe_dataset_val_windows(&ds, 3, 100) == 3);
    /* S = 9: one window 10..19; S = 10 would need 11 tokens: none. */
    CHECK(moe_dataset_val_windows(&ds, 9, 0) == 1);
    int32_t x9[9], y9[9];
    moe_dataset_val_window(&ds, 0, 9, x9, y9);
    CHECK(x9[0] == 10 && x9[8] == 18 && y9[0] == 11 && y9[8] == 19);
    CHECK(moe_dataset_val_windows(&ds, 10, 0) == 0);
    moe_dataset_close(&ds);
}

/* A shard written here, independently of moe_prepare. */
static void write_shard(const char *dir, const char *name, uint32_t tokenizer, uint32_t vocab,
                        uint32_t bytes_per_id, uint64_t n_chars, const uint32_t *ids, size_t n) {
    unsigned char *buf = calloc(1, 64 + n * bytes_per_id);
    memcpy(buf, "MOETOKS", 8);
    const uint32_t fields[4] = {1, tokenizer, vocab, bytes_per_id};
    for (int f = 0; f < 4; ++f)
        for (int k = 0; k < 4; ++k) buf[8 + 4 * f + k] = (unsigned char)(fields[f] >> (8 * k));
    for (int k = 0; k < 8; ++k) {
        buf[24 + k] = (unsigned char)((uint64_t)n >> (8 * k));
        buf[32 + k] = (unsigned char)(n_chars >> (8 * k));
    }
    for (size_t i = 0; i < n; ++i)
        for (uint32_t k = 0; k < bytes_per_id; ++k)
            buf[64 + i * bytes_per_id + k] = (unsigned char)(ids[i] >> (8 * k));
    CHECK(test_write_file(test_path(dir, name), buf, 64 + n * bytes_per_id) == 0);
    free(buf);
}

static void check_open_fails(const char *path, double val_fraction, int seq_len,
                             const char *needle);

/* The loader takes BPE folders too: vocab.json gives the size, the BPE
 * files beside it must agree with it, and the headers' character counts
 * give chars_per_token (25 / 10 = 2.5). */
static void test_bpe_folder(void) {
    char dir[128];
    snprintf(dir, sizeof dir, "%s/bpe", tmp_dir);
    mkdir(dir, 0755);
    const char *vocab = "{\"tokenizer\": \"gpt2\", \"vocab_size\": 272}";
    CHECK(test_write_file(test_path(dir, "vocab.json"), vocab, strlen(vocab)) == 0);
    const uint32_t first[6] = {0, 1, 2, 0, 1, 271}, second[4] = {271, 2, 1, 0};
    write_shard(dir, "tokens_000.bin", MOE_TOKENIZER_GPT2, 272, 4, 15, first, 6);
    write_shard(dir, "tokens_001.bin", MOE_TOKENIZER_GPT2, 272, 2, 10, second, 4);
    moe_dataset ds;
    /* Without encoder.json and vocab.bpe the folder cannot decode: refused. */
    CHECK(moe_dataset_open(&ds, dir, 0.5, 2, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "encoder.json") != NULL, "%s", err);
    CHECK(write_tiny_vocab(dir) == 0);
    CHECK_MSG(moe_dataset_open(&ds, dir, 0.5, 2, err, sizeof err) == 0, "%s", err);
    CHECK(ds.tokenizer == MOE_TOKENIZER_GPT2 && ds.vocab_size == 272 && ds.vocab.size == 0);
    const uint32_t want[10] = {0, 1, 2, 0, 1, 271, 271, 2, 1, 0};
    CHECK(ds.n_tokens == 10 && memcmp(ds.tokens, want, sizeof want) == 0);
    CHECK(ds.n_train == 5);
    CHECK(ds.chars_per_token == 2.5);
    moe_dataset_close(&ds);
    /* A vocabulary size the files do not have. */
    const char *three = "{\"tokenizer\": \"gpt2\", \"vocab_size\": 3}";
    CHECK(test_write_file(test_path(dir, "vocab.json"), three, strlen(three)) == 0);
    check_open_fails(dir, 0.5, 2, "vocab_size 3");
}

/* -1, a message containing `needle`, and nothing left allocated. */
static void check_open_fails(const char *path, double val_fraction, int seq_len,
                             const char *needle) {
    moe_dataset ds;
    err[0] = '\0';
    CHECK(moe_dataset_open(&ds, path, val_fraction, seq_len, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, needle) != NULL, "wanted '%s' in: %s", needle, err);
    CHECK(ds.tokens == NULL && ds.vocab.codepoints == NULL);
}

static void test_open_errors(void) {
    check_open_fails(test_path(tmp_dir, "no_such_file.txt"), 0.1, 8, "no_such_file.txt");
    check_open_fails(test_path(tmp_dir, "no_such_file.txt"), 0.1, 8, "does not exist");

    CHECK(test_write_file(test_path(tmp_dir, "empty.txt"), "", 0) == 0);
    check_open_fails(test_path(tmp_dir, "empty.txt"), 0.1, 8, "empty.txt");

    /* 20 tokens at val 0.5 split 10/10: seq_len 9 needs 10 (fits), 10 needs 11. */
    const char *id20 = write_identity_text("id20.txt", 20);
    moe_dataset ds;
    CHECK(moe_dataset_open(&ds, id20, 0.5, 9, err, sizeof err) == 0);
    moe_dataset_close(&ds);
    check_open_fails(id20, 0.5, 10, "10 train and 10 val");
    check_open_fails(id20, 0.5, 10, "model.seq_len");
    check_open_fails(id20, 1.0, 2, "val_fraction");
}

/* A good folder made by prepare, broken one way at a time. */
static void test_corrupt_folders(void) {
    char text[128], dir[128];
    snprintf(text, sizeof text, "%s/hello3.txt", tmp_dir);
    snprintf(dir, sizeof dir, "%s/corrupt", tmp_dir);
    CHECK(test_write_file(text, "hello worldhello worldhello world", 33) == 0);
    const char *inputs[1] = {text};
    /* Shards of 10 tokens: 000..002 hold 84 bytes, 003 holds 70; vocab size 8. */
#define REPREPARE() CHECK(moe_prepare(inputs, 1, dir, "char", 10, err, sizeof err) == 0)
    REPREPARE();
    moe_dataset ds;
    CHECK(moe_dataset_open(&ds, dir, 0.25, 4, err, sizeof err) == 0);
    moe_dataset_close(&ds);

    CHECK(test_patch_file(test_path(dir, "tokens_001.bin"), 0, "X", 1) == 0);
    check_open_fails(dir, 0.25, 4, "tokens_001.bin: bad magic");
    REPREPARE();

    CHECK(truncate(test_path(dir, "tokens_002.bin"), 83) == 0);
    check_open_fails(dir, 0.25, 4, "tokens_002.bin: 83 bytes");
    REPREPARE();
    CHECK(truncate(test_path(dir, "tokens_002.bin"), 20) == 0);
    check_open_fails(dir, 0.25, 4, "tokens_002.bin: 20 bytes, shorter than the 64-byte header");
    REPREPARE();

    /* Token 1 of shard 0 set to id 8 = the vocab size (08 00 at byte 66). */
    const unsigned char id8[2] = {8, 0};
    CHECK(test_patch_file(test_path(dir, "tokens_000.bin"), 66, id8, 2) == 0);
    check_open_fails(dir, 0.25, 4, "tokens_000.bin: token 1 has id 8");
    REPREPARE();

    /* Vocab size 9 in shard 3's header disagrees with vocab.json's 8. */
    const unsigned char nine[1] = {9};
    CHECK(test_patch_file(test_path(dir, "tokens_003.bin"), 16, nine, 1) == 0);
    check_open_fails(dir, 0.25, 4, "tokens_003.bin: tokenizer 1 with vocab size 9");
    REPREPARE();

    const unsigned char version2[1] = {2};
    CHECK(test_patch_file(test_path(dir, "tokens_000.bin"), 8, version2, 1) == 0);
    check_open_fails(dir, 0.25, 4, "tokens_000.bin: format version 2");
    REPREPARE();

    CHECK(unlink(test_path(dir, "tokens_001.bin")) == 0);
    check_open_fails(dir, 0.25, 4, "tokens_001.bin: missing");
    REPREPARE();

    CHECK(unlink(test_path(dir, "vocab.json")) == 0);
    check_open_fails(dir, 0.25, 4, "vocab.json: missing");
    const char *unsorted = "{\"tokenizer\": \"char\", \"vocab\": [\"b\", \"a\"]}";
    CHECK(test_write_file(test_path(dir, "vocab.json"), unsorted, strlen(unsorted)) == 0);
    check_open_fails(dir, 0.25, 4, "vocab.json: the vocab entries are not");
    const char *two_chars = "{\"tokenizer\": \"char\", \"vocab\": [\"ab\"]}";
    CHECK(test_write_file(test_path(dir, "vocab.json"), two_chars, strlen(two_chars)) == 0);
    check_open_fails(dir, 0.25, 4, "vocab.json: the vocab entries are not");
    CHECK(test_write_file(test_path(dir, "vocab.json"), "{\"vocab\": ", 10) == 0);
    check_open_fails(dir, 0.25, 4, "vocab.json: line 1");
    REPREPARE();
#undef REPREPARE

    /* An empty folder has no shards to read. */
    char bare[128];
    snprintf(bare, sizeof bare, "%s/bare", tmp_dir);
    mkdir(bare, 0755);
    const char *vocab = "{\"tokenizer\": \"char\", \"vocab\": [\"a\"]}";
    CHECK(test_write_file(test_path(bare, "vocab.json"), vocab, strlen(vocab)) == 0);
    check_open_fails(bare, 0.25, 4, "no token shards");
}

int main(void) {
    test_make_temp_dir(tmp_dir);
    test_split_sizes();
    test_train_batches();
    test_val_windows();
    test_bpe_folder();
    test_open_errors();
    test_corrupt_folders();
    test_remove_tree(tmp_dir);
    return moe_test_summary("test_data_loader");
}
