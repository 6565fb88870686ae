/*
 * GPT-2 byte-level BPE (see tokenizer_bpe.h for the contract and for how
 * invalid UTF-8 is handled).
 *
 * Tokens are handled as ids throughout: a merge is a hash-table entry
 * (left id, right id) -> (rank, result id), built once from vocab.bpe, so
 * merging never touches strings. The byte strings of the tokens (for
 * decoding) sit in one block indexed by id.
 *
 * Merging a pre-token of k bytes follows GPT-2's rule: repeatedly take the
 * adjacent pair of lowest rank and merge all its occurrences left to right.
 * GPT-2's loop does that in one pass per merge, O(k^2) for long pre-tokens
 * (a megabyte without spaces takes hours). When the merge list is ordered
 * (every pair made of a merge's result ranks above that merge, as in any
 * trained list) no pass can create a pair ranking below its own, so the
 * rule equals "merge the leftmost pair of lowest rank, repeat", which a heap
 * keyed by (rank, position) over a linked list does in O(k log k). Lists
 * that are not ordered keep GPT-2's loop.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "runtime/utf8.h"
#include "runtime/tokenizer_bpe.h"

#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <pcre2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CACHE_SLOTS 4096        /* direct-mapped, a power of two */
#define CACHE_KEY_MAX 24        /* longer pre-tokens are rare and not cached */
#define NO_RANK UINT32_MAX
#define DEAD UINT32_MAX
#define SETUP_HINT "scripts/setup_data.sh --gpt2 puts the GPT-2 files in data/gpt2"

typedef struct merge_slot {
    uint32_t left, right;
    uint32_t rank;              /* NO_RANK: empty slot */
    uint32_t result;
} merge_slot;

typedef struct cache_entry {
    uint8_t key_len;            /* 0: empty */
    uint8_t n_ids;
    unsigned char key[CACHE_KEY_MAX];
    uint32_t ids[CACHE_KEY_MAX];
} cache_entry;

typedef struct heap_item {
    uint32_t rank, pos, left, right, result;
} heap_item;

struct moe_bpe {
    int vocab_size;
    int n_merges;
    int ordered;
    unsigned flags;
    uint32_t byte_id[256];
    uint32_t *tok_off;          /* token id's bytes: tok_bytes[tok_off[id] .. tok_off[id+1]) */
    unsigned char *tok_bytes;
    merge_slot *merges;
    size_t merge_mask;
    pcre2_code *re;
    pcre2_match_data *match;
    cache_entry *cache;
    /* Scratch for one pre-token, grown on demand. */
    size_t scratch_cap;
    uint32_t *sym;
    int32_t *prev, *next;
    heap_item *heap;
};

static void set_err(char *err, size_t errcap, const char *fmt, ...) {
    if (!err || errcap == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errcap, fmt, ap);
    va_end(ap);
}

/* ---- UTF-8 ---- */

/* Length and allowed second-byte range of a sequence led by `lead`; 0 for a
 * byte that cannot lead one (80..C1, F5..FF). The second byte's range rules
 * out overlong forms (E0, F0), surrogates (ED) and values past U+10FFFF (F4). */
static size_t utf8_lead(unsigned char lead, unsigned char *lo, unsigned char *hi) {
    *lo = 0x80;
    *hi = 0xBF;
    if (lead < 0x80) return 1;
    if (lead >= 0xC2 && lead <= 0xDF) return 2;
    if (lead >= 0xE0 && lead <= 0xEF) {
        if (lead == 0xE0) *lo = 0xA0;
        if (lead == 0xED) *hi = 0x9F;
        return 3;
    }
    if (lead >= 0xF0 && lead <= 0xF4) {
        if (lead == 0xF0) *lo = 0x90;
        if (lead == 0xF4) *hi = 0x8F;
        return 4;
    }
    return 0;
}


