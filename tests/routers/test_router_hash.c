/*
 * The hash router (Hash Layers) through its ABI: fixed experts per id,
 * K distinct experts, weights 1/K, balance over a vocabulary, the position
 * variant, the hash itself against an independent recomputation, and the
 * errors it must answer.
 */
#include "router_harness.h"

/* splitmix64's output for state v (Steele, Lea & Flood 2014), written again
 * here from its definition so the test does not trust the plugin's copy:
 *   z = v + 0x9E3779B97F4A7C15   (2^64 / golden ratio, the splitmix64 increment)
 *   z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
 *   z = (z ^ (z >> 27)) * 0x94D049BB133111EB
 *   h = z ^ (z >> 31)
 * (the two multipliers are Stafford's "Mix13" constants). */
static uint64_t ref_splitmix64(uint64_t v) {
    uint64_t z = v + 0x9E3779B97F4A7C15ull;
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}

static int ref_gcd(int a, int b) { return b == 0 ? a : ref_gcd(b, a % b); }

/* The routing rule of the design, from the definition. */
static void ref_experts(uint64_t h, int E, int K, int32_t *out) {
    int e0 = (int)(h % (uint64_t)E);
    int s = E > 1 ? 1 + (int)((h >> 32) % (uint64_t)(E - 1)) : 0;
    while (E > 1 && ref_gcd(s, E) != 1) ++s;
    for (int j = 0; j < K; ++j) out[j] = (int32_t)((e0 + (long long)j * s) % E);
}

static rh_router make(const struct moe_router_plugin_v1 *p, int E, int K, int vocab, int max_tokens, const char *key) {
    rh_router r;
    moe_option o = rh_opt_str("key", key);
    moe_status st = rh_create(&r, p, rh_dims(E, K, 16, vocab, max_tokens, 1.0), &o, 1);
    CHECK_MSG(st == MOE_OK, "create E=%d K=%d key=%s: %s", E, K, key, r.msg);
    return r;
}

static void test_table(const struct moe_router_plugin_v1 *p) {
    rh_check_table(p, "hash", 1);
    rh_router r = make(p, 8, 2, 100, 16, "token");
    CHECK(r.info.k_out == 2);
    CHECK(r.info.flags == (MOE_ROUTER_IGNORES_LOGITS | MOE_ROUTER_NO_GRAD | MOE_ROUTER_WEIGHT_SUM_EXACT));
    CHECK(r.info.weight_sum == 1.0f);
    CHECK(r.info.n_params == 0 && r.info.n_buffers == 0);
    rh_destroy(&r);
}

/* The published first output of splitmix64 seeded with 0 is
 * 0xE220A8397B1DCDAF; the plugin's mix of id 0 is that value. By hand:
 *   E = 8: e_0 = h mod 8 = low 3 bits of 0x...AF (binary ...10101111) = 7;
 *          h >> 32 = 0xE220A839 = 3793791033 = 7 * 541970147 + 4, so
 *          s = 1 + 4 = 5, gcd(5, 8) = 1; experts 7, 12 mod 8 = 4, 17 mod 8 = 1.
 *   E = 6: h = 16294208416658607535 = 6 * 2715701402776434589 + 1, e_0 = 1;
 *          3793791033 mod 5 = 3 (last digit), s = 4, gcd(4, 6) = 2 so s = 5,
 *          gcd(5, 6) = 1; experts 1, 6, 11, 16, 21, 26 mod 6 = 1 0 5 4 3 2. */
