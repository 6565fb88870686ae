/*
 * The config layer (core/runtime/config.h): defaults, a file setting every
 * key, each class of error (with file, line, key and fix in the message),
 * --set overrides, router options, data.path resolution, write -> load
 * round trips, and docs/config.md staying equal to moe_config_print_doc().
 *
 * Expected values are written out here, not read from the schema, so a
 * wrong default or a key stored in the wrong field fails the test.
 *
 * MOE_UPDATE_DOCS=1 makes the doc check rewrite docs/config.md instead.
 */
/* realpath() is an XSI function; the build's _POSIX_C_SOURCE alone hides it. */
#define _XOPEN_SOURCE 700

#include "runtime/config.h"
#include "runtime/config_extra.h"
#include "runtime/config_schema.h"
#include "test_util.h"

#include <sys/stat.h>
#include <unistd.h>

#define CHECK_HAS(text, part) CHECK_MSG(strstr((text), (part)) != NULL, "'%s' not in: %s", (part), (text))

/* ---- a scratch folder for fixture files ---- */

static char g_dir[64];
static char g_data[128];   /* an existing data file, for configs that must load */
static char g_case[128];   /* the config file most cases write */

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    CHECK_MSG(f != NULL, "cannot write %s", path);
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

static int setup_dir(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/moe_config_test_XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    snprintf(g_data, sizeof g_data, "%s/data.txt", g_dir);
    snprintf(g_case, sizeof g_case, "%s/case.toml", g_dir);
    write_text(g_data, "hello world\n");
    return 0;
}

/* Write `body` as case.toml, after a [data] table pointing at the data file
 * when with_data is set (that takes the first two lines of the file). */
static int load_case(moe_config *cfg, int with_data, const char *body, const char *const *sets, int n_sets,
                     char *err, size_t errcap) {
    char text[8192];
    if (with_data)
        snprintf(text, sizeof text, "[data]\npath = \"%s\"\n%s", g_data, body);
    else
        snprintf(text, sizeof text, "%s", body);
    write_text(g_case, text);
    err[0] = '\0';
    return moe_config_load(cfg, g_case, sets, n_sets, err, errcap);
}

/* Expect a load of `body` (after the two [data] lines) to fail with a
 * message naming case.toml:LINE and containing `part`. */
static void expect_file_error(const char *body, int line, const char *part) {
    moe_config cfg;
    char err[1024], where[160];
    int rc = load_case(&cfg, 1, body, NULL, 0, err, sizeof err);
    CHECK_MSG(rc == -1, "loaded: %s", body);
    snprintf(where, sizeof where, "%s:%d:", g_case, line);
    CHECK_HAS(err, where);
    CHECK_HAS(err, part);
}

static void expect_set_error(const char *set, const char *part1, const char *part2) {
    moe_config cfg;
    char err[1024];
    const char *sets[] = { set };
    int rc = load_case(&cfg, 1, "", sets, 1, err, sizeof err);
    CHECK_MSG(rc == -1, "accepted --set %s", set);
    CHECK_HAS(err, part1);
    if (part2) CHECK_HAS(err, part2);
}

/* ---- field-by-field comparison, written out independently of the schema ---- */

static int configs_equal(const moe_config *a, const moe_config *b, int compare_lines) {
#define SAME_STR(f) (strcmp(a->f, b->f) == 0)
#define SAME(f) (a->f == b->f)
    int same = SAME_STR(run.name) && SAME_STR(run.out_dir) && SAME(run.seed) && SAME_STR(run.device) &&
               SAME(run.threads) && SAME_STR(data.path) && SAME_STR(data.tokenizer) && SAME(data.val_fraction) &&
               SAME(model.vocab_size) && SAME(model.d_model) && SAME(model.n_layers) && SAME(model.n_heads) &&
               SAME(model.seq_len) && SAME_STR(model.pos) && SAME(model.rope_theta) && SAME_STR(model.norm) &&
               SAME(model.norm_eps) && SAME(model.tie_embeddings) && SAME(model.dropout) &&
               SAME(model.init_std) && SAME(moe.num_experts) && SAME(moe.top_k) && SAME(moe.capacity_factor) &&
               SAME(moe.d_ff) && SAME_STR(moe.activation) && SAME(moe.expert_bias) && SAME_STR(moe.gate) &&
               SAME(moe.gate_hidden) && SAME_STR(moe.drop_policy) && SAME(moe.renorm_after_drop) &&
               SAME(moe.aux_loss_weight) && SAME(moe.z_loss_weight) && SAME_STR(router.plugin) &&
               SAME(router.n_opts) && SAME(train.steps) && SAME(train.batch_size) && SAME_STR(train.optimizer) && SAME_STR(train.precision) && SAME(train.grad_accum) &&
               SAME(train.muon_lr) && SAME(train.muon_momentum) && SAME(train.muon_ns_steps) &&
               SAME(train.lr) && SAME(train.min_lr_ratio) && SAME(train.warmup_steps) &&
               SAME(train.weight_decay) && SAME(train.beta1) && SAME(train.beta2) && SAME(train.eps) &&
               SAME(train.grad_clip) && SAME(train.log_interval) && SAME(eval.interval) &&
               SAME(eval.max_tokens) && SAME(eval.batch_size);
    for (int i = 0; same && i < a->router.n_opts; ++i) {
        const moe_option *x = &a->router.opts[i], *y = &b->router.opts[i];
        same = strcmp(x->key, y->key) == 0 && x->type == y->type && x->i == y->i && x->f == y->f &&
               (x->type != MOE_OPT_STRING || strcmp(x->s, y->s) == 0) &&
               (!compare_lines || a->router.opt_line[i] == b->router.opt_line[i]);
    }
#undef SAME_STR
#undef SAME
    return same;
}