/* Bytes of the valid sequence at s (avail readable), 0 if none starts there. */
static size_t utf8_valid_len(const unsigned char *s, size_t avail) {
    unsigned char lo, hi;
    size_t len = utf8_lead(s[0], &lo, &hi);
    if (len <= 1) return len;
    if (avail < len || s[1] < lo || s[1] > hi) return 0;
    for (size_t k = 2; k < len; ++k)
        if (!moe_utf8_is_continuation(s[k])) return 0;
    return len;
}

/* Where no valid sequence starts at s: the bytes of the maximal subpart
 * (a lead byte and the continuation bytes that could still have completed
 * it), which a decoder replaces by one U+FFFD, as Python's does. */
static size_t utf8_invalid_len(const unsigned char *s, size_t avail) {
    unsigned char lo, hi;
    size_t len = utf8_lead(s[0], &lo, &hi);
    if (len <= 1 || avail < 2 || s[1] < lo || s[1] > hi) return 1;
    size_t k = 2;
    while (k < len && k < avail && moe_utf8_is_continuation(s[k])) ++k;
    return k;
}

/* Code point of a valid sequence of `len` bytes. */
static uint32_t utf8_value(const unsigned char *s, size_t len) {
    static const unsigned char lead_mask[5] = {0, 0x7F, 0x1F, 0x0F, 0x07};
    uint32_t cp = s[0] & lead_mask[len];
    for (size_t k = 1; k < len; ++k) cp = (cp << 6) | (s[k] & 0x3Fu);
    return cp;
}

size_t moe_utf8_char_len(const char *text, size_t avail) {
    size_t len = utf8_valid_len((const unsigned char *)text, avail);
    return len ? len : 1;
}

uint64_t moe_utf8_count_chars(const char *text, size_t n) {
    uint64_t count = 0;
    for (size_t i = 0; i < n; ++count) i += moe_utf8_char_len(text + i, n - i);
    return count;
}

/* ---- the byte map ---- */

static int byte_kept(unsigned b) {
    return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
}

uint32_t moe_bpe_byte_to_codepoint(unsigned char byte) {
    if (byte_kept(byte)) return byte;
    /* The n-th byte (from 0, ascending) that is not kept maps to 256 + n:
     * 0..32 are the first 33, then 127..160 (34 more), then 173. */
    if (byte <= 32) return 256u + byte;
    if (byte <= 160) return 256u + 33u + (byte - 127u);
    return 256u + 67u; /* 173 */
}

int moe_bpe_codepoint_to_byte(uint32_t cp) {
    if (cp < 256) return byte_kept(cp) ? (int)cp : -1;
    if (cp <= 256 + 32) return (int)(cp - 256);
    if (cp <= 256 + 66) return (int)(cp - 256 - 33 + 127);
    if (cp == 256 + 67) return 173;
    return -1;
}

/* ---- loading ---- */

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static merge_slot *merge_slot_for(const moe_bpe *b, uint32_t left, uint32_t right) {
    size_t i = (size_t)mix64((uint64_t)left << 32 | right) & b->merge_mask;
    while (b->merges[i].rank != NO_RANK &&
           (b->merges[i].left != left || b->merges[i].right != right))
        i = (i + 1) & b->merge_mask;
    return &b->merges[i];
}

static const merge_slot *merge_find(const moe_bpe *b, uint32_t left, uint32_t right) {
    const merge_slot *slot = merge_slot_for(b, left, right);
    return slot->rank == NO_RANK ? NULL : slot;
}

static char *read_whole_file(const char *path, size_t *n, char *err, size_t errcap) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        set_err(err, errcap, "%s: cannot open (%s); %s", path, strerror(errno), SETUP_HINT);
        return NULL;
    }
    char *text = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? 2 * cap : 1 << 16;
            char *grown = realloc(text, cap + 1);
            if (!grown) {
                set_err(err, errcap, "%s: out of memory", path);
                free(text);
                fclose(f);
                return NULL;
            }
            text = grown;
        }
        size_t got = fread(text + len, 1, cap - len, f);
        len += got;
        if (got == 0) break;
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        set_err(err, errcap, "%s: read error", path);
        free(text);
        return NULL;
    }
    text[len] = '\0';
    *n = len;
    return text;
}

