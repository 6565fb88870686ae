/*
 * `moehost prepare`: text files -> token shards + vocab.json (layout in
 * data.h), with the char tokenizer or GPT-2's byte-level BPE.
 *
 * Every file is written atomically (a .tmp sibling, fsync, rename, then an
 * fsync of the folder) so a crash or a full disk never leaves a half-written
 * shard under its final name for the loader to trust.
 */
#include "runtime/data.h"
#include "runtime/tokenizer_bpe.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* 2^24 ids: 32 MiB (uint16) or 64 MiB (uint32) per shard. */
#define DEFAULT_SHARD_TOKENS (1LL << 24)

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

static char *shard_path(const char *dir, int index) {
    char name[32];
    snprintf(name, sizeof name, "tokens_%03d.bin", index);
    return join_path(dir, name);
}

/* mkdir -p: the output folder may be several new levels deep. */
static int make_dirs(const char *path, char *err, size_t errcap) {
    char *copy = strdup(path);
    if (!copy) {
        set_err(err, errcap, "out of memory");
        return -1;
    }
    for (char *p = copy + 1;; ++p) {
        if (*p != '/' && *p != '\0') continue;
        char saved = *p;
        *p = '\0';
        if (mkdir(copy, 0755) != 0 && errno != EEXIST) {
            set_err(err, errcap, "cannot create folder '%s': %s", copy, strerror(errno));
            free(copy);
            return -1;
        }
        *p = saved;
        if (saved == '\0') break;
    }
    free(copy);
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) {
        set_err(err, errcap, "'%s' exists and is not a folder; choose another output folder", path);
        return -1;
    }
    return 0;
}

/* Append the whole of one input file to *text (grown with realloc). */
static int append_file(const char *path, char **text, size_t *len, char *err, size_t errcap) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        set_err(err, errcap, "cannot open input '%s': %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        set_err(err, errcap, "input '%s' is not a regular file; pass text files to prepare", path);
        fclose(f);
        return -1;
    }
    size_t size = (size_t)st.st_size;
    char *grown = realloc(*text, *len + size + 1);
    if (!grown) {
        set_err(err, errcap, "out of memory reading '%s' (%zu bytes)", path, size);
        fclose(f);
        return -1;
    }
    *text = grown;
    size_t got = fread(*text + *len, 1, size, f);
    int failed = ferror(f);
    fclose(f);
    if (failed || got != size) {
        set_err(err, errcap, "cannot read input '%s' (got %zu of %zu bytes)", path, got, size);
        return -1;
    }
    *len += size;
    return 0;
}

static int write_all(int fd, const unsigned char *data, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, data, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Make the renames in `dir` durable, not just the files' contents. */
static int fsync_dir(const char *dir, char *err, size_t errcap) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY);
    if (fd < 0 || fsync(fd) != 0) {
        set_err(err, errcap, "cannot sync folder '%s': %s", dir, strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

/* path.tmp, written and fsync'd, then renamed over path. */
static int write_file_atomic(const char *path, const unsigned char *data, size_t n, char *err,
                             size_t errcap) {
    size_t tmp_len = strlen(path) + sizeof ".tmp";
    char *tmp = malloc(tmp_len);
    if (!tmp) {
        set_err(err, errcap, "out of memory");
        return -1;
    }
    snprintf(tmp, tmp_len, "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        set_err(err, errcap, "cannot create '%s': %s", tmp, strerror(errno));
        free(tmp);
        return -1;
    }
    int ok = write_all(fd, data, n) == 0 && fsync(fd) == 0;
    int saved_errno = errno;
    ok = (close(fd) == 0) && ok;
    if (ok && rename(tmp, path) != 0) {
        ok = 0;
        saved_errno = errno;
    }
    if (!ok) {
        set_err(err, errcap, "cannot write '%s': %s (disk full or no permission?)", path,
                strerror(saved_errno));
        unlink(tmp);
    }
    free(tmp);
    return ok ? 0 : -1;
}

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; ++i) p[i] = (unsigned char)(v >> (8 * i));
}

/* What every shard of one prepare shares. */
typedef struct shard_format {
    uint32_t tokenizer;          /* MOE_TOKENIZER_* */
    uint32_t vocab_size;
    const uint64_t *chars;       /* characters of shard i; NULL: one per token (char) */
} shard_format;

