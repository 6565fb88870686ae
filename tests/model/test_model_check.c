/*
 * test_model_check: the model's results block and router checks
 * (moe_model_forward with and without a result, moe_model_collect,
 * moe_model_check) on the CPU backend.
 *
 *   pending_equals_direct  forwards left pending and read by
 *                          moe_model_collect give bitwise the results of
 *                          forwards that read their own (loss, aux,
 *                          n_targets, n_correct); more pending forwards than
 *                          train.grad_accum allows are refused.
 *   records                a record written into a layer's slot of the
 *                          block (as CUDA's check kernels do) is reported by
 *                          moe_model_check with the router's name, what is
 *                          wrong and where; the lowest layer wins; the
 *                          records are cleared afterwards. Every record code
 *                          has its message.
 *   bad_router             every fault of bad_router.c through the whole
 *                          model: forward with and without a result returns
 *                          -1 naming the router and the fault; the control
 *                          mode trains; no record is left behind.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "model/model.h"
#include "runtime/config.h"
#include "runtime/plugin_loader.h"
#include "test_util.h"

#define V_SIZE 11
#define B_SEQ 2
#define S_LEN 5

static int open_model(moe_model *m, moe_backend *be, const moe_router_lib *lib, const moe_option *opt, int grad_accum,
                      char *err, size_t errcap) {
    moe_config cfg;
    moe_config_defaults(&cfg);
    cfg.run.seed = 7;
    cfg.model.d_model = 8;
    cfg.model.n_layers = 2;
    cfg.model.n_heads = 2;
    cfg.model.seq_len = S_LEN;
    cfg.model.init_std = 0.3;
    cfg.moe.num_experts = 3;
    cfg.moe.top_k = 2;
    cfg.moe.d_ff = 6;
    cfg.moe.capacity_factor = 1.0;
    cfg.moe.aux_loss_weight = 0.1;
    cfg.moe.z_loss_weight = 0.05;
    cfg.train.grad_accum = grad_accum;
    if (opt) {
        cfg.router.opts[0] = *opt;
        cfg.router.n_opts = 1;
    }
    return moe_model_create(m, &cfg, be, V_SIZE, B_SEQ, lib->api, err, errcap);
}

static void make_batch(int32_t *ids, int32_t *targets, uint64_t seed) {
    moe_test_rng r = {seed};
    for (int t = 0; t < B_SEQ * S_LEN; ++t) {
        ids[t] = (int32_t)(moe_test_next(&r) % V_SIZE);
        targets[t] = (int32_t)(moe_test_next(&r) % V_SIZE);
    }
    targets[2] = -1; /* an ignored target */
}

static int same_result(const moe_forward_result *a, const moe_forward_result *b) {
    return memcmp(&a->loss, &b->loss, sizeof a->loss) == 0 && memcmp(&a->aux, &b->aux, sizeof a->aux) == 0 &&
           a->n_targets == b->n_targets && a->n_correct == b->n_correct;
}

static void test_pending_equals_direct(const moe_router_lib *lib) {
    char err[1024];
    moe_backend *be = moe_backend_cpu_create(1);
    moe_model m;
    int rc = open_model(&m, be, lib, NULL, 2, err, sizeof err);
    CHECK_MSG(rc == 0, "create: %s", err);
    if (rc == 0) {
        int32_t ids[2][B_SEQ * S_LEN], tg[2][B_SEQ * S_LEN];
        make_batch(ids[0], tg[0], 1);
        make_batch(ids[1], tg[1], 2);
        moe_forward_result direct[2];
        for (int i = 0; i < 2; ++i)
            CHECK(moe_model_forward(&m, ids[i], tg[i], B_SEQ, 1, 10 + i, &direct[i], err, sizeof err) == 0);
        CHECK(moe_model_check(&m, err, sizeof err) == 0);
        for (int i = 0; i < 2; ++i)
            CHECK(moe_model_forward(&m, ids[i], tg[i], B_SEQ, 1, 10 + i, NULL, err, sizeof err) == 0);
        /* a third pending forward is more than grad_accum = 2 allows */
        err[0] = '\0';
        CHECK(moe_model_forward(&m, ids[0], tg[0], B_SEQ, 1, 12, NULL, err, sizeof err) == -1);
        CHECK_MSG(strstr(err, "pending") != NULL, "message: %s", err);
        double norm = -1.0;
        CHECK(moe_model_collect(&m, &norm, err, sizeof err) == 0);
        CHECK(m.n_results == 2 && m.n_pending == 0);
        CHECK_MSG(memcmp(&m.results_out[0].loss, &direct[0].loss, sizeof(double)) == 0 &&
                      m.results_out[0].n_targets == direct[0].n_targets &&
                      m.results_out[0].n_correct == direct[0].n_correct,
                  "pending result 0: loss %.17g, direct %.17g", m.results_out[0].loss, direct[0].loss);
        /* aux is the last forward's */
        CHECK_MSG(same_result(&m.results_out[1], &direct[1]), "pending result 1: loss %.17g / %.17g, aux %.17g / %.17g",
                  m.results_out[1].loss, direct[1].loss, m.results_out[1].aux, direct[1].aux);
        CHECK(direct[0].n_targets == B_SEQ * S_LEN - 1 && isfinite(direct[0].loss) && direct[0].aux > 0.0);
        /* the gradient norm slot is what clip_grad_norm wrote */
        float g[3] = {3.0f, 4.0f, 0.0f};
        be->clip_grad_norm(be, g, 3, 1.0, m.grad_norm);
        CHECK(moe_model_collect(&m, &norm, err, sizeof err) == 0);
        CHECK(norm == 5.0 && m.n_results == 0);
        const float a = (float)(1.0 / 5.0);
        CHECK(g[0] == 3.0f * a && g[1] == 4.0f * a && g[2] == 0.0f);
        moe_model_destroy(&m);
    }
    moe_backend_destroy(be);
}