/* encoder.json -> the id of each token string (kept in `root` for the
 * merges) and each id's bytes (tok_off, tok_bytes). */
static int load_encoder(moe_bpe *b, const char *path, json_t **root_out, char *err,
                        size_t errcap) {
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        FILE *probe = fopen(path, "rb");
        if (!probe)
            set_err(err, errcap, "%s: cannot open (%s); %s", path, strerror(errno), SETUP_HINT);
        else
            set_err(err, errcap, "%s: line %d: %s (not GPT-2's encoder.json?)", path, jerr.line,
                    jerr.text);
        if (probe) fclose(probe);
        return -1;
    }
    int rc = -1;
    const char **keys = NULL;
    size_t n = json_object_size(root);
    if (!json_is_object(root) || n == 0 || n > (size_t)INT_MAX / 2) {
        set_err(err, errcap, "%s: needs a non-empty JSON object of token -> id", path);
        goto done;
    }
    keys = calloc(n, sizeof *keys);
    b->tok_off = malloc((n + 1) * sizeof *b->tok_off);
    if (!keys || !b->tok_off) {
        set_err(err, errcap, "%s: out of memory", path);
        goto done;
    }
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value) {
        json_int_t id = json_is_integer(value) ? json_integer_value(value) : -1;
        if (id < 0 || (size_t)id >= n) {
            set_err(err, errcap,
                    "%s: token \"%s\" has id %s, but ids must be integers 0..%zu (one per token)",
                    path, key, json_is_integer(value) ? "out of range" : "not an integer", n - 1);
            goto done;
        }
        if (keys[id]) {
            set_err(err, errcap, "%s: tokens \"%s\" and \"%s\" share id %lld", path, keys[id], key,
                    (long long)id);
            goto done;
        }
        keys[id] = key;
    }
    /* n distinct ids below n: every id 0..n-1 is used once. Bytes per token
     * = code points of its string, each a byte through the map. */
    size_t total = 0;
    for (size_t id = 0; id < n; ++id) {
        b->tok_off[id] = (uint32_t)total;
        const unsigned char *s = (const unsigned char *)keys[id];
        size_t len = strlen(keys[id]);
        if (len == 0) {
            set_err(err, errcap, "%s: the empty string is not a token (id %zu)", path, id);
            goto done;
        }
        for (size_t i = 0; i < len;) {
            size_t step = utf8_valid_len(s + i, len - i);
            uint32_t cp = step ? utf8_value(s + i, step) : 0xFFFD;
            if (!step || moe_bpe_codepoint_to_byte(cp) < 0) {
                set_err(err, errcap,
                        "%s: token \"%s\" (id %zu) holds U+%04X, which is not in GPT-2's byte "
                        "map (not a byte-level vocabulary)",
                        path, keys[id], id, (unsigned)cp);
                goto done;
            }
            i += step;
            ++total;
        }
        if (total > UINT32_MAX) {
            set_err(err, errcap, "%s: tokens too long in total", path);
            goto done;
        }
    }
    b->tok_off[n] = (uint32_t)total;
    b->tok_bytes = malloc(total);
    if (!b->tok_bytes) {
        set_err(err, errcap, "%s: out of memory", path);
        goto done;
    }
    for (size_t id = 0; id < n; ++id) {
        const unsigned char *s = (const unsigned char *)keys[id];
        unsigned char *out = b->tok_bytes + b->tok_off[id];
        for (size_t i = 0, len = strlen(keys[id]); i < len;) {
            size_t step = utf8_valid_len(s + i, len - i);
            *out++ = (unsigned char)moe_bpe_codepoint_to_byte(utf8_value(s + i, step));
            i += step;
        }
    }
    b->vocab_size = (int)n;
    /* Byte-level: every byte has its one-symbol token. */
    for (unsigned byte = 0; byte < 256; ++byte) {
        char symbol[4] = {0};
        moe_utf8_encode(moe_bpe_byte_to_codepoint((unsigned char)byte), (unsigned char *)symbol);
        const json_t *id = json_object_get(root, symbol);
        if (!id) {
            set_err(err, errcap,
                    "%s: no token for byte 0x%02X (\"%s\"); a byte-level vocabulary needs all 256",
                    path, byte, symbol);
            goto done;
        }
        b->byte_id[byte] = (uint32_t)json_integer_value(id);
    }
    rc = 0;