static void test_hand_value(const struct moe_router_plugin_v1 *p) {
    CHECK(ref_splitmix64(0) == 0xE220A8397B1DCDAFull);

    rh_router r = make(p, 8, 3, 10, 4, "token");
    int32_t ids[1] = {0};
    rh_call c = {.T = 1, .ids = ids};
    rh_alloc_outputs(&r, &c);
    CHECK(rh_forward(&r, &c) == MOE_OK);
    CHECK(c.expert[0] == 7 && c.expert[1] == 4 && c.expert[2] == 1);
    rh_free_outputs(&c);
    rh_destroy(&r);

    r = make(p, 6, 6, 10, 4, "token");
    rh_alloc_outputs(&r, &c);
    CHECK(rh_forward(&r, &c) == MOE_OK);
    const int32_t want[6] = {1, 0, 5, 4, 3, 2};
    CHECK(memcmp(c.expert, want, sizeof want) == 0);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

/* For every K = 1..E: the experts of each id match the recomputed rule, are
 * K distinct values in [0,E), and each weight is exactly 1/K. */
static void test_distinct_and_reference(const struct moe_router_plugin_v1 *p, int E) {
    enum { T = 200, VOCAB = 1000 };
    int32_t ids[T];
    for (int t = 0; t < T; ++t) ids[t] = (int32_t)((t * 7919) % VOCAB);
    for (int K = 1; K <= E; ++K) {
        rh_router r = make(p, E, K, VOCAB, T, "token");
        rh_call c = {.T = T, .ids = ids};
        rh_alloc_outputs(&r, &c);
        CHECK(rh_forward(&r, &c) == MOE_OK);
        int bad_range = 0, dup = 0, bad_weight = 0, mismatch = 0;
        for (int t = 0; t < T; ++t) {
            const int32_t *ex = c.expert + (size_t)t * K;
            int32_t ref[64];
            ref_experts(ref_splitmix64((uint64_t)ids[t]), E, K, ref);
            for (int j = 0; j < K; ++j) {
                bad_range += ex[j] < 0 || ex[j] >= E;
                mismatch += ex[j] != ref[j];
                bad_weight += c.weight[(size_t)t * K + j] != 1.0f / (float)K;
                for (int q = 0; q < j; ++q) dup += ex[q] == ex[j];
            }
        }
        CHECK_MSG(bad_range == 0 && dup == 0, "E=%d K=%d: %d out of range, %d duplicates", E, K, bad_range, dup);
        CHECK_MSG(bad_weight == 0, "E=%d K=%d: %d weights != 1/K", E, K, bad_weight);
        CHECK_MSG(mismatch == 0, "E=%d K=%d: %d experts differ from the reference rule", E, K, mismatch);
        rh_free_outputs(&c);
        rh_destroy(&r);
    }
}

/* The same id gets the same experts wherever it sits and in whichever call. */
static void test_same_id_same_experts(const struct moe_router_plugin_v1 *p) {
    rh_router r = make(p, 8, 2, 100, 8, "token");
    int32_t ids_a[5] = {42, 7, 42, 99, 42};
    int32_t ids_b[2] = {99, 42};
    rh_call a = {.T = 5, .ids = ids_a}, b = {.T = 2, .ids = ids_b};
    rh_alloc_outputs(&r, &a);
    rh_alloc_outputs(&r, &b);
    CHECK(rh_forward(&r, &a) == MOE_OK);
    CHECK(rh_forward(&r, &b) == MOE_OK);
    /* id 42 at positions 0, 2, 4 of a and 1 of b; id 99 at 3 of a and 0 of b */
    CHECK(memcmp(a.expert + 0, a.expert + 4, 2 * sizeof(int32_t)) == 0);
    CHECK(memcmp(a.expert + 0, a.expert + 8, 2 * sizeof(int32_t)) == 0);
    CHECK(memcmp(a.expert + 0, b.expert + 2, 2 * sizeof(int32_t)) == 0);
    CHECK(memcmp(a.expert + 6, b.expert + 0, 2 * sizeof(int32_t)) == 0);
    rh_free_outputs(&a);
    rh_free_outputs(&b);
    rh_destroy(&r);
}

/* Balance over a vocabulary: 50000 ids, E = 8, K = 1. If the hash behaves
 * like a uniform random function, each count is Binomial(50000, 1/8): mean
 * 6250, std sqrt(50000 * 1/8 * 7/8) = sqrt(5468.75) ~ 74. The bound 5% of
 * 6250 = 312 is ~4.2 std: a good hash passes, a biased one (e.g. one that
 * favours small residues) fails. */
static void test_balance(const struct moe_router_plugin_v1 *p) {
    enum { V = 50000, E = 8 };
    rh_router r = make(p, E, 1, V, V, "token");
    int32_t *ids = malloc(V * sizeof(int32_t));
    for (int t = 0; t < V; ++t) ids[t] = t;
    rh_call c = {.T = V, .ids = ids};
    rh_alloc_outputs(&r, &c);
    CHECK(rh_forward(&r, &c) == MOE_OK);
    int count[E] = {0};
    for (int t = 0; t < V; ++t)
        if (c.expert[t] >= 0 && c.expert[t] < E) ++count[c.expert[t]];
    for (int e = 0; e < E; ++e) CHECK_MSG(abs(count[e] - 6250) <= 312, "expert %d got %d of 50000", e, count[e]);
    rh_free_outputs(&c);
    free(ids);
    rh_destroy(&r);
}

/* key = "position": experts follow t, not the id. */
static void test_position(const struct moe_router_plugin_v1 *p) {
    enum { T = 64, E = 8, K = 2 };
    rh_router r = make(p, E, K, 0, T, "position"); /* position mode needs no vocabulary */
    int32_t same[T], other[T];
    for (int t = 0; t < T; ++t) {
        same[t] = 5;
        other[t] = 1000 + 3 * t;
    }
    rh_call a = {.T = T, .ids = same}, b = {.T = T, .ids = other}, n = {.T = T, .ids = NULL};
    rh_alloc_outputs(&r, &a);
    rh_alloc_outputs(&r, &b);
    rh_alloc_outputs(&r, &n);
    CHECK(rh_forward(&r, &a) == MOE_OK);
    CHECK(rh_forward(&r, &b) == MOE_OK);
    CHECK(rh_forward(&r, &n) == MOE_OK); /* ids are not needed */
    CHECK(memcmp(a.expert, b.expert, sizeof(int32_t) * T * K) == 0);
    CHECK(memcmp(a.expert, n.expert, sizeof(int32_t) * T * K) == 0);
    int differs = 0, mismatch = 0;
    for (int t = 0; t < T; ++t) {
        differs += a.expert[t * K] != a.expert[0];
        int32_t ref[K];
        ref_experts(ref_splitmix64((uint64_t)t), E, K, ref);
        mismatch += a.expert[t * K] != ref[0] || a.expert[t * K + 1] != ref[1];
    }
    CHECK_MSG(differs > 0, "one id at 64 positions always went to expert %d", a.expert[0]);
    CHECK(mismatch == 0);
    rh_free_outputs(&a);
    rh_free_outputs(&b);
    rh_free_outputs(&n);
    rh_destroy(&r);
}

static void test_backward_and_empty(const struct moe_router_plugin_v1 *p) {
    enum { T = 3, E = 4 };
    rh_router r = make(p, E, 2, 10, T, "token");
    int32_t ids[T] = {1, 2, 3};
    rh_call c = {.T = T, .ids = ids};
    rh_alloc_outputs(&r, &c);
    CHECK(rh_forward(&r, &c) == MOE_OK);
    float cw[T * 2] = {1, 2, 3, 4, 5, 6};
    float dlogits[T * E];
    for (int i = 0; i < T * E; ++i) dlogits[i] = 123.0f; /* must be overwritten */
    CHECK(rh_backward(&r, &c, cw, NULL, dlogits, NULL) == MOE_OK);
    int nonzero = 0;
    for (int i = 0; i < T * E; ++i) nonzero += dlogits[i] != 0.0f;
    CHECK(nonzero == 0);
    rh_free_outputs(&c);

    rh_call z = {.T = 0, .ids = NULL}; /* T = 0 is a no-op, even with NULL ids */
    rh_alloc_outputs(&r, &z);
    CHECK(rh_forward(&r, &z) == MOE_OK);
    rh_free_outputs(&z);
    rh_destroy(&r);
}

static void test_errors(const struct moe_router_plugin_v1 *p) {
    const moe_router_dims d = rh_dims(8, 2, 16, 100, 8, 1.0);
    rh_expect_option_error(p, d, rh_opt_str("hash", "token"), "'hash'", NULL);
    rh_expect_option_error(p, d, rh_opt_int("key", 3), "'key'", NULL);
    rh_expect_option_error(p, d, rh_opt_str("key", "word"), "'key'", "word");
    rh_check_refuses_bad_dims(p, d);
    rh_expect_create_error(p, rh_dims(8, 2, 16, 0, 8, 1.0), NULL, 0, MOE_ERR_INVALID_ARG, NULL, NULL); /* no vocabulary */

    rh_router r = make(p, 8, 2, 100, 8, "token");
    int32_t ids[4] = {0, 99, 100, 5};
    rh_call c = {.T = 4, .ids = ids};
    rh_alloc_outputs(&r, &c);
    CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r.msg, "token 2") != NULL && strstr(r.msg, "100") != NULL, "%s", r.msg);
    ids[2] = -1;
    CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r.msg, "token 2") != NULL, "%s", r.msg);
    c.ids = NULL;
    CHECK(rh_forward(&r, &c) == MOE_ERR_INVALID_ARG);
    CHECK_MSG(strstr(r.msg, "token_ids") != NULL, "%s", r.msg);
    rh_free_outputs(&c);
    rh_destroy(&r);
}

int main(void) {
    const struct moe_router_plugin_v1 *p = rh_load("hash");
    test_table(p);
    test_hand_value(p);
    test_distinct_and_reference(p, 8);
    test_distinct_and_reference(p, 6);
    test_same_id_same_experts(p);
    test_balance(p);
    test_position(p);
    test_backward_and_empty(p);
    test_errors(p);
    return moe_test_summary("test_router_hash");
}
