#include "runtime/stats.h"

#include <math.h>

/* t(0.975, df) for df = 1..30, to 10 decimals (computed from the regularized
 * incomplete beta function; tests/sweep/test_sweep_stats.c checks them
 * against an independent numerical integration and textbook values). */
static const double t975[31] = {
    NAN,          12.7062047362, 4.3026527297, 3.1824463053, 2.7764451052, 2.5705818356, 2.4469118511,
    2.3646242516, 2.3060041352,  2.2621571628, 2.2281388520, 2.2009851601, 2.1788128297, 2.1603686565,
    2.1447866879, 2.1314495456,  2.1199052992, 2.1098155778, 2.1009220402, 2.0930240544, 2.0859634473,
    2.0796138447, 2.0738730679,  2.0686576104, 2.0638985616, 2.0595385528, 2.0555294386, 2.0518305165,
    2.0484071418, 2.0452296421,  2.0422724563,
};

double moe_t_quantile_975(int df) {
    if (df < 1) return NAN;
    if (df <= 30) return t975[df];
    /* Cornish-Fisher expansion of the t quantile around the normal one. */
    const double z = 1.959963984540054, n = (double)df;
    double z2 = z * z, z3 = z2 * z, z5 = z3 * z2, z7 = z5 * z2, z9 = z7 * z2;
    return z + (z3 + z) / (4 * n) + (5 * z5 + 16 * z3 + 3 * z) / (96 * n * n) +
           (3 * z7 + 19 * z5 + 17 * z3 - 15 * z) / (384 * n * n * n) +
           (79 * z9 + 776 * z7 + 1482 * z5 - 1920 * z3 - 945 * z) / (92160 * n * n * n * n);
}

void moe_stats_of(const double *x, int n, moe_stats *s) {
    double sum = 0.0;
    int used = 0;
    for (int i = 0; i < n; ++i)
        if (isfinite(x[i])) {
            sum += x[i];
            used++;
        }
    s->n = used;
    s->mean = used ? sum / used : NAN;
    s->std = s->half = s->lo = s->hi = NAN;
    if (used == 0) return;
    s->lo = s->hi = s->mean;
    if (used < 2) return;
    double ss = 0.0;
    for (int i = 0; i < n; ++i)
        if (isfinite(x[i])) ss += (x[i] - s->mean) * (x[i] - s->mean);
    s->std = sqrt(ss / (used - 1));
    s->half = moe_t_quantile_975(used - 1) * s->std / sqrt((double)used);
    s->lo = s->mean - s->half;
    s->hi = s->mean + s->half;
}