done:
    free(keys);
    if (rc == 0)
        *root_out = root;
    else
        json_decref(root);
    return rc;
}

/* Token id of the string s[0, len), or -1. */
static long long token_id(const json_t *root, const char *s, size_t len, char *scratch) {
    memcpy(scratch, s, len);
    scratch[len] = '\0';
    const json_t *id = json_object_get(root, scratch);
    return id ? (long long)json_integer_value(id) : -1;
}

/* vocab.bpe -> the merge table, then whether its ranks are ordered. */
static int load_merges(moe_bpe *b, const char *path, const json_t *root, char *err,
                       size_t errcap) {
    size_t size = 0;
    char *text = read_whole_file(path, &size, err, errcap);
    if (!text) return -1;
    int rc = -1;
    char *scratch = malloc(size + 1);
    size_t max_merges = 1;
    for (size_t i = 0; i < size; ++i) max_merges += text[i] == '\n';
    size_t slots = 16;
    while (slots < 2 * max_merges) slots *= 2;
    b->merges = malloc(slots * sizeof *b->merges);
    b->merge_mask = slots - 1;
    /* For the order check: each merge's parts, and the highest rank that makes each token. */
    uint32_t(*parts)[2] = malloc(max_merges * sizeof *parts);
    long long *made_at = malloc((size_t)b->vocab_size * sizeof *made_at);
    if (!scratch || !b->merges || !parts || !made_at) {
        set_err(err, errcap, "%s: out of memory", path);
        goto done;
    }
    for (size_t i = 0; i < slots; ++i) b->merges[i].rank = NO_RANK;
    for (int id = 0; id < b->vocab_size; ++id) made_at[id] = -1;

    uint32_t rank = 0;
    size_t line_no = 0;
    for (char *line = text; line < text + size;) {
        char *end = memchr(line, '\n', (size_t)(text + size - line));
        if (!end) end = text + size;
        char *next = end + (end < text + size);
        ++line_no;
        if (end > line && end[-1] == '\r') --end;
        size_t len = (size_t)(end - line);
        if (len == 0 || (line_no == 1 && len >= 8 && memcmp(line, "#version", 8) == 0)) {
            line = next;
            continue;
        }
        char *space = memchr(line, ' ', len);
        /* (A NUL would cut the token strings short when looked up.) */
        if (!space || space == line || space == end - 1 ||
            memchr(space + 1, ' ', (size_t)(end - space - 1)) || memchr(line, '\0', len)) {
            set_err(err, errcap, "%s: line %zu: '%.*s' is not two tokens separated by one space",
                    path, line_no, (int)(len < 80 ? len : 80), line);
            goto done;
        }
        size_t left_len = (size_t)(space - line), right_len = (size_t)(end - space - 1);
        long long left = token_id(root, line, left_len, scratch);
        long long right = token_id(root, space + 1, right_len, scratch);
        /* The result's string: the line without its space. */
        memcpy(scratch, line, left_len);
        memcpy(scratch + left_len, space + 1, right_len);
        scratch[left_len + right_len] = '\0';
        const json_t *joined = json_object_get(root, scratch);
        long long result = joined ? (long long)json_integer_value(joined) : -1;
        if (left < 0 || right < 0 || result < 0) {
            set_err(err, errcap,
                    "%s: line %zu: merge '%.*s' names %s, which encoder.json lacks (files from "
                    "different vocabularies?)",
                    path, line_no, (int)(len < 80 ? len : 80), line,
                    left < 0 ? "its left token" : right < 0 ? "its right token" : "its result");
            goto done;
        }
        merge_slot *slot = merge_slot_for(b, (uint32_t)left, (uint32_t)right);
        if (slot->rank != NO_RANK) {
            set_err(err, errcap, "%s: line %zu: merge '%.*s' repeats an earlier line", path,
                    line_no, (int)(len < 80 ? len : 80), line);
            goto done;
        }
        *slot = (merge_slot){(uint32_t)left, (uint32_t)right, rank, (uint32_t)result};
        parts[rank][0] = (uint32_t)left;
        parts[rank][1] = (uint32_t)right;
        if ((long long)rank > made_at[result]) made_at[result] = rank;
        ++rank;
        line = next;
    }
    b->n_merges = (int)rank;
    b->ordered = 1;
    for (uint32_t r = 0; r < rank && b->ordered; ++r)
        b->ordered = made_at[parts[r][0]] < (long long)r && made_at[parts[r][1]] < (long long)r;
    rc = 0;
done:
    free(text);
    free(scratch);
    free(parts);
    free(made_at);
    return rc;
}

