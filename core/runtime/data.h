/*
 * Token data: the char tokenizer, token shards on disk, and the loader that
 * splits a token stream into training and validation parts.
 *
 * Shard file (little-endian), written by `moehost prepare`:
 *   offset 0  char[8]  magic "MOETOKS\0"
 *          8  u32      format version (1)
 *         12  u32      tokenizer (1 = char, 2 = gpt2 byte-level BPE)
 *         16  u32      vocab size
 *         20  u32      bytes per token id (2 or 4)
 *         24  u64      number of tokens
 *         32  u64      number of characters (Unicode code points) the tokens encode
 *         40  u8[24]   reserved, zero
 *         64  ids
 * The vocabulary sits beside the shards as vocab.json, a JSON object:
 *   char: {"tokenizer": "char", "vocab": ["\n", " ", "!", ...]}, id = position;
 *   gpt2: {"tokenizer": "gpt2", "vocab_size": 50257}, with copies of the
 *         encoder.json and vocab.bpe the text was encoded with beside it
 *         (so the folder decodes, and re-encodes, by itself).
 */
#ifndef MOE_DATA_H
#define MOE_DATA_H

#include <stddef.h>
#include <stdint.h>

#define MOE_SHARD_MAGIC "MOETOKS"
#define MOE_SHARD_VERSION 1u
#define MOE_SHARD_HEADER_BYTES 64
enum { MOE_TOKENIZER_CHAR = 1, MOE_TOKENIZER_GPT2 = 2 };

/* ---- char tokenizer: one token per Unicode code point seen in the text ---- */
typedef struct moe_char_vocab {
    int size;
    uint32_t *codepoints;        /* sorted ascending; id = index */
} moe_char_vocab;

/* Build the vocabulary of a UTF-8 text (sorted distinct code points).
 * Invalid UTF-8 bytes are taken as code points U+0080..U+00FF (Latin-1) so
 * nothing is lost. 0 ok, -1 + err. */
int moe_char_vocab_build(moe_char_vocab *v, const char *text, size_t n, char *err, size_t errcap);
/* ids[] (capacity n) from text; returns the token count, -1 + err on a code
 * point outside the vocabulary. */
long long moe_char_encode(const moe_char_vocab *v, const char *text, size_t n, uint32_t *ids,
                          char *err, size_t errcap);
/* UTF-8 of ids into out (cap bytes, NUL-terminated); returns bytes written. */
size_t moe_char_decode(const moe_char_vocab *v, const uint32_t *ids, size_t n, char *out, size_t cap);
void moe_char_vocab_free(moe_char_vocab *v);

typedef struct moe_prepare_opts {
    const char *tokenizer;       /* "char" (also when NULL) or "gpt2" */
    const char *bpe_dir;         /* gpt2: the folder holding encoder.json and vocab.bpe */
    long long shard_tokens;      /* ids per shard; <= 0 = 2^24 */
} moe_prepare_opts;

/* `moehost prepare`: tokenize the inputs (concatenated, in order) into
 * out_dir: vocab.json (and for gpt2 the BPE files) and shards
 * tokens_000.bin, tokens_001.bin, ... of at most shard_tokens ids each.
 * A shard's character count is the number of code points whose first byte
 * its tokens encode, so the counts add up to the text's. 0 ok, -1 + err. */
int moe_prepare_with(const char *const *inputs, int n_inputs, const char *out_dir,
                     const moe_prepare_opts *opts, char *err, size_t errcap);
/* The same with the tokenizer's default files: "char" only ("gpt2" needs
 * bpe_dir, so moe_prepare_with). */
int moe_prepare(const char *const *inputs, int n_inputs, const char *out_dir, const char *tokenizer,
                long long shard_tokens, char *err, size_t errcap);

/* A token stream in memory, split into train (head) and val (tail). */
typedef struct moe_dataset {
    uint32_t *tokens;
    size_t n_tokens;
    size_t n_train;              /* tokens [0, n_train) train, [n_train, n_tokens) val */
    int vocab_size;
    int tokenizer;               /* MOE_TOKENIZER_* */
    double chars_per_token;      /* over the whole stream, for bits per character */
    moe_char_vocab vocab;        /* for decoding samples (char tokenizer) */
    struct moe_bpe *bpe;         /* for decoding samples (gpt2), else NULL */
} moe_dataset;

/* Open `path`: a folder made by `moehost prepare` (its own tokenizer, as
 * its vocab.json says), or a UTF-8 text file tokenized in memory with
 * `tokenizer`: "char" (also when NULL) or "gpt2", whose encoder.json and
 * vocab.bpe come from bpe_dir. val_fraction in (0,1).
 * Errors (missing, empty, corrupt, too short for seq_len+1 tokens in either
 * split) return -1 with a message naming the path and the fix. */
int moe_dataset_open_with(moe_dataset *ds, const char *path, const char *tokenizer,
                          const char *bpe_dir, double val_fraction, int seq_len, char *err,
                          size_t errcap);
/* moe_dataset_open_with(ds, path, "char", NULL, ...). */
int moe_dataset_open(moe_dataset *ds, const char *path, double val_fraction, int seq_len,
                     char *err, size_t errcap);
void moe_dataset_close(moe_dataset *ds);

/* Text of ids for people (samples): valid UTF-8 into out (cap bytes,
 * NUL-terminated, cut at a whole character); returns the bytes before the
 * NUL. An id outside the vocabulary shows as U+FFFD; for gpt2 so does
 * each invalid UTF-8 subpart of the decoded bytes (as GPT-2's decoder). */
size_t moe_dataset_decode(const moe_dataset *ds, const uint32_t *ids, size_t n, char *out,
                          size_t cap);

/* Training batch for `step`: B windows of seq_len+1 tokens starting at
 * offsets drawn uniformly from the train split with Philox keyed by (seed,
 * step): a pure function of its arguments, so resuming needs no loader state.
 * x[b*S+s] = tokens[o_b+s], y[b*S+s] = tokens[o_b+s+1]. */
void moe_dataset_train_batch(const moe_dataset *ds, uint64_t seed, uint64_t step, int B, int S,
                             int32_t *x, int32_t *y);

/* Number of non-overlapping validation windows of S+1 tokens (consecutive
 * windows share their boundary token), capped so at most max_tokens targets
 * are used (max_tokens 0 = no cap). */
size_t moe_dataset_val_windows(const moe_dataset *ds, int S, long long max_tokens);
/* Window i: x = val[i*S .. i*S+S), y = val[i*S+1 .. i*S+S]. */
void moe_dataset_val_window(const moe_dataset *ds, size_t i, int S, int32_t *x, int32_t *y);

#endif