/* ---- cases ---- */

static void test_defaults(void) {
    moe_config c;
    memset(&c, 0xAB, sizeof c); /* defaults must overwrite everything */
    moe_config_defaults(&c);
    CHECK(strcmp(c.source, "") == 0);
    CHECK(strcmp(c.run.name, "run") == 0 && strcmp(c.run.out_dir, "runs") == 0 && c.run.seed == 1337);
    CHECK(strcmp(c.run.device, "auto") == 0 && c.run.threads == 0);
    CHECK(strcmp(c.data.path, "") == 0 && strcmp(c.data.tokenizer, "char") == 0 && c.data.val_fraction == 0.1);
    CHECK(c.model.vocab_size == 0 && c.model.d_model == 256 && c.model.n_layers == 4 && c.model.n_heads == 4);
    CHECK(c.model.seq_len == 256 && strcmp(c.model.pos, "learned") == 0 && c.model.rope_theta == 10000.0);
    CHECK(strcmp(c.model.norm, "layernorm") == 0 && c.model.norm_eps == 1e-5 && c.model.tie_embeddings == 1);
    CHECK(c.model.dropout == 0.0 && c.model.init_std == 0.02);
    CHECK(c.moe.num_experts == 8 && c.moe.top_k == 2 && c.moe.capacity_factor == 1.25 && c.moe.d_ff == 1024);
    CHECK(strcmp(c.moe.activation, "gelu") == 0 && c.moe.expert_bias == 1 && strcmp(c.moe.gate, "linear") == 0);
    CHECK(c.moe.gate_hidden == 0 && strcmp(c.moe.drop_policy, "position") == 0 && c.moe.renorm_after_drop == 0);
    CHECK(c.moe.aux_loss_weight == 0.01 && c.moe.z_loss_weight == 0.001);
    CHECK(strcmp(c.router.plugin, "softk") == 0 && c.router.n_opts == 0);
    CHECK(c.train.steps == 1000 && c.train.batch_size == 32 && strcmp(c.train.optimizer, "adamw") == 0);
    CHECK(strcmp(c.train.precision, "bf16") == 0);
    CHECK(c.train.grad_accum == 1 && c.train.muon_lr == 0.02 && c.train.muon_momentum == 0.95 &&
          c.train.muon_ns_steps == 5);
    CHECK(c.train.lr == 3e-4 && c.train.min_lr_ratio == 0.1 && c.train.warmup_steps == 100);
    CHECK(c.train.weight_decay == 0.01 && c.train.beta1 == 0.9 && c.train.beta2 == 0.95 && c.train.eps == 1e-8);
    CHECK(c.train.grad_clip == 1.0 && c.train.log_interval == 10);
    CHECK(c.eval.interval == 200 && c.eval.max_tokens == 0 && c.eval.batch_size == 0);

    char err[512] = "";
    CHECK_MSG(moe_config_validate(&c, err, sizeof err) == 0, "%s", err);

    /* A file with only data.path gives the defaults plus that path. */
    moe_config loaded;
    CHECK_MSG(load_case(&loaded, 1, "", NULL, 0, err, sizeof err) == 0, "%s", err);
    CHECK(strcmp(loaded.data.path, g_data) == 0 && strcmp(loaded.source, g_case) == 0);
    strcpy(c.data.path, g_data);
    CHECK(configs_equal(&c, &loaded, 1));
}

