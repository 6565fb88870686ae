/*
 * GPT-2 byte-level BPE: the byte <-> unicode map, loading (and rejecting)
 * encoder.json and vocab.bpe, merges in rank order on a tiny hand-made
 * vocabulary, GPT-2's pre-tokenizer splits, invalid UTF-8 and NUL bytes,
 * the exact round trip of thousands of random byte strings, decoding for
 * people, `moehost prepare --tokenizer gpt2` and the loader on its output,
 * and, when data/gpt2 holds GPT-2's real files (scripts/setup_data.sh
 * --gpt2), ids known from outside this project.
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bpe_test_vocab.h"
#include "data_test_files.h"
#include "runtime/data.h"
#include "runtime/tokenizer_bpe.h"
#include "test_util.h"

static char err[1024];
static char tmp_dir[64];
static char tiny_dir[128];

/* ---- the byte map ---- */

static void test_byte_map(void) {
    uint32_t want[256];
    test_gpt2_byte_map(want);
    int bijective = 1, seen[324] = {0};
    for (int b = 0; b < 256; ++b) {
        uint32_t cp = moe_bpe_byte_to_codepoint((unsigned char)b);
        CHECK_MSG(cp == want[b], "byte %d -> U+%04X, want U+%04X", b, (unsigned)cp,
                  (unsigned)want[b]);
        CHECK_MSG(moe_bpe_codepoint_to_byte(cp) == b, "U+%04X back to %d", (unsigned)cp, b);
        if (cp < 324) bijective &= !seen[cp]++;
        else bijective = 0;
    }
    CHECK(bijective);
    /* By hand: the bytes that are not printable Latin-1 are 0..32 (33 of
     * them), 127..160 (34) and 173 (1), 68 in all, mapped in order to
     * U+0100.. : 0 -> U+0100 'Ā', 10 -> U+010A 'Ċ', 32 -> U+0120 'Ġ',
     * 127 -> U+0100 + 33 = U+0121 'ġ', 128 -> U+0122, 160 -> U+0121 + 33 =
     * U+0142 'ł', 173 -> U+0143 'Ń' (the 68th). The rest map to themselves. */
    CHECK(moe_bpe_byte_to_codepoint(0) == 0x100);
    CHECK(moe_bpe_byte_to_codepoint(10) == 0x10A);
    CHECK(moe_bpe_byte_to_codepoint(32) == 0x120);
    CHECK(moe_bpe_byte_to_codepoint(127) == 0x121);
    CHECK(moe_bpe_byte_to_codepoint(128) == 0x122);
    CHECK(moe_bpe_byte_to_codepoint(160) == 0x142);
    CHECK(moe_bpe_byte_to_codepoint(173) == 0x143);
    CHECK(moe_bpe_byte_to_codepoint('!') == '!' && moe_bpe_byte_to_codepoint('~') == '~');
    CHECK(moe_bpe_byte_to_codepoint(161) == 161 && moe_bpe_byte_to_codepoint(172) == 172);
    CHECK(moe_bpe_byte_to_codepoint(174) == 174 && moe_bpe_byte_to_codepoint(255) == 255);
    /* Outside the image: remapped bytes' own values, and past U+0143. */
    CHECK(moe_bpe_codepoint_to_byte(' ') == -1 && moe_bpe_codepoint_to_byte('\n') == -1);
    CHECK(moe_bpe_codepoint_to_byte(127) == -1 && moe_bpe_codepoint_to_byte(173) == -1);
    CHECK(moe_bpe_codepoint_to_byte(0x144) == -1 && moe_bpe_codepoint_to_byte(0x20AC) == -1);
}

/* ---- the tiny vocabulary ---- */

static moe_bpe *load_tiny(void) {
    moe_bpe *b = moe_bpe_load_dir(tiny_dir, err, sizeof err);
    CHECK_MSG(b != NULL, "%s", err);
    return b;
}

/* ids of text (NUL-terminated unless n given) equal want[0..n_want). */
#define CHECK_IDS(b, text, n, ...)                                                          \
    do {                                                                                    \
        const uint32_t want_[] = {__VA_ARGS__};                                             \
        size_t n_want_ = sizeof want_ / sizeof want_[0];                                    \
        uint32_t got_[256];                                                                 \
        long long got_n_ = moe_bpe_encode((b), (text), (n), got_, err, sizeof err);         \
        int same_ = got_n_ == (long long)n_want_ &&                                         \
                    memcmp(got_, want_, n_want_ * sizeof *want_) == 0;                      \
        CHECK_MSG(same_, "encode \"%s\": %lld ids, first %u", (text), got_n_,               \
                  got_n_ > 0 ? (unsigned)got_[0] : 0u);                                     \
    } while (0)

static void test_load_tiny(void) {
    moe_bpe *b = load_tiny();
    if (!b) return;
    CHECK(moe_bpe_vocab_size(b) == TINY_VOCAB_SIZE && TINY_VOCAB_SIZE == 272);
    CHECK(moe_bpe_n_merges(b) == 15);
    /* Each merge's parts are made by lower ranks (rank 2 "he ll" uses ranks
     * 1 and 0, rank 8 "low er" ranks 7 and 5, ...): ordered. */
    CHECK(moe_bpe_merges_ordered(b) == 1);
    int bytes_ok = 1;
    for (int byte = 0; byte < 256; ++byte)
        bytes_ok &= moe_bpe_byte_token(b, (unsigned char)byte) == (uint32_t)byte;
    CHECK(bytes_ok);
    moe_bpe_free(b);
}