/* Header and ids of one shard into buf, field by field (no struct, so no
 * padding or host byte order reaches the file); returns the byte count. */
static size_t serialize_shard(unsigned char *buf, const uint32_t *ids, size_t n,
                              const shard_format *fmt, uint64_t n_chars, uint32_t bytes_per_id) {
    memset(buf, 0, MOE_SHARD_HEADER_BYTES); /* includes the magic's NUL and the reserved bytes */
    memcpy(buf, MOE_SHARD_MAGIC, sizeof MOE_SHARD_MAGIC - 1);
    put_u32(buf + 8, MOE_SHARD_VERSION);
    put_u32(buf + 12, fmt->tokenizer);
    put_u32(buf + 16, fmt->vocab_size);
    put_u32(buf + 20, bytes_per_id);
    put_u64(buf + 24, n);
    put_u64(buf + 32, n_chars);
    unsigned char *p = buf + MOE_SHARD_HEADER_BYTES;
    for (size_t i = 0; i < n; ++i, p += bytes_per_id) {
        if (bytes_per_id == 2) {
            p[0] = (unsigned char)ids[i];
            p[1] = (unsigned char)(ids[i] >> 8);
        } else {
            put_u32(p, ids[i]);
        }
    }
    return (size_t)(p - buf);
}

/* Shards are cut from the whole id stream in order, shard_tokens at a time. */
static int write_shards(const char *out_dir, const uint32_t *ids, size_t n_ids, size_t shard_tokens,
                        const shard_format *fmt, int *n_shards, char *err, size_t errcap) {
    uint32_t bytes_per_id = fmt->vocab_size <= 65535u ? 2u : 4u;
    size_t per_shard = shard_tokens < n_ids ? shard_tokens : n_ids;
    unsigned char *buf = malloc(MOE_SHARD_HEADER_BYTES + per_shard * bytes_per_id);
    if (!buf) {
        set_err(err, errcap, "out of memory for a shard of %zu tokens; use a smaller shard size",
                per_shard);
        return -1;
    }
    int rc = 0;
    *n_shards = 0;
    for (size_t start = 0; start < n_ids && rc == 0; start += per_shard) {
        size_t n = n_ids - start < per_shard ? n_ids - start : per_shard;
        uint64_t n_chars = fmt->chars ? fmt->chars[*n_shards] : n;
        size_t bytes = serialize_shard(buf, ids + start, n, fmt, n_chars, bytes_per_id);
        char *path = shard_path(out_dir, *n_shards);
        if (!path) {
            set_err(err, errcap, "out of memory");
            rc = -1;
            break;
        }
        rc = write_file_atomic(path, buf, bytes, err, errcap);
        free(path);
        if (rc == 0) ++*n_shards;
    }
    free(buf);
    return rc;
}

/* A previous, larger prepare into the same folder left tokens_NNN.bin past
 * the new last shard; the loader reads every shard, so they must go. Shards
 * are always numbered without gaps, so stopping at the first absent one
 * removes them all. */
static int remove_stale_shards(const char *out_dir, int first_stale, char *err, size_t errcap) {
    for (int index = first_stale;; ++index) {
        char *path = shard_path(out_dir, index);
        if (!path) {
            set_err(err, errcap, "out of memory");
            return -1;
        }
        int rc = unlink(path);
        int saved_errno = errno;
        if (rc != 0 && saved_errno != ENOENT)
            set_err(err, errcap, "cannot remove stale shard '%s': %s", path, strerror(saved_errno));
        free(path);
        if (rc != 0) return saved_errno == ENOENT ? 0 : -1;
    }
}

/* root as vocab.json in out_dir (pretty-printed, ending with a newline). */
static int write_json(const char *out_dir, const json_t *root, char *err, size_t errcap) {
    char *text = json_dumps(root, JSON_INDENT(1));
    if (!text) return -1;
    int rc = -1;
    size_t text_len = strlen(text);
    char *path = join_path(out_dir, "vocab.json");
    if (path) {
        /* json_dumps ends without a newline; end the file with one (over
         * the dump's NUL, put back below) so it is a proper text file. */
        text[text_len] = '\n';
        rc = write_file_atomic(path, (const unsigned char *)text, text_len + 1, err, errcap);
        text[text_len] = '\0';
        free(path);
    }
    free(text);
    return rc;
}

