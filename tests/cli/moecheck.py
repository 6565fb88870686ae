#!/usr/bin/env python3
"""Checks of moehost run folders for the CLI tests (tests/cli/*.sh).

    moecheck.py metrics RUN_DIR --router R --steps 5,10,... --batch B --seq S
                        --experts E --top-k K --layers L --lr LR --warmup W
                        --total-steps N --min-lr-ratio M [--loss-drop D] [--k-out K]
    moecheck.py summary RUN_DIR --router R
    moecheck.py compare METRICS_A METRICS_B        every key but the timings equal
    moecheck.py ckpt-step CHECKPOINT               prints the step it holds
    moecheck.py ckpt-compare CKPT_A CKPT_B         bytes equal but train_seconds
    moecheck.py config-diff CONFIG_A CONFIG_B KEY  texts equal but lines "KEY = ..."

Prints every problem found and exits 1 if there was any.
"""
import argparse
import json
import math
import os
import struct
import sys

PROBLEMS = []

# The keys every metrics line must carry (docs/metrics.md).
REQUIRED = ["step", "tokens_seen", "lr", "train_loss", "val_loss", "val_ppl", "val_bpc", "val_acc",
            "tokens_per_s", "ms_per_step", "drop_rate", "token_drop_rate", "load_cv", "used_capacity",
            "router_entropy", "combine_entropy", "mean_topk_prob", "aux_loss", "z_loss", "layers"]
# Per-layer routing values whose run-level value is the mean over layers.
ROUTING = ["drop_rate", "token_drop_rate", "load_cv", "used_capacity", "router_entropy",
           "combine_entropy", "mean_topk_prob", "aux_loss", "z_loss"]
# Wall-clock values: the only ones allowed to differ between identical runs.
TIMING = {"tokens_per_s", "ms_per_step", "peak_mem_gb", "mfu"}


def problem(msg):
    PROBLEMS.append(msg)


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def load_jsonl(path):
    lines = []
    with open(path) as f:
        for i, text in enumerate(f, 1):
            try:
                lines.append(json.loads(text))
            except ValueError as e:
                problem("%s:%d is not JSON (%s): %r" % (path, i, e, text[:200]))
    return lines