/* Merges worked by hand: at each step the adjacent pair of lowest rank
 * merges, all its occurrences, left to right. Each text is one pre-token
 * unless said otherwise. */
static void test_merges(void) {
    moe_bpe *b = load_tiny();
    if (!b) return;
    for (int pass = 0; pass < 3; ++pass) {
        /* Pass 0 as loaded (heap merging, cache); 1 GPT-2's loop; 2 without the cache. */
        moe_bpe_set_flags(b, pass == 1 ? MOE_BPE_REFERENCE_MERGES : pass == 2 ? MOE_BPE_NO_CACHE : 0);
        /* h e l l o: pairs he(1) el(-) ll(0) lo(6): ll first, though "l o" is
         * also a merge -> h e ll o -> he ll o (1) -> hell o (2) -> hello (3). */
        CHECK_IDS(b, "hello", 5, TINY_HELLO);
        /* " hello": one pre-token; Ġ h e l l o -> Ġ hello -> " hello" (4). */
        CHECK_IDS(b, " hello", 6, TINY_SP_HELLO);
        CHECK_IDS(b, "hello hello", 11, TINY_HELLO, TINY_SP_HELLO);
        /* l o w e r: er(5) before lo(6) -> l o w er -> lo w er -> low er (7)
         * -> lower (8). */
        CHECK_IDS(b, "lower", 5, TINY_LOWER);
        /* " lower": after Ġ low er both "Ġ low" (9) and "low er" (8) apply;
         * 8 wins -> Ġ lower, and "Ġ lower" is no merge: 32, 264. */
        CHECK_IDS(b, " lower", 6, ' ', TINY_LOWER);
        /* " low": Ġ l o w -> Ġ lo w -> Ġ low -> " low" (9). */
        CHECK_IDS(b, " low", 4, TINY_SP_LOW);
        /* l o w l y -> lo w l y -> low l y; "low l" is no merge. */
        CHECK_IDS(b, "lowly", 5, TINY_LOW, 'l', 'y');
        /* aaaaa: "a a" (10) left to right, non-overlapping -> aa aa a ->
         * "aa aa" (11) -> aaaa a. */
        CHECK_IDS(b, "aaaaa", 5, TINY_AAAA, 'a');
        /* 7 a: aa aa aa a -> aaaa (from the first two aa) aa a; stop. */
        CHECK_IDS(b, "aaaaaaa", 7, TINY_AAAA, TINY_AA, 'a');
        /* 8 a: aa aa aa aa -> aaaa aaaa ("aaaa aaaa" is no merge). */
        CHECK_IDS(b, "aaaaaaaa", 8, TINY_AAAA, TINY_AAAA);
        /* Pre-tokens "I" "'m": 73, then ' m -> 'm (14). */
        CHECK_IDS(b, "I'm", 3, 'I', TINY_QUOTE_M);
        /* "12" and " 123": Ġ 1 2 3 -> Ġ 12 3. */
        CHECK_IDS(b, "12 123", 6, TINY_12, ' ', TINY_12, '3');
        /* "x" then the trailing "   " (one pre-token): Ġ Ġ Ġ -> ĠĠ Ġ. */
        CHECK_IDS(b, "x   ", 4, 'x', TINY_SP_SP, ' ');
        /* "  hello" is " " + " hello": the white space before a word leaves
         * one space to the word, so "Ġ Ġ" never sees both. */
        CHECK_IDS(b, "  hello", 7, ' ', TINY_SP_HELLO);
        /* é = C3 A9, no merges: two byte tokens. */
        CHECK_IDS(b, "\xC3\xA9", 2, 0xC3, 0xA9);
    }
    uint32_t none[1];
    CHECK(moe_bpe_encode(b, "", 0, none, err, sizeof err) == 0);
    moe_bpe_free(b);
}

/* A merge list out of order: rank 0 "ab a" uses "ab", which rank 1 "a b"
 * makes. GPT-2's rule on "abab": lowest pair present is "a b" (1), merged
 * everywhere -> ab ab; "ab ab" is no merge: [256, 256]. (Merging the first
 * "a b" and then its new pair "ab a" (0) first would give aba b instead.) */
static void test_unordered_merges(void) {
    char dir[128];
    snprintf(dir, sizeof dir, "%s/unordered", tmp_dir);
    mkdir(dir, 0755);
    json_t *enc = json_object();
    char key[8];
    for (int byte = 0; byte < 256; ++byte) {
        char c = (char)byte;
        test_token_key(&c, 1, key);
        json_object_set_new(enc, key, json_integer(byte));
    }
    json_object_set_new(enc, "ab", json_integer(256));
    json_object_set_new(enc, "aba", json_integer(257));
    CHECK(json_dump_file(enc, test_path(dir, "encoder.json"), 0) == 0);
    json_decref(enc);
    const char *merges = "#version: 0.2\nab a\na b\n";
    CHECK(test_write_file(test_path(dir, "vocab.bpe"), merges, strlen(merges)) == 0);
    moe_bpe *b = moe_bpe_load_dir(dir, err, sizeof err);
    CHECK_MSG(b != NULL, "%s", err);
    if (!b) return;
    CHECK(moe_bpe_merges_ordered(b) == 0);
    CHECK_IDS(b, "abab", 4, 256, 256);
    /* "aba": a b a -> ab a -> aba (0). */
    CHECK_IDS(b, "aba", 3, 257);
    moe_bpe_free(b);
}

/* ---- pre-tokenization ---- */

