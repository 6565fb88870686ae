/*
 * The char tokenizer: UTF-8 decoding and encoding, the sorted vocabulary,
 * ids of known strings, the Latin-1 fallback for invalid bytes, and the
 * exact round trip of the TinyStories sample.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data_test_files.h"
#include "runtime/data.h"
#include "test_util.h"

static char err[512];

/* Every UTF-8 length and the code points at the edges of each length. */
static void test_utf8_round_trip(void) {
    /* The characters in a scrambled order; their code points and UTF-8:
     *   U+20AC  E2 82 AC      U+0041  41           U+10FFFF F4 8F BF BF
     *   U+00E9  C3 A9         U+0800  E0 A0 80     U+007F   7F
     *   U+1F600 F0 9F 98 80   U+0080  C2 80        U+FFFF   EF BF BF
     *   U+07FF  DF BF         U+10000 F0 90 80 80  U+0041   41 (again)
     * 3+1+4 + 2+3+1 + 4+2+3 + 2+4+1 = 30 bytes, 12 characters. */
    const char text[] = "\xE2\x82\xAC" "A" "\xF4\x8F\xBF\xBF"
                        "\xC3\xA9" "\xE0\xA0\x80" "\x7F"
                        "\xF0\x9F\x98\x80" "\xC2\x80" "\xEF\xBF\xBF"
                        "\xDF\xBF" "\xF0\x90\x80\x80" "A";
    size_t n = sizeof text - 1;
    CHECK(n == 30);
    moe_char_vocab v;
    CHECK(moe_char_vocab_build(&v, text, n, err, sizeof err) == 0);
    /* The 11 distinct code points, sorted; id = index. */
    const uint32_t sorted[11] = {0x41,   0x7F,  0x80,    0xE9,    0x7FF,   0x800,
                                 0x20AC, 0xFFFF, 0x10000, 0x1F600, 0x10FFFF};
    CHECK(v.size == 11);
    for (int i = 0; i < 11 && i < v.size; ++i)
        CHECK_MSG(v.codepoints[i] == sorted[i], "id %d: U+%04X", i, (unsigned)v.codepoints[i]);

    /* Text order mapped through the sorted list above. */
    const uint32_t want_ids[12] = {6, 0, 10, 3, 5, 1, 9, 2, 7, 4, 8, 0};
    uint32_t ids[30];
    long long count = moe_char_encode(&v, text, n, ids, err, sizeof err);
    CHECK(count == 12);
    for (int i = 0; i < 12 && i < count; ++i) CHECK_MSG(ids[i] == want_ids[i], "token %d", i);

    char back[64];
    size_t back_len = moe_char_decode(&v, ids, 12, back, sizeof back);
    CHECK(back_len == 30);
    CHECK(memcmp(back, text, 30) == 0);
    CHECK(back[30] == '\0');

    /* A short buffer ends at a whole character: "€" (3) + "A" (1) + NUL fit
     * in 8 bytes, U+10FFFF (4 more) does not; 9 bytes take all three. */
    CHECK(moe_char_decode(&v, ids, 3, back, 8) == 4);
    CHECK(memcmp(back, "\xE2\x82\xAC" "A", 5) == 0);
    CHECK(moe_char_decode(&v, ids, 3, back, 9) == 8);
    CHECK(moe_char_decode(&v, ids, 3, back, 1) == 0 && back[0] == '\0');
    back[0] = 'x';
    CHECK(moe_char_decode(&v, ids, 3, back, 0) == 0 && back[0] == 'x');

    /* An id past the vocabulary decodes to U+FFFD (EF BF BD). */
    uint32_t bad_id = 11;
    CHECK(moe_char_decode(&v, &bad_id, 1, back, sizeof back) == 3);
    CHECK(memcmp(back, "\xEF\xBF\xBD", 4) == 0);
    moe_char_vocab_free(&v);
    CHECK(v.size == 0 && v.codepoints == NULL);
}