/* Every key set to a value different from its default. */
static const char *full_file_body =
    "[run]\n"                       /* line 3 */
    "name = \"full\"\n"
    "out_dir = \"out\"\n"
    "seed = 7\n"
    "device = \"cpu\"\n"
    "threads = 3\n"
    "\n"                            /* line 9 */
    "[model]\n"
    "vocab_size = 100\n"
    "d_model = 128\n"
    "n_layers = 2\n"
    "n_heads = 8\n"
    "seq_len = 64\n"
    "pos = \"rope\"\n"
    "rope_theta = 500000\n"         /* an integer for a float key */
    "norm = \"rmsnorm\"\n"
    "norm_eps = 1e-6\n"
    "tie_embeddings = false\n"
    "dropout = 0.1\n"
    "init_std = 0.01\n"
    "\n"
    "[moe]\n"
    "num_experts = 16\n"
    "top_k = 4\n"
    "capacity_factor = 2.0\n"
    "d_ff = 512\n"
    "activation = \"swiglu\"\n"
    "expert_bias = false\n"
    "gate = \"mlp_hadamard\"\n"
    "gate_hidden = 64\n"
    "drop_policy = \"probs\"\n"
    "renorm_after_drop = true\n"
    "aux_loss_weight = 0.02\n"
    "z_loss_weight = 0.0\n"
    "\n"
    "[router]\n"                    /* line 38 */
    "plugin = \"noisy_topk\"\n"
    "noise_std = 0.5\n"             /* line 40 */
    "learned = true\n"              /* line 41 */
    "k = 3\n"                       /* line 42 */
    "mode = \"st\"\n"               /* line 43 */
    "\n"
    "[train]\n"
    "steps = 50\n"
    "batch_size = 4\n"
    "optimizer = \"muon\"\n"
    "grad_accum = 3\n"
    "muon_lr = 0.03\n"
    "muon_momentum = 0.9\n"
    "muon_ns_steps = 4\n"
    "precision = \"fp32\"\n"
    "lr = 1e-3\n"
    "min_lr_ratio = 0.0\n"
    "warmup_steps = 5\n"
    "weight_decay = 0.1\n"
    "beta1 = 0.8\n"
    "beta2 = 0.99\n"
    "eps = 1e-6\n"
    "grad_clip = 0.5\n"
    "log_interval = 2\n"
    "\n"
    "[eval]\n"
    "interval = 25\n"
    "max_tokens = 10000000000\n"    /* needs the int64 field */
    "batch_size = 8\n";

static void check_full_values(const moe_config *c) {
    CHECK(strcmp(c->run.name, "full") == 0 && strcmp(c->run.out_dir, "out") == 0 && c->run.seed == 7);
    CHECK(strcmp(c->run.device, "cpu") == 0 && c->run.threads == 3);
    CHECK(strcmp(c->data.path, g_data) == 0 && strcmp(c->data.tokenizer, "char") == 0);
    CHECK(c->model.vocab_size == 100 && c->model.d_model == 128 && c->model.n_layers == 2 && c->model.n_heads == 8);
    CHECK(c->model.seq_len == 64 && strcmp(c->model.pos, "rope") == 0 && c->model.rope_theta == 500000.0);
    CHECK(strcmp(c->model.norm, "rmsnorm") == 0 && c->model.norm_eps == 1e-6 && c->model.tie_embeddings == 0);
    CHECK(c->model.dropout == 0.1 && c->model.init_std == 0.01);
    CHECK(c->moe.num_experts == 16 && c->moe.top_k == 4 && c->moe.capacity_factor == 2.0 && c->moe.d_ff == 512);
    CHECK(strcmp(c->moe.activation, "swiglu") == 0 && c->moe.expert_bias == 0);
    CHECK(strcmp(c->moe.gate, "mlp_hadamard") == 0 && c->moe.gate_hidden == 64);
    CHECK(strcmp(c->moe.drop_policy, "probs") == 0 && c->moe.renorm_after_drop == 1);
    CHECK(c->moe.aux_loss_weight == 0.02 && c->moe.z_loss_weight == 0.0);
    CHECK(strcmp(c->router.plugin, "noisy_topk") == 0);
    CHECK(c->train.steps == 50 && c->train.batch_size == 4 && strcmp(c->train.optimizer, "muon") == 0);
    CHECK(c->train.grad_accum == 3 && c->train.muon_lr == 0.03 && c->train.muon_momentum == 0.9 &&
          c->train.muon_ns_steps == 4);
    CHECK(strcmp(c->train.precision, "fp32") == 0);
    CHECK(c->train.lr == 1e-3 && c->train.min_lr_ratio == 0.0 && c->train.warmup_steps == 5);
    CHECK(c->train.weight_decay == 0.1 && c->train.beta1 == 0.8 && c->train.beta2 == 0.99 && c->train.eps == 1e-6);
    CHECK(c->train.grad_clip == 0.5 && c->train.log_interval == 2);
    CHECK(c->eval.interval == 25 && c->eval.max_tokens == 10000000000LL && c->eval.batch_size == 8);
}