/* vocab.json: {"tokenizer": "char", "vocab": [...]}, one code point per
 * string, id = position. */
static int write_vocab_json(const char *out_dir, const moe_char_vocab *vocab, char *err,
                            size_t errcap) {
    json_t *root = json_object();
    json_t *list = json_array();
    int rc = -1;
    if (!root || !list) goto done;
    for (int id = 0; id < vocab->size; ++id) {
        uint32_t one_id = (uint32_t)id;
        char utf8[8];
        size_t len = moe_char_decode(vocab, &one_id, 1, utf8, sizeof utf8);
        /* json_stringn, not json_string: U+0000 is a legal character. */
        if (json_array_append_new(list, json_stringn(utf8, len)) != 0) goto done;
    }
    if (json_object_set_new(root, "tokenizer", json_string("char")) != 0) goto done;
    if (json_object_set(root, "vocab", list) != 0) goto done;
    rc = write_json(out_dir, root, err, errcap);
done:
    /* jansson's constructors fail only when out of memory, and say nothing. */
    if (rc != 0 && err && errcap && err[0] == '\0')
        set_err(err, errcap, "out of memory writing vocab.json");
    json_decref(list);
    json_decref(root);
    return rc;
}

/* gpt2: vocab.json {"tokenizer": "gpt2", "vocab_size": N} and copies of the
 * two BPE files, byte for byte. */
static int write_gpt2_vocab(const char *out_dir, const char *bpe_dir, int vocab_size, char *err,
                            size_t errcap) {
    static const char *const files[2] = {MOE_BPE_ENCODER_FILE, MOE_BPE_MERGES_FILE};
    for (int i = 0; i < 2; ++i) {
        char *src = join_path(bpe_dir, files[i]), *dst = join_path(out_dir, files[i]);
        char *bytes = NULL;
        size_t len = 0;
        int rc = -1;
        if (!src || !dst)
            set_err(err, errcap, "out of memory");
        else if (append_file(src, &bytes, &len, err, errcap) == 0)
            rc = write_file_atomic(dst, (const unsigned char *)bytes, len, err, errcap);
        free(bytes);
        free(src);
        free(dst);
        if (rc != 0) return -1;
    }
    json_t *root = json_pack("{s:s, s:i}", "tokenizer", "gpt2", "vocab_size", vocab_size);
    int rc = root ? write_json(out_dir, root, err, errcap) : -1;
    if (rc != 0 && err && errcap && err[0] == '\0')
        set_err(err, errcap, "out of memory writing vocab.json");
    json_decref(root);
    return rc;
}

/* Characters of each shard of gpt2 ids (cut as write_shards cuts them): a
 * character counts in the shard whose tokens hold its first byte (a token
 * may hold part of a character). Tokens decode to the text exactly, so
 * shard s ends at the byte where its last token's bytes end. */
static uint64_t *shard_chars(const moe_bpe *bpe, const char *text, size_t text_len,
                             const uint32_t *ids, size_t n_ids, size_t shard_tokens) {
    size_t per_shard = shard_tokens < n_ids ? shard_tokens : n_ids;
    size_t n_shards = (n_ids + per_shard - 1) / per_shard;
    uint64_t *chars = calloc(n_shards, sizeof *chars);
    if (!chars) return NULL;
    size_t tok = 0, shard_end = 0, at = 0;
    for (size_t s = 0; s < n_shards; ++s) {
        size_t last = n_ids - tok < per_shard ? n_ids : tok + per_shard;
        for (; tok < last; ++tok) shard_end += (size_t)moe_bpe_decode(bpe, ids + tok, 1, NULL, 0);
        for (; at < shard_end && at < text_len; ++chars[s])
            at += moe_utf8_char_len(text + at, text_len - at);
    }
    return chars;
}

