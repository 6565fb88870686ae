/*
 * The one schema table of the config layer (see config_schema.h), the
 * section list, and helpers that turn schema entries into text.
 */
#include "config_schema.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- the table ---- */

/* Offset and size of a moe_config field; the member names double as the
 * section and key names, so the table cannot name a key that has no field. */
#define FIELD(sec, name) offsetof(moe_config, sec.name), sizeof(((moe_config *)0)->sec.name)

#define KEY_BOOL(sec, name, def, doc) \
    { #sec, #name, MOE_CFG_BOOL, FIELD(sec, name), (def), NULL, NULL, NULL, ANY, doc }
#define KEY_INT(sec, name, def, range, doc) \
    { #sec, #name, MOE_CFG_INT, FIELD(sec, name), (def), NULL, NULL, NULL, range, doc }
#define KEY_FLOAT(sec, name, def, range, doc) \
    { #sec, #name, MOE_CFG_FLOAT, FIELD(sec, name), (def), NULL, NULL, NULL, range, doc }
#define KEY_STRING(sec, name, def, choices, not_built, doc) \
    { #sec, #name, MOE_CFG_STRING, FIELD(sec, name), 0, (def), (choices), (not_built), ANY, doc }

#define ANY { 0, 0, 0 }
#define AT_LEAST(a) { (a), 0, MOE_CFG_HAS_MIN }
#define ABOVE(a) { (a), 0, MOE_CFG_HAS_MIN | MOE_CFG_MIN_OPEN }
#define CLOSED(a, b) { (a), (b), MOE_CFG_HAS_MIN | MOE_CFG_HAS_MAX }
#define HALF_OPEN(a, b) { (a), (b), MOE_CFG_HAS_MIN | MOE_CFG_HAS_MAX | MOE_CFG_MAX_OPEN }
#define OPEN(a, b) { (a), (b), MOE_CFG_HAS_MIN | MOE_CFG_HAS_MAX | MOE_CFG_MIN_OPEN | MOE_CFG_MAX_OPEN }
#define OPEN_CLOSED(a, b) { (a), (b), MOE_CFG_HAS_MIN | MOE_CFG_HAS_MAX | MOE_CFG_MIN_OPEN }

const moe_cfg_section moe_cfg_sections[] = {
    { "run", "Naming, output folder, seed and device." },
    { "data", "The training text and how it is split." },
    { "model", "The TinyMoE transformer around the MoE layers." },
    { "moe", "The MoE feed-forward layer: experts, gate network, capacity and auxiliary losses." },
    { "router", "Which router plugin assigns tokens to experts. Every other key in this table is an "
                "option of the plugin (see the introduction)." },
    { "train", "Optimisation: AdamW with linear warm-up and cosine decay." },
    { "eval", "Periodic evaluation on the validation split." },
};
const int moe_cfg_n_sections = (int)(sizeof moe_cfg_sections / sizeof moe_cfg_sections[0]);

const moe_cfg_key moe_cfg_keys[] = {
    KEY_STRING(run, name, "run", NULL, NULL, "Run name; results go to `out_dir/name/`."),
    KEY_STRING(run, out_dir, "runs", NULL, NULL, "Folder that holds one sub-folder per run."),
    KEY_INT(run, seed, 1337, AT_LEAST(0), "Seed for initialisation, data order, dropout and router noise."),
    KEY_STRING(run, device, "auto", "auto|cpu|cuda", NULL, "`auto` uses CUDA when a GPU is present, else the CPU."),
    KEY_INT(run, threads, 0, AT_LEAST(0), "CPU threads; 0 = the OpenMP default."),

    KEY_STRING(data, path, "", NULL, NULL,
               "Required. A text file, or a folder made by `moehost prepare`. A relative path written in "
               "a config file is resolved against the file's folder when it exists there, else against "
               "the working directory."),
    KEY_STRING(data, tokenizer, "char", "char|gpt2", NULL,
               "Tokenizer for a text-file data.path: `char` (one token per character) or `gpt2` (GPT-2 "
               "byte-level BPE). A folder made by `moehost prepare` records its own tokenizer, which is used "
               "instead."),
    KEY_STRING(data, bpe_dir, "", NULL, NULL,
               "Folder holding GPT-2's `encoder.json` and `vocab.bpe`, for `tokenizer = \"gpt2\"` on a text-file "
               "`data.path` (`scripts/setup_data.sh --gpt2` puts them in `data/gpt2`)."),
    KEY_FLOAT(data, val_fraction, 0.1, OPEN(0, 1), "Fraction of the token stream (its tail) held out for validation."),

    KEY_INT(model, vocab_size, 0, CLOSED(0, 1 << 24), "Vocabulary size; 0 = taken from the data."),
    KEY_INT(model, d_model, 256, CLOSED(1, 65536), "Width of the residual stream; a multiple of n_heads."),
    KEY_INT(model, n_layers, 4, CLOSED(1, 1024), "Transformer blocks, each with attention and an MoE feed-forward."),
    KEY_INT(model, n_heads, 4, CLOSED(1, 1024), "Attention heads."),
    KEY_INT(model, seq_len, 256, CLOSED(1, 1 << 20), "Context length in tokens."),
    KEY_STRING(model, pos, "learned", "learned|rope", NULL,
               "Position encoding: learned absolute embeddings, or rotary (`rope`, needs an even head dimension)."),
    KEY_FLOAT(model, rope_theta, 10000, ABOVE(0), "RoPE base frequency (used when pos = `rope`)."),
    KEY_STRING(model, norm, "layernorm", "layernorm|rmsnorm", NULL, "Normalisation layer."),
    KEY_FLOAT(model, norm_eps, 1e-5, ABOVE(0), "Epsilon added to the variance (or mean square) in the norm."),
    KEY_BOOL(model, tie_embeddings, 1, "Share the token embedding matrix with the LM head."),
    KEY_FLOAT(model, dropout, 0.0, HALF_OPEN(0, 1), "Dropout probability; 0 = off."),
    KEY_FLOAT(model, init_std, 0.02, ABOVE(0), "Standard deviation of the normal weight initialisation."),

    KEY_INT(moe, num_experts, 8, CLOSED(1, 4096), "Experts per MoE layer (E)."),
    KEY_INT(moe, top_k, 2, CLOSED(1, 4096), "Experts per token (K); at most num_experts."),
    KEY_FLOAT(moe, capacity_factor, 1.25, OPEN_CLOSED(0, 1024),
              "Capacity factor CF: each expert keeps at most C = ceil(CF * T * K / E) of the T tokens' assignments."),
    KEY_INT(moe, d_ff, 1024, CLOSED(1, 1 << 20), "Hidden width of each expert."),
    KEY_STRING(moe, activation, "gelu", "gelu|silu|swiglu", NULL,
               "Expert activation (`swiglu` gates the hidden layer)."),
    KEY_BOOL(moe, expert_bias, 1, "Add biases to the expert layers."),
    KEY_STRING(moe, gate, "linear", "linear|mlp|mlp_hadamard", NULL,
               "Gate network that turns a token into router logits."),
    KEY_INT(moe, gate_hidden, 0, CLOSED(0, 1 << 20), "Hidden width of the `mlp` and `mlp_hadamard` gates; 0 = d_model."),
    KEY_STRING(moe, drop_policy, "position", "position|probs", NULL,
               "Which assignments keep a slot when an expert is full: earlier tokens first (`position`) or "
               "higher router weight first (`probs`)."),
    KEY_BOOL(moe, renorm_after_drop, 0, "Renormalise each token's kept weights after capacity drops."),
    KEY_FLOAT(moe, aux_loss_weight, 0.01, AT_LEAST(0),
              "Weight alpha of the load-balancing loss alpha * E * sum_e f_e * P_e; 0 = off."),
    KEY_FLOAT(moe, z_loss_weight, 0.001, AT_LEAST(0),
              "Weight beta of the router z-loss beta * mean(logsumexp(logits)^2); 0 = off."),

    KEY_STRING(router, plugin, "softk", NULL, NULL,
               "Router plugin: a built-in name (`top1`, `topk_hard`, `softk`, `hash`, `expert_choice`, "
               "`noisy_topk`) or the path of a plugin `.so`."),

    KEY_INT(train, steps, 1000, AT_LEAST(1), "Optimizer steps."),
    KEY_INT(train, batch_size, 32, CLOSED(1, 65536), "Sequences per step."),
    KEY_STRING(train, optimizer, "adamw", "adamw|muon", NULL,
               "`adamw` on every tensor, or `muon`: Muon (orthogonalised Nesterov momentum) on the hidden weight "
               "matrices and AdamW on embeddings, LM head, norms, biases and router plugin parameters."),
    KEY_FLOAT(train, lr, 3e-4, ABOVE(0), "Peak learning rate."),
    KEY_FLOAT(train, min_lr_ratio, 0.1, CLOSED(0, 1), "The cosine schedule decays to lr * min_lr_ratio."),
    KEY_INT(train, warmup_steps, 100, AT_LEAST(0), "Linear warm-up steps before the cosine decay."),
    KEY_FLOAT(train, weight_decay, 0.01, AT_LEAST(0), "AdamW decoupled weight decay."),
    KEY_FLOAT(train, beta1, 0.9, HALF_OPEN(0, 1), "AdamW first-moment decay."),
    KEY_FLOAT(train, beta2, 0.95, HALF_OPEN(0, 1), "AdamW second-moment decay."),
    KEY_FLOAT(train, eps, 1e-8, ABOVE(0), "AdamW epsilon."),
    KEY_FLOAT(train, grad_clip, 1.0, AT_LEAST(0), "Clip the global gradient norm to this value; 0 = off."),
    KEY_INT(train, log_interval, 10, AT_LEAST(1), "Print a progress line every N steps."),
    KEY_INT(train, grad_accum, 1, AT_LEAST(1),
            "Micro-batches of `batch_size` sequences accumulated into each optimizer step."),
    KEY_FLOAT(train, muon_lr, 0.02, ABOVE(0),
              "Muon's peak learning rate (follows the same warm-up and cosine schedule as `lr`)."),
    KEY_FLOAT(train, muon_momentum, 0.95, HALF_OPEN(0, 1), "Muon's Nesterov momentum."),
    KEY_INT(train, muon_ns_steps, 5, AT_LEAST(1), "Newton-Schulz iterations that orthogonalise Muon's update."),
    KEY_STRING(train, precision, "bf16", "bf16|fp32", NULL,
               "Matrix-product precision on CUDA: `bf16` operands with fp32 accumulation (GEMMs and "
               "attention's products on tensor cores), or `fp32` throughout. Master weights, optimizer "
               "state, softmax statistics and router math are fp32 either way; the CPU is fp32."),

    KEY_INT(eval, interval, 200, AT_LEAST(1), "Evaluate (and checkpoint) every N steps, and at the end."),
    KEY_INT(eval, max_tokens, 0, AT_LEAST(0), "Cap on validation tokens; 0 = the whole split."),
    KEY_INT(eval, batch_size, 0, CLOSED(0, 65536), "Sequences per evaluation batch; 0 = train.batch_size."),
};
const int moe_cfg_n_keys = (int)(sizeof moe_cfg_keys / sizeof moe_cfg_keys[0]);
_Static_assert(sizeof moe_cfg_keys / sizeof moe_cfg_keys[0] <= MOE_CFG_MAX_KEYS, "raise MOE_CFG_MAX_KEYS");

/* ---- lookups ---- */

const moe_cfg_key *moe_cfg_find_key(const char *section, const char *key) {
    for (int k = 0; k < moe_cfg_n_keys; ++k)
        if (strcmp(moe_cfg_keys[k].section, section) == 0 && strcmp(moe_cfg_keys[k].key, key) == 0)
            return &moe_cfg_keys[k];
    return NULL;
}

const moe_cfg_section *moe_cfg_find_section(const char *name) {
    for (int s = 0; s < moe_cfg_n_sections; ++s)
        if (strcmp(moe_cfg_sections[s].name, name) == 0) return &moe_cfg_sections[s];
    return NULL;
}

int moe_cfg_word_in_list(const char *list, const char *value) {
    size_t n = strlen(value);
    for (const char *p = list; p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, value, n) == 0) return 1;
        p = bar ? bar + 1 : NULL;
    }
    return 0;
}

void moe_cfg_list_text(const char *list, const char *separator, char *buf, size_t cap) {
    size_t used = 0;
    buf[0] = '\0';
    for (const char *p = list; p;) {
        const char *bar = strchr(p, '|');
        int len = bar ? (int)(bar - p) : (int)strlen(p);
        int n = snprintf(buf + used, cap - used, "%s%.*s", used ? separator : "", len, p);
        if (n < 0 || (size_t)n >= cap - used) return; /* cut short: buf holds what fit */
        used += (size_t)n;
        p = bar ? bar + 1 : NULL;
    }
}

/* ---- numbers ---- */

int moe_cfg_in_range(const moe_cfg_range *r, double value) {
    if (r->flags & MOE_CFG_HAS_MIN) {
        if (r->flags & MOE_CFG_MIN_OPEN ? !(value > r->min) : !(value >= r->min)) return 0;
    }
    if (r->flags & MOE_CFG_HAS_MAX) {
        if (r->flags & MOE_CFG_MAX_OPEN ? !(value < r->max) : !(value <= r->max)) return 0;
    }
    return 1;
}

void moe_cfg_range_text(const moe_cfg_range *r, char *buf, size_t cap) {
    int has_min = (r->flags & MOE_CFG_HAS_MIN) != 0, has_max = (r->flags & MOE_CFG_HAS_MAX) != 0;
    int min_open = (r->flags & MOE_CFG_MIN_OPEN) != 0, max_open = (r->flags & MOE_CFG_MAX_OPEN) != 0;
    if (has_min && has_max)
        snprintf(buf, cap, "%c%.15g, %.15g%c", min_open ? '(' : '[', r->min, r->max, max_open ? ')' : ']');
    else if (has_min)
        snprintf(buf, cap, "%s %.15g", min_open ? ">" : ">=", r->min);
    else if (has_max)
        snprintf(buf, cap, "%s %.15g", max_open ? "<" : "<=", r->max);
    else
        snprintf(buf, cap, "%s", "");
}

int moe_cfg_edit_distance(const char *a, const char *b) {
    enum { MAX_LEN = 127 };
    size_t na = strlen(a), nb = strlen(b);
    if (na > MAX_LEN || nb > MAX_LEN) return MAX_LEN + 1; /* too long to be a typo of a schema key */
    /* Three rows: the swap of two neighbours ("modle") looks back two rows. */
    int before[MAX_LEN + 1], prev[MAX_LEN + 1], cur[MAX_LEN + 1];
    for (size_t j = 0; j <= nb; ++j) prev[j] = (int)j;
    for (size_t i = 1; i <= na; ++i) {
        cur[0] = (int)i;
        for (size_t j = 1; j <= nb; ++j) {
            int best = prev[j - 1] + (a[i - 1] != b[j - 1]); /* substitute or keep */
            if (prev[j] + 1 < best) best = prev[j] + 1;       /* delete from a */
            if (cur[j - 1] + 1 < best) best = cur[j - 1] + 1; /* insert into a */
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] && before[j - 2] + 1 < best)
                best = before[j - 2] + 1; /* swap neighbours */
            cur[j] = best;
        }
        memcpy(before, prev, (nb + 1) * sizeof prev[0]);
        memcpy(prev, cur, (nb + 1) * sizeof prev[0]);
    }
    return prev[nb];
}