static void check_full_router_options(const moe_config *c) {
    const moe_router_cfg *r = &c->router;
    CHECK(r->n_opts == 4);
    if (r->n_opts != 4) return;
    CHECK(strcmp(r->opts[0].key, "noise_std") == 0 && r->opts[0].type == MOE_OPT_FLOAT && r->opts[0].f == 0.5);
    CHECK(strcmp(r->opts[1].key, "learned") == 0 && r->opts[1].type == MOE_OPT_BOOL && r->opts[1].i == 1);
    CHECK(strcmp(r->opts[2].key, "k") == 0 && r->opts[2].type == MOE_OPT_INT && r->opts[2].i == 3);
    CHECK(strcmp(r->opts[3].key, "mode") == 0 && r->opts[3].type == MOE_OPT_STRING);
    CHECK(r->opts[3].s && strcmp(r->opts[3].s, "st") == 0);
    CHECK(r->opt_line[0] == 40 && r->opt_line[1] == 41 && r->opt_line[2] == 42 && r->opt_line[3] == 43);
    /* The struct owns its strings. */
    for (int i = 0; i < 4; ++i) CHECK(r->opts[i].key == r->opt_keys[i]);
    CHECK(r->opts[3].s == r->opt_strs[3]);
    CHECK(r->opts[0].s == NULL && r->opts[1].s == NULL && r->opts[2].s == NULL);
}

static void test_full_file(void) {
    moe_config c;
    char err[1024];
    int rc = load_case(&c, 1, full_file_body, NULL, 0, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc != 0) return;
    check_full_values(&c);
    check_full_router_options(&c);
    CHECK_MSG(moe_config_validate(&c, err, sizeof err) == 0, "%s", err);
}

static void test_copy_and_fix_pointers(void) {
    moe_config *original = malloc(sizeof *original), *copy = malloc(sizeof *copy);
    char err[1024];
    CHECK(original && copy);
    if (!original || !copy) return;
    CHECK_MSG(load_case(original, 1, full_file_body, NULL, 0, err, sizeof err) == 0, "%s", err);
    memcpy(copy, original, sizeof *copy);
    CHECK(copy->router.opts[3].s == original->router.opt_strs[3]); /* what fix_pointers is for */
    moe_config_fix_pointers(copy);
    for (int i = 0; i < copy->router.n_opts; ++i) CHECK(copy->router.opts[i].key == copy->router.opt_keys[i]);
    CHECK(copy->router.opts[3].s == copy->router.opt_strs[3]);
    CHECK(copy->router.opts[0].s == NULL);
    free(original); /* the copy must not depend on it any more */
    CHECK(strcmp(copy->router.opts[3].s, "st") == 0 && strcmp(copy->router.opts[1].key, "learned") == 0);
    free(copy);
}

