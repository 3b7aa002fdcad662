"""Poisoning-defence benchmark: every rule × attack × Byzantine fraction, as in-process DiLoCo runs.

    python bench/defence.py [--quick] [--rules mean,trimmed_mean] [--attacks sign_flip,alie]
                            [--fractions 0.1,0.25,0.4] [--pools 20] [--rounds 6] [--inner-steps 6]
                            [--workers 2] [--csv bench/defence.csv]

Each cell is one run of ``coordinator.defence.simulate``: R pools of the tiny GPT train
H inner steps per round on a random Markov chain; the last K pools are Byzantine with
the attack's ``node.policy`` policy; the coordinator aggregates with the rule, rejects
outliers (``coordinator.defence.TUNED_DETECTION``) and quarantines a pool at 2
rejections among its last 3 updates. K = max(1, ⌊fraction·R + ½⌋) for a fraction > 0:
with the default 20 pools 10% → 2, 25% → 5, 40% → 8 exactly (with 8 pools: 1, 2, 3).
Every pool's batches come from the same chain, so every pool's data holds the chain's 128
symbols and no other token; the backdoor's trigger (the vocabulary's last three ids) lies
outside them, which detection's absent-token check sees. A trigger made of tokens a pool's
own data holds is not seen by that check (on the demo corpus the last BPE merges occur in
most shards): the rule alone bounds it (tests/coordinator/test_defence_runs.py).

Columns, every ratio against a baseline from the same invocation:
- loss: validation loss after the last round; ×clean: over the same rule's run without
  attackers; ×mean: over the plain mean's run without attackers;
- TPR / FPR: share of the Byzantine / honest updates rejected, counted per pool per round
  while the pool still sends (a quarantined pool sends nothing more);
- quar: attackers quarantined, of K; t/mean: the defended round's time (aggregate, judge,
  re-aggregate, outer step) over the plain mean and outer step on the same updates, both
  in CPU time of the single-threaded worker (robust to other load), median over rounds;
- ASR: backdoor attack success, the share of triggered validation inputs predicted as the target.

Target for the default rule (issue 7): with at most 25% Byzantine pools, loss ≤ 1.05 × clean
and every attacker quarantined; with none, FPR < 1%. A cell "ok" meets it; "bounded" meets
the loss bound without quarantining every attacker.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "centered_clipping")
FRACTIONS = (0.1, 0.25, 0.4)
VOCAB = 512  # the tiny preset's vocabulary
FIELDS = [
    "rule", "attack", "fraction", "byzantine", "pools", "val_loss", "x_clean", "x_clean_mean", "tpr", "fpr",
    "quarantined", "quarantined_pools", "t_over_mean", "defend_ms", "mean_ms", "backdoor_asr", "target",
]  # fmt: skip


def byzantine_count(fraction: float, pools: int) -> int:
    return 0 if fraction == 0 else max(1, math.floor(fraction * pools + 0.5))


def run_cell(job: tuple[str, str, int, dict]) -> dict:
    """One run; executed in a worker process with one thread."""
    import torch

    torch.set_num_threads(1)
    from coordinator.defence import TUNED_DETECTION, SimConfig, defence_for, simulate
    from coordinator.detection import DetectionPolicy
    from node.policy import make_policy

    rule, attack, k, sim_args = job
    sim_args = dict(sim_args)
    detection = DetectionPolicy() if sim_args.pop("detection") == "default" else TUNED_DETECTION
    row_ratio = sim_args.pop("row_ratio")
    if row_ratio is not None:  # the opt-in row check (off in TUNED_DETECTION: see coordinator/defence.py)
        detection = detection.model_copy(update={"max_row_ratio": row_ratio})
    sim = SimConfig(**sim_args)
    pools = sim.pools

    def policy(name: str, p: int):
        extra = {"vocab_size": VOCAB} if name in ("label_flip", "backdoor") else {}
        return make_policy(name, seed=1000 + p, n_pools=pools, n_byzantine=k, **extra)

    policies = {p: policy(attack, p) for p in range(pools - k, pools)}
    probe = policy("backdoor", 0)  # its trigger and target: measured in every run, clean ones too
    t0, c0 = time.perf_counter(), time.process_time()
    res = simulate(
        sim, defence_for(rule, pools, detection=detection), policies, backdoor=(probe.trigger, probe.target)
    )
    return {
        "rule": rule,
        "attack": attack if k else "none",
        "byzantine": k,
        "pools": pools,
        "val_loss": res.final_val_loss,
        "tpr": res.tpr,
        "fpr": res.fpr,
        "quarantined": sum(b in res.quarantined for b in res.byzantine),
        "quarantined_pools": " ".join(sorted(res.quarantined)),
        "honest_quarantined": len(set(res.quarantined) - set(res.byzantine)),
        "all_quarantined": res.all_quarantined,
        "defend_ms": 1e3 * res.defend_s,
        "mean_ms": 1e3 * res.mean_s,
        "t_over_mean": res.defend_s / res.mean_s,
        "backdoor_asr": res.backdoor_asr,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
    }


def judge_cell(row: dict) -> str:
    k, pools = row["byzantine"], row["pools"]
    if k == 0:
        return "ok" if row["fpr"] < 0.01 else "miss: FPR"
    if k / pools > 0.25:
        return ""  # beyond the target's scope: context
    bounded = row["x_clean"] <= 1.05
    if bounded and row["all_quarantined"]:
        return "ok"
    if bounded:
        return "bounded"
    return "miss: loss" + ("" if row["all_quarantined"] else ", not quarantined")


def fmt(x: object, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="mean and the default rule, 25%% only, 4 rounds")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--attacks", default=None, help="default: every attack of node.policy.ATTACKS")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--pools", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--inner-steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--detection",
        choices=["tuned", "default"],
        default="tuned",
        help="coordinator.defence.TUNED_DETECTION (default) or DetectionPolicy()'s own defaults",
    )
    ap.add_argument(
        "--row-ratio", type=float, default=None, help="also reject row ratios above this (off by default)"
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--csv", default=str(Path(__file__).with_suffix(".csv")))
    args = ap.parse_args()

    from coordinator.defence import DEFAULT_RULE
    from node.policy import ATTACKS

    rules = args.rules.split(",")
    attacks = args.attacks.split(",") if args.attacks else [a for a in ATTACKS if a != "honest"]
    fractions = [float(f) for f in args.fractions.split(",")]
    rounds = args.rounds
    if args.quick:
        rules, fractions, rounds = ["mean", DEFAULT_RULE], [0.25], 4
    unknown = sorted(set(rules) - set(RULES)) + sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise SystemExit(
            f"unknown rule or attack {unknown}; rules: {', '.join(RULES)}; attacks: {', '.join(ATTACKS)}"
        )
    if "mean" not in rules:
        rules = ["mean", *rules]  # the clean mean run is every cell's second baseline
    sim = {
        "pools": args.pools,
        "rounds": rounds,
        "inner_steps": args.inner_steps,
        "seed": args.seed,
        "detection": args.detection,
        "row_ratio": args.row_ratio,
    }
    ks = sorted({byzantine_count(f, args.pools) for f in fractions} - {0})
    jobs = [(r, "honest", 0, sim) for r in rules] + [
        (r, a, k, sim) for r in rules for a in attacks for k in ks
    ]
    print(
        f"{len(jobs)} runs: {args.pools} pools, {rounds} rounds × {args.inner_steps} inner steps, "
        f"Byzantine pools {ks}, {args.detection} detection, {args.workers} worker(s)",
        flush=True,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    rows = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for i, row in enumerate(pool.imap_unordered(run_cell, jobs), 1):
            rows.append(row)
            print(
                f"  [{i}/{len(jobs)}] {row['rule']} {row['attack']} K={row['byzantine']}: "
                f"loss {row['val_loss']:.3f} in {row['wall_s']:.0f}s ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    clean = {r["rule"]: r["val_loss"] for r in rows if r["byzantine"] == 0}
    for r in rows:
        r["fraction"] = r["byzantine"] / r["pools"]
        r["x_clean"] = r["val_loss"] / clean[r["rule"]]
        r["x_clean_mean"] = r["val_loss"] / clean["mean"]
        r["target"] = judge_cell(r)
    order = {a: i for i, a in enumerate(["none", *attacks])}
    rows.sort(key=lambda r: (rules.index(r["rule"]), order[r["attack"]], r["byzantine"]))

    head = f"{'rule':<18}{'attack':<11}{'K/R':>5}{'loss':>7}{'×clean':>8}{'×mean':>7}{'TPR':>6}{'FPR':>6}"
    head += f"{'quar':>6}{'t/mean':>8}{'ASR':>6}  target"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['rule']:<18}{r['attack']:<11}{r['byzantine']:>3}/{r['pools']:<1}{r['val_loss']:>7.3f}"
            f"{r['x_clean']:>8.3f}{r['x_clean_mean']:>7.3f}{fmt(r['tpr'], '.2f'):>6}{fmt(r['fpr'], '.2f'):>6}"
            f"{r['quarantined']:>4}/{r['byzantine']:<1}{r['t_over_mean']:>8.1f}{fmt(r['backdoor_asr'], '.2f'):>6}"
            f"  {r['target']}"
        )
    print("\nTarget (≤ 25% Byzantine: loss ≤ 1.05 × clean and all attackers quarantined; none: FPR < 1%):")
    for rule in rules:
        scoped = [r for r in rows if r["rule"] == rule and r["target"]]
        ok = [r for r in scoped if r["target"] == "ok"]
        misses = [f"{r['attack']} K={r['byzantine']} ({r['target']})" for r in scoped if r["target"] != "ok"]
        print(
            f"  {rule + (' (default)' if rule == DEFAULT_RULE else ''):<28} {len(ok)}/{len(scoped)} cells"
            + (f"; not ok: {', '.join(misses)}" if misses else "")
        )
    cpu = sum(r["cpu_s"] for r in rows)
    print(
        f"\nwall time {time.perf_counter() - t0:.0f}s; CPU time of the runs {cpu:.0f}s ({cpu / len(rows):.1f}s a run)"
    )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
