#!/usr/bin/env python3
"""Checks of sweep results for the sweep tests (tests/sweep/*.sh).

    sweepcheck.py csv SWEEP_DIR --axes K1,K2 --runs NAME,...   summary.csv against each run's summary.json
    sweepcheck.py md SWEEP_DIR                                 summary.md's statistics from summary.csv
    sweepcheck.py same-results CSV_A CSV_B                     equal but for the timing columns
    sweepcheck.py noise SWEEP_DIR                              the noise study's CSV against summary.csv
    sweepcheck.py frontier SWEEP_DIR --labels 'L=V;...'       figures/frontier.dat against summary.csv
    sweepcheck.py png FILE...                                  PNG signature, more than 1000 bytes

Prints every problem found and exits 1 if there was any.
"""
import argparse
import csv
import json
import math
import os
import re
import sys

PROBLEMS = []

RESULTS = ["val_loss", "val_ppl", "val_bpc", "val_acc", "train_loss", "tokens_per_s", "ms_per_step", "drop_rate",
           "token_drop_rate", "load_cv", "used_capacity", "router_entropy", "combine_entropy", "aux_loss",
           "best_val_loss", "best_val_ppl", "best_step", "train_time_s", "peak_mem_gb"]
FROM_FINAL = ["val_loss", "val_ppl", "val_bpc", "val_acc", "train_loss", "drop_rate", "token_drop_rate", "load_cv",
              "used_capacity", "router_entropy", "combine_entropy", "aux_loss"]
# Wall-clock and memory values: the only ones allowed to differ between identical runs.
TIMING = {"tokens_per_s", "ms_per_step", "train_time_s", "peak_mem_gb"}
NOISE_HEADER = ["seed", "noise_std", "load_balancing_weight", "val_loss", "val_accuracy", "val_perplexity",
                "training_time_minutes", "peak_memory_gb", "best_val_perplexity", "expert_usage_cv"]
NOISE_CSV = "moe_routing_noise_experiment_results.csv"
MD_COLS = ["val_ppl", "val_loss", "tokens_per_s", "drop_rate", "load_cv"]


def problem(msg):
    PROBLEMS.append(msg)


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        problem("%s is empty" % path)
        return [], []
    return rows[0], rows[1:]


def summary_json(sweep_dir, run):
    with open(os.path.join(sweep_dir, run, "summary.json")) as f:
        return json.load(f)


def check_csv(a):
    header, rows = read_csv(os.path.join(a.sweep_dir, "summary.csv"))
    axes = [k for k in a.axes.split(",") if k]
    want = axes + ["seed", "run"] + RESULTS
    if header != want:
        problem("summary.csv header %s, expected %s" % (header, want))
        return
    runs = a.runs.split(",")
    got_runs = [r[len(axes) + 1] for r in rows]
    if got_runs != runs:
        problem("summary.csv runs %s, expected %s (grid order)" % (got_runs, runs))
    for r in rows:
        row = dict(zip(header, r))
        s = summary_json(a.sweep_dir, row["run"])
        want = {k: s["final"][k] for k in FROM_FINAL}
        want.update(tokens_per_s=s["tokens_per_s"], train_time_s=s["train_time_s"], peak_mem_gb=s["peak_mem_gb"],
                    best_val_loss=s["best"]["val_loss"], best_val_ppl=s["best"]["val_ppl"],
                    best_step=s["best"]["step"], ms_per_step=1e3 * s["train_time_s"] / s["steps"])
        for k, v in want.items():
            got = float(row[k])
            if got != v and not (k == "ms_per_step" and abs(got - v) <= 1e-12 * abs(v)):
                problem("summary.csv %s %s = %r, summary.json says %r" % (row["run"], k, row[k], v))
        cfg = open(os.path.join(a.sweep_dir, row["run"], "config.toml")).read()
        seed = re.search(r"^seed = (\d+)$", cfg, re.M)
        if not seed or seed.group(1) != row["seed"]:
            problem("%s: config.toml seed %s, summary.csv seed %s" % (row["run"], seed and seed.group(1), row["seed"]))
        for k in axes:
            key = k.split(".", 1)[1]
            m = re.search(r"^%s = (.*)$" % re.escape(key), cfg, re.M)
            val = m.group(1).strip('"') if m else None
            if val is None or (val != row[k] and float_or(val) != float_or(row[k])):
                problem("%s: config.toml %s = %r, summary.csv says %r" % (row["run"], k, val, row[k]))
    print("summary.csv: %d rows checked" % len(rows))


