/*
 * The token loader: a folder of shards from `moehost prepare` or a plain
 * text file, read whole into memory, checked, and split into a training head
 * and a validation tail; then training batches and validation windows cut
 * from it.
 *
 * Everything read from disk is validated before use, and every error names
 * the file and how to fix it: a corrupt shard found here costs a message,
 * found by the model it costs a crash or silently wrong numbers.
 */
#include "runtime/data.h"

#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "moe/philox.h"
#include "runtime/tokenizer_bpe.h"

#define REPREPARE "re-run `moehost prepare`"

static void set_err(char *err, size_t errcap, const char *fmt, ...) {
    if (!err || errcap == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errcap, fmt, ap);
    va_end(ap);
}

/* "dir/name", malloc'd; NULL when out of memory. */
static char *join_path(const char *dir, const char *name) {
    size_t n = strlen(dir) + 1 + strlen(name) + 1;
    char *path = malloc(n);
    if (path) snprintf(path, n, "%s/%s", dir, name);
    return path;
}

static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_u64(const unsigned char *p) {
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

/* ---- a plain text file, tokenized in memory ---- */

/* The text with GPT-2's BPE from bpe_dir into ds. */
static int encode_text_bpe(moe_dataset *ds, const char *path, const char *text, size_t size,
                           const char *bpe_dir, char *err, size_t errcap) {
    if (!bpe_dir || bpe_dir[0] == '\0') {
        set_err(err, errcap,
                "%s: the gpt2 tokenizer needs the folder holding encoder.json and vocab.bpe "
                "(data.bpe_dir; scripts/setup_data.sh --gpt2 puts them in data/gpt2)",
                path);
        return -1;
    }
    ds->bpe = moe_bpe_load_dir(bpe_dir, err, errcap);
    if (!ds->bpe) return -1;
    ds->tokens = malloc(size * sizeof *ds->tokens);
    if (!ds->tokens) {
        set_err(err, errcap, "%s: out of memory for %zu token ids", path, size);
        return -1;
    }
    char why[256];
    long long n = moe_bpe_encode(ds->bpe, text, size, ds->tokens, why, sizeof why);
    if (n < 0) {
        set_err(err, errcap, "%s: %s", path, why);
        return -1;
    }
    uint32_t *trimmed = realloc(ds->tokens, (size_t)n * sizeof *ds->tokens);
    if (trimmed) ds->tokens = trimmed;
    ds->n_tokens = (size_t)n;
    ds->vocab_size = moe_bpe_vocab_size(ds->bpe);
    ds->tokenizer = MOE_TOKENIZER_GPT2;
    ds->chars_per_token = (double)moe_utf8_count_chars(text, size) / (double)n;
    return 0;
}

static int open_text(moe_dataset *ds, const char *path, const char *tokenizer, const char *bpe_dir,
                     char *err, size_t errcap) {
    int gpt2 = tokenizer && strcmp(tokenizer, "gpt2") == 0;
    if (tokenizer && !gpt2 && strcmp(tokenizer, "char") != 0) {
        set_err(err, errcap, "%s: unknown tokenizer '%s' (known: char, gpt2)", path, tokenizer);
        return -1;
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        set_err(err, errcap, "%s: cannot open (%s); check data.path and its permissions", path,
                strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        set_err(err, errcap, "%s: cannot stat (%s)", path, strerror(errno));
        fclose(f);
        return -1;
    }
    size_t size = (size_t)st.st_size;
    if (size == 0) {
        set_err(err, errcap, "%s: the file is empty; data.path needs UTF-8 text", path);
        fclose(f);
        return -1;
    }
    char *text = malloc(size);
    if (!text) {
        set_err(err, errcap, "%s: out of memory for %zu bytes of text", path, size);
        fclose(f);
        return -1;
    }
    size_t got = fread(text, 1, size, f);
    int failed = ferror(f);
    fclose(f);
    if (failed || got != size) {
        set_err(err, errcap, "%s: read %zu of %zu bytes", path, got, size);
        free(text);
        return -1;
    }
    int rc = -1;
    if (gpt2) {
        rc = encode_text_bpe(ds, path, text, size, bpe_dir, err, errcap);
        goto done;
    }
    if (moe_char_vocab_build(&ds->vocab, text, size, err, errcap) != 0) goto done;
    /* At most one token per byte; trimmed to the real count below. */
    ds->tokens = malloc(size * sizeof *ds->tokens);
    if (!ds->tokens) {
        set_err(err, errcap, "%s: out of memory for %zu token ids", path, size);
        goto done;
    }
    long long n = moe_char_encode(&ds->vocab, text, size, ds->tokens, err, errcap);
    if (n <= 0) goto done;
    uint32_t *trimmed = realloc(ds->tokens, (size_t)n * sizeof *ds->tokens);
    if (trimmed) ds->tokens = trimmed;
    ds->n_tokens = (size_t)n;
    ds->vocab_size = ds->vocab.size;
    ds->tokenizer = MOE_TOKENIZER_CHAR;
    ds->chars_per_token = 1.0;
    rc = 0;
done:
    free(text);
    return rc;
}

/* ---- a folder from `moehost prepare` ---- */

/* The char vocabulary from vocab.json's list, checked to be what prepare
 * writes: distinct single code points in ascending order. Tokenizing the
 * concatenated entries with the vocabulary built from them gives exactly
 * 0, 1, ..., n-1 when, and only when, that holds (given no entry is empty). */
static int char_vocab_from_json(moe_char_vocab *vocab, const json_t *list, const char *path,
                                char *err, size_t errcap) {
    size_t n = json_array_size(list);
    size_t total = 0;
    for (size_t i = 0; i < n; ++i) {
        const json_t *entry = json_array_get(list, i);
        if (!json_is_string(entry) || json_string_length(entry) == 0) {
            set_err(err, errcap, "%s: vocab entry %zu is not a one-character string; " REPREPARE,
                    path, i);
            return -1;
        }
        total += json_string_length(entry);
    }
    char *joined = malloc(total);
    uint32_t *ids = malloc(total * sizeof *ids);
    int rc = -1;
    if (!joined || !ids) {
        set_err(err, errcap, "%s: out of memory", path);
        goto done;
    }
    size_t at = 0;
    for (size_t i = 0; i < n; ++i) {
        const json_t *entry = json_array_get(list, i);
        memcpy(joined + at, json_string_value(entry), json_string_length(entry));
        at += json_string_length(entry);
    }
    if (moe_char_vocab_build(vocab, joined, total, err, errcap) != 0) goto done;
    long long count = moe_char_encode(vocab, joined, total, ids, err, errcap);
    int in_order = count == (long long)n;
    for (size_t i = 0; in_order && i < n; ++i) in_order = ids[i] == i;
    if (!in_order) {
        set_err(err, errcap,
                "%s: the vocab entries are not distinct single characters in ascending code "
                "point order; " REPREPARE,
                path);
        moe_char_vocab_free(vocab);
        goto done;
    }
    rc = 0;
done:
    free(joined);
    free(ids);
    return rc;
}

/* gpt2: the vocabulary size vocab.json states, and the BPE files beside it
 * (kept in ds->bpe for decoding), which must agree on it. */
static int gpt2_from_json(moe_dataset *ds, const char *dir, const json_t *root, const char *path,
                          char *err, size_t errcap) {
    const json_t *size = json_object_get(root, "vocab_size");
    json_int_t n = json_is_integer(size) ? json_integer_value(size) : 0;
    if (n <= 0 || n > INT_MAX) {
        set_err(err, errcap, "%s: a gpt2 vocab.json needs a positive integer \"vocab_size\"; "
                REPREPARE, path);
        return -1;
    }
    char why[1024];
    ds->bpe = moe_bpe_load_dir(dir, why, sizeof why);
    if (!ds->bpe) {
        set_err(err, errcap, "%s: %s; " REPREPARE " --tokenizer gpt2", dir, why);
        return -1;
    }
    if (moe_bpe_vocab_size(ds->bpe) != n) {
        set_err(err, errcap,
                "%s: vocab_size %lld, but the folder's encoder.json has %d tokens (files from "
                "different prepares?); " REPREPARE " --tokenizer gpt2",
                path, (long long)n, moe_bpe_vocab_size(ds->bpe));
        return -1;
    }
    ds->vocab_size = (int)n;
    return 0;
}

/* vocab.json: the tokenizer and the vocabulary size the shards must match;
 * for the char tokenizer also the vocabulary itself (kept in ds->vocab),
 * for gpt2 the BPE files beside it (kept in ds->bpe). */
static int read_vocab_json(moe_dataset *ds, const char *dir, char *err, size_t errcap) {
    char *path = join_path(dir, "vocab.json");
    if (!path) {
        set_err(err, errcap, "out of memory");
        return -1;
    }
    int rc = -1;
    json_error_t jerr;
    /* JSON_ALLOW_NUL: U+0000 is a legal character of a text. */
    json_t *root = json_load_file(path, JSON_ALLOW_NUL, &jerr);
    if (!root) {
        struct stat st;
        if (stat(path, &st) != 0)
            set_err(err, errcap, "%s: missing; the folder is not a complete `moehost prepare` "
                    "output; " REPREPARE, path);
        else
            set_err(err, errcap, "%s: line %d: %s; " REPREPARE, path, jerr.line, jerr.text);
        goto done;
    }
    const char *tokenizer = json_string_value(json_object_get(root, "tokenizer"));
    const json_t *list = json_object_get(root, "vocab");
    if (tokenizer && strcmp(tokenizer, "gpt2") == 0) {
        ds->tokenizer = MOE_TOKENIZER_GPT2;
        rc = gpt2_from_json(ds, dir, root, path, err, errcap);
        goto done;
    }
    if (!tokenizer || !json_is_array(list)) {
        set_err(err, errcap, "%s: needs a \"tokenizer\" string and a \"vocab\" list; " REPREPARE,
                path);
        goto done;
    }
    if (strcmp(tokenizer, "char") == 0) {
        ds->tokenizer = MOE_TOKENIZER_CHAR;
    } else {
        set_err(err, errcap, "%s: unknown tokenizer '%s' (known: char, gpt2); " REPREPARE, path,
                tokenizer);
        goto done;
    }
    size_t n = json_array_size(list);
    if (n == 0 || n > INT_MAX) {
        set_err(err, errcap, "%s: vocabulary of %zu entries; " REPREPARE, path, n);
        goto done;
    }
    ds->vocab_size = (int)n;
    if (char_vocab_from_json(&ds->vocab, list, path, err, errcap) != 0) goto done;
    rc = 0;
done:
    json_decref(root);
    free(path);
    return rc;
}

static int compare_ints(const void *a, const void *b) {
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* The shard index of a name prepare writes ("tokens_007.bin" -> 7), or -1
 * for any other name (vocab.json, leftover .tmp files, ...). */
static int shard_index_of(const char *name) {
    if (strncmp(name, "tokens_", strlen("tokens_")) != 0) return -1;
    const char *digits = name + strlen("tokens_");
    int index = 0, n_digits = 0;
    while (digits[n_digits] >= '0' && digits[n_digits] <= '9' && n_digits < 9)
        index = index * 10 + (digits[n_digits++] - '0');
    if (n_digits == 0 || strcmp(digits + n_digits, ".bin") != 0) return -1;
    /* Only the canonical spelling, so one index cannot appear twice. */
    char canonical[32];
    snprintf(canonical, sizeof canonical, "tokens_%03d.bin", index);
    return strcmp(name, canonical) == 0 ? index : -1;
}

/* Number of shards, after checking they are tokens_000.bin .. tokens_{n-1}
 * without a gap (a gap would silently drop data from the stream). */
static int count_shards(const char *dir, int *n_shards, char *err, size_t errcap) {
    DIR *d = opendir(dir);
    if (!d) {
        set_err(err, errcap, "%s: cannot list the folder (%s)", dir, strerror(errno));
        return -1;
    }
    int *indices = NULL;
    int n = 0, cap = 0, rc = -1;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        int index = shard_index_of(e->d_name);
        if (index < 0) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            int *grown = realloc(indices, (size_t)cap * sizeof *indices);
            if (!grown) {
                set_err(err, errcap, "out of memory");
                goto done;
            }
            indices = grown;
        }
        indices[n++] = index;
    }
    if (n == 0) {
        set_err(err, errcap, "%s: no token shards (tokens_000.bin, ...) in the folder; " REPREPARE,
                dir);
        goto done;
    }
    qsort(indices, (size_t)n, sizeof *indices, compare_ints);
    for (int i = 0; i < n; ++i) {
        if (indices[i] != i) {
            set_err(err, errcap, "%s/tokens_%03d.bin: missing, but later shards exist; " REPREPARE,
                    dir, i);
            goto done;
        }
    }
    *n_shards = n;
    rc = 0;
done:
    free(indices);
    closedir(d);
    return rc;
}

/* Append one shard's ids to ds->tokens after checking its header against
 * vocab.json, its size against its header, and every id against the
 * vocabulary size. *n_chars accumulates the header's character count. */
static int read_shard(moe_dataset *ds, const char *path, uint64_t *n_chars, char *err,
                      size_t errcap) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        set_err(err, errcap, "%s: cannot open (%s); " REPREPARE, path, strerror(errno));
        return -1;
    }
    int rc = -1;
    unsigned char *block = NULL;
    struct stat st;
    unsigned char header[MOE_SHARD_HEADER_BYTES];
    if (fstat(fileno(f), &st) != 0) {
        set_err(err, errcap, "%s: cannot stat (%s)", path, strerror(errno));
        goto done;
    }
    uint64_t file_bytes = (uint64_t)st.st_size;
    if (fread(header, 1, sizeof header, f) != sizeof header) {
        set_err(err, errcap,
                "%s: %llu bytes, shorter than the %d-byte header (truncated); " REPREPARE, path,
                (unsigned long long)file_bytes, MOE_SHARD_HEADER_BYTES);
        goto done;
    }
    /* sizeof includes the magic's terminating NUL, which is part of the 8 bytes. */
    if (memcmp(header, MOE_SHARD_MAGIC, sizeof MOE_SHARD_MAGIC) != 0) {
        set_err(err, errcap, "%s: bad magic (not a token shard); " REPREPARE, path);
        goto done;
    }
    uint32_t version = get_u32(header + 8), tokenizer = get_u32(header + 12);
    uint32_t vocab_size = get_u32(header + 16), bytes_per_id = get_u32(header + 20);
    uint64_t n = get_u64(header + 24);
    if (version != MOE_SHARD_VERSION) {
        set_err(err, errcap, "%s: format version %u, this build reads version %u; " REPREPARE
                " with this build", path, version, MOE_SHARD_VERSION);
        goto done;
    }
    if (tokenizer != (uint32_t)ds->tokenizer || vocab_size != (uint32_t)ds->vocab_size) {
        set_err(err, errcap,
                "%s: tokenizer %u with vocab size %u, but vocab.json says tokenizer %d with %d "
                "entries (files from different prepares?); " REPREPARE,
                path, tokenizer, vocab_size, ds->tokenizer, ds->vocab_size);
        goto done;
    }
    if (bytes_per_id != 2 && bytes_per_id != 4) {
        set_err(err, errcap, "%s: %u bytes per token id (must be 2 or 4); " REPREPARE, path,
                bytes_per_id);
        goto done;
    }
    /* Compared without forming 64 + n * bytes_per_id, which a corrupt n could overflow. */
    uint64_t payload = file_bytes - MOE_SHARD_HEADER_BYTES;
    if (payload % bytes_per_id != 0 || payload / bytes_per_id != n) {
        set_err(err, errcap,
                "%s: %llu bytes, but the header promises %d + %llu x %u (truncated or corrupt); "
                REPREPARE,
                path, (unsigned long long)file_bytes, MOE_SHARD_HEADER_BYTES,
                (unsigned long long)n, bytes_per_id);
        goto done;
    }
    /* n is bounded by the file's size now, so the new total cannot overflow. */
    if (n > 0) {
        uint32_t *tokens = realloc(ds->tokens, ((size_t)n + ds->n_tokens) * sizeof *tokens);
        if (!tokens) {
            set_err(err, errcap, "%s: out of memory for %llu more tokens", path,
                    (unsigned long long)n);
            goto done;
        }
        ds->tokens = tokens;
    }
    enum { BLOCK_IDS = 1 << 16 };
    block = malloc((size_t)BLOCK_IDS * bytes_per_id);
    if (!block) {
        set_err(err, errcap, "out of memory");
        goto done;
    }
    for (uint64_t done_ids = 0; done_ids < n;) {
        size_t want = n - done_ids < BLOCK_IDS ? (size_t)(n - done_ids) : BLOCK_IDS;
        if (fread(block, bytes_per_id, want, f) != want) {
            set_err(err, errcap, "%s: read error after %llu ids; " REPREPARE, path,
                    (unsigned long long)done_ids);
            goto done;
        }
        uint32_t *out = ds->tokens + ds->n_tokens;
        for (size_t i = 0; i < want; ++i) {
            const unsigned char *p = block + i * bytes_per_id;
            uint32_t id = bytes_per_id == 2 ? (uint32_t)p[0] | (uint32_t)p[1] << 8 : get_u32(p);
            if (id >= vocab_size) {
                set_err(err, errcap,
                        "%s: token %llu has id %u, not below the vocab size %u (corrupt shard); "
                        REPREPARE,
                        path, (unsigned long long)(done_ids + i), id, vocab_size);
                goto done;
            }
            out[i] = id;
        }
        ds->n_tokens += want;
        done_ids += want;
    }
    *n_chars += get_u64(header + 32);
    rc = 0;