/* The pre-tokens of text[0, n) end at want[]. */
static void check_split(moe_bpe *b, const char *label, const char *text, size_t n,
                        const size_t *want, size_t n_want) {
    size_t ends[64];
    long long got = moe_bpe_pretokenize(b, text, n, ends, err, sizeof err);
    int same = got == (long long)n_want && memcmp(ends, want, n_want * sizeof *want) == 0;
    CHECK_MSG(same, "%s: %lld pre-tokens", label, got);
    if (!same && got > 0)
        for (long long i = 0; i < got; ++i) fprintf(stderr, "  ends[%lld] = %zu\n", i, ends[i]);
}
#define CHECK_SPLIT(b, text, ...)                                                           \
    do {                                                                                    \
        const size_t want_[] = {__VA_ARGS__};                                               \
        check_split((b), #text, (text), sizeof(text) - 1, want_,                             \
                    sizeof want_ / sizeof want_[0]);                                        \
    } while (0)

static void test_pretokenize(void) {
    moe_bpe *b = load_tiny();
    if (!b) return;
    /* "I'm here  now": I | 'm (a contraction) | " here" | " " | " now".
     * At the double space " ?\p{L}+" fails (a space follows the space);
     * "\s+(?!\S)" takes both spaces, fails the look-ahead at 'n', backs off
     * to one space, whose next character is a space: " " alone. Offsets:
     * I=0 '=1 m=2 sp=3 here=4..7 sp=8 sp=9 now=10..12. */
    CHECK_SPLIT(b, "I'm here  now", 1, 3, 8, 9, 13);
    /* Numbers: "abc" | " 12345" (a run of digits, one pre-token) | " x" | "1". */
    CHECK_SPLIT(b, "abc 12345 x1", 3, 9, 11, 12);
    /* Punctuation runs: Hello | , | " world" | !!! | " ..." | ok | ?
     * (0..4, 5, 6..11, 12..14, 15..18, 19..20, 21). */
    CHECK_SPLIT(b, "Hello, world!!! ...ok?", 5, 6, 12, 15, 19, 21, 22);
    /* Trailing spaces: at the end "(?!\S)" holds, so all three are one. */
    CHECK_SPLIT(b, "end   ", 3, 6);
    /* " \n\n b": \s+ takes " \n\n " then backs off one to leave " b". */
    CHECK_SPLIT(b, "a \n\n b", 1, 4, 6);
    /* Contractions are lower case only: they | 'll | 've; DON | ' | T. */
    CHECK_SPLIT(b, "they'll've", 4, 7, 10);
    CHECK_SPLIT(b, "DON'T", 3, 4, 5);
    /* Unicode: "héllo" (é is a letter, 2 bytes: 6 bytes), " wörld" (7),
     * " 42" (3), "€" (3 bytes, a symbol: the punctuation branch). */
    CHECK_SPLIT(b, "h\xC3\xA9llo w\xC3\xB6rld 42\xE2\x82\xAC", 6, 13, 16, 19);
    /* Two no-break spaces (U+00A0, C2 A0) before "b": with PCRE2_UCP they
     * are \s, so "\s+(?!\S)" keeps the first and "\s+" takes the second
     * (without UCP both would be one run of "other" characters). */
    CHECK_SPLIT(b, "a\xC2\xA0\xC2\xA0" "b", 1, 3, 5, 6);
    /* NUL is neither space, letter nor number: the punctuation branch. */
    CHECK_SPLIT(b, "a\0b", 1, 2, 3);
    moe_bpe_free(b);
}

/* Bytes that start no valid UTF-8 sequence are pre-tokens of their own,
 * and the valid runs between them are split by the regex as usual. */
static void test_invalid_utf8(void) {
    moe_bpe *b = load_tiny();
    if (!b) return;
    /* ab | FF | cd */
    CHECK_SPLIT(b, "ab\xFF" "cd", 2, 3, 5);
    /* "a " is cut off by FF, so its space is trailing white space there:
     * a | " " | FF | " b". */
    CHECK_SPLIT(b, "a \xFF b", 1, 2, 3, 5);
    /* A truncated sequence (E2 82 of €), an overlong form (C0 AF), a
     * surrogate (ED A0 80) and F5: every byte on its own. */
    CHECK_SPLIT(b, "x\xE2\x82", 1, 2, 3);
    CHECK_SPLIT(b, "\xC0\xAF" "\xED\xA0\x80" "\xF5", 1, 2, 3, 4, 5, 6);
    /* Ids: hello | FF | " hello" -> 259, 255, 260; the pieces around the
     * bad byte still merge. */
    CHECK_IDS(b, "hello\xFF hello", 12, TINY_HELLO, 0xFF, TINY_SP_HELLO);
    CHECK_IDS(b, "\xE2\x82" "aa", 4, 0xE2, 0x82, TINY_AA);
    moe_bpe_free(b);
}

/* ---- the round trip ---- */

/* A random byte string of mostly merge-friendly pieces, some multi-byte
 * characters, and some arbitrary bytes (so invalid UTF-8 and NUL occur). */
static size_t random_text(moe_test_rng *rng, char *out, size_t cap) {
    static const char *const pieces[] = {
        "hello", " hello", " ", "  ", "l", "lo", "w", "er", "a", "aa", "'m", "'", "12", "1",
        "\n", "\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xC2\xA0", "\xFF", "\xE2\x82",
        "\xC0", "\x80", "\0", "!?", "x"};
    size_t n_pieces = sizeof pieces / sizeof pieces[0];
    size_t want = moe_test_next(rng) % 48, n = 0;
    for (size_t i = 0; i < want; ++i) {
        uint64_t r = moe_test_next(rng);
        if (r % 4 == 0) {
            if (n + 1 <= cap) out[n++] = (char)(r >> 8);
            continue;
        }
        const char *p = pieces[(r >> 8) % n_pieces];
        /* Pieces are strings, except "\0", which is one NUL byte. */
        size_t len = p[0] == '\0' ? 1 : strlen(p);
        if (n + len > cap) break;
        memcpy(out + n, p, len);
        n += len;
    }
    return n;
}