static void put_record(moe_model *m, int layer, int32_t code, int32_t t, int32_t k, int32_t value, int32_t extra) {
    int32_t r[MOE_CHECK_RECORD_WORDS] = {code, t, k, value, extra, 0, 0, 0};
    m->be->from_host(m->be, m->blocks[layer].moe.record, r, sizeof r);
}

static void expect_message(moe_model *m, const char *want1, const char *want2) {
    char err[1024] = "";
    int rc = moe_model_check(m, err, sizeof err);
    CHECK_MSG(rc == -1 && strstr(err, "'softk'") && strstr(err, want1) && (!want2 || strstr(err, want2)),
              "moe_model_check returned %d, message '%s'; expected '%s'%s%s", rc, err, want1, want2 ? " and " : "",
              want2 ? want2 : "");
    CHECK_MSG(moe_model_check(m, err, sizeof err) == 0, "the records were not cleared: %s", err);
}

static void test_records(const moe_router_lib *lib) {
    char err[1024];
    moe_backend *be = moe_backend_cpu_create(1);
    moe_model m;
    int rc = open_model(&m, be, lib, NULL, 1, err, sizeof err);
    CHECK_MSG(rc == 0, "create: %s", err);
    if (rc == 0) {
        CHECK(moe_model_check(&m, err, sizeof err) == 0);
        float nan = NAN;
        int32_t nan_bits;
        memcpy(&nan_bits, &nan, sizeof nan_bits);
        put_record(&m, 1, MOE_CHECK_EXPERT, 5, 1, 9, 3);
        expect_message(&m, "returned expert[5,1] = 9, outside [-1, 3)", NULL);
        put_record(&m, 1, MOE_CHECK_EXPERT, 5, 1, 9, 3);
        put_record(&m, 0, MOE_CHECK_WEIGHT, 2, 0, nan_bits, 0); /* the lower layer is reported */
        expect_message(&m, "returned weight[2,0] = nan", "finite and >= 0");
        put_record(&m, 0, MOE_CHECK_SLOT, 4, 1, 7, 6);
        expect_message(&m, "returned slot[4,1] = 7, outside its capacity [0, 6)", NULL);
        put_record(&m, 1, MOE_CHECK_SLOT_TWICE, 4, 0, 2, 1);
        expect_message(&m, "gave two tokens slot 2 of expert 1", NULL);
        {
            int32_t r[MOE_CHECK_RECORD_WORDS] = {MOE_CHECK_SLOT_GAP, 0, 0, 3, 2, 7, 0, 0};
            be->from_host(be, m.blocks[0].moe.record, r, sizeof r);
            expect_message(&m, "(layer 0) declares MOE_ROUTER_DENSE_SLOTS, but expert 2's 7 assignments leave its "
                               "slot 3 empty (they must fill slots 0 .. 6)",
                           "must not set MOE_ROUTER_DENSE_SLOTS");
        }
        put_record(&m, 0, MOE_CHECK_GUARD_FORWARD, 3, 0, 0, 0);
        expect_message(&m, "wrote past its workspace in forward", "byte 3 after the end");
        put_record(&m, 1, MOE_CHECK_GUARD_BACKWARD, 0, 0, 0, 0);
        expect_message(&m, "wrote past its workspace in backward", NULL);
        /* the plugin's inputs, checked by the host on CUDA (index t * E + e, E = 3 here) */
        put_record(&m, 0, MOE_CHECK_LOGIT, 3 * 5 + 2, 0, nan_bits, 0);
        expect_message(&m, "logit of token 5, expert 2 is nan", "the gate produced a non-finite value");
        put_record(&m, 1, MOE_CHECK_ROUTE_LOGIT, 3 * 7 + 1, 0, nan_bits, 0);
        expect_message(&m, "perturbed logit of token 7, expert 1 is nan", NULL);
        /* l and l' checked in one pass over both (T = 40 here: 2 T E = 240 values) */
        put_record(&m, 0, MOE_CHECK_ROUTE_LOGIT, 3 * 5 + 2, 0, nan_bits, 240);
        expect_message(&m, "forward failed: logit of token 5, expert 2 is nan", "the gate produced a non-finite value");
        put_record(&m, 1, MOE_CHECK_ROUTE_LOGIT, 120 + 3 * 39 + 2, 0, nan_bits, 240);
        expect_message(&m, "forward failed: perturbed logit of token 39, expert 2 is nan", "perturbation");
        put_record(&m, 1, MOE_CHECK_ROUTE_LOGIT, 3 * 39 + 2, 0, nan_bits, 240);
        expect_message(&m, "forward failed: logit of token 39, expert 2 is nan", NULL);
        /* token ids outside the vocabulary are refused before anything runs */
        {
            int32_t bad_ids[B_SEQ * S_LEN], bad_tg[B_SEQ * S_LEN];
            make_batch(bad_ids, bad_tg, 5);
            bad_ids[9] = m.V;
            moe_forward_result bfr;
            err[0] = '\0';
            CHECK(moe_model_forward(&m, bad_ids, bad_tg, B_SEQ, 0, 0, &bfr, err, sizeof err) == -1);
            CHECK_MSG(strstr(err, "token 9 of the batch has id") != NULL, "message: %s", err);
        }
        /* a forward with a result reports a record too, and clears it */
        int32_t ids[B_SEQ * S_LEN], tg[B_SEQ * S_LEN];
        make_batch(ids, tg, 3);
        put_record(&m, 1, MOE_CHECK_EXPERT, 0, 0, -4, 3);
        moe_forward_result fr;
        err[0] = '\0';
        CHECK(moe_model_forward(&m, ids, tg, B_SEQ, 0, 0, &fr, err, sizeof err) == -1);
        CHECK_MSG(strstr(err, "'softk'") && strstr(err, "expert[0,0] = -4"), "message: %s", err);
        CHECK(moe_model_forward(&m, ids, tg, B_SEQ, 0, 0, &fr, err, sizeof err) == 0);
        moe_model_destroy(&m);
    }
    moe_backend_destroy(be);
}