done:
    free(block);
    fclose(f);
    return rc;
}

static int open_prepared(moe_dataset *ds, const char *dir, char *err, size_t errcap) {
    if (read_vocab_json(ds, dir, err, errcap) != 0) return -1;
    int n_shards;
    if (count_shards(dir, &n_shards, err, errcap) != 0) return -1;
    uint64_t n_chars = 0;
    for (int i = 0; i < n_shards; ++i) {
        char name[32];
        snprintf(name, sizeof name, "tokens_%03d.bin", i);
        char *path = join_path(dir, name);
        if (!path) {
            set_err(err, errcap, "out of memory");
            return -1;
        }
        int rc = read_shard(ds, path, &n_chars, err, errcap);
        free(path);
        if (rc != 0) return -1;
    }
    if (ds->n_tokens == 0) {
        set_err(err, errcap, "%s: the shards hold no tokens; prepare it from non-empty text", dir);
        return -1;
    }
    ds->chars_per_token = (double)n_chars / (double)ds->n_tokens;
    return 0;
}

/* ---- opening and splitting ---- */

static int split(moe_dataset *ds, const char *path, double val_fraction, int seq_len, char *err,
                 size_t errcap) {
    ds->n_train = (size_t)floor((double)ds->n_tokens * (1.0 - val_fraction));
    size_t n_val = ds->n_tokens - ds->n_train;
    size_t needed = (size_t)seq_len + 1;
    if (ds->n_train < needed || n_val < needed) {
        set_err(err, errcap,
                "%s: %zu tokens split into %zu train and %zu val (data.val_fraction = %g), but "
                "each split needs at least model.seq_len + 1 = %zu tokens; use a smaller "
                "model.seq_len or more data",
                path, ds->n_tokens, ds->n_train, n_val, val_fraction, needed);
        return -1;
    }
    return 0;
}

