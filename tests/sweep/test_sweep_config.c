/*
 * [sweep] tables (runtime/sweep.h): reading, the grid's order and point
 * names, each point's overrides and the config they load to, and the
 * messages for malformed tables (file:line, the key, the problem).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "runtime/config.h"
#include "runtime/sweep.h"
#include "test_util.h"

static char g_dir[256], g_data[300], g_case[300];

#define CHECK_HAS(text, part) CHECK_MSG(strstr((text), (part)) != NULL, "'%s' lacks '%s'", (text), (part))

/* case.toml: a small valid base config (lines 1-8), then `sweep`. */
static void write_case(const char *sweep) {
    FILE *f = fopen(g_case, "w");
    CHECK_MSG(f != NULL, "cannot write %s", g_case);
    if (!f) return;
    fprintf(f,
            "[run]\n"                       /* 1 */
            "name = \"base\"\n"             /* 2 */
            "out_dir = \"%s/runs\"\n"       /* 3 */
            "seed = 7\n"                    /* 4 */
            "[data]\n"                      /* 5 */
            "path = \"%s\"\n"               /* 6 */
            "[moe]\n"                       /* 7 */
            "num_experts = 4\n"             /* 8 */
            "%s",
            g_dir, g_data, sweep);
    fclose(f);
}

/* Load [sweep] (expect 1) and make the plan; returns the plan's result. */
static int plan_case(const char *sweep, moe_sweep *sw, moe_sweep_plan *plan, const char *const *sets, int n_sets,
                     char *err, size_t errcap) {
    write_case(sweep);
    err[0] = '\0';
    int got = moe_sweep_load(g_case, sw, err, errcap);
    if (got != 1) return got == 0 ? -2 : -1;
    int rc = moe_sweep_plan_make(plan, sw, g_case, sets, n_sets, 0, err, errcap);
    if (rc != 0) moe_sweep_free(sw);
    return rc;
}

/* A malformed table: refused with "case.toml:LINE:" and every part. */
static void expect_error(const char *sweep, int line, const char *part1, const char *part2) {
    moe_sweep sw;
    moe_sweep_plan plan;
    char err[4096], where[400];
    int rc = plan_case(sweep, &sw, &plan, NULL, 0, err, sizeof err);
    CHECK_MSG(rc == -1, "accepted: %s", sweep);
    if (rc == 0) {
        moe_sweep_plan_free(&plan);
        moe_sweep_free(&sw);
        return;
    }
    snprintf(where, sizeof where, "%s:%d:", g_case, line);
    CHECK_HAS(err, where);
    CHECK_HAS(err, part1);
    if (part2) CHECK_HAS(err, part2);
}