def schedule(step, lr, warmup, total, min_ratio):
    """The documented schedule: linear warm-up, then cosine to lr * min_ratio."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    span = total - warmup
    progress = min(1.0, (step - warmup) / span) if span > 0 else 1.0
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def check_metrics(a):
    path = os.path.join(a.run_dir, "metrics.jsonl")
    lines = load_jsonl(path)
    steps = [int(s) for s in a.steps.split(",")]
    got_steps = [o.get("step") for o in lines]
    if got_steps != steps:
        problem("%s: evaluation steps %s, expected %s" % (path, got_steps, steps))
    k_out = a.k_out if a.k_out else (1 if a.router == "top1" else a.top_k)
    owns_capacity = a.router == "expert_choice"
    for o in lines:
        where = "%s step %s" % (path, o.get("step"))
        missing = [k for k in REQUIRED if k not in o]
        if missing:
            problem("%s: missing keys %s" % (where, missing))
            continue
        for k, v in o.items():
            if isinstance(v, float) and not math.isfinite(v):
                problem("%s: %s = %r is not finite" % (where, k, v))
        step = o["step"]
        if o["tokens_seen"] != step * a.batch * a.seq:
            problem("%s: tokens_seen %s != step * batch * seq_len = %d" % (where, o["tokens_seen"],
                                                                           step * a.batch * a.seq))
        want_lr = schedule(step, a.lr, a.warmup, a.total_steps, a.min_lr_ratio)
        if not close(o["lr"], want_lr, 1e-9):
            problem("%s: lr %r, the schedule gives %r" % (where, o["lr"], want_lr))
        if not close(o["val_ppl"], math.exp(o["val_loss"]), 1e-9):
            problem("%s: val_ppl %r != exp(val_loss) = %r" % (where, o["val_ppl"], math.exp(o["val_loss"])))
        # Char tokenizer on ASCII text: one character per token.
        if not close(o["val_bpc"], o["val_loss"] / math.log(2), 1e-9):
            problem("%s: val_bpc %r != val_loss / ln 2 = %r" % (where, o["val_bpc"], o["val_loss"] / math.log(2)))
        if not 0.0 <= o["val_acc"] <= 1.0:
            problem("%s: val_acc %r outside [0, 1]" % (where, o["val_acc"]))
        if not (o["train_loss"] > 0 and o["val_loss"] > 0):
            problem("%s: losses must be > 0 (train %r, val %r)" % (where, o["train_loss"], o["val_loss"]))
        if not (o["tokens_per_s"] > 0 and o["ms_per_step"] > 0):
            problem("%s: tokens_per_s %r and ms_per_step %r must be > 0" % (where, o["tokens_per_s"],
                                                                            o["ms_per_step"]))
        for k in ("drop_rate", "token_drop_rate", "used_capacity", "mean_topk_prob"):
            if not -1e-12 <= o[k] <= 1.0 + 1e-12:
                problem("%s: %s = %r outside [0, 1]" % (where, k, o[k]))
        for k in ("load_cv", "aux_loss", "z_loss", "combine_entropy"):
            if o[k] < 0:
                problem("%s: %s = %r is negative" % (where, k, o[k]))
        if not -1e-12 <= o["router_entropy"] <= math.log(a.experts) + 1e-9:
            problem("%s: router_entropy %r outside [0, ln E]" % (where, o["router_entropy"]))
        layers = o["layers"]
        if not isinstance(layers, list) or len(layers) != a.layers:
            problem("%s: layers should be a list of %d, got %r" % (where, a.layers, layers))
            continue
        val_tokens = o.get("val_tokens")
        for i, lay in enumerate(layers):
            lw = "%s layer %d" % (where, i)
            counts = lay.get("expert_counts")
            if not (isinstance(counts, list) and len(counts) == a.experts
                    and all(isinstance(c, int) and c >= 0 for c in counts)):
                problem("%s: expert_counts should be %d counts >= 0, got %r" % (lw, a.experts, counts))
                continue
            before = lay.get("expert_counts_before")
            if before is not None and val_tokens is not None:
                if not owns_capacity:
                    # Every token makes k_out assignments before capacity.
                    if sum(before) != val_tokens * k_out:
                        problem("%s: sum(expert_counts_before) = %d, expected val_tokens * %d = %d"
                                % (lw, sum(before), k_out, val_tokens * k_out))
                    want = 1.0 - sum(counts) / sum(before) if sum(before) else 0.0
                    if not abs(lay.get("drop_rate", -1) - want) <= 1e-9:
                        problem("%s: drop_rate %r != 1 - kept/assigned = %r" % (lw, lay.get("drop_rate"), want))
                    if lay.get("token_drop_rate", 2) > lay.get("drop_rate", -1) + 1e-12:
                        problem("%s: token_drop_rate %r > drop_rate %r" % (lw, lay.get("token_drop_rate"),
                                                                           lay.get("drop_rate")))
                else:
                    if counts != before or lay.get("drop_rate") != 0:
                        problem("%s: expert choice owns capacity: nothing may be dropped (counts %r, before "
                                "%r, drop_rate %r)" % (lw, counts, before, lay.get("drop_rate")))
        for k in ROUTING:
            vals = [lay.get(k) for lay in layers]
            if any(not isinstance(v, (int, float)) for v in vals):
                problem("%s: layers[].%s missing: %r" % (where, k, vals))
                continue
            mean = sum(vals) / len(vals)
            if not abs(o[k] - mean) <= 1e-9 * max(1.0, abs(mean)):
                problem("%s: %s = %r is not the mean over layers %r" % (where, k, o[k], vals))
    if a.loss_drop is not None and len(lines) >= 2 and all("val_loss" in o for o in lines):
        first, last = lines[0]["val_loss"], lines[-1]["val_loss"]
        if not last < first - a.loss_drop:
            problem("%s: val_loss went from %.4f (step %s) to %.4f (step %s); expected a fall of more than %.2f"
                    % (path, first, lines[0]["step"], last, lines[-1]["step"], a.loss_drop))
    print("val_loss by step:", [(o.get("step"), round(o.get("val_loss", float("nan")), 4)) for o in lines])


def check_summary(a):
    path = os.path.join(a.run_dir, "summary.json")
    with open(path) as f:
        s = json.load(f)
    lines = load_jsonl(os.path.join(a.run_dir, "metrics.jsonl"))
    if not lines:
        problem("%s: metrics.jsonl is empty" % a.run_dir)
        return
    last = lines[-1]
    if s.get("router") != a.router:
        problem("%s: router %r, expected %r" % (path, s.get("router"), a.router))
    if not str(s.get("router_path", "")).endswith("/%s.so" % a.router_file):
        problem("%s: router_path %r does not end in /%s.so" % (path, s.get("router_path"), a.router_file))
    if s.get("steps") != last["step"] or s.get("tokens_seen") != last["tokens_seen"]:
        problem("%s: steps/tokens_seen %r/%r, the last metrics line says %r/%r" % (
            path, s.get("steps"), s.get("tokens_seen"), last["step"], last["tokens_seen"]))
    final = s.get("final")
    if final != last:
        problem("%s: 'final' is not the last metrics line" % path)
    best = min(lines, key=lambda o: o["val_loss"])
    b = s.get("best", {})
    if b.get("val_loss") != best["val_loss"] or b.get("step") != best["step"]:
        problem("%s: best %r, but the lowest val_loss is %r at step %r" % (path, b, best["val_loss"], best["step"]))
    elif not close(b.get("val_ppl", 0.0), math.exp(best["val_loss"]), 1e-9):
        problem("%s: best.val_ppl %r != exp(best.val_loss)" % (path, b.get("val_ppl")))


def compare(a):
    A, B = load_jsonl(a.a), load_jsonl(a.b)
    if len(A) != len(B):
        problem("%s has %d lines, %s has %d (steps %s vs %s)" % (a.a, len(A), a.b, len(B),
                                                                 [o.get("step") for o in A], [o.get("step") for o in B]))
    for i, (x, y) in enumerate(zip(A, B)):
        if set(x) != set(y):
            problem("line %d: keys differ: %s" % (i + 1, sorted(set(x) ^ set(y))))
        diff = [k for k in x if k not in TIMING and k in y and x[k] != y[k]]
        for k in diff:
            problem("line %d (step %s): %s differs: %r vs %r" % (i + 1, x.get("step"), k,
                                                                 str(x[k])[:300], str(y[k])[:300]))
    print("compared %d lines of %d keys" % (min(len(A), len(B)), len(A[0]) if A else 0))


# checkpoint.h: magic[8], u32 version, u32 reserved, u64 step, u64 layout hash,
# u64 n_params, u64 n_buffers, u64 tokens_seen, f64 train_seconds, f64 best,
# u64 best_step, then the tensors.
CKPT_STEP = 16
CKPT_TRAIN_SECONDS = 56


def ckpt_step(a):
    with open(a.ckpt, "rb") as f:
        head = f.read(80)
    if len(head) < 80 or head[:8] != b"MOECKPT\0":
        problem("%s is not a moehost checkpoint" % a.ckpt)
        return
    print(struct.unpack_from("<Q", head, CKPT_STEP)[0])


def ckpt_compare(a):
    x = open(a.a, "rb").read()
    y = open(a.b, "rb").read()
    if len(x) != len(y):
        problem("checkpoints differ in size: %d vs %d" % (len(x), len(y)))
        return
    x = x[:CKPT_TRAIN_SECONDS] + x[CKPT_TRAIN_SECONDS + 8:]
    y = y[:CKPT_TRAIN_SECONDS] + y[CKPT_TRAIN_SECONDS + 8:]
    if x != y:
        first = next(i for i in range(len(x)) if x[i] != y[i])
        n = sum(1 for i in range(len(x)) if x[i] != y[i])
        problem("checkpoints differ in %d bytes, the first at offset %d (train_seconds excluded)" % (
            n, first if first < CKPT_TRAIN_SECONDS else first + 8))
    else:
        print("checkpoints equal (%d bytes)" % len(x))


def config_diff(a):
    x = open(a.a).read().splitlines()
    y = open(a.b).read().splitlines()
    if len(x) != len(y):
        problem("%s and %s differ in length (%d vs %d lines)" % (a.a, a.b, len(x), len(y)))
        return
    for i, (p, q) in enumerate(zip(x, y), 1):
        if p != q and not (p.startswith(a.key + " =") and q.startswith(a.key + " =")):
            problem("line %d differs: %r vs %r" % (i, p, q))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("metrics")
    m.add_argument("run_dir")
    m.add_argument("--router", required=True)
    m.add_argument("--steps", required=True)
    for k in ("batch", "seq", "experts", "top_k", "layers", "warmup", "total_steps"):
        m.add_argument("--" + k.replace("_", "-"), type=int, required=True)
    m.add_argument("--lr", type=float, required=True)
    m.add_argument("--min-lr-ratio", type=float, required=True)
    m.add_argument("--loss-drop", type=float)
    m.add_argument("--k-out", type=int, help="assignments per token (default: 1 for top1, else --top-k)")
    s = sub.add_parser("summary")
    s.add_argument("run_dir")
    s.add_argument("--router", required=True)
    s.add_argument("--router-file", help="file name of the .so without .so (default: --router)")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    k = sub.add_parser("ckpt-step")
    k.add_argument("ckpt")
    kc = sub.add_parser("ckpt-compare")
    kc.add_argument("a")
    kc.add_argument("b")
    d = sub.add_parser("config-diff")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("key")
    a = ap.parse_args()
    try:
        if a.cmd == "metrics":
            check_metrics(a)
        elif a.cmd == "summary":
            a.router_file = a.router_file or a.router
            check_summary(a)
        elif a.cmd == "compare":
            compare(a)
        elif a.cmd == "ckpt-step":
            ckpt_step(a)
        elif a.cmd == "ckpt-compare":
            ckpt_compare(a)
        elif a.cmd == "config-diff":
            config_diff(a)
    except (OSError, ValueError, KeyError, TypeError) as e:
        problem("%s: %s: %s" % (a.cmd, type(e).__name__, e))
    for p in PROBLEMS:
        print("moecheck: " + p, file=sys.stderr)
    return 1 if PROBLEMS else 0


if __name__ == "__main__":
    sys.exit(main())