int moe_dataset_open_with(moe_dataset *ds, const char *path, const char *tokenizer,
                          const char *bpe_dir, double val_fraction, int seq_len, char *err,
                          size_t errcap) {
    memset(ds, 0, sizeof *ds);
    if (!(val_fraction > 0.0 && val_fraction < 1.0)) {
        set_err(err, errcap, "data.val_fraction must lie in (0, 1), got %g", val_fraction);
        return -1;
    }
    if (seq_len < 1) {
        set_err(err, errcap, "model.seq_len must be at least 1, got %d", seq_len);
        return -1;
    }
    struct stat st;
    if (stat(path, &st) != 0) {
        set_err(err, errcap,
                "data.path '%s' does not exist; set data.path to a UTF-8 text file or a folder "
                "made by `moehost prepare`",
                path);
        return -1;
    }
    int rc;
    if (S_ISDIR(st.st_mode)) {
        rc = open_prepared(ds, path, err, errcap);
    } else if (S_ISREG(st.st_mode)) {
        rc = open_text(ds, path, tokenizer, bpe_dir, err, errcap);
    } else {
        set_err(err, errcap, "data.path '%s' is neither a regular file nor a folder", path);
        rc = -1;
    }
    if (rc == 0) rc = split(ds, path, val_fraction, seq_len, err, errcap);
    if (rc != 0) moe_dataset_close(ds);
    return rc;
}