int moe_prepare_with(const char *const *inputs, int n_inputs, const char *out_dir,
                     const moe_prepare_opts *opts, char *err, size_t errcap) {
    if (err && errcap) err[0] = '\0';
    const char *tokenizer = opts && opts->tokenizer ? opts->tokenizer : "char";
    const char *bpe_dir = opts ? opts->bpe_dir : NULL;
    int gpt2 = strcmp(tokenizer, "gpt2") == 0;
    if (!gpt2 && strcmp(tokenizer, "char") != 0) {
        set_err(err, errcap, "prepare: unknown tokenizer '%s' (known: char, gpt2)", tokenizer);
        return -1;
    }
    if (gpt2 && (!bpe_dir || bpe_dir[0] == '\0')) {
        set_err(err, errcap,
                "prepare: the gpt2 tokenizer needs --bpe-dir DIR, the folder holding encoder.json "
                "and vocab.bpe (scripts/setup_data.sh --gpt2 puts them in data/gpt2)");
        return -1;
    }
    if (n_inputs <= 0) {
        set_err(err, errcap, "prepare: no input files given");
        return -1;
    }
    if (!out_dir || out_dir[0] == '\0') {
        set_err(err, errcap, "prepare: no output folder given");
        return -1;
    }
    long long shard_tokens = opts && opts->shard_tokens > 0 ? opts->shard_tokens
                                                            : DEFAULT_SHARD_TOKENS;

    char *text = NULL;
    size_t text_len = 0;
    moe_char_vocab vocab = {0, NULL};
    moe_bpe *bpe = NULL;
    uint32_t *ids = NULL;
    uint64_t *chars = NULL;
    int n_shards = 0;
    int rc = -1;
    /* The folder and the BPE files first: a bad path should fail before
     * minutes of tokenizing. */
    if (make_dirs(out_dir, err, errcap) != 0) goto done;
    if (gpt2 && !(bpe = moe_bpe_load_dir(bpe_dir, err, errcap))) goto done;
    for (int i = 0; i < n_inputs; ++i)
        if (append_file(inputs[i], &text, &text_len, err, errcap) != 0) goto done;
    if (text_len == 0) {
        set_err(err, errcap, "prepare: the input files are empty; there is no text to tokenize");
        goto done;
    }
    /* At most one id per byte, with either tokenizer. */
    ids = malloc(text_len * sizeof *ids);
    if (!ids) {
        set_err(err, errcap, "out of memory for %zu token ids", text_len);
        goto done;
    }
    long long n_ids;
    shard_format fmt;
    if (gpt2) {
        n_ids = moe_bpe_encode(bpe, text, text_len, ids, err, errcap);
        if (n_ids < 0) goto done;
        chars = shard_chars(bpe, text, text_len, ids, (size_t)n_ids, (size_t)shard_tokens);
        if (!chars) {
            set_err(err, errcap, "out of memory");
            goto done;
        }
        fmt = (shard_format){MOE_TOKENIZER_GPT2, (uint32_t)moe_bpe_vocab_size(bpe), chars};
    } else {
        if (moe_char_vocab_build(&vocab, text, text_len, err, errcap) != 0) goto done;
        n_ids = moe_char_encode(&vocab, text, text_len, ids, err, errcap);
        if (n_ids < 0) goto done;
        fmt = (shard_format){MOE_TOKENIZER_CHAR, (uint32_t)vocab.size, NULL};
    }
    free(text);
    text = NULL;

    if (write_shards(out_dir, ids, (size_t)n_ids, (size_t)shard_tokens, &fmt, &n_shards, err,
                     errcap) != 0)
        goto done;
    if (remove_stale_shards(out_dir, n_shards, err, errcap) != 0) goto done;
    if (gpt2 ? write_gpt2_vocab(out_dir, bpe_dir, moe_bpe_vocab_size(bpe), err, errcap)
             : write_vocab_json(out_dir, &vocab, err, errcap))
        goto done;
    rc = fsync_dir(out_dir, err, errcap);
done:
    free(text);
    free(ids);
    free(chars);
    moe_char_vocab_free(&vocab);
    moe_bpe_free(bpe);
    return rc;
}

int moe_prepare(const char *const *inputs, int n_inputs, const char *out_dir, const char *tokenizer,
                long long shard_tokens, char *err, size_t errcap) {
    moe_prepare_opts opts = {tokenizer, NULL, shard_tokens};
    return moe_prepare_with(inputs, n_inputs, out_dir, &opts, err, errcap);
}