static void test_file_errors(void) {
    /* Lines count from 1; the [data] table takes lines 1-2. */
    expect_file_error("[model]\nd_model = 256\nn_heads = = 4\n", 5, "Error while parsing"); /* malformed TOML */
    expect_file_error("[model]\nd_modle = 3\n", 4, "unknown key 'd_modle' in [model]; did you mean 'd_model'?");
    expect_file_error("[model]\nd_ff = 3\n", 4,
                      "unknown key 'd_ff' in [model]; did you mean 'd_ff'? It belongs in [moe]");
    expect_file_error("[train]\ncompletely_unknown = 1\n", 4, "valid keys: steps, batch_size, optimizer, lr");
    expect_file_error("[model]\nd_model = \"abc\"\n", 4, "model.d_model must be an integer, got a string (\"abc\")");
    expect_file_error("[model]\nd_model = 256.5\n", 4, "model.d_model must be an integer, got a float (256.5)");
    expect_file_error("[model]\ntie_embeddings = 1\n", 4, "model.tie_embeddings must be a boolean");
    expect_file_error("[train]\nlr = \"fast\"\n", 4, "train.lr must be a number, got a string (\"fast\")");
    expect_file_error("[train]\nlr = [1, 2]\n", 4, "train.lr must be a number, got an array");
    expect_file_error("[model]\npos = \"rotary\"\n", 4, "model.pos = \"rotary\" is not one of: learned, rope");
    expect_file_error("[moe]\ngate = \"a-very-long-gate-name-that-does-not-fit\"\n", 4,
                      "is not one of: linear, mlp, mlp_hadamard");
    expect_file_error("[train]\noptimizer = \"sgd\"\n", 4, "train.optimizer = \"sgd\" is not one of: adamw, muon");
    expect_file_error("[train]\nsteps = 0\n", 4, "train.steps = 0 is out of range; it must be >= 1");
    expect_file_error("[run]\nthreads = -1\n", 4, "run.threads = -1 is out of range; it must be >= 0");
    expect_file_error("[moe]\ncapacity_factor = 0\n", 4, "moe.capacity_factor = 0.0 is out of range; it must be in (0, 1024]");
    expect_file_error("[model]\ndropout = 1\n", 4, "model.dropout = 1.0 is out of range; it must be in [0, 1)");
    expect_file_error("[train]\nmin_lr_ratio = 1.5\n", 4,
                      "train.min_lr_ratio = 1.5 is out of range; it must be in [0, 1]");
    expect_file_error("[model]\nd_model = 3000000000\n", 4,
                      "model.d_model = 3000000000 does not fit in a 32-bit integer");
    expect_file_error("[train]\nlr = nan\n", 4, "train.lr = nan is not a finite number");
    expect_file_error("[modle]\nd_model = 3\n", 3, "unknown section [modle]; did you mean [model]?");
    expect_file_error("[xyz]\n", 3,
                      "unknown section [xyz]; valid sections: [run], [data], [model], [moe], [router], [train], [eval]");
    {
        /* A [sweep] table belongs to runtime/sweep.c: loading the base config skips it. */
        moe_config swept;
        char serr[1024];
        int src = load_case(&swept, 1, "[sweep]\nseeds = [1, 2]\n\"moe.top_k\" = [1, 4]\n[moe]\ntop_k = 3\n", NULL, 0,
                            serr, sizeof serr);
        CHECK_MSG(src == 0, "%s", serr);
        CHECK(src != 0 || swept.moe.top_k == 3);
    }
    expect_file_error("[model.extra]\nx = 1\n", 3, "nested table [model.extra] is not supported");
    expect_file_error("[router]\nlayers = [1, 2]\n", 4,
                      "router.layers is an array; router options take a single value");
    expect_file_error("[moe]\ntop_k = 9\n", 4,
                      "moe.top_k = 9 exceeds moe.num_experts = 8; choose top_k <= num_experts");
    expect_file_error("[moe]\ntop_k = 4\nnum_experts = 2\n", 4, "moe.top_k = 4 exceeds moe.num_experts = 2");
    expect_file_error("[model]\nd_model = 250\n", 4,
                      "model.d_model = 250 is not a multiple of model.n_heads = 4; choose d_model = 248 or 252");
    expect_file_error("[model]\nd_model = 12\npos = \"rope\"\n", 5,
                      "needs an even head dimension, but d_model / n_heads = 12 / 4 = 3");
    expect_file_error("[run]\nname = \"a/b\"\n", 4, "run.name = \"a/b\" must be a plain folder name");
    expect_file_error("[router]\nplugin = \"\"\n", 4, "router.plugin is empty");

    /* Keys outside a section, a value in the [data] table, and a wrong file. */
    moe_config c;
    char err[1024], where[160], text[512];
    snprintf(text, sizeof text, "[data]\npath = \"%s\"\ntokenizer = \"bpe\"\n", g_data);
    CHECK(load_case(&c, 0, text, NULL, 0, err, sizeof err) == -1);
    snprintf(where, sizeof where, "%s:3:", g_case);
    CHECK_HAS(err, where);
    CHECK_HAS(err, "data.tokenizer = \"bpe\" is not one of: char, gpt2");

    CHECK(load_case(&c, 0, "seed = 3\n[data]\npath = \"x\"\n", NULL, 0, err, sizeof err) == -1);
    snprintf(where, sizeof where, "%s:1:", g_case);
    CHECK_HAS(err, where);
    CHECK_HAS(err, "key 'seed' is outside any section; move it under [run]");

    CHECK(moe_config_load(&c, "/nonexistent/x.toml", NULL, 0, err, sizeof err) == -1);
    CHECK_HAS(err, "/nonexistent/x.toml: cannot open");

    /* data.path: missing, and set to "" explicitly. */
    CHECK(load_case(&c, 0, "[model]\nd_model = 128\n", NULL, 0, err, sizeof err) == -1);
    CHECK_HAS(err, "data.path is not set; point it at a text file or a folder made by `moehost prepare`");
    CHECK_HAS(err, g_case);
    CHECK(load_case(&c, 0, "[data]\npath = \"\"\n", NULL, 0, err, sizeof err) == -1);
    snprintf(where, sizeof where, "%s:2: data.path is not set", g_case);
    CHECK_HAS(err, where);
}