static void test_grid(void) {
    moe_sweep sw;
    moe_sweep_plan plan;
    char err[4096];
    int rc = plan_case("[sweep]\n"                                              /* 9 */
                       "name = \"expA\"\n"                                      /* 10 */
                       "seeds = [42, 43]\n"                                     /* 11 */
                       "parallel = 3\n"                                         /* 12 */
                       "\"router.plugin\" = [\"top1\", \"topk_hard\", \"softk\"]\n" /* 13 */
                       "\"moe.capacity_factor\" = [1.0, 1.25]\n",               /* 14 */
                       &sw, &plan, NULL, 0, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc != 0) return;
    CHECK(sw.parallel == 3 && sw.n_seeds == 2 && sw.n_axes == 2 && strcmp(sw.csv, "standard") == 0);
    CHECK(sw.axes[0].line == 13 && sw.axes[1].line == 14);
    CHECK(plan.n_points == 12 && plan.n_groups == 6);
    CHECK(strcmp(plan.experiment, "expA") == 0);
    char dir[520];
    snprintf(dir, sizeof dir, "%s/runs/expA", g_dir);
    CHECK(strcmp(plan.dir, dir) == 0);
    /* The first axis varies slowest, seeds fastest. */
    static const char *const names[12] = {
        "top1-cf1.0-s42",      "top1-cf1.0-s43",      "top1-cf1.25-s42",  "top1-cf1.25-s43",
        "topk_hard-cf1.0-s42", "topk_hard-cf1.0-s43", "topk_hard-cf1.25-s42", "topk_hard-cf1.25-s43",
        "softk-cf1.0-s42",     "softk-cf1.0-s43",     "softk-cf1.25-s42", "softk-cf1.25-s43",
    };
    for (int p = 0; p < plan.n_points && p < 12; ++p) {
        CHECK_MSG(strcmp(plan.points[p].name, names[p]) == 0, "point %d is %s, expected %s", p,
                  plan.points[p].name, names[p]);
        CHECK(plan.points[p].group == p / 2);
        CHECK(plan.points[p].seed == (p % 2 ? 43 : 42));
        CHECK(plan.points[p].value[0] == p / 4 && plan.points[p].value[1] == (p / 2) % 2);
    }
    /* Point 6 = topk_hard, CF 1.25, seed 42: its overrides and the config they give. */
    char sets[MOE_SWEEP_MAX_AXES + 3][MOE_SWEEP_SET_CAP];
    int n = moe_sweep_point_sets(&plan, 6, sets);
    CHECK(n == 5);
    CHECK(strcmp(sets[0], "router.plugin=\"topk_hard\"") == 0);
    CHECK(strcmp(sets[1], "moe.capacity_factor=1.25") == 0);
    CHECK(strcmp(sets[2], "run.seed=42") == 0);
    CHECK(strcmp(sets[3], "run.name=\"topk_hard-cf1.25-s42\"") == 0);
    char want_dir[600];
    snprintf(want_dir, sizeof want_dir, "run.out_dir=\"%s\"", dir);
    CHECK(strcmp(sets[4], want_dir) == 0);
    const char *ptrs[8];
    for (int i = 0; i < n; ++i) ptrs[i] = sets[i];
    moe_config cfg;
    rc = moe_config_load(&cfg, g_case, ptrs, n, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    CHECK(strcmp(cfg.router.plugin, "topk_hard") == 0 && cfg.moe.capacity_factor == 1.25 && cfg.run.seed == 42);
    CHECK(strcmp(cfg.run.name, "topk_hard-cf1.25-s42") == 0 && strcmp(cfg.run.out_dir, dir) == 0);
    CHECK(cfg.moe.num_experts == 4);
    moe_sweep_plan_free(&plan);
    moe_sweep_free(&sw);

    /* The user's --set reaches every point; --set run.out_dir moves the experiment. */
    char other[400], set_out[450];
    snprintf(other, sizeof other, "%s/elsewhere", g_dir);
    snprintf(set_out, sizeof set_out, "run.out_dir=\"%s\"", other);
    const char *user[] = { "train.steps=12", set_out };
    rc = plan_case("[sweep]\n\"moe.top_k\" = [1, 2]\n", &sw, &plan, user, 2, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc == 0) {
        snprintf(dir, sizeof dir, "%s/base", other); /* no name: run.name */
        CHECK_MSG(strcmp(plan.dir, dir) == 0, "%s", plan.dir);
        CHECK(plan.n_points == 2 && strcmp(plan.points[0].name, "tk1-s7") == 0 &&
              strcmp(plan.points[1].name, "tk2-s7") == 0);
        moe_sweep_plan_free(&plan);
        moe_sweep_free(&sw);
    }
}

static void test_names(void) {
    moe_sweep sw;
    moe_sweep_plan plan;
    char err[4096];
    /* No axes, no seeds: one run with run.seed. */
    int rc = plan_case("[sweep]\nname = \"one\"\n", &sw, &plan, NULL, 0, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc == 0) {
        CHECK(plan.n_points == 1 && plan.n_groups == 1 && strcmp(plan.points[0].name, "s7") == 0);
        moe_sweep_plan_free(&plan);
        moe_sweep_free(&sw);
    }
    /* Initials that clash (norm_eps, num_experts: "ne") fall back to the key names. */
    rc = plan_case("[sweep]\n\"model.norm_eps\" = [0.001]\n\"moe.num_experts\" = [4, 8]\n\"train.lr\" = [0.01]\n",
                   &sw, &plan, NULL, 0, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc == 0) {
        CHECK_MSG(strcmp(plan.points[1].name, "norm_eps0.001-num_experts8-lr0.01-s7") == 0, "%s",
                  plan.points[1].name);
        moe_sweep_plan_free(&plan);
        moe_sweep_free(&sw);
    }
    /* A plugin path names the point by its file; values that read the same get numbered. */
    rc = plan_case("[sweep]\n\"router.plugin\" = [\"/x/y/softk.so\", \"softk\", \"a b\"]\n", &sw, &plan, NULL, 0,
                   err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc == 0) {
        CHECK_MSG(strcmp(plan.points[0].name, "softk-s7-p1") == 0, "%s", plan.points[0].name);
        CHECK_MSG(strcmp(plan.points[1].name, "softk-s7-p2") == 0, "%s", plan.points[1].name);
        CHECK_MSG(strcmp(plan.points[2].name, "a_b-s7") == 0, "%s", plan.points[2].name);
        moe_sweep_plan_free(&plan);
        moe_sweep_free(&sw);
    }
    /* Booleans and strings of other keys. */
    rc = plan_case("[sweep]\n\"moe.renorm_after_drop\" = [true, false]\n\"moe.gate\" = [\"mlp\"]\nseeds = [3]\n",
                   &sw, &plan, NULL, 0, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc == 0) {
        CHECK_MSG(strcmp(plan.points[0].name, "radtrue-mlp-s3") == 0, "%s", plan.points[0].name);
        moe_sweep_plan_free(&plan);
        moe_sweep_free(&sw);
    }
}

static void test_errors(void) {
    /* No [sweep]: 0. */
    moe_sweep sw;
    char err[4096];
    write_case("");
    CHECK(moe_sweep_load(g_case, &sw, err, sizeof err) == 0);

    expect_error("[sweep]\n\"moe.capacity_fator\" = [1.0]\n", 10, "\"moe.capacity_fator\"",
                 "unknown key 'capacity_fator' in [moe]; did you mean 'capacity_factor'?");
    expect_error("[sweep]\n\"mo.top_k\" = [1]\n", 10, "\"mo.top_k\"", "unknown section [mo]");
    expect_error("[sweep]\n\"moe.top_k\" = []\n", 10, "axis \"moe.top_k\" is an empty list", NULL);
    expect_error("[sweep]\n\"moe.top_k\" = 2\n", 10, "axis \"moe.top_k\" = 2 is not a list", "[2]");
    expect_error("[sweep]\nseed = [1, 2]\n", 10, "unknown key 'seed' in [sweep]; did you mean 'seeds'?", NULL);
    expect_error("[sweep]\nrepeat = 3\n", 10, "unknown key 'repeat' in [sweep]", "seeds, name, parallel, csv");
    expect_error("[sweep]\ncapacity_factor = [1.0]\n", 10, "\"moe.capacity_factor\" = [...]", NULL);
    expect_error("[sweep]\n\"moe.capacity_factor\" = [1.0, \"big\"]\n", 10, "value 2 (\"big\")",
                 "moe.capacity_factor must be a number, got a string");
    expect_error("[sweep]\n\"moe.capacity_factor\" = [0.0]\n", 10, "moe.capacity_factor = 0.0 is out of range", NULL);
    expect_error("[sweep]\n\"moe.top_k\" = [1, 9]\n", 10, "value 2 (9)", "exceeds moe.num_experts = 4");
    expect_error("[sweep]\n\"moe.top_k\" = [2, 2]\n", 10, "lists 2 twice", NULL);
    expect_error("[sweep]\n\"run.seed\" = [1, 2]\n", 10, "seeds = [...]", NULL);
    expect_error("[sweep]\n\"run.name\" = [\"a\"]\n", 10, "name the experiment folder with name = \"...\"", NULL);
    expect_error("[sweep]\n\"a.b.c\" = [1]\n", 10, "does not name a config key", "\"section.key\"");
    expect_error("[sweep]\nseeds = [1, \"x\"]\n", 10, "seeds: item 2 (\"x\") is not a whole number", NULL);
    expect_error("[sweep]\nseeds = []\n", 10, "seeds is an empty list", NULL);
    expect_error("[sweep]\nseeds = [4, 4]\n", 10, "seeds lists 4 twice", NULL);
    expect_error("[sweep]\nparallel = 0\n", 10, "parallel = 0 must be a whole number in [1, 256]", NULL);
    expect_error("[sweep]\ncsv = \"excel\"\n", 10, "csv = \"excel\" is not one of: \"standard\", \"noise\"", NULL);
    expect_error("[sweep]\nname = \"a/b\"\n", 10, "name = \"a/b\" must be a plain folder name", NULL);
    /* Points whose combination is invalid: the whole config of every point is checked. */
    expect_error("[sweep]\n\"moe.top_k\" = [2, 4]\n\"moe.num_experts\" = [4, 2]\n", 9, "point 4/4",
                 "moe.top_k = 4 exceeds moe.num_experts = 2");

    /* The user's --set of a swept key, of run.seed with seeds, of run.name with a name. */
    moe_sweep_plan plan;
    const char *s1[] = { "moe.top_k=1" };
    int rc = plan_case("[sweep]\n\"moe.top_k\" = [1, 2]\n", &sw, &plan, s1, 1, err, sizeof err);
    CHECK(rc == -1);
    CHECK_HAS(err, "--set moe.top_k: \"moe.top_k\" is an axis of the sweep");
    const char *s2[] = { "run.seed = 5" };
    rc = plan_case("[sweep]\nseeds = [1, 2]\n", &sw, &plan, s2, 1, err, sizeof err);
    CHECK(rc == -1);
    CHECK_HAS(err, "--set run.seed: the sweep's seeds come from seeds = [...]");
    const char *s3[] = { "run.name=x" };
    rc = plan_case("[sweep]\nname = \"e\"\n", &sw, &plan, s3, 1, err, sizeof err);
    CHECK(rc == -1);
    CHECK_HAS(err, "--set run.name");
    /* Without seeds, --set run.seed picks the one seed. */
    const char *s4[] = { "run.seed=11" };
    rc = plan_case("[sweep]\n\"moe.top_k\" = [1]\n", &sw, &plan, s4, 1, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc == 0) {
        CHECK(plan.points[0].seed == 11 && strcmp(plan.points[0].name, "tk1-s11") == 0);
        moe_sweep_plan_free(&plan);
        moe_sweep_free(&sw);
    }
}

/* Router options are checked against the plugin (when it can be loaded). */
static void test_plugin_options(void) {
    moe_sweep sw;
    moe_sweep_plan plan;
    char err[4096];
    write_case("[sweep]\n\"router.plugin\" = [\"top1\", \"softk\"]\n\"router.temperature\" = [0.5]\n");
    CHECK(moe_sweep_load(g_case, &sw, err, sizeof err) == 1);
    int rc = moe_sweep_plan_make(&plan, &sw, g_case, NULL, 0, 1, err, sizeof err);
    CHECK(rc == -1);
    char where[400];
    snprintf(where, sizeof where, "%s:11:", g_case);
    CHECK_HAS(err, where);
    CHECK_HAS(err, "point 1/2 \"top1-temperature0.5-s7\"");
    CHECK_HAS(err, "router 'top1': unknown option 'temperature'");
    moe_sweep_free(&sw);

    /* csv = "noise" takes noise_std from the axis, or the plugin's default. */
    write_case("[router]\nplugin = \"noisy_topk\"\nlearned = false\n[sweep]\ncsv = \"noise\"\n"
               "\"moe.aux_loss_weight\" = [0.01, 0.0]\n");
    CHECK(moe_sweep_load(g_case, &sw, err, sizeof err) == 1);
    rc = moe_sweep_plan_make(&plan, &sw, g_case, NULL, 0, 1, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc == 0) {
        CHECK(plan.points[0].noise_std == 1.0 && plan.points[0].aux_loss_weight == 0.01);
        CHECK(plan.points[1].aux_loss_weight == 0.0);
        moe_sweep_plan_free(&plan);
    }
    moe_sweep_free(&sw);
    write_case("[router]\nplugin = \"softk\"\n[sweep]\ncsv = \"noise\"\n");
    CHECK(moe_sweep_load(g_case, &sw, err, sizeof err) == 1);
    rc = moe_sweep_plan_make(&plan, &sw, g_case, NULL, 0, 1, err, sizeof err);
    CHECK(rc == -1);
    CHECK_HAS(err, "router 'softk' has no noise_std option");
    moe_sweep_free(&sw);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/moe_sweep_test_XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(g_data, sizeof g_data, "%s/data.txt", g_dir);
    snprintf(g_case, sizeof g_case, "%s/case.toml", g_dir);
    FILE *f = fopen(g_data, "w");
    if (f) {
        fputs("hello world, hello sweep\n", f);
        fclose(f);
    }
    test_grid();
    test_names();
    test_errors();
    test_plugin_options();
    unlink(g_case);
    unlink(g_data);
    rmdir(g_dir);
    return moe_test_summary("test_sweep_config");
}