int moe_dataset_open(moe_dataset *ds, const char *path, double val_fraction, int seq_len,
                     char *err, size_t errcap) {
    return moe_dataset_open_with(ds, path, "char", NULL, val_fraction, seq_len, err, errcap);
}

void moe_dataset_close(moe_dataset *ds) {
    free(ds->tokens);
    moe_char_vocab_free(&ds->vocab);
    moe_bpe_free(ds->bpe);
    memset(ds, 0, sizeof *ds);
}

size_t moe_dataset_decode(const moe_dataset *ds, const uint32_t *ids, size_t n, char *out,
                          size_t cap) {
    if (ds->bpe) return moe_bpe_decode_text(ds->bpe, ids, n, out, cap);
    return moe_char_decode(&ds->vocab, ids, n, out, cap);
}

/* ---- training batches and validation windows ---- */

void moe_dataset_train_batch(const moe_dataset *ds, uint64_t seed, uint64_t step, int B, int S,
                             int32_t *x, int32_t *y) {
    assert(S >= 1 && ds->n_train >= (size_t)S + 1);
    moe_rng_key key = {.seed = seed, .step = step, .layer = 0, .stream = MOE_RNG_STREAM_DATA};
    /* A window starting at o reads tokens o .. o+S, all inside [0, n_train). */
    uint64_t n_starts = ds->n_train - (size_t)S;
    for (int b = 0; b < B; ++b) {
        /* Philox elements 2b and 2b+1 make one 64-bit draw. Reducing it
         * modulo n_starts favours the smallest values by at most
         * n_starts / 2^64 (below 1e-9 for any corpus under 2^34 tokens),
         * far below anything training could notice. */
        uint64_t lo = moe_rng_u32(key, 2 * (uint64_t)b);
        uint64_t hi = moe_rng_u32(key, 2 * (uint64_t)b + 1);
        size_t start = (size_t)(((hi << 32) | lo) % n_starts);
        const uint32_t *window = ds->tokens + start;
        for (int s = 0; s < S; ++s) {
            x[(size_t)b * S + s] = (int32_t)window[s];
            y[(size_t)b * S + s] = (int32_t)window[s + 1];
        }
    }
}

size_t moe_dataset_val_windows(const moe_dataset *ds, int S, long long max_tokens) {
    size_t n_val = ds->n_tokens - ds->n_train;
    if (S < 1 || n_val < 2) return 0;
    /* Window i covers val[i*S .. i*S+S]; the last needs i*S + S <= n_val - 1. */
    size_t windows = (n_val - 1) / (size_t)S;
    /* Each window scores S targets; a negative cap means no cap, like 0. */
    if (max_tokens > 0 && (unsigned long long)max_tokens / (unsigned)S < windows)
        windows = (size_t)((unsigned long long)max_tokens / (unsigned)S);
    return windows;
}

void moe_dataset_val_window(const moe_dataset *ds, size_t i, int S, int32_t *x, int32_t *y) {
    assert(S >= 1 && ds->n_train + (i + 1) * (size_t)S < ds->n_tokens);
    const uint32_t *window = ds->tokens + ds->n_train + i * (size_t)S;
    for (int s = 0; s < S; ++s) {
        x[s] = (int32_t)window[s];
        y[s] = (int32_t)window[s + 1];
    }
}