static void test_validate(void) {
    moe_config c;
    char err[1024];
    moe_config_defaults(&c);
    c.moe.top_k = 9;
    CHECK(moe_config_validate(&c, err, sizeof err) == -1);
    CHECK_HAS(err, "moe.top_k = 9 exceeds moe.num_experts = 8; choose top_k <= num_experts");

    moe_config_defaults(&c);
    c.model.n_heads = 3;
    CHECK(moe_config_validate(&c, err, sizeof err) == -1);
    CHECK_HAS(err, "model.d_model = 256 is not a multiple of model.n_heads = 3; choose d_model = 255 or 258");

    /* Schema checks apply to a struct filled by hand too. */
    moe_config_defaults(&c);
    c.moe.d_ff = 0;
    CHECK(moe_config_validate(&c, err, sizeof err) == -1);
    CHECK_HAS(err, "moe.d_ff = 0 is out of range; it must be in [1, 1048576]");
    moe_config_defaults(&c);
    strcpy(c.model.norm, "batchnorm");
    CHECK(moe_config_validate(&c, err, sizeof err) == -1);
    CHECK_HAS(err, "model.norm = \"batchnorm\" is not one of: layernorm, rmsnorm");
    moe_config_defaults(&c);
    c.train.beta2 = 1.0;
    CHECK(moe_config_validate(&c, err, sizeof err) == -1);
    CHECK_HAS(err, "train.beta2 = 1.0 is out of range; it must be in [0, 1)");

    /* A loaded config names its file. */
    CHECK(load_case(&c, 1, "", NULL, 0, err, sizeof err) == 0);
    c.model.n_layers = 0;
    CHECK(moe_config_validate(&c, err, sizeof err) == -1);
    CHECK_HAS(err, g_case);
    CHECK_HAS(err, "model.n_layers = 0 is out of range");
}