static void test_hello_world(void) {
    moe_char_vocab v;
    CHECK(moe_char_vocab_build(&v, "hello world", 11, err, sizeof err) == 0);
    /* ' ' 0x20, d 0x64, e 0x65, h 0x68, l 0x6C, o 0x6F, r 0x72, w 0x77 */
    const uint32_t want_vocab[8] = {' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w'};
    CHECK(v.size == 8);
    for (int i = 0; i < 8 && i < v.size; ++i) CHECK(v.codepoints[i] == want_vocab[i]);

    /* h=3 e=2 l=4 l=4 o=5 ' '=0 w=7 o=5 r=6 l=4 d=1 */
    const uint32_t want_ids[11] = {3, 2, 4, 4, 5, 0, 7, 5, 6, 4, 1};
    uint32_t ids[11];
    CHECK(moe_char_encode(&v, "hello world", 11, ids, err, sizeof err) == 11);
    CHECK(memcmp(ids, want_ids, sizeof want_ids) == 0);
    /* "lower" reuses the vocabulary: l=4 o=5 w=7 e=2 r=6 */
    const uint32_t lower_ids[5] = {4, 5, 7, 2, 6};
    CHECK(moe_char_encode(&v, "lower", 5, ids, err, sizeof err) == 5);
    CHECK(memcmp(ids, lower_ids, sizeof lower_ids) == 0);

    /* 'x' (U+0078) at byte 2 of "hex" is not in the vocabulary. */
    err[0] = '\0';
    CHECK(moe_char_encode(&v, "hex", 3, ids, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "U+0078") && strstr(err, "byte 2"), "%s", err);
    moe_char_vocab_free(&v);

    CHECK(moe_char_vocab_build(&v, "", 0, err, sizeof err) == -1);
    CHECK(v.size == 0 && v.codepoints == NULL);
}

/* Bytes that start no valid sequence become U+0080..U+00FF one by one. */
static void test_invalid_utf8(void) {
    /* a; FF (never valid); b; C0 AF (overlong '/': C0 is never a lead);
     * ED A0 80 (a surrogate: after ED the second byte must be <= 9F);
     * C3 '(' (lead without its continuation); E2 82 cut off by the end. */
    const char text[] = "a\xFF" "b\xC0\xAF" "\xED\xA0\x80" "\xC3(" "\xE2\x82";
    size_t n = sizeof text - 1;
    /* Code points in order: 61 FF 62 C0 AF ED A0 80 C3 28 E2 82 (12).
     * Sorted distinct: 28 61 62 80 82 A0 AF C0 C3 E2 ED FF (12). */
    const uint32_t sorted[12] = {0x28, 0x61, 0x62, 0x80, 0x82, 0xA0,
                                 0xAF, 0xC0, 0xC3, 0xE2, 0xED, 0xFF};
    const uint32_t want_ids[12] = {1, 11, 2, 7, 6, 10, 5, 3, 8, 0, 9, 4};
    moe_char_vocab v;
    CHECK(moe_char_vocab_build(&v, text, n, err, sizeof err) == 0);
    CHECK(v.size == 12);
    for (int i = 0; i < 12 && i < v.size; ++i)
        CHECK_MSG(v.codepoints[i] == sorted[i], "id %d: U+%04X", i, (unsigned)v.codepoints[i]);
    uint32_t ids[16];
    CHECK(moe_char_encode(&v, text, n, ids, err, sizeof err) == 12);
    CHECK(memcmp(ids, want_ids, sizeof want_ids) == 0);
    /* Decoding writes each as valid UTF-8: U+00FF = C3 BF, U+0080 = C2 80, ... */
    const char want_text[] = "a\xC3\xBF" "b\xC3\x80\xC2\xAF" "\xC3\xAD\xC2\xA0\xC2\x80"
                             "\xC3\x83(" "\xC3\xA2\xC2\x82";
    char back[64];
    CHECK(moe_char_decode(&v, ids, 12, back, sizeof back) == sizeof want_text - 1);
    CHECK(strcmp(back, want_text) == 0);
    moe_char_vocab_free(&v);
}

/* The code points the tokenizer reads in text: its ids mapped back through
 * its vocabulary. Returns the count (at most cap). */