/* "1e-05" -> "1e-5", "1e+20" -> "1e20": both are TOML, the short form reads better. */
static void tidy_exponent(char *text) {
    char *e = strpbrk(text, "eE");
    if (!e) return;
    char *digits = e + 1, *out = e + 1;
    if (*digits == '+') ++digits;
    else if (*digits == '-') *out++ = *digits++;
    while (digits[0] == '0' && digits[1] != '\0') ++digits;
    memmove(out, digits, strlen(digits) + 1);
}

void moe_cfg_format_float(double value, char *buf, size_t cap) {
    if (isnan(value)) {
        snprintf(buf, cap, "nan");
        return;
    }
    if (isinf(value)) {
        snprintf(buf, cap, "%s", value < 0 ? "-inf" : "inf");
        return;
    }
    int precision = 1;
    for (; precision <= 17; ++precision) {
        snprintf(buf, cap, "%.*g", precision, value);
        if (strtod(buf, NULL) == value) break;
    }
    /* The shortest form of 10000 is "1e+04"; write numbers of ordinary size
     * in positional notation instead, with as many decimals as needed. */
    int exponent = value != 0 ? (int)floor(log10(fabs(value))) : 0;
    if (strpbrk(buf, "eE") && exponent >= -4 && exponent < 16) {
        char positional[64];
        int decimals = precision - 1 - exponent;
        snprintf(positional, sizeof positional, "%.*f", decimals > 0 ? decimals : 0, value);
        /* log10 can land one off next to a power of ten; keep the exact form then. */
        if (strtod(positional, NULL) == value) snprintf(buf, cap, "%s", positional);
    }
    tidy_exponent(buf);
    /* "256" would read back as an integer. */
    if (!strpbrk(buf, ".eE")) {
        size_t len = strlen(buf);
        if (len + 3 <= cap) memcpy(buf + len, ".0", 3);
    }
}

