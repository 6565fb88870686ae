/*
 * A tiny hand-made GPT-2-style BPE vocabulary for the data tests, written
 * to encoder.json and vocab.bpe in a folder, and GPT-2's byte <-> unicode
 * map computed here the way GPT-2's Python computes it (independently of
 * the library's closed form).
 *
 * Ids: 0..255 the one-byte token of byte b is id b (unlike GPT-2's order, so
 * ids can be read off by hand); 256 + r the result of the merge of rank r
 * in TINY_MERGES; 271 "<|endoftext|>", a token no merge makes. 272 in all.
 */
#ifndef MOE_BPE_TEST_VOCAB_H
#define MOE_BPE_TEST_VOCAB_H

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* bytes_to_unicode() of GPT-2's encoder.py: bs = the printable ranges
 * '!'..'~', '¡'..'¬', '®'..'ÿ' mapped to themselves; every other byte b, in
 * increasing order, appended with the code point 2**8 + n, n = 0, 1, ... */
static inline void test_gpt2_byte_map(uint32_t map[256]) {
    int kept[256] = {0};
    for (int b = '!'; b <= '~'; ++b) kept[b] = 1;
    for (int b = 0xA1; b <= 0xAC; ++b) kept[b] = 1;
    for (int b = 0xAE; b <= 0xFF; ++b) kept[b] = 1;
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b) map[b] = kept[b] ? (uint32_t)b : 256u + n++;
}

/* UTF-8 of cp (below U+0800 here) into out; returns the byte count. */
static inline size_t test_utf8_small(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xC0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/* The token string (GPT-2's encoder.json key) of a byte string. */
static inline void test_token_key(const char *bytes, size_t n, char *out) {
    uint32_t map[256];
    test_gpt2_byte_map(map);
    size_t at = 0;
    for (size_t i = 0; i < n; ++i) at += test_utf8_small(map[(unsigned char)bytes[i]], out + at);
    out[at] = '\0';
}

/* The merges, rank = index, as raw bytes (the file holds their token strings). */
static const char *const TINY_MERGES[][2] = {
    {"l", "l"},      /* 0  -> 256 "ll" */
    {"h", "e"},      /* 1  -> 257 "he" */
    {"he", "ll"},    /* 2  -> 258 "hell" */
    {"hell", "o"},   /* 3  -> 259 "hello" */
    {" ", "hello"},  /* 4  -> 260 " hello" */
    {"e", "r"},      /* 5  -> 261 "er" */
    {"l", "o"},      /* 6  -> 262 "lo" */
    {"lo", "w"},     /* 7  -> 263 "low" */
    {"low", "er"},   /* 8  -> 264 "lower" */
    {" ", "low"},    /* 9  -> 265 " low" */
    {"a", "a"},      /* 10 -> 266 "aa" */
    {"aa", "aa"},    /* 11 -> 267 "aaaa" */
    {" ", " "},      /* 12 -> 268 "  " */
    {"1", "2"},      /* 13 -> 269 "12" */
    {"'", "m"},      /* 14 -> 270 "'m" */
};
enum {
    TINY_LL = 256, TINY_HE, TINY_HELL, TINY_HELLO, TINY_SP_HELLO, TINY_ER, TINY_LO, TINY_LOW,
    TINY_LOWER, TINY_SP_LOW, TINY_AA, TINY_AAAA, TINY_SP_SP, TINY_12, TINY_QUOTE_M,
    TINY_EOT, /* 271 "<|endoftext|>" */
    TINY_VOCAB_SIZE
};
#define TINY_N_MERGES ((int)(sizeof TINY_MERGES / sizeof TINY_MERGES[0]))

/* encoder.json and vocab.bpe of the tiny vocabulary in dir; 0 ok. */
static inline int write_tiny_vocab(const char *dir) {
    json_t *enc = json_object();
    char key[64], path[512];
    for (int b = 0; b < 256; ++b) {
        char byte = (char)b;
        test_token_key(&byte, 1, key);
        json_object_set_new(enc, key, json_integer(b));
    }
    for (int r = 0; r < TINY_N_MERGES; ++r) {
        char joined[32];
        snprintf(joined, sizeof joined, "%s%s", TINY_MERGES[r][0], TINY_MERGES[r][1]);
        test_token_key(joined, strlen(joined), key);
        json_object_set_new(enc, key, json_integer(256 + r));
    }
    json_object_set_new(enc, "<|endoftext|>", json_integer(TINY_EOT));
    snprintf(path, sizeof path, "%s/encoder.json", dir);
    int rc = json_object_size(enc) == TINY_VOCAB_SIZE ? json_dump_file(enc, path, 0) : -1;
    json_decref(enc);
    if (rc != 0) return -1;
    snprintf(path, sizeof path, "%s/vocab.bpe", dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "#version: 0.2\n");
    for (int r = 0; r < TINY_N_MERGES; ++r) {
        char left[32], right[32];
        test_token_key(TINY_MERGES[r][0], strlen(TINY_MERGES[r][0]), left);
        test_token_key(TINY_MERGES[r][1], strlen(TINY_MERGES[r][1]), right);
        fprintf(f, "%s %s\n", left, right);
    }
    return fclose(f) == 0 ? 0 : -1;
}

#endif