moe_bpe *moe_bpe_load(const char *encoder_path, const char *merges_path, char *err,
                      size_t errcap) {
    moe_bpe *b = calloc(1, sizeof *b);
    if (!b) {
        set_err(err, errcap, "out of memory loading the BPE vocabulary");
        return NULL;
    }
    json_t *root = NULL;
    if (load_encoder(b, encoder_path, &root, err, errcap) != 0) goto fail;
    int rc = load_merges(b, merges_path, root, err, errcap);
    json_decref(root);
    if (rc != 0) goto fail;

    int code;
    PCRE2_SIZE offset;
    b->re = pcre2_compile((PCRE2_SPTR)MOE_BPE_GPT2_PATTERN, PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP, &code, &offset, NULL);
    if (!b->re) {
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(code, message, sizeof message);
        set_err(err, errcap, "PCRE2 rejects GPT-2's pattern at offset %zu: %s (a PCRE2 built "
                "without Unicode support?)", (size_t)offset, (const char *)message);
        goto fail;
    }
    /* JIT is a speed-up only; without it PCRE2 interprets the same pattern. */
    (void)pcre2_jit_compile(b->re, PCRE2_JIT_COMPLETE);
    b->match = pcre2_match_data_create_from_pattern(b->re, NULL);
    b->cache = calloc(CACHE_SLOTS, sizeof *b->cache);
    if (!b->match || !b->cache) {
        set_err(err, errcap, "out of memory loading the BPE vocabulary");
        goto fail;
    }
    return b;
fail:
    moe_bpe_free(b);
    return NULL;
}

moe_bpe *moe_bpe_load_dir(const char *dir, char *err, size_t errcap) {
    size_t n = strlen(dir) + sizeof "/" MOE_BPE_ENCODER_FILE;
    char *encoder = malloc(n), *merges = malloc(n);
    moe_bpe *b = NULL;
    if (encoder && merges) {
        snprintf(encoder, n, "%s/%s", dir, MOE_BPE_ENCODER_FILE);
        snprintf(merges, n, "%s/%s", dir, MOE_BPE_MERGES_FILE);
        b = moe_bpe_load(encoder, merges, err, errcap);
    } else {
        set_err(err, errcap, "out of memory");
    }
    free(encoder);
    free(merges);
    return b;
}

void moe_bpe_free(moe_bpe *b) {
    if (!b) return;
    free(b->tok_off);
    free(b->tok_bytes);
    free(b->merges);
    pcre2_match_data_free(b->match);
    pcre2_code_free(b->re);
    free(b->cache);
    free(b->sym);
    free(b->prev);
    free(b->next);
    free(b->heap);
    free(b);
}

int moe_bpe_vocab_size(const moe_bpe *b) { return b->vocab_size; }
int moe_bpe_n_merges(const moe_bpe *b) { return b->n_merges; }
uint32_t moe_bpe_byte_token(const moe_bpe *b, unsigned char byte) { return b->byte_id[byte]; }
void moe_bpe_set_flags(moe_bpe *b, unsigned flags) { b->flags = flags; }
int moe_bpe_merges_ordered(const moe_bpe *b) { return b->ordered; }

/* ---- pre-tokenization ---- */

