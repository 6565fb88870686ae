/*
 * The char tokenizer: one token per Unicode code point of a UTF-8 text, the
 * vocabulary being the sorted distinct code points the text contains.
 *
 * Decoding is strict UTF-8 (no overlong forms, no surrogates, nothing above
 * U+10FFFF). A byte that does not start a valid sequence becomes the code
 * point of the same value, U+0080..U+00FF (Latin-1), and decoding resumes at
 * the next byte, so any byte string tokenizes without loss of information.
 * moe_char_decode writes every code point as valid UTF-8, so such a byte
 * comes back as its 2-byte UTF-8 form (0xFF -> C3 BF): the round trip text ->
 * ids -> text is exact for valid UTF-8 input, and only for it.
 */
#include "runtime/utf8.h"
#include "runtime/data.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define UNICODE_CODEPOINTS 0x110000u
#define REPLACEMENT_CHARACTER 0xFFFDu

static void set_err(char *err, size_t errcap, const char *fmt, ...) {
    if (!err || errcap == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errcap, fmt, ap);
    va_end(ap);
}


/* Decode the code point at s[0] with `avail` bytes readable; returns the
 * number of bytes it takes (1..4). The second byte's range is what rules
 * out overlong forms (E0, F0), surrogates (ED) and values past U+10FFFF (F4);
 * a sequence cut short by the end of the text is invalid like any other. */
static size_t utf8_decode_one(const unsigned char *s, size_t avail, uint32_t *cp) {
    unsigned char lead = s[0];
    size_t len;
    unsigned char second_min = 0x80, second_max = 0xBF;
    uint32_t value;
    if (lead < 0x80) {
        *cp = lead;
        return 1;
    } else if (lead >= 0xC2 && lead <= 0xDF) {
        len = 2;
        value = lead & 0x1Fu;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
        len = 3;
        value = lead & 0x0Fu;
        if (lead == 0xE0) second_min = 0xA0;
        if (lead == 0xED) second_max = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
        len = 4;
        value = lead & 0x07u;
        if (lead == 0xF0) second_min = 0x90;
        if (lead == 0xF4) second_max = 0x8F;
    } else {
        *cp = lead; /* 80..C1, F5..FF never start a sequence */
        return 1;
    }
    if (avail < len || s[1] < second_min || s[1] > second_max) {
        *cp = lead;
        return 1;
    }
    for (size_t k = 1; k < len; ++k) {
        if (!moe_utf8_is_continuation(s[k])) {
            *cp = lead;
            return 1;
        }
        value = (value << 6) | (s[k] & 0x3Fu);
    }
    *cp = value;
    return len;
}

int moe_char_vocab_build(moe_char_vocab *v, const char *text, size_t n, char *err, size_t errcap) {
    v->size = 0;
    v->codepoints = NULL;
    if (n == 0) {
        set_err(err, errcap, "the text is empty; a vocabulary needs at least one character");
        return -1;
    }
    /* One bit per possible code point (136 KiB): marking what occurs and
     * reading the bits back in order gives the sorted distinct set in O(n). */
    uint8_t *seen = calloc(UNICODE_CODEPOINTS / 8, 1);
    if (!seen) {
        set_err(err, errcap, "out of memory building the character vocabulary");
        return -1;
    }
    const unsigned char *s = (const unsigned char *)text;
    size_t distinct = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += utf8_decode_one(s + i, n - i, &cp);
        uint8_t bit = (uint8_t)(1u << (cp & 7u));
        if (!(seen[cp >> 3] & bit)) {
            seen[cp >> 3] |= bit;
            ++distinct;
        }
    }
    v->codepoints = malloc(distinct * sizeof *v->codepoints);
    if (!v->codepoints) {
        free(seen);
        set_err(err, errcap, "out of memory building the character vocabulary");
        return -1;
    }
    for (uint32_t cp = 0; cp < UNICODE_CODEPOINTS; ++cp) {
        if (seen[cp >> 3] & (1u << (cp & 7u))) v->codepoints[v->size++] = cp;
    }
    free(seen);
    return 0;
}

/* Id of a code point by binary search over the sorted vocabulary, -1 if absent. */
static long vocab_find(const moe_char_vocab *v, uint32_t cp) {
    long lo = 0, hi = (long)v->size - 1;
    while (lo <= hi) {
        long mid = lo + (hi - lo) / 2;
        uint32_t at = v->codepoints[mid];
        if (at == cp) return mid;
        if (at < cp)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

long long moe_char_encode(const moe_char_vocab *v, const char *text, size_t n, uint32_t *ids,
                          char *err, size_t errcap) {
    const unsigned char *s = (const unsigned char *)text;
    long long count = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t len = utf8_decode_one(s + i, n - i, &cp);
        long id = vocab_find(v, cp);
        if (id < 0) {
            set_err(err, errcap,
                    "character U+%04X at byte %zu is not in the vocabulary (%d characters)",
                    (unsigned)cp, i, v->size);
            return -1;
        }
        ids[count++] = (uint32_t)id;
        i += len;
    }
    return count;
}

size_t moe_char_decode(const moe_char_vocab *v, const uint32_t *ids, size_t n, char *out,
                       size_t cap) {
    if (cap == 0) return 0;
    size_t written = 0;
    for (size_t i = 0; i < n; ++i) {
        /* An id outside the vocabulary (a caller's bug, or a model sampling
         * past it) shows up as U+FFFD rather than being silently skipped. */
        uint32_t cp = ids[i] < (uint32_t)v->size ? v->codepoints[ids[i]] : REPLACEMENT_CHARACTER;
        unsigned char bytes[4];
        size_t len = moe_utf8_encode(cp, bytes);
        /* Stop at a whole character so the output stays valid UTF-8. */
        if (written + len + 1 > cap) break;
        memcpy(out + written, bytes, len);
        written += len;
    }
    out[written] = '\0';
    return written;
}

void moe_char_vocab_free(moe_char_vocab *v) {
    free(v->codepoints);
    v->codepoints = NULL;
    v->size = 0;
}
