/*
 * Experiment configuration: the TOML file, resolved against the schema in
 * config.c (every key, its type, default and documentation), with
 * `--set section.key=value` overrides applied on top.
 */
#ifndef MOE_CONFIG_H
#define MOE_CONFIG_H

#include <stddef.h>
#include <stdio.h>
#include <stdint.h>

#include "moe/abi.h"

#define MOE_CFG_STR 256
#define MOE_CFG_MAX_ROUTER_OPTS 32

typedef struct moe_run_cfg {
    char name[MOE_CFG_STR];      /* results go to <out_dir>/<name>/ */
    char out_dir[MOE_CFG_STR];
    int64_t seed;
    char device[16];             /* "auto" | "cpu" | "cuda" */
    int threads;                 /* CPU threads, 0 = OpenMP default */
} moe_run_cfg;

typedef struct moe_data_cfg {
    char path[MOE_CFG_STR];      /* text file, or a folder made by `moehost prepare` */
    char tokenizer[16];          /* "char" | "gpt2" */
    char bpe_dir[MOE_CFG_STR];   /* encoder.json + vocab.bpe, for gpt2 on a text file */
    double val_fraction;         /* tail of the token stream held out, default 0.1 */
} moe_data_cfg;

typedef struct moe_model_cfg {
    int vocab_size;              /* 0 = from the data */
    int d_model;
    int n_layers;
    int n_heads;
    int seq_len;
    char pos[16];                /* "learned" | "rope" */
    double rope_theta;
    char norm[16];               /* "layernorm" | "rmsnorm" */
    double norm_eps;
    int tie_embeddings;
    double dropout;
    double init_std;
} moe_model_cfg;

typedef struct moe_moe_cfg {
    int num_experts;             /* E */
    int top_k;                   /* K */
    double capacity_factor;      /* CF */
    int d_ff;                    /* expert hidden width h */
    char activation[16];         /* "gelu" | "silu" | "swiglu" */
    int expert_bias;
    char gate[16];               /* "linear" | "mlp" | "mlp_hadamard" */
    int gate_hidden;             /* hidden width of mlp gates, 0 = d_model */
    char drop_policy[16];        /* "position" | "probs" */
    int renorm_after_drop;
    double aux_loss_weight;      /* alpha of the load-balancing loss */
    double z_loss_weight;        /* beta of the router z-loss */
} moe_moe_cfg;

/* The [router] table: `plugin` plus whatever the plugin accepts. Values are
 * kept as written; the plugin validates them. */
typedef struct moe_router_cfg {
    char plugin[MOE_CFG_STR];    /* a name ("softk") or a path to a .so */
    int n_opts;
    moe_option opts[MOE_CFG_MAX_ROUTER_OPTS];
    int opt_line[MOE_CFG_MAX_ROUTER_OPTS];   /* source line of each option, 0 = --set */
    char opt_keys[MOE_CFG_MAX_ROUTER_OPTS][64];
    char opt_strs[MOE_CFG_MAX_ROUTER_OPTS][MOE_CFG_STR];
} moe_router_cfg;

typedef struct moe_train_cfg {
    int steps;
    int batch_size;
    char optimizer[16];          /* "adamw" | "muon" */
    int grad_accum;              /* micro-batches per optimizer step */
    double muon_lr, muon_momentum;
    int muon_ns_steps;
    char precision[16];          /* "bf16" | "fp32": GEMMs on CUDA */
    double lr;
    double min_lr_ratio;         /* cosine decays to lr * min_lr_ratio */
    int warmup_steps;
    double weight_decay;
    double beta1, beta2, eps;
    double grad_clip;            /* global-norm clip, 0 = off */
    int log_interval;            /* progress/log line every N steps */
} moe_train_cfg;

typedef struct moe_eval_cfg {
    int interval;                /* evaluate (and checkpoint) every N steps, and at the end */
    int64_t max_tokens;          /* cap on validation tokens, 0 = the whole split */
    int batch_size;              /* 0 = train.batch_size */
} moe_eval_cfg;

typedef struct moe_config {
    char source[MOE_CFG_STR];    /* the file it came from */
    moe_run_cfg run;
    moe_data_cfg data;
    moe_model_cfg model;
    moe_moe_cfg moe;
    moe_router_cfg router;
    moe_train_cfg train;
    moe_eval_cfg eval;
} moe_config;

/* A config file may also hold a [sweep] table: the set of runs to make from
 * it (runtime/sweep.h reads it; docs/experiments.md). moe_config_load skips
 * that table, so each run of a sweep loads the same file as its base. */
#define MOE_SWEEP_SECTION "sweep"

/* Fill cfg with every default. */
void moe_config_defaults(moe_config *cfg);

/* Load a TOML file and apply overrides ("section.key=value", value in TOML
 * syntax; a bare word is taken as a string). Returns 0 on success; on error
 * returns -1 with a message in err naming file:line, the key and the fix.
 * Relative data.path is resolved against the config file's folder when it
 * exists there, else against the working directory. */
int moe_config_load(moe_config *cfg, const char *path, const char *const *overrides, int n_overrides,
                    char *err, size_t errcap);

/* Cross-key checks (K <= E, d_model % n_heads == 0, ...). 0 ok, -1 + err. */
int moe_config_validate(const moe_config *cfg, char *err, size_t errcap);

/* Write the resolved config as TOML (every key, defaults included),
 * atomically (temp file + rename). 0 ok, -1 + err. */
int moe_config_write(const moe_config *cfg, const char *path, char *err, size_t errcap);

/* Markdown reference of every key (docs/config.md is this output). */
void moe_config_print_doc(FILE *out);

#endif