typedef int (*pretoken_fn)(moe_bpe *b, void *ctx, const unsigned char *s, size_t start,
                           size_t end);

/* The regex's matches over the valid UTF-8 run s[start, end). The pattern
 * matches every character (letters, numbers, white space and "anything
 * else" each have a branch), so successive matches tile the run; the gap
 * and empty-match branches below only keep that promise if PCRE2 ever broke
 * it. */
static int match_run(moe_bpe *b, const unsigned char *s, size_t start, size_t end, pretoken_fn fn,
                     void *ctx, char *err, size_t errcap) {
    const unsigned char *subject = s + start;
    size_t len = end - start, at = 0;
    while (at < len) {
        int rc = pcre2_match(b->re, subject, len, at, PCRE2_NO_UTF_CHECK, b->match, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) return fn(b, ctx, s, start + at, end);
        if (rc < 0) {
            PCRE2_UCHAR message[256];
            pcre2_get_error_message(rc, message, sizeof message);
            set_err(err, errcap, "pre-tokenizing at byte %zu: PCRE2: %s", start + at,
                    (const char *)message);
            return -1;
        }
        const PCRE2_SIZE *ov = pcre2_get_ovector_pointer(b->match);
        size_t m_start = ov[0], m_end = ov[1];
        if (m_start > at && fn(b, ctx, s, start + at, start + m_start) != 0) return -1;
        if (m_end <= m_start) m_end = m_start + utf8_valid_len(subject + m_start, len - m_start);
        if (fn(b, ctx, s, start + m_start, start + m_end) != 0) return -1;
        at = m_end;
    }
    return 0;
}

/* Valid runs through the regex; each byte that starts no valid sequence a
 * pre-token of its own. */
static int for_each_pretoken(moe_bpe *b, const unsigned char *s, size_t n, pretoken_fn fn,
                             void *ctx, char *err, size_t errcap) {
    size_t i = 0;
    while (i < n) {
        size_t run = i;
        for (size_t len; run < n && (len = utf8_valid_len(s + run, n - run)) != 0;) run += len;
        if (run > i && match_run(b, s, i, run, fn, ctx, err, errcap) != 0) return -1;
        i = run;
        if (i < n) {
            if (fn(b, ctx, s, i, i + 1) != 0) return -1;
            ++i;
        }
    }
    return 0;
}

typedef struct ends_ctx {
    size_t *ends;
    long long count;
} ends_ctx;

static int record_end(moe_bpe *b, void *ctx, const unsigned char *s, size_t start, size_t end) {
    (void)b;
    (void)s;
    (void)start;
    ends_ctx *c = ctx;
    c->ends[c->count++] = end;
    return 0;
}

long long moe_bpe_pretokenize(moe_bpe *b, const char *text, size_t n, size_t *ends, char *err,
                              size_t errcap) {
    ends_ctx c = {ends, 0};
    if (for_each_pretoken(b, (const unsigned char *)text, n, record_end, &c, err, errcap) != 0)
        return -1;
    return c.count;
}

/* ---- merging ---- */

static int grow_scratch(moe_bpe *b, size_t k) {
    if (k <= b->scratch_cap) return 0;
    size_t cap = b->scratch_cap ? b->scratch_cap : 64;
    while (cap < k) cap *= 2;
    uint32_t *sym = realloc(b->sym, cap * sizeof *sym);
    if (sym) b->sym = sym;
    int32_t *prev = realloc(b->prev, cap * sizeof *prev);
    if (prev) b->prev = prev;
    int32_t *next = realloc(b->next, cap * sizeof *next);
    if (next) b->next = next;
    /* Pairs ever pushed: k-1 at the start, at most 2 per merge after. */
    heap_item *heap = realloc(b->heap, 3 * cap * sizeof *heap);
    if (heap) b->heap = heap;
    if (!sym || !prev || !next || !heap) return -1;
    b->scratch_cap = cap;
    return 0;
}

static int item_less(const heap_item *x, const heap_item *y) {
    return x->rank != y->rank ? x->rank < y->rank : x->pos < y->pos;
}