/* ---- strings ---- */

/* The TOML escape of one byte, NUL-terminated in out (at least 7 bytes). */
static void escape_byte(unsigned char c, char *out) {
    switch (c) {
    case '"': strcpy(out, "\\\""); return;
    case '\\': strcpy(out, "\\\\"); return;
    case '\b': strcpy(out, "\\b"); return;
    case '\t': strcpy(out, "\\t"); return;
    case '\n': strcpy(out, "\\n"); return;
    case '\f': strcpy(out, "\\f"); return;
    case '\r': strcpy(out, "\\r"); return;
    default: break;
    }
    if (c < 0x20 || c == 0x7f) {
        snprintf(out, 7, "\\u%04X", (unsigned)c);
        return;
    }
    out[0] = (char)c;
    out[1] = '\0';
}

void moe_cfg_quote(const char *s, char *buf, size_t cap) {
    static const char cut_mark[] = "...\"";
    if (cap < sizeof cut_mark + 1) {
        if (cap) buf[0] = '\0';
        return;
    }
    size_t full = 2;
    for (const unsigned char *p = (const unsigned char *)s; *p; ++p) {
        char esc[8];
        escape_byte(*p, esc);
        full += strlen(esc);
    }
    /* Room for the text between the opening quote and what must follow it:
     * the closing quote and NUL when everything fits, else the cut mark. */
    size_t room = full + 1 <= cap ? cap - 2 : cap - sizeof cut_mark;
    size_t pos = 0;
    buf[pos++] = '"';
    const unsigned char *p = (const unsigned char *)s;
    for (; *p; ++p) {
        char esc[8];
        escape_byte(*p, esc);
        size_t n = strlen(esc);
        if (pos + n > room) {
            /* Cut between characters: drop a partly copied UTF-8 sequence. */
            if ((*p & 0xC0) == 0x80) {
                while (pos > 1 && ((unsigned char)buf[pos - 1] & 0xC0) == 0x80) --pos;
                if (pos > 1 && ((unsigned char)buf[pos - 1] & 0x80)) --pos;
            }
            break;
        }
        memcpy(buf + pos, esc, n);
        pos += n;
    }
    if (*p) {
        memcpy(buf + pos, cut_mark, sizeof cut_mark);
    } else {
        buf[pos++] = '"';
        buf[pos] = '\0';
    }
}

void moe_cfg_default_text(const moe_cfg_key *k, char *buf, size_t cap) {
    switch (k->type) {
    case MOE_CFG_BOOL: snprintf(buf, cap, "%s", k->default_number != 0 ? "true" : "false"); return;
    case MOE_CFG_INT: snprintf(buf, cap, "%lld", (long long)k->default_number); return;
    case MOE_CFG_FLOAT: moe_cfg_format_float(k->default_number, buf, cap); return;
    case MOE_CFG_STRING: moe_cfg_quote(k->default_string, buf, cap); return;
    }
}
