/*
 * GPT-2 byte-level BPE: the vocabulary from encoder.json (token string ->
 * id) and the merges from vocab.bpe (one "left right" pair a line, rank =
 * line order, after a first "#version" line), exactly as GPT-2 reads them.
 *
 * Encoding: text bytes -> pre-tokens (GPT-2's regex, through PCRE2) -> each
 * pre-token's bytes as byte symbols -> merges applied lowest rank first ->
 * ids. Decoding: ids -> the bytes of their tokens. Any byte string encodes
 * and decodes back to itself exactly, NUL bytes and invalid UTF-8 included.
 *
 * Invalid UTF-8: PCRE2 in UTF mode is never given it. The text is cut at
 * every byte that does not start a valid UTF-8 sequence (strict decoding:
 * no overlong forms, no surrogates, nothing past U+10FFFF, no truncated
 * sequence); each valid run is pre-tokenized with the regex on its own, and
 * each such byte is a pre-token by itself, so it encodes as its single-byte
 * token. (GPT-2 itself only ever sees decoded Unicode text, so it has no
 * behaviour to match here; valid UTF-8 is tokenized as GPT-2 does.)
 *
 * A moe_bpe is not thread-safe: encoding uses its cache, match data and
 * scratch space. Decoding only reads it.
 */
#ifndef MOE_TOKENIZER_BPE_H
#define MOE_TOKENIZER_BPE_H

#include <stddef.h>
#include <stdint.h>

#define MOE_BPE_ENCODER_FILE "encoder.json"
#define MOE_BPE_MERGES_FILE "vocab.bpe"
/* GPT-2's pre-tokenizer, compiled with PCRE2_UTF | PCRE2_UCP. */
#define MOE_BPE_GPT2_PATTERN \
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"

typedef struct moe_bpe moe_bpe;

/* GPT-2's byte <-> code point map: bytes 33..126, 161..172 and 174..255 map
 * to the code point of the same value, the other 68 bytes, in ascending
 * order, to U+0100..U+0143 (so 0 -> U+0100, 32 ' ' -> U+0120 'Ġ').
 * codepoint_to_byte returns -1 for a code point outside the map's image. */
uint32_t moe_bpe_byte_to_codepoint(unsigned char byte);
int moe_bpe_codepoint_to_byte(uint32_t cp);

/* Load encoder.json and vocab.bpe. The vocabulary must be byte-level (all
 * 256 one-byte tokens present), its ids 0..size-1 each used once, and every
 * merge must name two tokens of the vocabulary whose concatenation is one
 * too. NULL + err (naming the file and line) on any failure. */
moe_bpe *moe_bpe_load(const char *encoder_path, const char *merges_path, char *err,
                      size_t errcap);
/* dir/encoder.json and dir/vocab.bpe. */
moe_bpe *moe_bpe_load_dir(const char *dir, char *err, size_t errcap);
void moe_bpe_free(moe_bpe *bpe);

int moe_bpe_vocab_size(const moe_bpe *bpe);
int moe_bpe_n_merges(const moe_bpe *bpe);
/* Token id of the merge-free symbol of `byte`. */
uint32_t moe_bpe_byte_token(const moe_bpe *bpe, unsigned char byte);

/* Pre-tokens of text[0, n): they tile the text; ends[i] (capacity n) is the
 * byte offset where pre-token i ends. Returns their count, -1 + err. */
long long moe_bpe_pretokenize(moe_bpe *bpe, const char *text, size_t n, size_t *ends, char *err,
                              size_t errcap);

/* ids[] (capacity n: at most one id per byte) of text[0, n). Returns the
 * token count, -1 + err (out of memory, or PCRE2 failing). */
long long moe_bpe_encode(moe_bpe *bpe, const char *text, size_t n, uint32_t *ids, char *err,
                         size_t errcap);

/* The exact bytes of ids into out: whole tokens while they fit in cap
 * (nothing is NUL-terminated). Returns the byte count of the whole decode
 * (like snprintf: more than cap means out holds a prefix), -1 if an id is
 * not below the vocabulary size. */
long long moe_bpe_decode(const moe_bpe *bpe, const uint32_t *ids, size_t n, char *out,
                         size_t cap);

/* Text for people (samples, logs): the bytes of ids read as UTF-8 the way
 * GPT-2's decoder does (errors='replace'): each maximal invalid subpart
 * becomes U+FFFD, as does an id outside the vocabulary. Valid UTF-8 into out
 * (cap bytes, NUL-terminated, cut at a whole character); returns the bytes
 * written before the NUL. */
size_t moe_bpe_decode_text(const moe_bpe *bpe, const uint32_t *ids, size_t n, char *out,
                           size_t cap);

/* Code points of a byte string, each byte that does not start a valid UTF-8
 * sequence counting as one (the char tokenizer's rule): the "characters" of
 * bits per character. */
uint64_t moe_utf8_count_chars(const char *text, size_t n);
/* Bytes of the character at text (avail >= 1 readable): a valid sequence's
 * length, else 1. */
size_t moe_utf8_char_len(const char *text, size_t avail);

/* Switches for tests and benchmarks; the default (0) is what to use. */
enum {
    MOE_BPE_NO_CACHE = 1,          /* skip the pre-token cache */
    MOE_BPE_REFERENCE_MERGES = 2,  /* GPT-2's pass-per-merge loop even where the heap is exact */
};
void moe_bpe_set_flags(moe_bpe *bpe, unsigned flags);
/* 1 when every merge's rank exceeds the ranks of the merges that make its
 * two parts (true of a trained merge list such as GPT-2's): merges then run
 * through a heap in O(k log k) for a k-byte pre-token, giving the same
 * tokens as GPT-2's loop, which is used otherwise. */
int moe_bpe_merges_ordered(const moe_bpe *bpe);

#endif
