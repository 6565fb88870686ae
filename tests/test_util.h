/*
 * A minimal test harness: CHECK-style assertions that count failures and
 * keep going, so one run reports every broken case. Each test program ends
 * with `return moe_test_summary("name");` which prints "N passed, M failed"
 * and returns non-zero when anything failed.
 */
#ifndef MOE_TEST_UTIL_H
#define MOE_TEST_UTIL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int moe_test_passed_ = 0;
static int moe_test_failed_ = 0;

#define CHECK(cond)                                                                     \
    do {                                                                                \
        if (cond) {                                                                     \
            ++moe_test_passed_;                                                         \
        } else {                                                                        \
            ++moe_test_failed_;                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);    \
        }                                                                               \
    } while (0)

#define CHECK_MSG(cond, ...)                                                            \
    do {                                                                                \
        if (cond) {                                                                     \
            ++moe_test_passed_;                                                         \
        } else {                                                                        \
            ++moe_test_failed_;                                                         \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);    \
            fprintf(stderr, __VA_ARGS__);                                               \
            fputc('\n', stderr);                                                        \
        }                                                                               \
    } while (0)

/* |a - b| <= atol + rtol * |b| */
#define CHECK_CLOSE(a, b, rtol, atol)                                                   \
    do {                                                                                \
        double a_ = (double)(a), b_ = (double)(b);                                      \
        int ok_ = fabs(a_ - b_) <= (atol) + (rtol) * fabs(b_);                          \
        CHECK_MSG(ok_, "%s = %.9g, %s = %.9g", #a, a_, #b, b_);                         \
    } while (0)

/* Deterministic test randomness (xorshift64*), independent of the code under test. */
typedef struct { uint64_t s; } moe_test_rng;
static inline uint64_t moe_test_next(moe_test_rng *r) {
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 2685821657736338717ULL;
}
/* uniform in [lo, hi) */
static inline float moe_test_uniform(moe_test_rng *r, float lo, float hi) {
    return lo + (hi - lo) * (float)((moe_test_next(r) >> 40) * (1.0 / 16777216.0));
}
static inline void moe_test_fill(moe_test_rng *r, float *x, size_t n, float lo, float hi) {
    for (size_t i = 0; i < n; ++i) x[i] = moe_test_uniform(r, lo, hi);
}

static inline int moe_test_summary(const char *name) {
    printf("%s: %d passed, %d failed\n", name, moe_test_passed_, moe_test_failed_);
    return moe_test_failed_ ? 1 : 0;
}

#endif