def float_or(text):
    try:
        return float(text)
    except ValueError:
        return text


# Student t 0.975 quantile, independent of the C table: regularized incomplete
# beta function (continued fraction) and bisection.
def _betacf(a, b, x):
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + aa / c
        c = c if abs(c) > 1e-300 else 1e-300
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + aa / c
        c = c if abs(c) > 1e-300 else 1e-300
        de = d * c
        h *= de
        if abs(de - 1.0) < 1e-16:
            break
    return h


def _betai(a, b, x):
    bt = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x < (a + 1) / (a + b + 2):
        return bt * _betacf(a, b, x) / a
    return 1.0 - bt * _betacf(b, a, 1 - x) / b


def t975(df):
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if _betai(df / 2, 0.5, df / (df + mid * mid)) > 0.05:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def md_number(v):
    return "%.0f" % v if abs(v) >= 1e4 else "%.4g" % v


def stats_cell(values):
    n = len(values)
    if n == 0:
        return "—"
    mean = sum(values) / n
    if n == 1:
        return md_number(mean)
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    half = t975(n - 1) * std / math.sqrt(n)
    return "%s ± %s [%s, %s]" % (md_number(mean), md_number(std), md_number(mean - half), md_number(mean + half))


def check_md(a):
    header, rows = read_csv(os.path.join(a.sweep_dir, "summary.csv"))
    axes = header[:header.index("seed")]
    groups = {}
    for r in rows:
        row = dict(zip(header, r))
        groups.setdefault(tuple(row[k] for k in axes), []).append(row)
    text = open(os.path.join(a.sweep_dir, "summary.md")).read()
    lines = [l for l in text.splitlines() if l.startswith("| ")]
    table_header = "| " + " | ".join((axes or ["config"]) + ["n"] + MD_COLS) + " |"
    if not lines or lines[0] != table_header:
        problem("summary.md table header %r, expected %r" % (lines[:1], table_header))
        return
    for key, members in groups.items():
        cells = list(key or ("base",)) + [str(len(members))]
        cells += [stats_cell([float(m[c]) for m in members]) for c in MD_COLS]
        want = "| " + " | ".join(cells) + " |"
        if want not in lines:
            near = [l for l in lines if l.startswith("| " + " | ".join(key or ("base",)) + " |")]
            problem("summary.md lacks the row %r; it has %r" % (want, near))
    print("summary.md: %d grid points checked" % len(groups))


def check_same_results(a):
    ha, ra = read_csv(a.a)
    hb, rb = read_csv(a.b)
    if ha != hb:
        problem("headers differ: %s vs %s" % (ha, hb))
        return
    if len(ra) != len(rb):
        problem("%d rows vs %d rows" % (len(ra), len(rb)))
    compared = 0
    for x, y in zip(ra, rb):
        for k, p, q in zip(ha, x, y):
            if k in TIMING:
                continue
            compared += 1
            if p != q:
                problem("run %s: %s differs: %s vs %s" % (x[ha.index("run")], k, p, q))
    print("compared %d values of %d rows (timing columns excluded)" % (compared, len(ra)))


def check_noise(a):
    header, rows = read_csv(os.path.join(a.sweep_dir, NOISE_CSV))
    if header != NOISE_HEADER:
        problem("%s header %s, expected %s" % (NOISE_CSV, header, NOISE_HEADER))
        return
    sh, srows = read_csv(os.path.join(a.sweep_dir, "summary.csv"))
    if len(rows) != len(srows):
        problem("%s has %d rows, summary.csv %d" % (NOISE_CSV, len(rows), len(srows)))
    for r, s in zip(rows, srows):
        n = dict(zip(header, r))
        row = dict(zip(sh, s))
        cfg = open(os.path.join(a.sweep_dir, row["run"], "config.toml")).read()
        alw = float(re.search(r"^aux_loss_weight = (.*)$", cfg, re.M).group(1))
        noise = float(re.search(r"^noise_std = (.*)$", cfg, re.M).group(1))
        want = {"seed": float(row["seed"]), "noise_std": noise, "load_balancing_weight": alw,
                "val_loss": float(row["val_loss"]), "val_accuracy": float(row["val_acc"]),
                "val_perplexity": float(row["val_ppl"]), "training_time_minutes": float(row["train_time_s"]) / 60,
                "peak_memory_gb": float(row["peak_mem_gb"]), "best_val_perplexity": float(row["best_val_ppl"]),
                "expert_usage_cv": float(row["load_cv"])}
        for k, v in want.items():
            if float(n[k]) != v:
                problem("%s run %s: %s = %s, expected %r" % (NOISE_CSV, row["run"], k, n[k], v))
        if "." not in n["noise_std"] or "." not in n["load_balancing_weight"]:
            problem("%s: noise_std %r and load_balancing_weight %r should be written as floats (0.0)"
                    % (NOISE_CSV, n["noise_std"], n["load_balancing_weight"]))
    print("%s: %d rows checked" % (NOISE_CSV, len(rows)))


