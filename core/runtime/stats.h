/*
 * Small statistics over the seeds of a sweep point: mean, sample standard
 * deviation and the 95% confidence interval of the mean from Student's t
 * distribution with n-1 degrees of freedom.
 */
#ifndef MOE_STATS_H
#define MOE_STATS_H

/* The 0.975 quantile of Student's t with df degrees of freedom (the factor of
 * a two-sided 95% interval): tabulated for df 1..30, the Cornish-Fisher
 * expansion beyond (error below 1e-7). NAN for df < 1. */
double moe_t_quantile_975(int df);

typedef struct moe_stats {
    int n;          /* values used (non-finite ones are skipped) */
    double mean;    /* NAN when n == 0 */
    double std;     /* sample standard deviation (n-1 in the denominator); NAN when n < 2 */
    double half;    /* CI half-width t(0.975, n-1) * std / sqrt(n); NAN when n < 2 */
    double lo, hi;  /* mean -+ half */
} moe_stats;

/* Statistics of the finite values among x[0..n). */
void moe_stats_of(const double *x, int n, moe_stats *s);

#endif