static void test_round_trip(moe_bpe *b, int vocab_size, int cases, uint64_t seed) {
    moe_test_rng rng = {seed};
    char text[512], back[512];
    uint32_t ids[512], ids_ref[512];
    int failures = 0;
    for (int c = 0; c < cases && failures < 5; ++c) {
        size_t n = random_text(&rng, text, sizeof text);
        moe_bpe_set_flags(b, 0);
        long long count = moe_bpe_encode(b, text, n, ids, err, sizeof err);
        moe_bpe_set_flags(b, MOE_BPE_REFERENCE_MERGES | MOE_BPE_NO_CACHE);
        long long count_ref = moe_bpe_encode(b, text, n, ids_ref, err, sizeof err);
        int ok = count >= 0 && count <= (long long)n && (n == 0) == (count == 0);
        ok = ok && count == count_ref && memcmp(ids, ids_ref, (size_t)count * sizeof *ids) == 0;
        for (long long i = 0; ok && i < count; ++i) ok = ids[i] < (uint32_t)vocab_size;
        long long len = ok ? moe_bpe_decode(b, ids, (size_t)count, back, sizeof back) : -1;
        ok = ok && len == (long long)n && memcmp(back, text, n) == 0;
        if (!ok) {
            ++failures;
            fprintf(stderr, "round trip case %d (%zu bytes): %lld ids (ref %lld), %lld back\n", c,
                    n, count, count_ref, len);
        }
    }
    moe_bpe_set_flags(b, 0);
    CHECK_MSG(failures == 0, "%d round-trip failures", failures);
}

static void test_round_trip_tiny(void) {
    moe_bpe *b = load_tiny();
    if (!b) return;
    test_round_trip(b, TINY_VOCAB_SIZE, 5000, 0x5EED);
    /* A long pre-token (3000 letters, no spaces): heap and GPT-2's loop agree. */
    enum { LONG = 3000 };
    static char word[LONG];
    static uint32_t heap_ids[LONG], loop_ids[LONG];
    moe_test_rng rng = {77};
    for (int i = 0; i < LONG; ++i) word[i] = "ahellowera"[moe_test_next(&rng) % 10];
    long long n_heap = moe_bpe_encode(b, word, LONG, heap_ids, err, sizeof err);
    moe_bpe_set_flags(b, MOE_BPE_REFERENCE_MERGES | MOE_BPE_NO_CACHE);
    long long n_loop = moe_bpe_encode(b, word, LONG, loop_ids, err, sizeof err);
    moe_bpe_set_flags(b, 0);
    CHECK(n_heap > 0 && n_heap < LONG && n_heap == n_loop);
    CHECK(n_heap == n_loop && memcmp(heap_ids, loop_ids, (size_t)n_heap * sizeof *heap_ids) == 0);
    moe_bpe_free(b);
}

/* ---- decoding ---- */

static void test_decode(void) {
    moe_bpe *b = load_tiny();
    if (!b) return;
    char out[64];
    /* "hello" + " hello" = 11 bytes; with room for 8 only the first token
     * (5 bytes) is written, and the return value is still 11. */
    const uint32_t two[2] = {TINY_HELLO, TINY_SP_HELLO};
    memset(out, '#', sizeof out);
    CHECK(moe_bpe_decode(b, two, 2, out, 8) == 11);
    CHECK(memcmp(out, "hello##", 7) == 0);
    CHECK(moe_bpe_decode(b, two, 2, NULL, 0) == 11);
    const uint32_t bad[2] = {TINY_HELLO, TINY_VOCAB_SIZE};
    CHECK(moe_bpe_decode(b, bad, 2, out, sizeof out) == -1);

    /* For people: invalid UTF-8 as U+FFFD (EF BF BD), one per maximal
     * subpart, as Python's bytes.decode('utf-8', 'replace'). */
    const uint32_t h_c3[2] = {'H', 0xC3};
    CHECK(moe_bpe_decode_text(b, h_c3, 2, out, sizeof out) == 4);
    CHECK(strcmp(out, "H\xEF\xBF\xBD") == 0);
    const uint32_t e_acute[2] = {0xC3, 0xA9};
    CHECK(moe_bpe_decode_text(b, e_acute, 2, out, sizeof out) == 2);
    CHECK(strcmp(out, "\xC3\xA9") == 0);
    /* E2 82 could have begun €: one U+FFFD for both, then A. */
    const uint32_t cut[3] = {0xE2, 0x82, 'A'};
    CHECK(moe_bpe_decode_text(b, cut, 3, out, sizeof out) == 4);
    CHECK(strcmp(out, "\xEF\xBF\xBD" "A") == 0);
    /* E0 80 is overlong (E0 needs A0..BF next): two subparts. ED A0 80 is
     * a surrogate (ED needs 80..9F next): three. */
    const uint32_t overlong[2] = {0xE0, 0x80};
    CHECK(moe_bpe_decode_text(b, overlong, 2, out, sizeof out) == 6);
    const uint32_t surrogate[3] = {0xED, 0xA0, 0x80};
    CHECK(moe_bpe_decode_text(b, surrogate, 3, out, sizeof out) == 9);
    CHECK(strcmp(out, "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD") == 0);
    /* An unknown id shows as U+FFFD too; <|endoftext|> is plain text. */
    const uint32_t eot[3] = {TINY_HELLO, 9999, TINY_EOT};
    CHECK(moe_bpe_decode_text(b, eot, 3, out, sizeof out) == 5 + 3 + 13);
    CHECK(strcmp(out, "hello\xEF\xBF\xBD<|endoftext|>") == 0);
    /* Cut at a whole character: "H" + U+FFFD needs 4 + NUL; cap 4 keeps "H". */
    CHECK(moe_bpe_decode_text(b, h_c3, 2, out, 4) == 1 && strcmp(out, "H") == 0);

    /* Characters for bits per character: h é FF E2 82 = 5 (a truncated
     * sequence counts byte by byte, as the char tokenizer counts it). */
    CHECK(moe_utf8_count_chars("h\xC3\xA9\xFF\xE2\x82", 6) == 5);
    CHECK(moe_utf8_count_chars("\xF0\x9F\x98\x80", 4) == 1);
    moe_bpe_free(b);
}