static void test_overrides(void) {
    moe_config c;
    char err[1024];
    const char *sets[] = {
        "model.d_model=512",          /* int */
        "train.lr = 1e-3",            /* float, spaces around '=' */
        "moe.capacity_factor=2",      /* int for a float key */
        "model.tie_embeddings=false", /* bool */
        "run.name=\"quoted name\"",   /* TOML string */
        "router.plugin=top1",         /* bare word */
        "data.path=/tmp/x y.txt",     /* bare text with a space and a slash */
        "router.temperature=0.5",     /* new router option */
        "router.mode=st",             /* new router option, bare word */
        "model.n_layers=3",
        "model.n_layers=5",           /* later wins */
    };
    int rc = load_case(&c, 1, "[model]\nd_model = 128\n", sets, (int)(sizeof sets / sizeof sets[0]), err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    CHECK(c.model.d_model == 512 && c.train.lr == 1e-3 && c.moe.capacity_factor == 2.0);
    CHECK(c.model.tie_embeddings == 0 && strcmp(c.run.name, "quoted name") == 0);
    CHECK(strcmp(c.router.plugin, "top1") == 0 && strcmp(c.data.path, "/tmp/x y.txt") == 0);
    CHECK(c.model.n_layers == 5);
    CHECK(c.router.n_opts == 2);
    if (c.router.n_opts == 2) {
        CHECK(strcmp(c.router.opts[0].key, "temperature") == 0 && c.router.opts[0].type == MOE_OPT_FLOAT);
        CHECK(c.router.opts[0].f == 0.5 && c.router.opt_line[0] == 0);
        CHECK(strcmp(c.router.opts[1].key, "mode") == 0 && c.router.opts[1].type == MOE_OPT_STRING);
        CHECK(strcmp(c.router.opts[1].s, "st") == 0 && c.router.opt_line[1] == 0);
    }

    /* Overrides replace router options from the file, keeping their place. */
    const char *replace[] = { "router.k=5", "router.mode=true" };
    rc = load_case(&c, 1, "[router]\nk = 3\nmode = \"st\"\nnoise_std = 1.0\n", replace, 2, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    CHECK(c.router.n_opts == 3);
    if (c.router.n_opts == 3) {
        CHECK(strcmp(c.router.opts[0].key, "k") == 0 && c.router.opts[0].i == 5 && c.router.opt_line[0] == 0);
        CHECK(strcmp(c.router.opts[1].key, "mode") == 0 && c.router.opts[1].type == MOE_OPT_BOOL);
        CHECK(c.router.opts[1].i == 1 && c.router.opts[1].s == NULL);
        CHECK(strcmp(c.router.opts[2].key, "noise_std") == 0 && c.router.opt_line[2] == 6);
    }

    /* No file at all: defaults plus overrides. */
    const char *only[] = { "data.path=corpus.txt", "moe.top_k=1" };
    rc = moe_config_load(&c, NULL, only, 2, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    CHECK(strcmp(c.data.path, "corpus.txt") == 0 && c.moe.top_k == 1 && strcmp(c.source, "") == 0);

    expect_set_error("model.d_model", "--set 'model.d_model': expected section.key=value", NULL);
    expect_set_error("d_model=512", "--set 'd_model=512': missing section; write --set model.d_model=512", NULL);
    expect_set_error("=3", "expected section.key=value", NULL);
    expect_set_error("model.=3", "expected section.key=value", NULL);
    expect_set_error("modle.d_model=3", "--set modle.d_model: unknown section [modle]; did you mean [model]?", NULL);
    expect_set_error("sweep.lr=[1,2]", "--set sweep.lr: [sweep] belongs to sweeps", NULL);
    expect_set_error("model.d_model=abc",
                     "--set model.d_model: model.d_model must be an integer, got a string (\"abc\")",
                     "e.g. --set model.d_model=256");
    expect_set_error("run.name=2024", "--set run.name: run.name must be a string, got an integer (2024)",
                     "--set run.name='\"text\"'");
    expect_set_error("model.dmodel=3",
                     "--set model.dmodel: unknown key 'dmodel' in [model]; did you mean 'd_model'?", NULL);
    expect_set_error("model.pos=rotary", "--set model.pos: model.pos = \"rotary\" is not one of: learned, rope", NULL);
    expect_set_error("moe.top_k=12", "--set moe.top_k: moe.top_k = 12 exceeds moe.num_experts = 8", NULL);
    expect_set_error("data.path=", "--set data.path: data.path is not set", NULL);
    expect_set_error("router.bad=[1]", "--set router.bad: router.bad is an array", NULL);
}

static void test_data_path_resolution(void) {
    char sub[160], cfg_path[200], data_path[200], text[512], err[1024];
    snprintf(sub, sizeof sub, "%s/sub", g_dir);
    CHECK(mkdir(sub, 0700) == 0);
    snprintf(cfg_path, sizeof cfg_path, "%s/cfg.toml", sub);
    snprintf(data_path, sizeof data_path, "%s/local.txt", sub);
    write_text(data_path, "abc\n");
    char *expected = realpath(data_path, NULL);
    CHECK(expected != NULL);

    moe_config c;
    /* Relative, and present beside the config: resolved to an absolute path. */
    snprintf(text, sizeof text, "[data]\npath = \"local.txt\"\n");
    write_text(cfg_path, text);
    CHECK_MSG(moe_config_load(&c, cfg_path, NULL, 0, err, sizeof err) == 0, "%s", err);
    CHECK_MSG(expected && strcmp(c.data.path, expected) == 0, "%s", c.data.path);
    /* Also through "..". */
    snprintf(text, sizeof text, "[data]\npath = \"../sub/local.txt\"\n");
    write_text(cfg_path, text);
    CHECK_MSG(moe_config_load(&c, cfg_path, NULL, 0, err, sizeof err) == 0, "%s", err);
    CHECK_MSG(expected && strcmp(c.data.path, expected) == 0, "%s", c.data.path);
    /* Relative, not there: kept as written (relative to the working directory). */
    snprintf(text, sizeof text, "[data]\npath = \"elsewhere/none.txt\"\n");
    write_text(cfg_path, text);
    CHECK_MSG(moe_config_load(&c, cfg_path, NULL, 0, err, sizeof err) == 0, "%s", err);
    CHECK(strcmp(c.data.path, "elsewhere/none.txt") == 0);
    /* Given with --set: relative to the working directory, even if the file's folder has it. */
    const char *sets[] = { "data.path=local.txt" };
    CHECK_MSG(moe_config_load(&c, cfg_path, sets, 1, err, sizeof err) == 0, "%s", err);
    CHECK(strcmp(c.data.path, "local.txt") == 0);

    free(expected);
    remove(cfg_path);
    remove(data_path);
    rmdir(sub);
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static void test_write_round_trip(void) {
    char out[200], tmp[220], err[1024];
    snprintf(out, sizeof out, "%s/written.toml", g_dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", out);

    /* The full file, plus strings and keys that need escaping and floats
     * that need every digit. */
    const char *sets[] = {
        "run.name=\"quote\\\" back\\\\slash tab\\t caf\\u00e9\"",
        "router.third=0.1",
        "router.tiny=1e-300",
        "router.big=-12345678901234",
        "router.text=\"line1\\nline2\"",
        "train.lr=0.00030000000000000003",
    };
    moe_config *a = malloc(sizeof *a), *b = malloc(sizeof *b);
    CHECK(a && b);
    if (!a || !b) return;
    int rc = load_case(a, 1, full_file_body, sets, (int)(sizeof sets / sizeof sets[0]), err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    CHECK(strcmp(a->run.name, "quote\" back\\slash tab\t caf\xc3\xa9") == 0);
    CHECK(a->router.n_opts == 8);

    CHECK_MSG(moe_config_write(a, out, err, sizeof err) == 0, "%s", err);
    CHECK(file_exists(out) && !file_exists(tmp));
    rc = moe_config_load(b, out, NULL, 0, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    CHECK(strcmp(b->source, out) == 0);
    CHECK(configs_equal(a, b, 0)); /* lines differ: options sit elsewhere in the new file */
    CHECK(b->train.lr == 0.00030000000000000003 && b->router.opts[5].f == 1e-300);

    /* Option names that must be quoted in TOML. */
    rc = load_case(a, 1, "[router]\n\"odd key\" = 1\n\"cl\u00e9.x\" = \"v\"\n", NULL, 0, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    CHECK(a->router.n_opts == 2 && strcmp(a->router.opts[1].key, "cl\xc3\xa9.x") == 0);
    CHECK_MSG(moe_config_write(a, out, err, sizeof err) == 0, "%s", err);
    rc = moe_config_load(b, out, NULL, 0, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    CHECK(configs_equal(a, b, 0));

    /* Defaults round-trip too, and writing over an existing file works. */
    moe_config_defaults(a);
    strcpy(a->data.path, g_data);
    CHECK_MSG(moe_config_write(a, out, err, sizeof err) == 0, "%s", err);
    rc = moe_config_load(b, out, NULL, 0, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    CHECK(configs_equal(a, b, 1));

    /* The written file lists every key: count "key = " lines. */
    FILE *f = fopen(out, "r");
    int assignments = 0;
    char line[512];
    while (f && fgets(line, sizeof line, f))
        if (strstr(line, " = ")) ++assignments;
    if (f) fclose(f);
    /* One line per schema key: every key is written, defaults included. */
    CHECK_MSG(assignments == moe_cfg_n_keys, "%d key lines for %d keys", assignments, moe_cfg_n_keys);

    /* A folder that does not exist: an error, nothing left behind. */
    CHECK(moe_config_write(a, "/nonexistent/dir/c.toml", err, sizeof err) == -1);
    CHECK_HAS(err, "/nonexistent/dir/c.toml.tmp");
    remove(out);
    free(a);
    free(b);
}

static char *read_all(FILE *f, size_t *len) {
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            char *bigger = realloc(buf, cap * 2);
            if (!bigger) {
                free(buf);
                return NULL;
            }
            buf = bigger;
            cap *= 2;
        }
    }
    *len = n;
    return buf;
}

static void test_doc_matches(void) {
    FILE *generated = tmpfile();
    CHECK(generated != NULL);
    if (!generated) return;
    moe_config_print_doc(generated);
    rewind(generated);
    size_t gen_len = 0;
    char *gen = read_all(generated, &gen_len);
    fclose(generated);
    CHECK(gen != NULL && gen_len > 0);
    if (!gen) return;

    /* Spot-check the content against the spec, not only against the file. */
    char *text = malloc(gen_len + 1);
    CHECK(text != NULL);
    if (text) {
        memcpy(text, gen, gen_len);
        text[gen_len] = '\0';
        CHECK_HAS(text, "## [moe]");
        CHECK_HAS(text, "| `top_k` | int | `2` | [1, 4096] |");
        CHECK_HAS(text, "| `pos` | string | `\"learned\"` | `learned`, `rope` |");
        CHECK_HAS(text, "| `val_fraction` | float | `0.1` | (0, 1) |");
        CHECK_HAS(text, "--set section.key=value");
        CHECK_HAS(text, "moehost plugins");
        free(text);
    }

    const char *doc_path = MOE_TEST_SOURCE_DIR "/docs/config.md";
    const char *update = getenv("MOE_UPDATE_DOCS");
    if (update && strcmp(update, "1") == 0) {
        FILE *f = fopen(doc_path, "w");
        CHECK_MSG(f != NULL, "cannot write %s", doc_path);
        if (f) {
            CHECK(fwrite(gen, 1, gen_len, f) == gen_len);
            fclose(f);
            printf("wrote %s\n", doc_path);
        }
        free(gen);
        return;
    }
    FILE *f = fopen(doc_path, "r");
    CHECK_MSG(f != NULL, "cannot read %s", doc_path);
    if (f) {
        size_t doc_len = 0;
        char *doc = read_all(f, &doc_len);
        fclose(f);
        CHECK_MSG(doc && doc_len == gen_len && memcmp(doc, gen, gen_len) == 0,
                  "%s differs from moe_config_print_doc(); regenerate it with MOE_UPDATE_DOCS=1 ctest -R test_config",
                  doc_path);
        free(doc);
    }
    free(gen);
}

int main(void) {
    if (setup_dir() != 0) {
        fprintf(stderr, "mkdtemp failed\n");
        return 1;
    }
    test_defaults();
    test_full_file();
    test_copy_and_fix_pointers();
    test_file_errors();
    test_validate();
    test_overrides();
    test_data_path_resolution();
    test_write_round_trip();
    test_doc_matches();
    remove(g_case);
    remove(g_data);
    rmdir(g_dir);
    return moe_test_summary("test_config");
}
