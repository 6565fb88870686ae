/*
 * Results of finished runs, and `moehost report`: figures drawn by gnuplot.
 *
 * moe_report_make(dir) looks at the run folders directly under dir (those
 * holding metrics.jsonl; finished ones also hold summary.json) and writes
 * into dir/figures/, for each figure, the data (.dat), the gnuplot script
 * (.gp, runnable again by hand: `cd figures && gnuplot frontier.gp`) and the
 * PNG:
 *   frontier      final validation perplexity against training tokens/s, one
 *                 marker per configuration (runs that differ only in seed),
 *                 error bars = std over seeds
 *   overlay       validation loss against step, one line per run
 *   expert_load   final per-expert kept assignments, layers averaged, per run
 *   capacity_drop_rate, capacity_tokens_per_s
 *                 drop rate and tokens/s against the capacity factor, one line
 *                 per (E, K), from dir/capacity.jsonl when it exists
 * Runs that differ only in run.name, run.seed and run.out_dir form one
 * configuration; the config keys that differ between configurations label it.
 */
#ifndef MOE_REPORT_H
#define MOE_REPORT_H

#include <stddef.h>

/* The values a sweep summarises, from a run's summary.json. */
enum {
    MOE_RES_VAL_LOSS,
    MOE_RES_VAL_PPL,
    MOE_RES_VAL_BPC,
    MOE_RES_VAL_ACC,
    MOE_RES_TRAIN_LOSS,
    MOE_RES_TOKENS_PER_S,
    MOE_RES_MS_PER_STEP,
    MOE_RES_DROP_RATE,
    MOE_RES_TOKEN_DROP_RATE,
    MOE_RES_LOAD_CV,
    MOE_RES_USED_CAPACITY,
    MOE_RES_ROUTER_ENTROPY,
    MOE_RES_COMBINE_ENTROPY,
    MOE_RES_AUX_LOSS,
    MOE_RES_BEST_VAL_LOSS,
    MOE_RES_BEST_VAL_PPL,
    MOE_RES_BEST_STEP,
    MOE_RES_TRAIN_TIME_S,
    MOE_RES_PEAK_MEM_GB,
    MOE_RES_COUNT
};

/* Column names, in the order above (summary.csv uses them). */
extern const char *const moe_result_names[MOE_RES_COUNT];

/* Read <run_dir>/summary.json: values of the final evaluation ("final"),
 * the best one ("best"), and the run's totals: tokens_per_s = training
 * tokens / training time over the whole run, ms_per_step = 1000 *
 * train_time_s / steps. A value the file lacks is NAN. 1 ok, 0 when there is
 * no summary.json (the run has not finished), -1 + err when it is unreadable. */
int moe_run_results_read(const char *run_dir, double v[MOE_RES_COUNT], char *err, size_t errcap);

/* Shortest text that reads back as the same double ("0.1", "2.0794415416798357",
 * "1e-05"); "" for NAN. */
void moe_format_exact(double value, char *buf, size_t cap);

/* Draw the figures of dir (see above), printing one line per figure to
 * stdout. 0 ok; -1 + err when there is nothing to plot, a file cannot be
 * written, or gnuplot is missing or fails (data and scripts are written
 * first, so they can be drawn later). */
int moe_report_make(const char *dir, char *err, size_t errcap);

#endif