static int codepoints_of(const char *text, size_t n, uint32_t *out, int cap) {
    moe_char_vocab v;
    if (moe_char_vocab_build(&v, text, n, err, sizeof err) != 0) return -1;
    uint32_t ids[16];
    long long count = n <= 16 ? moe_char_encode(&v, text, n, ids, err, sizeof err) : -1;
    for (long long i = 0; i < count && i < cap; ++i) out[i] = v.codepoints[ids[i]];
    moe_char_vocab_free(&v);
    return (int)count;
}

/* Each edge of the UTF-8 grammar, and what decoding makes of it. */
static void test_utf8_edges(void) {
    static const struct {
        const char *bytes;
        int n_codepoints;
        uint32_t codepoints[4];
    } cases[] = {
        {"\xC2\x80", 1, {0x80}},                            /* smallest 2-byte */
        {"\xC1\xBF", 2, {0xC1, 0xBF}},                      /* overlong 2-byte U+007F */
        {"\xE0\x9F\xBF", 3, {0xE0, 0x9F, 0xBF}},            /* overlong 3-byte U+07FF */
        {"\xED\x9F\xBF", 1, {0xD7FF}},                      /* last before the surrogates */
        {"\xED\xBF\xBF", 3, {0xED, 0xBF, 0xBF}},            /* surrogate U+DFFF */
        {"\xEE\x80\x80", 1, {0xE000}},                      /* first after them */
        {"\xF0\x8F\xBF\xBF", 4, {0xF0, 0x8F, 0xBF, 0xBF}},  /* overlong 4-byte U+FFFF */
        {"\xF4\x90\x80\x80", 4, {0xF4, 0x90, 0x80, 0x80}},  /* U+110000, past Unicode */
        {"\xF5\x80\x80\x80", 4, {0xF5, 0x80, 0x80, 0x80}},  /* F5 never starts one */
        {"\xF0\x9F\x98", 3, {0xF0, 0x9F, 0x98}},            /* 4-byte cut to 3 */
        {"\xE2\x82x", 3, {0xE2, 0x82, 'x'}},                /* continuation replaced */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
        uint32_t got[8] = {0};
        int count = codepoints_of(cases[c].bytes, strlen(cases[c].bytes), got, 8);
        int same = count == cases[c].n_codepoints;
        for (int i = 0; same && i < count; ++i) same = got[i] == cases[c].codepoints[i];
        CHECK_MSG(same, "case %zu: %d code points, first U+%04X", c, count, (unsigned)got[0]);
    }
}

/* Per shared/data/README.md the sample has 80 distinct characters. */
static void test_tinystories(void) {
    size_t n = 0;
    unsigned char *text = test_read_file(MOE_TEST_DATA, &n);
    if (!text) {
        printf("note: %s absent; skipping the TinyStories checks\n", MOE_TEST_DATA);
        return;
    }
    moe_char_vocab v;
    CHECK(moe_char_vocab_build(&v, (const char *)text, n, err, sizeof err) == 0);
    CHECK_MSG(v.size == 80, "%d distinct characters", v.size);
    /* The smallest are the newline and the space, as in data.h's example. */
    CHECK(v.size > 2 && v.codepoints[0] == '\n' && v.codepoints[1] == ' ');
    uint32_t *ids = malloc(n * sizeof *ids);
    long long count = moe_char_encode(&v, (const char *)text, n, ids, err, sizeof err);
    /* Not ASCII throughout (it has curly quotes), so fewer tokens than bytes. */
    CHECK(count > 0 && (size_t)count < n);
    char *back = malloc(n + 1);
    size_t back_len = moe_char_decode(&v, ids, (size_t)(count > 0 ? count : 0), back, n + 1);
    CHECK(back_len == n);
    CHECK(memcmp(back, text, n) == 0);
    free(back);
    free(ids);
    free(text);
    moe_char_vocab_free(&v);
}

int main(void) {
    test_utf8_round_trip();
    test_hello_world();
    test_invalid_utf8();
    test_utf8_edges();
    test_tinystories();
    return moe_test_summary("test_data_tokenizer");
}
