/*
 * The statistics of sweep summaries (runtime/stats.h): the Student t
 * quantile table against an independent numerical integration of the t
 * density and against textbook values, and mean / std / confidence
 * interval against hand-computed values. Also the exact number format of
 * summary.csv.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "runtime/report.h"
#include "runtime/stats.h"
#include "test_util.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

/* P(T <= x) for Student t with df degrees of freedom, x >= 0: 1/2 plus the
 * integral of the density over [0, x] by composite Simpson. */
static double t_cdf(double x, int df) {
    double nu = df;
    double c = exp(lgamma((nu + 1) / 2) - lgamma(nu / 2)) / sqrt(nu * M_PI);
    const int n = 20000; /* even */
    double h = x / n, sum = 0.0;
    for (int i = 0; i <= n; ++i) {
        double t = i * h;
        double f = c * pow(1.0 + t * t / nu, -(nu + 1) / 2);
        sum += f * (i == 0 || i == n ? 1 : (i % 2 ? 4 : 2));
    }
    return 0.5 + sum * h / 3;
}

/* The 0.975 quantile by bisection on t_cdf. */
static double t_quantile_numeric(int df) {
    double lo = 1.0, hi = 20.0;
    for (int it = 0; it < 60; ++it) {
        double mid = 0.5 * (lo + hi);
        if (t_cdf(mid, df) < 0.975) lo = mid;
        else hi = mid;
    }
    return 0.5 * (lo + hi);
}

static void test_t_table(void) {
    /* Every tabulated df, and the expansion beyond the table. */
    static const int dfs[] = { 1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15,  16,  17,  18,
                               19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 35, 40, 60, 100, 1000 };
    for (size_t i = 0; i < sizeof dfs / sizeof dfs[0]; ++i) {
        double want = t_quantile_numeric(dfs[i]), got = moe_t_quantile_975(dfs[i]);
        CHECK_MSG(fabs(got - want) < 2e-6, "df %d: table %.10f, numerical %.10f", dfs[i], got, want);
    }
    /* Textbook values (three decimals). */
    static const struct {
        int df;
        double t;
    } book[] = { { 1, 12.706 }, { 2, 4.303 }, { 3, 3.182 }, { 4, 2.776 },  { 5, 2.571 },
                 { 9, 2.262 },  { 10, 2.228 }, { 20, 2.086 }, { 30, 2.042 }, { 120, 1.980 } };
    for (size_t i = 0; i < sizeof book / sizeof book[0]; ++i)
        CHECK_CLOSE(moe_t_quantile_975(book[i].df), book[i].t, 0, 5e-4);
    /* Decreasing in df, towards the normal 1.959964. */
    for (int df = 1; df < 200; ++df) CHECK(moe_t_quantile_975(df + 1) < moe_t_quantile_975(df));
    CHECK_CLOSE(moe_t_quantile_975(1000000), 1.959964, 0, 1e-5);
    CHECK(isnan(moe_t_quantile_975(0)) && isnan(moe_t_quantile_975(-3)));
}

static void test_stats(void) {
    moe_stats s;
    /* 1, 2, 3, 4: mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, / (n-1) = 5/3,
     * std = sqrt(5/3) = 1.2909944487; half = t(0.975, 3) * std / sqrt(4) = 3.1824463053 * 1.2909944487 / 2
     * = 2.0542602568. */
    double a[] = { 1, 2, 3, 4 };
    moe_stats_of(a, 4, &s);
    CHECK(s.n == 4);
    CHECK_CLOSE(s.mean, 2.5, 0, 1e-15);
    CHECK_CLOSE(s.std, 1.2909944487358056, 1e-14, 0);
    CHECK_CLOSE(s.half, 2.0542602567710375, 1e-9, 0);
    CHECK_CLOSE(s.lo, 2.5 - 2.0542602567710375, 1e-9, 0);
    CHECK_CLOSE(s.hi, 2.5 + 2.0542602567710375, 1e-9, 0);

    /* Three seeds' perplexities 9.06, 8.98, 9.12: mean 27.16 / 3 = 9.0533333; deviations 0.0066667,
     * -0.0733333, 0.0666667, squares sum 0.0098667, / 2 = 0.0049333, std = 0.0702377;
     * half = 4.3026527297 * 0.0702377 / sqrt(3) = 0.1744801. */
    double b[] = { 9.06, 8.98, 9.12 };
    moe_stats_of(b, 3, &s);
    CHECK(s.n == 3);
    CHECK_CLOSE(s.mean, 9.053333333333333, 1e-14, 0);
    CHECK_CLOSE(s.std, 0.07023769168568436, 1e-9, 0);
    CHECK_CLOSE(s.half, 0.17448009870069536, 1e-8, 0);

    /* Non-finite values (a run without that value) are left out. */
    double c[] = { NAN, 1, INFINITY, 2, 3, 4 };
    moe_stats_of(c, 6, &s);
    CHECK(s.n == 4);
    CHECK_CLOSE(s.std, 1.2909944487358056, 1e-14, 0);

    /* One value: no spread, no interval. */
    double d[] = { 7.5 };
    moe_stats_of(d, 1, &s);
    CHECK(s.n == 1 && s.mean == 7.5 && isnan(s.std) && isnan(s.half) && s.lo == 7.5 && s.hi == 7.5);
    moe_stats_of(d, 0, &s);
    CHECK(s.n == 0 && isnan(s.mean));

    /* Equal values: zero spread. */
    double e[] = { 3, 3, 3 };
    moe_stats_of(e, 3, &s);
    CHECK(s.std == 0.0 && s.half == 0.0 && s.lo == 3.0);
}

static void test_format(void) {
    char buf[64];
    moe_format_exact(0.1, buf, sizeof buf);
    CHECK(strcmp(buf, "0.1") == 0);
    moe_format_exact(30, buf, sizeof buf);
    CHECK(strcmp(buf, "30") == 0);
    moe_format_exact(2.0794415416798357, buf, sizeof buf);
    CHECK(strtod(buf, NULL) == 2.0794415416798357);
    moe_format_exact(1.0 / 3.0, buf, sizeof buf);
    CHECK(strtod(buf, NULL) == 1.0 / 3.0 && strlen(buf) <= 19);
    moe_format_exact(1e-7, buf, sizeof buf);
    CHECK(strcmp(buf, "1e-07") == 0);
    moe_format_exact(NAN, buf, sizeof buf);
    CHECK(strcmp(buf, "") == 0);
}

int main(void) {
    test_t_table();
    test_stats();
    test_format();
    return moe_test_summary("test_sweep_stats");
}
