/*
 * Sweeps: one config file describing many runs.
 *
 * A [sweep] table in a config file lists what varies; the rest of the file
 * is the base config every run starts from:
 *
 *     [sweep]
 *     name = "expA"                        # experiment folder under run.out_dir (default run.name)
 *     seeds = [42, 43, 44]                 # default: run.seed only
 *     parallel = 1                         # runs at once, each a child `moehost train` process
 *     csv = "noise"                        # also the routing-noise study's CSV (default "standard")
 *     "router.plugin" = ["top1", "softk"]  # grid axes: quoted config keys, each a non-empty list
 *     "moe.capacity_factor" = [1.0, 1.25]
 *
 * The grid is the cartesian product of the axes in the order written (the
 * first axis varies slowest), times the seeds (innermost). Each point runs
 * as the base config plus --set overrides: its axis values, run.seed,
 * run.name (the point's name) and run.out_dir = <run.out_dir>/<experiment>,
 * after the user's own --set overrides (`--set sweep.KEY=...` changes the
 * table itself: moe_sweep_apply_sets).
 *
 * Running a sweep skips points whose summary.json exists, resumes points
 * with a checkpoint.bin and starts the rest, so a sweep killed at any moment
 * and started again loses at most one evaluation interval per running
 * point. It ends with summary.csv and summary.md in the experiment folder
 * and the figures of `moehost report` (runtime/report.h).
 */
#ifndef MOE_SWEEP_H
#define MOE_SWEEP_H

#include <stddef.h>
#include <stdint.h>

#include "runtime/config.h"

#define MOE_SWEEP_MAX_AXES 16
#define MOE_SWEEP_MAX_POINTS 4096
#define MOE_SWEEP_KEY 128
/* Room for one "section.key=value" override, the value a quoted config string. */
#define MOE_SWEEP_SET_CAP (MOE_SWEEP_KEY + 6 * MOE_CFG_STR + 16)

typedef struct moe_sweep_axis {
    char key[MOE_SWEEP_KEY];  /* "moe.capacity_factor" */
    char short_name[MOE_SWEEP_KEY]; /* in point names before a number: "cf"; see moe_sweep_plan_make */
    int line;                 /* where the key is written */
    int n_values;
    char **texts;             /* each value as TOML text, the way --set takes it: 1.25, "top1" */
    char **labels;            /* each value as read: 1.25, top1 */
    int *is_string;
} moe_sweep_axis;

typedef struct moe_sweep {
    char source[MOE_CFG_STR]; /* the config file */
    int line;                 /* of the [sweep] header */
    char name[MOE_CFG_STR];   /* "" = run.name */
    int name_line;
    int parallel;
    int64_t *seeds;           /* NULL = run.seed only */
    int n_seeds, seeds_line;
    char csv[16];             /* "standard" | "noise" */
    int n_axes;
    moe_sweep_axis axes[MOE_SWEEP_MAX_AXES];
} moe_sweep;

/* Read the [sweep] table of a config file. 1 when there is one (sw filled;
 * free it with moe_sweep_free), 0 when there is none, -1 with "FILE:LINE:
 * ..." in err when it is malformed: an unknown reserved key, an axis that
 * is not a list or is an empty one, a value listed twice, a bad seeds /
 * name / parallel / csv. Whether the axes name config keys and their values
 * fit them is checked by moe_sweep_plan_make. */
int moe_sweep_load(const char *path, moe_sweep *sw, char *err, size_t errcap);
void moe_sweep_free(moe_sweep *sw);

/* Command-line changes to the table: "sweep.seeds=[42]", "sweep.parallel=4",
 * "sweep.name=x", "sweep.csv=noise", or an axis "sweep.moe.top_k=[1, 2]"
 * (replaces that axis' list in place, or adds the axis at the end). Values
 * are TOML, a bare word a string. 0 ok; -1 + err ("--set sweep.KEY: ..."),
 * after which sw must only be freed. */
int moe_sweep_apply_sets(moe_sweep *sw, const char *const *sets, int n_sets, char *err, size_t errcap);

typedef struct moe_sweep_point {
    int value[MOE_SWEEP_MAX_AXES]; /* index into each axis' values */
    int group;                /* grid point (axis values, seeds apart), 0-based in grid order */
    int64_t seed;
    char name[MOE_CFG_STR];   /* run.name: e.g. "top1-cf1.25-s42" */
    double noise_std;         /* router noise_std as the plugin resolves it (csv = "noise"), else NAN */
    double aux_loss_weight;   /* moe.aux_loss_weight */
} moe_sweep_point;

typedef struct moe_sweep_plan {
    const moe_sweep *sw;      /* borrowed */
    const char *config_path;  /* borrowed */
    const char *const *user_sets; /* borrowed: the user's --set overrides */
    int n_user_sets;
    char experiment[MOE_CFG_STR];
    char dir[MOE_CFG_STR];    /* <run.out_dir>/<experiment> */
    int n_points, n_groups;
    moe_sweep_point *points;  /* grid order: first axis slowest, seeds innermost */
} moe_sweep_plan;

/* Expand the grid and check every point before anything runs: each axis
 * value applied as an override to the base config (the file plus the
 * user's --set), then each point's whole config, then (check_plugins) its
 * router options against the plugin's option table. A user --set of a
 * swept key, of run.seed when seeds are listed, or of run.name when the
 * sweep has a name is refused. 0 ok; -1 + err naming FILE:LINE and the key. */
int moe_sweep_plan_make(moe_sweep_plan *plan, const moe_sweep *sw, const char *config_path,
                        const char *const *user_sets, int n_user_sets, int check_plugins, char *err,
                        size_t errcap);
void moe_sweep_plan_free(moe_sweep_plan *plan);

/* The sweep's own overrides of point p, in order: one per axis, run.seed,
 * run.name, run.out_dir. Returns how many (at most MOE_SWEEP_MAX_AXES + 3). */
int moe_sweep_point_sets(const moe_sweep_plan *plan, int p, char sets[][MOE_SWEEP_SET_CAP]);

typedef struct moe_sweep_options {
    long long stop_after;     /* > 0: passed to every run (--stop-after) */
    int quiet;                /* passed to every run (--quiet) */
    int report;               /* draw the figures at the end */
} moe_sweep_options;

/* Run every point (child processes of /proc/self/exe, at most sw->parallel
 * at once, output in <point>/train.log), printing one line per point; then
 * write the summaries and, with opt->report, the figures. 0 when every
 * point finished (or stopped as --stop-after asked), 1 when any failed (the
 * others still ran), -1 + err when the sweep could not run at all. */
int moe_sweep_run(const moe_sweep_plan *plan, const moe_sweep_options *opt, char *err, size_t errcap);

/* summary.csv and summary.md (and, for csv = "noise", the noise study's
 * CSV) from the summary.json of the finished points, written atomically.
 * Sets *n_done to the points that had results. 0 ok, -1 + err. */
int moe_sweep_write_summaries(const moe_sweep_plan *plan, int *n_done, char *err, size_t errcap);

/* File name of the routing-noise study's CSV (csv = "noise"). */
#define MOE_SWEEP_NOISE_CSV "moe_routing_noise_experiment_results.csv"

#endif