def check_frontier(a):
    """--labels "LABEL=AXIS_VALUES;...": the configuration labelled LABEL is the grid point whose axis
    values, joined with '|', are AXIS_VALUES."""
    header, rows = read_csv(os.path.join(a.sweep_dir, "summary.csv"))
    axes = header[:header.index("seed")]
    groups = {}
    for r in rows:
        row = dict(zip(header, r))
        groups.setdefault("|".join(row[k] for k in axes), []).append(row)
    blocks = open(os.path.join(a.sweep_dir, "figures", "frontier.dat")).read().strip().split("\n\n\n")
    data = {}
    for b in blocks:
        lines = [l for l in b.splitlines() if l.strip()]
        comments = [l for l in lines if l.startswith("#")]
        values = [l for l in lines if not l.startswith("#")]
        data[comments[-1][2:]] = [float(x) for x in values[0].split()]
    want_labels = dict(item.rsplit("=", 1) for item in a.labels.split(";"))
    if sorted(data) != sorted(want_labels):
        problem("frontier.dat labels %s, expected %s" % (sorted(data), sorted(want_labels)))
        return
    for label, key in want_labels.items():
        members, vals = groups.get(key, []), data[label]
        if not members:
            problem("summary.csv has no grid point %r" % key)
            continue
        tps = [float(m["tokens_per_s"]) for m in members]
        ppl = [float(m["val_ppl"]) for m in members]
        mt, mp = sum(tps) / len(tps), sum(ppl) / len(ppl)
        sp = math.sqrt(sum((x - mp) ** 2 for x in ppl) / (len(ppl) - 1)) if len(ppl) > 1 else 0.0
        for got, want, what in ((vals[0], mt, "mean tokens/s"), (vals[2], mp, "mean val_ppl"),
                                (vals[3], sp, "std val_ppl"), (vals[4], len(members), "n")):
            if abs(got - want) > 1e-8 * max(1.0, abs(want)):
                problem("frontier.dat %s: %s %r, summary.csv gives %r" % (label, what, got, want))
    print("frontier.dat: %d configurations checked" % len(data))


def check_png(a):
    for path in a.files:
        data = open(path, "rb").read()
        if data[:8] != b"\x89PNG\r\n\x1a\n":
            problem("%s: no PNG signature (starts %r)" % (path, data[:8]))
        elif len(data) <= 1000:
            problem("%s: only %d bytes" % (path, len(data)))
    print("checked %d PNG files" % len(a.files))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("csv")
    c.add_argument("sweep_dir")
    c.add_argument("--axes", required=True)
    c.add_argument("--runs", required=True)
    m = sub.add_parser("md")
    m.add_argument("sweep_dir")
    s = sub.add_parser("same-results")
    s.add_argument("a")
    s.add_argument("b")
    n = sub.add_parser("noise")
    n.add_argument("sweep_dir")
    fr = sub.add_parser("frontier")
    fr.add_argument("sweep_dir")
    fr.add_argument("--labels", required=True)
    p = sub.add_parser("png")
    p.add_argument("files", nargs="+")
    a = ap.parse_args()
    try:
        {"csv": check_csv, "md": check_md, "same-results": check_same_results, "noise": check_noise,
         "frontier": check_frontier, "png": check_png}[a.cmd](a)
    except (OSError, ValueError, KeyError, IndexError, AttributeError) as e:
        problem("%s: %s: %s" % (a.cmd, type(e).__name__, e))
    for msg in PROBLEMS:
        print("sweepcheck: " + msg, file=sys.stderr)
    return 1 if PROBLEMS else 0


if __name__ == "__main__":
    sys.exit(main())