/* ---- loading errors ---- */

static void write_merges(const char *dir, const char *text) {
    CHECK(test_write_file(test_path(dir, "vocab.bpe"), text, strlen(text)) == 0);
}

static void check_load_fails(const char *dir, const char *needle, const char *needle2) {
    err[0] = '\0';
    moe_bpe *b = moe_bpe_load_dir(dir, err, sizeof err);
    CHECK(b == NULL);
    moe_bpe_free(b);
    CHECK_MSG(strstr(err, needle) != NULL, "wanted '%s' in: %s", needle, err);
    if (needle2) CHECK_MSG(strstr(err, needle2) != NULL, "wanted '%s' in: %s", needle2, err);
}

static void test_load_errors(void) {
    char dir[128];
    snprintf(dir, sizeof dir, "%s/broken", tmp_dir);
    mkdir(dir, 0755);
    check_load_fails(dir, "encoder.json: cannot open", "setup_data.sh --gpt2");
    CHECK(write_tiny_vocab(dir) == 0);
    /* The good files load; then one fault at a time in vocab.bpe (line 1 is
     * the version line, so the merges start at line 2). */
    moe_bpe *b = moe_bpe_load_dir(dir, err, sizeof err);
    CHECK_MSG(b != NULL, "%s", err);
    moe_bpe_free(b);
    write_merges(dir, "#version: 0.2\n\xC4\xA0 l o\n");
    check_load_fails(dir, "line 2", "not two tokens");
    CHECK(test_write_file(test_path(dir, "vocab.bpe"), "l l\nh e\0x\n", 10) == 0);
    check_load_fails(dir, "line 2", "not two tokens");
    write_merges(dir, "#version: 0.2\nl l\nq zz\n");
    check_load_fails(dir, "line 3", "its right token");
    write_merges(dir, "#version: 0.2\nl l\nx y\n");
    check_load_fails(dir, "line 3", "its result");
    write_merges(dir, "#version: 0.2\nl l\nh e\nl l\n");
    check_load_fails(dir, "line 4", "repeats");
    /* No version line: line 1 is a merge like any other; \r\n endings are fine. */
    write_merges(dir, "l l\r\nh e\r\n");
    b = moe_bpe_load_dir(dir, err, sizeof err);
    CHECK_MSG(b != NULL && moe_bpe_n_merges(b) == 2, "%s", err);
    moe_bpe_free(b);
    unlink(test_path(dir, "vocab.bpe"));
    check_load_fails(dir, "vocab.bpe: cannot open", NULL);

    /* encoder.json faults. */
    const char *not_object = "[1, 2]";
    CHECK(test_write_file(test_path(dir, "encoder.json"), not_object, strlen(not_object)) == 0);
    check_load_fails(dir, "encoder.json", "JSON object");
    CHECK(test_write_file(test_path(dir, "encoder.json"), "{\"a\": ", 6) == 0);
    check_load_fails(dir, "encoder.json: line 1", NULL);
    /* Ids must be 0..n-1, each once. */
    const char *gap = "{\"a\": 0, \"b\": 2}";
    CHECK(test_write_file(test_path(dir, "encoder.json"), gap, strlen(gap)) == 0);
    check_load_fails(dir, "\"b\" has id out of range", NULL);
    const char *shared = "{\"a\": 0, \"b\": 0}";
    CHECK(test_write_file(test_path(dir, "encoder.json"), shared, strlen(shared)) == 0);
    check_load_fails(dir, "share id 0", NULL);
    /* A space is not a byte symbol (it is written Ġ). */
    const char *space = "{\"a\": 0, \" \": 1}";
    CHECK(test_write_file(test_path(dir, "encoder.json"), space, strlen(space)) == 0);
    check_load_fails(dir, "holds U+0020", NULL);
    /* Dense and well-formed, but not byte-level: "a" and "b" only. */
    const char *two = "{\"a\": 0, \"b\": 1}";
    CHECK(test_write_file(test_path(dir, "encoder.json"), two, strlen(two)) == 0);
    check_load_fails(dir, "no token for byte 0x00", "all 256");
}

/* ---- prepare and the loader ---- */

static uint64_t le_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = v << 8 | p[i];
    return v;
}

/* "hello lower é!" = 15 bytes, 14 characters. Pre-tokens and ids:
 *   "hello" -> 259;  " lower" -> 32 264 (see test_merges);
 *   " é" = Ġ C3 A9, no merges -> 32 195 169;  "!" -> 33.
 * 7 ids. Shards of 5: [259 32 264 32 195] and [169 33]. Shard 0's tokens
 * hold bytes 0..12 ("hello lower " and C3): 12 characters plus é, which
 * starts at byte 12 -> 13; shard 1 holds A9 (inside é) and "!" -> 1. */