static void heap_push(heap_item *h, size_t *n, heap_item item) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!item_less(&item, &h[parent])) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = item;
}

static heap_item heap_pop(heap_item *h, size_t *n) {
    heap_item top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && item_less(&h[child + 1], &h[child])) ++child;
        if (!item_less(&h[child], &last)) break;
        h[i] = h[child];
        i = child;
    }
    if (*n > 0) h[i] = last;
    return top;
}

/* The pair starting at node `left` (whose right neighbour is `right`) into
 * the heap, when it is a merge. */
static void push_pair(moe_bpe *b, size_t *n_heap, int32_t left, int32_t right) {
    if (left < 0 || right < 0) return;
    const merge_slot *m = merge_find(b, b->sym[left], b->sym[right]);
    if (m)
        heap_push(b->heap, n_heap,
                  (heap_item){m->rank, (uint32_t)left, m->left, m->right, m->result});
}

/* Heap merging over sym[0, k) as a linked list; ids into out, returns the count. */
static size_t merge_heap(moe_bpe *b, size_t k, uint32_t *out) {
    for (size_t i = 0; i < k; ++i) {
        b->prev[i] = (int32_t)i - 1;
        b->next[i] = i + 1 < k ? (int32_t)i + 1 : -1;
    }
    size_t n_heap = 0;
    for (size_t i = 0; i + 1 < k; ++i) push_pair(b, &n_heap, (int32_t)i, (int32_t)i + 1);
    while (n_heap > 0) {
        heap_item it = heap_pop(b->heap, &n_heap);
        int32_t p = (int32_t)it.pos, q = b->next[p];
        /* Stale when either node has merged since the push (a node's symbol
         * only ever grows, so equal symbols mean the same pair). */
        if (q < 0 || b->sym[p] != it.left || b->sym[q] != it.right) continue;
        b->sym[p] = it.result;
        b->sym[q] = DEAD;
        b->next[p] = b->next[q];
        if (b->next[q] >= 0) b->prev[b->next[q]] = p;
        push_pair(b, &n_heap, b->prev[p], p);
        push_pair(b, &n_heap, p, b->next[p]);
    }
    size_t count = 0;
    for (int32_t i = 0; i >= 0; i = b->next[i]) out[count++] = b->sym[i];
    return count;
}

/* GPT-2's loop: find the lowest-ranked pair, merge all its occurrences left
 * to right, repeat. */
static size_t merge_reference(moe_bpe *b, size_t k, uint32_t *out) {
    uint32_t *sym = b->sym;
    size_t m = k;
    for (;;) {
        const merge_slot *best = NULL;
        for (size_t i = 0; i + 1 < m; ++i) {
            const merge_slot *s = merge_find(b, sym[i], sym[i + 1]);
            if (s && (!best || s->rank < best->rank)) best = s;
        }
        if (!best) break;
        size_t j = 0;
        for (size_t i = 0; i < m;) {
            if (i + 1 < m && sym[i] == best->left && sym[i + 1] == best->right) {
                sym[j++] = best->result;
                i += 2;
            } else {
                sym[j++] = sym[i++];
            }
        }
        m = j;
    }
    memcpy(out, sym, m * sizeof *out);
    return m;
}

static long long bpe_word(moe_bpe *b, const unsigned char *s, size_t k, uint32_t *out) {
    if (k == 1) {
        out[0] = b->byte_id[s[0]];
        return 1;
    }
    if (grow_scratch(b, k) != 0) return -1;
    for (size_t i = 0; i < k; ++i) b->sym[i] = b->byte_id[s[i]];
    if (b->ordered && !(b->flags & MOE_BPE_REFERENCE_MERGES)) return (long long)merge_heap(b, k, out);
    return (long long)merge_reference(b, k, out);
}

/* ---- encoding and decoding ---- */

typedef struct encode_ctx {
    uint32_t *ids;
    long long count;
} encode_ctx;

static size_t cache_slot(const unsigned char *s, size_t k) {
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (size_t i = 0; i < k; ++i) h = (h ^ s[i]) * 1099511628211ULL;
    return (size_t)(mix64(h) & (CACHE_SLOTS - 1));
}

