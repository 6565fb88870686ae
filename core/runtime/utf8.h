/*
 * UTF-8 pieces shared by the tokenizers (header-only).
 */
#ifndef MOE_UTF8_H
#define MOE_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* 10xxxxxx */
static inline int moe_utf8_is_continuation(unsigned char byte) { return (byte & 0xC0u) == 0x80u; }

/* The UTF-8 bytes of code point cp (at most U+10FFFF) into out[0..3];
 * returns how many (1 to 4). */
static inline size_t moe_utf8_encode(uint32_t cp, unsigned char *out) {
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | (cp >> 6));
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (unsigned char)(0xF0 | (cp >> 18));
    out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

#endif