static void test_prepare_gpt2(void) {
    char text_path[128], out[128];
    snprintf(text_path, sizeof text_path, "%s/small.txt", tmp_dir);
    snprintf(out, sizeof out, "%s/gpt2_shards", tmp_dir);
    const char *text = "hello lower \xC3\xA9!";
    CHECK(strlen(text) == 15);
    CHECK(test_write_file(text_path, text, 15) == 0);
    const char *inputs[1] = {text_path};
    moe_prepare_opts opts = {"gpt2", tiny_dir, 5};
    CHECK_MSG(moe_prepare_with(inputs, 1, out, &opts, err, sizeof err) == 0, "%s", err);

    const uint32_t want_ids[7] = {TINY_HELLO, ' ', TINY_LOWER, ' ', 0xC3, 0xA9, '!'};
    const size_t shard_ids[2] = {5, 2};
    const uint64_t shard_chars[2] = {13, 1};
    for (int s = 0; s < 2; ++s) {
        char name[32];
        snprintf(name, sizeof name, "tokens_%03d.bin", s);
        size_t n = 0;
        unsigned char *shard = test_read_file(test_path(out, name), &n);
        CHECK(shard != NULL && n == 64 + 2 * shard_ids[s]);
        if (!shard || n != 64 + 2 * shard_ids[s]) {
            free(shard);
            continue;
        }
        /* tokenizer 2, vocab 272 = 0x110 (10 01), 2 bytes per id. */
        const unsigned char fields[12] = {1, 0, 0, 0, 2, 0, 0, 0, 0x10, 0x01, 0, 0};
        CHECK(memcmp(shard, "MOETOKS\0", 8) == 0 && memcmp(shard + 8, fields, 12) == 0);
        CHECK(shard[20] == 2 && shard[21] == 0);
        CHECK(le_u64(shard + 24) == shard_ids[s]);
        CHECK_MSG(le_u64(shard + 32) == shard_chars[s], "shard %d: %llu characters", s,
                  (unsigned long long)le_u64(shard + 32));
        for (size_t i = 0; i < shard_ids[s]; ++i) {
            uint32_t id = shard[64 + 2 * i] | (uint32_t)shard[65 + 2 * i] << 8;
            CHECK_MSG(id == want_ids[5 * s + i], "shard %d id %zu = %u", s, i, id);
        }
        free(shard);
    }
    CHECK(!test_file_exists(test_path(out, "tokens_002.bin")));

    /* vocab.json, and the BPE files copied byte for byte. */
    json_error_t jerr;
    json_t *vocab = json_load_file(test_path(out, "vocab.json"), 0, &jerr);
    CHECK(vocab != NULL);
    CHECK(json_object_size(vocab) == 2);
    const char *tokenizer = json_string_value(json_object_get(vocab, "tokenizer"));
    CHECK(tokenizer && strcmp(tokenizer, "gpt2") == 0);
    CHECK(json_integer_value(json_object_get(vocab, "vocab_size")) == TINY_VOCAB_SIZE);
    json_decref(vocab);
    static const char *const files[2] = {"encoder.json", "vocab.bpe"};
    for (int i = 0; i < 2; ++i) {
        size_t n_src = 0, n_copy = 0;
        unsigned char *src = test_read_file(test_path(tiny_dir, files[i]), &n_src);
        unsigned char *copy = test_read_file(test_path(out, files[i]), &n_copy);
        CHECK_MSG(src && copy && n_src == n_copy && memcmp(src, copy, n_src) == 0, "%s", files[i]);
        free(src);
        free(copy);
    }

    /* The loader on the folder: 7 ids, 14 / 7 = 2 characters a token, and
     * decoding through the copied files. */
    moe_dataset ds;
    CHECK_MSG(moe_dataset_open(&ds, out, 0.5, 2, err, sizeof err) == 0, "%s", err);
    CHECK(ds.tokenizer == MOE_TOKENIZER_GPT2 && ds.vocab_size == TINY_VOCAB_SIZE);
    CHECK(ds.n_tokens == 7 && memcmp(ds.tokens, want_ids, sizeof want_ids) == 0);
    CHECK(ds.n_train == 3); /* floor(7 * 0.5) */
    CHECK(ds.chars_per_token == 2.0);
    CHECK(ds.bpe != NULL && ds.vocab.size == 0);
    char back[64];
    CHECK(moe_dataset_decode(&ds, ds.tokens, ds.n_tokens, back, sizeof back) == 15);
    CHECK(strcmp(back, text) == 0);
    /* A sample cut inside é: the lone C3 shows as U+FFFD. */
    CHECK(moe_dataset_decode(&ds, ds.tokens, 5, back, sizeof back) == 12 + 3);
    CHECK(strcmp(back, "hello lower \xEF\xBF\xBD") == 0);
    moe_dataset_close(&ds);

    /* The text file itself with the gpt2 tokenizer: the same stream. */
    CHECK_MSG(moe_dataset_open_with(&ds, text_path, "gpt2", tiny_dir, 0.5, 2, err, sizeof err) == 0,
              "%s", err);
    CHECK(ds.tokenizer == MOE_TOKENIZER_GPT2 && ds.vocab_size == TINY_VOCAB_SIZE);
    CHECK(ds.n_tokens == 7 && memcmp(ds.tokens, want_ids, sizeof want_ids) == 0);
    CHECK(ds.chars_per_token == 2.0);
    moe_dataset_close(&ds);
    /* ... which needs the BPE folder; char stays the default. */
    CHECK(moe_dataset_open_with(&ds, text_path, "gpt2", NULL, 0.5, 2, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "encoder.json") && strstr(err, "small.txt"), "%s", err);
    CHECK(moe_dataset_open_with(&ds, text_path, "bpe", tiny_dir, 0.5, 2, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "unknown tokenizer 'bpe'"), "%s", err);
    CHECK(moe_dataset_open_with(&ds, text_path, NULL, NULL, 0.5, 2, err, sizeof err) == 0);
    CHECK(ds.tokenizer == MOE_TOKENIZER_CHAR && ds.n_tokens == 14 && ds.bpe == NULL);
    moe_dataset_close(&ds);

    /* Faults in the folder. */
    const char *mismatch = "{\"tokenizer\": \"gpt2\", \"vocab_size\": 271}";
    CHECK(test_write_file(test_path(out, "vocab.json"), mismatch, strlen(mismatch)) == 0);
    CHECK(moe_dataset_open(&ds, out, 0.5, 2, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "vocab_size 271") && strstr(err, "272 tokens"), "%s", err);
    const char *no_size = "{\"tokenizer\": \"gpt2\"}";
    CHECK(test_write_file(test_path(out, "vocab.json"), no_size, strlen(no_size)) == 0);
    CHECK(moe_dataset_open(&ds, out, 0.5, 2, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "vocab_size"), "%s", err);
    CHECK(moe_prepare_with(inputs, 1, out, &opts, err, sizeof err) == 0);
    CHECK(unlink(test_path(out, "encoder.json")) == 0);
    CHECK(moe_dataset_open(&ds, out, 0.5, 2, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "encoder.json: cannot open"), "%s", err);
    CHECK(ds.tokens == NULL && ds.bpe == NULL);

    /* Re-preparing the folder with the char tokenizer: one shard of 14. */
    CHECK(moe_prepare(inputs, 1, out, "char", 0, err, sizeof err) == 0);
    CHECK(moe_dataset_open(&ds, out, 0.5, 2, err, sizeof err) == 0);
    CHECK(ds.tokenizer == MOE_TOKENIZER_CHAR && ds.n_tokens == 14 && ds.bpe == NULL);
    moe_dataset_close(&ds);
    CHECK(!test_file_exists(test_path(out, "tokens_001.bin")));

    /* prepare's own errors. */
    moe_prepare_opts no_dir = {"gpt2", NULL, 0};
    CHECK(moe_prepare_with(inputs, 1, out, &no_dir, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "--bpe-dir"), "%s", err);
    CHECK(moe_prepare(inputs, 1, out, "gpt2", 0, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "--bpe-dir"), "%s", err);
    moe_prepare_opts missing = {"gpt2", tmp_dir, 0};
    CHECK(moe_prepare_with(inputs, 1, out, &missing, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "encoder.json: cannot open"), "%s", err);
    moe_prepare_opts klingon = {"klingon", NULL, 0};
    CHECK(moe_prepare_with(inputs, 1, out, &klingon, err, sizeof err) == -1);
    CHECK_MSG(strstr(err, "klingon"), "%s", err);
}