static int encode_pretoken(moe_bpe *b, void *ctx, const unsigned char *s, size_t start,
                           size_t end) {
    encode_ctx *c = ctx;
    const unsigned char *word = s + start;
    size_t k = end - start;
    uint32_t *out = c->ids + c->count;
    cache_entry *e = NULL;
    if (k <= CACHE_KEY_MAX && k > 1 && !(b->flags & MOE_BPE_NO_CACHE)) {
        e = &b->cache[cache_slot(word, k)];
        if (e->key_len == k && memcmp(e->key, word, k) == 0) {
            memcpy(out, e->ids, e->n_ids * sizeof *out);
            c->count += e->n_ids;
            return 0;
        }
    }
    long long n = bpe_word(b, word, k, out);
    if (n < 0) return -1;
    if (e) {
        e->key_len = (uint8_t)k;
        e->n_ids = (uint8_t)n;
        memcpy(e->key, word, k);
        memcpy(e->ids, out, (size_t)n * sizeof *out);
    }
    c->count += n;
    return 0;
}

long long moe_bpe_encode(moe_bpe *b, const char *text, size_t n, uint32_t *ids, char *err,
                         size_t errcap) {
    encode_ctx c = {ids, 0};
    if (err && errcap) err[0] = '\0';
    if (for_each_pretoken(b, (const unsigned char *)text, n, encode_pretoken, &c, err, errcap) !=
        0) {
        if (err && errcap && err[0] == '\0')
            set_err(err, errcap, "out of memory encoding a pre-token");
        return -1;
    }
    return c.count;
}

long long moe_bpe_decode(const moe_bpe *b, const uint32_t *ids, size_t n, char *out, size_t cap) {
    size_t total = 0;
    int fits = 1;
    for (size_t i = 0; i < n; ++i) {
        if (ids[i] >= (uint32_t)b->vocab_size) return -1;
        size_t len = b->tok_off[ids[i] + 1] - b->tok_off[ids[i]];
        fits = fits && total + len <= cap;
        if (fits) memcpy(out + total, b->tok_bytes + b->tok_off[ids[i]], len);
        total += len;
    }
    return (long long)total;
}

size_t moe_bpe_decode_text(const moe_bpe *b, const uint32_t *ids, size_t n, char *out,
                           size_t cap) {
    if (cap == 0) return 0;
    static const unsigned char replacement[3] = {0xEF, 0xBF, 0xBD};
    /* The raw bytes first (an unknown id as U+FFFD's own bytes), then read
     * as UTF-8; tokens may split a character, so bytes cannot be judged
     * token by token. */
    size_t raw_len = 0;
    for (size_t i = 0; i < n; ++i)
        raw_len += ids[i] < (uint32_t)b->vocab_size ? b->tok_off[ids[i] + 1] - b->tok_off[ids[i]]
                                                    : sizeof replacement;
    unsigned char *raw = malloc(raw_len ? raw_len : 1);
    size_t written = 0;
    if (raw) {
        size_t at = 0;
        for (size_t i = 0; i < n; ++i) {
            const unsigned char *src = replacement;
            size_t len = sizeof replacement;
            if (ids[i] < (uint32_t)b->vocab_size) {
                src = b->tok_bytes + b->tok_off[ids[i]];
                len = b->tok_off[ids[i] + 1] - b->tok_off[ids[i]];
            }
            memcpy(raw + at, src, len);
            at += len;
        }
        for (size_t i = 0; i < raw_len;) {
            size_t len = utf8_valid_len(raw + i, raw_len - i);
            const unsigned char *src = raw + i;
            size_t used = len;
            if (len == 0) {
                used = utf8_invalid_len(raw + i, raw_len - i);
                src = replacement;
                len = sizeof replacement;
            }
            if (written + len + 1 > cap) break;
            memcpy(out + written, src, len);
            written += len;
            i += used;
        }
    }
    free(raw);
    out[written] = '\0';
    return written;
}