static void test_bad_router(void) {
    static const char *const want[] = {"expert", "expert", "weight", "weight", "slot", "slot", "deliberate failure",
                                       "", "workspace", "declares MOE_ROUTER_DENSE_SLOTS, but expert 0's", ""};
    char err[1024];
    moe_router_lib lib;
    if (moe_router_lib_open_file(&lib, MOE_TEST_BAD_ROUTER, err, sizeof err) != 0) {
        CHECK_MSG(0, "%s", err);
        return;
    }
    for (int mode = 0; mode <= 10; ++mode) {
        moe_option opt = {"mode", MOE_OPT_INT, mode, (double)mode, NULL};
        moe_backend *be = moe_backend_cpu_create(1);
        moe_model m;
        int rc = open_model(&m, be, &lib, &opt, 1, err, sizeof err);
        CHECK_MSG(rc == 0, "bad_router mode %d: create: %s", mode, err);
        if (rc == 0) {
            int32_t ids[B_SEQ * S_LEN], tg[B_SEQ * S_LEN];
            make_batch(ids, tg, 4);
            for (int with_out = 0; with_out < 2; ++with_out) {
                moe_forward_result fr;
                err[0] = '\0';
                rc = moe_model_forward(&m, ids, tg, B_SEQ, 1, 1, with_out ? &fr : NULL, err, sizeof err);
                if (mode == 7 || mode == 10) {
                    CHECK_MSG(rc == 0, "bad_router control: %s", err);
                    if (rc == 0) CHECK(moe_model_backward(&m, 1, err, sizeof err) == 0);
                    if (!with_out) CHECK(moe_model_collect(&m, NULL, err, sizeof err) == 0 && m.n_results == 1);
                } else {
                    CHECK_MSG(rc == -1 && strstr(err, "bad_router") != NULL && strstr(err, want[mode]) != NULL,
                              "bad_router mode %d (%s a result): returned %d, message '%s' should name the router and "
                              "'%s'",
                              mode, with_out ? "with" : "without", rc, err, want[mode]);
                }
                CHECK_MSG(moe_model_check(&m, err, sizeof err) == 0, "mode %d: a record was left: %s", mode, err);
            }
            moe_model_destroy(&m);
        }
        moe_backend_destroy(be);
    }
    moe_router_lib_close(&lib);
}

int main(void) {
    char err[1024];
    moe_router_lib lib;
    if (moe_router_lib_open_file(&lib, MOE_TEST_PLUGIN_DIR "/softk.so", err, sizeof err) != 0) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    test_pending_equals_direct(&lib);
    test_records(&lib);
    moe_router_lib_close(&lib);
    test_bad_router();
    return moe_test_summary("test_model_check");
}