/* Shards written here, independently of prepare: the loader sums the
 * headers' character counts (15 + 10 over 10 tokens = 2.5 a token). */
static void test_hand_written_folder(void) {
    char dir[128];
    snprintf(dir, sizeof dir, "%s/by_hand", tmp_dir);
    mkdir(dir, 0755);
    CHECK(write_tiny_vocab(dir) == 0);
    const char *vocab = "{\"tokenizer\": \"gpt2\", \"vocab_size\": 272}";
    CHECK(test_write_file(test_path(dir, "vocab.json"), vocab, strlen(vocab)) == 0);
    const uint32_t ids[10] = {'h', 'i', TINY_SP_HELLO, 0, 271, 'h', 'i', 'h', 'i', 'h'};
    for (int s = 0; s < 2; ++s) {
        unsigned char buf[64 + 4 * 6] = {0};
        size_t n = s == 0 ? 6 : 4;
        uint64_t chars = s == 0 ? 15 : 10;
        memcpy(buf, "MOETOKS", 8);
        const uint32_t fields[4] = {1, 2, 272, 4};
        for (int f = 0; f < 4; ++f)
            for (int k = 0; k < 4; ++k) buf[8 + 4 * f + k] = (unsigned char)(fields[f] >> (8 * k));
        for (int k = 0; k < 8; ++k) {
            buf[24 + k] = (unsigned char)((uint64_t)n >> (8 * k));
            buf[32 + k] = (unsigned char)(chars >> (8 * k));
        }
        for (size_t i = 0; i < n; ++i)
            for (int k = 0; k < 4; ++k)
                buf[64 + 4 * i + k] = (unsigned char)(ids[6 * s + i] >> (8 * k));
        char name[32];
        snprintf(name, sizeof name, "tokens_%03d.bin", s);
        CHECK(test_write_file(test_path(dir, name), buf, 64 + 4 * n) == 0);
    }
    moe_dataset ds;
    CHECK_MSG(moe_dataset_open(&ds, dir, 0.5, 2, err, sizeof err) == 0, "%s", err);
    CHECK(ds.n_tokens == 10 && memcmp(ds.tokens, ids, sizeof ids) == 0);
    CHECK(ds.chars_per_token == 2.5);
    char text[64];
    /* The first three: h i " hello". */
    CHECK(moe_dataset_decode(&ds, ds.tokens, 3, text, sizeof text) == 8);
    CHECK(strcmp(text, "hi hello") == 0);
    moe_dataset_close(&ds);
}

