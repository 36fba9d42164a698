"""Feature visualization, convlens vs Lucent, side by side in one run.

The pretrained EfficientNet-Lite0 (offline weights), objective ``blocks.4`` channels
0-9 with channel n on batch image n, 224 px images (so Lucent does not upsample),
Lucid's standard transforms and Adam at 0.05 for both. Lucent gets the same network
with its normalisation folded in and ``preprocess=False`` (see ``_lucent.py``).

Both tools' images are scored the same way: ``convlens.analysis.featurevis.score``,
channel n's mean activation on image n, on the image itself (no transforms). Times are
seconds of optimisation to each step count. convlens records its images every few
steps, so the table also says after how many steps, and how many seconds, convlens
reaches the mean objective Lucent has at 16, 64 and 256 steps.

Run it in the benchmark environment, which has Lucent (never a convlens dependency):

    bash benchmarks/setup_lucent_env.sh
    .venv-bench/bin/python benchmarks/featurevis.py [--steps 16,64,256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

import convlens
from convlens._io import versions, write_json
from convlens.analysis.featurevis import render, score
from convlens.device import resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYER = "blocks.4"


def _reach(
    target: float, thresholds: list[int], means: list[float], times: list[float]
) -> tuple[int | None, float | None]:
    """The first recorded step count (and its time) whose mean objective is >= target."""
    for t, m, s in zip(thresholds, means, times):
        if m >= target:
            return t, s
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="16,64,256", help="Lucent's step counts")
    ap.add_argument("--channels", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--every", type=int, default=2, help="convlens records every N steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs of each tool")
    ap.add_argument("--skip-lucent", action="store_true", help="convlens only")
    ap.add_argument(
        "--lucent-frozen",
        action="store_true",
        help="also run Lucent with the model's weight gradients switched off",
    )
    ap.add_argument(
        "--budgets",
        default="16,32,64,128",
        help="step budgets of convlens at its defaults (precision auto, cosine schedule)",
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    steps = sorted({int(s) for s in args.steps.split(",")})
    chans = list(range(args.channels))
    objective = f"{LAYER}:0-{args.channels - 1}"
    bundle = convlens.load_model("efficientnet_lite0", device=dev)
    print(f"{bundle.description} on {dev}; {objective}; {args.size} px; steps {steps}")

    dense = sorted(set(range(args.every, steps[-1] + 1, args.every)) | set(steps))
    mean, std = bundle.normalize
    variants = [("lucent", False)] + ([("lucent_frozen", True)] if args.lucent_frozen else [])
    runs: dict[str, list[dict[str, Any]]] = {"convlens": [], **{n: [] for n, _ in variants}}
    for rnd in range(args.rounds):  # tools alternate, so drift in the machine hits both
        r = render(
            bundle,
            objective,
            size=args.size,
            steps=steps[-1],
            thresholds=dense,
            seed=args.seed,
            device=dev,
            progress=False,
            precision="float32",  # convlens as it was: float32, Lucid's constant 0.05
            schedule="constant",
        )
        runs["convlens"].append({"times": list(r.times), "result": r})
        print(f"round {rnd + 1}: convlens {r.times[-1]:.1f} s")
        if args.skip_lucent:
            continue
        from _lucent import fold_normalization, lucent_render

        for name, frozen in variants:
            net = fold_normalization(bundle.model, mean, std).eval()
            out = lucent_render(
                net,
                LAYER,
                chans,
                args.size,
                tuple(steps),
                seed=args.seed,
                device=dev,
                freeze_model=frozen,
            )
            runs[name].append(out)
            print(f"round {rnd + 1}: {name} {out['times'][-1]:.1f} s")

    def median_times(rows: list[dict[str, Any]]) -> list[float]:
        return [statistics.median(col) for col in zip(*(row["times"] for row in rows))]

    r = runs["convlens"][0]["result"]
    r.times = tuple(median_times(runs["convlens"]))
    cl_means = [float(v.mean()) for v in r.values]
    convlens_row: dict[str, Any] = {
        "thresholds": list(r.thresholds),
        "seconds": [round(t, 3) for t in r.times],
        "mean_objective": [round(m, 4) for m in cl_means],
        "per_channel": {
            str(t): [round(float(v), 4) for v in r.values[r.thresholds.index(t)]] for t in steps
        },
        "seconds_each_round": [
            [round(row["times"][r.thresholds.index(t)], 2) for t in steps]
            for row in runs["convlens"]
        ],
    }
    for t in steps:
        i = r.thresholds.index(t)
        print(f"convlens {t:>4} steps: {r.times[i]:8.1f} s, mean objective {cl_means[i]:.3f}")

    # -- Lucent: images are deterministic (seeded numpy and torch), times the median ------
    lucent_rows: dict[str, Any] = {}
    for name, _ in variants if not args.skip_lucent else []:
        out = runs[name][0]
        times = median_times(runs[name])
        per = [score(bundle, objective, imgs) for imgs in out["images"]]
        lucent_rows[name] = {
            "thresholds": steps,
            "seconds": [round(t, 3) for t in times],
            "seconds_each_round": [[round(t, 2) for t in row["times"]] for row in runs[name]],
            "mean_objective": [round(float(p.mean()), 4) for p in per],
            "per_channel": {str(t): [round(float(v), 4) for v in p] for t, p in zip(steps, per)},
        }
        for t, s_, p in zip(steps, times, per):
            print(f"{name} {t:>4} steps: {s_:8.1f} s, mean objective {float(p.mean()):.3f}")

    # -- convlens at its defaults: precision auto, the cosine schedule, one run per budget
    # (the schedule is planned for its budget, so a budget's end is its point) -----------
    new_points: list[tuple[int, float, float]] = []
    new_per_channel: dict[str, list[float]] = {}
    new_precision = None
    for b in sorted({int(x) for x in args.budgets.split(",") if x}):
        nr = render(
            bundle, objective, size=args.size, steps=b, seed=args.seed, device=dev, progress=False
        )
        new_precision = nr.settings["precision"]
        new_points.append((b, float(nr.final_values.mean()), nr.times[-1]))
        new_per_channel[str(b)] = [round(float(v), 4) for v in nr.final_values]
        print(f"convlens new {b:>4} steps: {nr.times[-1]:8.1f} s, mean {new_points[-1][1]:.3f}")
    new_row = {
        "precision": new_precision,
        "schedule": "cosine",
        "points": [[b, round(m, 4), round(t, 3)] for b, m, t in new_points],
        "per_channel": new_per_channel,
    }

    def reach_new(target: float) -> tuple[int | None, float | None]:
        hit = next(((b, t) for b, m, t in new_points if m >= target), None)
        return (None, None) if hit is None else hit

    # -- batching: ten channels in one batch vs one channel at a time (16 steps) ---------
    one = render(bundle, f"{LAYER}:0", size=args.size, steps=16, seed=args.seed, progress=False)
    ten = render(bundle, objective, size=args.size, steps=16, seed=args.seed, progress=False)
    batching = {
        "one_channel_s": round(one.times[-1], 2),
        "ten_one_by_one_s": round(10 * one.times[-1], 2),
        "ten_in_one_batch_s": round(ten.times[-1], 2),
        "speedup": round(10 * one.times[-1] / ten.times[-1], 2),
    }
    print(f"batching (16 steps): {batching}")

    # -- the comparison ---------------------------------------------------------------------
    table = []
    base = lucent_rows.get("lucent")
    for k, t in enumerate(steps):
        i = r.thresholds.index(t)
        row: dict[str, Any] = {
            "steps": t,
            "convlens_seconds": round(r.times[i], 2),
            "convlens_mean": round(cl_means[i], 3),
        }
        if base is not None:
            target = base["mean_objective"][k]
            reach_steps, reach_s = _reach(target, list(r.thresholds), cl_means, list(r.times))
            row.update(
                lucent_seconds=round(base["seconds"][k], 2),
                lucent_mean=target,
                convlens_steps_to_lucent_mean=reach_steps,
                convlens_seconds_to_lucent_mean=None if reach_s is None else round(reach_s, 2),
                speedup_same_steps=round(base["seconds"][k] / r.times[i], 2),
                speedup_to_lucent_mean=None
                if reach_s is None
                else round(base["seconds"][k] / reach_s, 2),
            )
            nb, ns = reach_new(target)
            row.update(
                new_steps_to_lucent_mean=nb,
                new_seconds_to_lucent_mean=None if ns is None else round(ns, 2),
                new_speedup_to_lucent_mean=None
                if ns is None
                else round(base["seconds"][k] / ns, 2),
            )
        nb, ns = reach_new(cl_means[i])
        row.update(
            new_steps_to_old_mean=nb,
            new_seconds_to_old_mean=None if ns is None else round(ns, 2),
            new_speedup_to_old=None if ns is None else round(r.times[i] / ns, 2),
        )
        table.append(row)

    doc = {
        "benchmark": "featurevis",
        "model": bundle.description,
        "objective": objective,
        "size": args.size,
        "seed": args.seed,
        "rounds": args.rounds,
        "device": str(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "versions": versions(),
        "convlens": convlens_row,
        "convlens_new": new_row,
        **lucent_rows,
        "batching": batching,
        "table": table,
    }
    path = write_json(args.out / f"featurevis_{dev.type}.json", doc)
    print()
    print(
        "| steps | Lucent s | Lucent mean | convlens s | convlens mean "
        "| convlens to Lucent's mean | speedup |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in table:
        if "lucent_seconds" in row:
            reach = (
                f"{row['convlens_steps_to_lucent_mean']} steps, "
                f"{row['convlens_seconds_to_lucent_mean']} s"
                if row["convlens_steps_to_lucent_mean"] is not None
                else "not reached"
            )
            print(
                f"| {row['steps']} | {row['lucent_seconds']} | {row['lucent_mean']} "
                f"| {row['convlens_seconds']} | {row['convlens_mean']} | {reach} "
                f"| {row['speedup_to_lucent_mean']}x |"
            )
        else:
            print(
                f"| {row['steps']} | - | - | {row['convlens_seconds']} | {row['convlens_mean']} |"
            )
    print(f"\nwrote {path}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