/* ---- GPT-2's real files, when set up ---- */

static void test_real_gpt2(void) {
    const char *dir = MOE_TEST_SOURCE_DIR "/data/gpt2";
    if (!test_file_exists(test_path(dir, "encoder.json")) ||
        !test_file_exists(test_path(dir, "vocab.bpe"))) {
        printf("test_data_bpe: skipping the checks against GPT-2's files: %s/encoder.json and "
               "vocab.bpe are absent (scripts/setup_data.sh --gpt2 fetches them)\n", dir);
        return;
    }
    moe_bpe *b = moe_bpe_load_dir(dir, err, sizeof err);
    CHECK_MSG(b != NULL, "%s", err);
    if (!b) return;
    /* 256 bytes + 50000 merges + <|endoftext|>; GPT-2's list is trained,
     * so each merge's parts come from earlier merges. */
    CHECK(moe_bpe_vocab_size(b) == 50257 && moe_bpe_n_merges(b) == 50000);
    CHECK(moe_bpe_merges_ordered(b) == 1);
    /* Where the ids come from:
     *  - encoder.json (OpenAI's file; setup checks its SHA-256 against the
     *    one tiktoken pins): "Hello" 15496, "Ġworld" 995, "Ġthe" 262,
     *    "," 11, "!" 0 -- and the one-byte tokens come first in
     *    bytes_to_unicode order: '!'..'~' = 0..93, then 161..172, 174..255
     *    (94..187), then bytes 0..32 = 188..220 ('\n' 198, ' ' 220), then
     *    127..160 = 221..254 (0x8D = 235, 0x91 = 239), then 173 = 255;
     *  - tiktoken's tests (test_simple): "hello world" -> [31373, 995], and
     *    "hello <|endoftext|>" with the special token -> [31373, 220, 50256],
     *    so the ordinary text "hello " -> [31373, 220];
     *  - GPT-2's own bpe() loop (encoder.py, run in Python on these files):
     *    "👍" (F0 9F 91 8D) -> "ðŁĳ" + "į" = [41840, 235], a character
     *    split across tokens (0x8D alone is 235 by the order above). */
    CHECK_IDS(b, "Hello world", 11, 15496, 995);
    CHECK_IDS(b, " the", 4, 262);
    CHECK_IDS(b, "Hello, world!", 13, 15496, 11, 995, 0);
    CHECK_IDS(b, "hello world", 11, 31373, 995);
    CHECK_IDS(b, "hello ", 6, 31373, 220);
    CHECK_IDS(b, "\xF0\x9F\x91\x8D", 4, 41840, 235);
    CHECK_IDS(b, "\n", 1, 198);
    CHECK(moe_bpe_byte_token(b, '!') == 0 && moe_bpe_byte_token(b, ' ') == 220);
    CHECK(moe_bpe_byte_token(b, 0x8D) == 235 && moe_bpe_byte_token(b, 0x91) == 239);
    CHECK(moe_bpe_byte_token(b, 173) == 255);
    const uint32_t eot = 50256;
    char out[32];
    CHECK(moe_bpe_decode(b, &eot, 1, out, sizeof out) == 13 && memcmp(out, "<|endoftext|>", 13) == 0);

    test_round_trip(b, 50257, 2000, 0xB9E2);
    /* The TinyStories sample (first 200 kB): heap and GPT-2's loop agree,
     * with and without the cache, and decoding gives the text back. */
    size_t n = 0;
    unsigned char *text = test_read_file(MOE_TEST_DATA, &n);
    if (text) {
        if (n > 200000) n = 200000;
        uint32_t *a = malloc(n * sizeof *a), *r = malloc(n * sizeof *r);
        char *back = malloc(n);
        long long na = moe_bpe_encode(b, (const char *)text, n, a, err, sizeof err);
        moe_bpe_set_flags(b, MOE_BPE_REFERENCE_MERGES | MOE_BPE_NO_CACHE);
        long long nr = moe_bpe_encode(b, (const char *)text, n, r, err, sizeof err);
        moe_bpe_set_flags(b, 0);
        CHECK(na > 0 && na == nr && memcmp(a, r, (size_t)na * sizeof *a) == 0);
        /* English prose: about 4 bytes a token. */
        CHECK_MSG(na > 0 && (double)n / (double)na > 3.0, "%zu bytes, %lld tokens", n, na);
        CHECK(na > 0 && moe_bpe_decode(b, a, (size_t)na, back, n) == (long long)n &&
              memcmp(back, text, n) == 0);
        free(a);
        free(r);
        free(back);
        free(text);
    }
    moe_bpe_free(b);
}

int main(void) {
    test_make_temp_dir(tmp_dir);
    snprintf(tiny_dir, sizeof tiny_dir, "%s/tiny", tmp_dir);
    mkdir(tiny_dir, 0755);
    if (write_tiny_vocab(tiny_dir) != 0) {
        fprintf(stderr, "cannot write the tiny vocabulary into %s\n", tiny_dir);
        return 2;
    }
    test_byte_map();
    test_load_tiny();
    test_merges();
    test_unordered_merges();
    test_pretokenize();
    test_invalid_utf8();
    test_round_trip_tiny();
    test_decode();
    test_load_errors();
    test_prepare_gpt2();
    test_hand_written_folder();
    test_real_gpt2();
    test_remove_tree(tmp_dir);
    return moe_test_summary("test_data_bpe");
}
