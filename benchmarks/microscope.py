"""The microscope: its renders against Lucent, and its wall time, stage by stage.

Three measurements, in one run:

1. **Renders against Lucent.** Every one of ``--channels`` (32) channels of the pretrained
   ``efficientnet_lite0`` ``blocks.4`` rendered to the channel objective at 128 px (both
   tools upsample to 224 before the model, Lucent's default below 224 px), Lucid's
   standard transforms, Adam at 0.05, seed 0. convlens: the microscope's own render code
   (``convlens.microscope._render_batch``, ``--batch`` channels per optimisation, each
   with its own seeded start, BatchNorms folded) with only the channel row of each
   channel. Lucent (torch-lucent 0.1.8, in ``.venv-bench``: ``bash
   benchmarks/setup_lucent_env.sh``) renders the same channels, the same number per
   ``render_vis`` call (channel i on batch image i), the model's normalisation folded in.
   Both tools' images are scored by the same function (``convlens.analysis.featurevis.score``:
   the channel's mean activation on its image, no transforms). Reported: the time each tool
   needs to the mean objective Lucent reaches at 16 and 64 steps, and their ratio.
2. **``convlens microscope --quick``** in a subprocess (the command a user types first:
   efficientnet_lite0 on the drawn shapes, ``blocks.4`` channels 0-15), its wall time and
   its stages from ``microscope.json``.
3. **A full microscope** of ``efficientnet_lite0`` ``blocks.4`` (all 112 channels) on the
   Imagenette validation JPEGs in ``../shared/data/imagenette2-224.tar`` (extracted once
   into ``benchmarks/results/imagenette2-224/``), at ``--full-steps`` (default 256, the
   command's default), with its split into dataset pass, renders, examples and pages.
   ``--full-channels`` renders fewer channels (the dataset pass still reads all); the
   report says so and gives the measured render seconds per channel.
4. **The attribution stage against its budget** (at most a quarter of the dataset pass):
   the pass over ``--attr-images`` Imagenette val images, the microscope's own attribution
   code on ``--attr-channels`` channels (the top examples the budget affords, as the
   microscope runs it), the pass again; wall and CPU time. Then each candidate method
   (input x gradient, integrated gradients at 2, 4, 8 steps) on the top 9 of 16 channels
   (seconds per pair, the share it would take at the full microscope's pairs per image),
   and its maps against integrated gradients at 64 steps (correlation over the crop,
   completeness error).

    .venv-bench/bin/python benchmarks/microscope.py [--device auto|cpu|cuda] [--skip-lucent]
        [--skip-quick] [--skip-full] [--full-steps 256] [--full-channels 0-111]
        [--torchrun 1]   # also the full run under torchrun --nproc-per-node N (GPUs)
        [--skip-attribution] [--attr-images 3925] [--attr-channels 112]

Results: ``results/microscope.json`` (a part skipped keeps its figures from the last run
that made them). Without the Imagenette archive part 3 says so and
the rest runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import convlens  # noqa: E402
from convlens._io import versions, write_json  # noqa: E402
from convlens.device import resolve_device  # noqa: E402

LAYER = "blocks.4"


def _reach(target: float, points: list[tuple[int, float, float]]) -> tuple[int, float] | None:
    """The first ``(step, seconds)`` whose mean objective is at least ``target``."""
    for step, mean, secs in points:
        if mean >= target:
            return step, secs
    return None


def _convlens_renders(
    bundle: Any,
    chans: list[int],
    size: int,
    steps: int,
    every: int,
    batch: int,
    dev: Any,
    precision: str = "float32",
    schedule: str = "constant",
) -> dict[str, Any]:
    """The microscope's render code on the channel rows of ``chans``; ``points``: (step,
    mean objective over the channels, seconds of optimisation) every ``every`` steps
    (``every=steps``: the end only), and ``final``: each channel's objective at the end."""
    from convlens.analysis.featurevis import score
    from convlens.analysis.featurevis.objectives import channel
    from convlens.analysis.featurevis.render import _fold_checked, _frozen
    from convlens.microscope import _plan, _render_batch
    from convlens.models.layers import evaluating

    net = bundle.model
    plan = _plan(net, bundle, size, steps, None, 0, 0, precision=precision, schedule=schedule)
    snaps = list(range(every, steps + 1, every))
    per_step: dict[int, list[torch.Tensor]] = {s: [] for s in snaps}
    secs: dict[int, float] = dict.fromkeys(snaps, 0.0)
    with evaluating(net), _frozen(net):
        probe = torch.rand(1, plan.channels, size, size, generator=torch.Generator().manual_seed(0))
        run, folded = _fold_checked(net, channel(LAYER, 0), plan.pipe(probe).to(dev), True)
        for start in range(0, len(chans), batch):
            part = chans[start : start + batch]

            def record(
                step: int, img: torch.Tensor, _v: torch.Tensor, t: float, n: int = len(part)
            ) -> None:
                per_step[step].append(img[:n])
                secs[step] += t

            _render_batch(
                run, LAYER, part, plan, dev, rows=[("channel", 0)], snapshots=snaps, record=record
            )
    objective = f"{LAYER}:{chans[0]}-{chans[-1]}"
    points = []
    for s in snaps:
        imgs = torch.cat(per_step[s])
        vals = score(bundle, objective, imgs, device=dev)
        points.append((s, float(vals.mean()), secs[s]))
    return {
        "points": points,
        "final": [round(float(v), 4) for v in vals],
        "folded_batchnorms": folded,
        "precision": plan.precision,
        "schedule": plan.settings["schedule"],
    }


def _lucent_renders(
    bundle: Any, chans: list[int], size: int, thresholds: tuple[int, ...], batch: int, dev: Any
) -> dict[str, Any]:
    from _lucent import fold_normalization, lucent_render
    from convlens.analysis.featurevis import score

    mean, std = bundle.normalize
    net = fold_normalization(bundle.model, mean, std).eval()
    per: dict[int, list[torch.Tensor]] = {t: [] for t in thresholds}
    secs: dict[int, float] = dict.fromkeys(thresholds, 0.0)
    for start in range(0, len(chans), batch):
        part = chans[start : start + batch]
        out = lucent_render(net, LAYER, part, size, thresholds, seed=0, device=dev)
        for i, t in enumerate(thresholds):
            per[t].append(out["images"][i])
            secs[t] += out["times"][i]
    objective = f"{LAYER}:{chans[0]}-{chans[-1]}"
    points = []
    for t in thresholds:
        vals = score(bundle, objective, torch.cat(per[t]), device=dev)
        points.append((t, float(vals.mean()), secs[t]))
    return {"points": points}


def _part_renders(args: argparse.Namespace, dev: Any) -> dict[str, Any]:
    """Lucent, convlens as it was (float32, Lucid's constant 0.05: ``"old"``) and convlens
    at its defaults (``precision="auto"``, the cosine schedule: ``"new"``) on the same
    channels. The cosine schedule is planned for its step budget, so "new" runs once per
    budget in ``--budgets``, and the time it needs to reach an objective is that of the
    smallest budget whose final mean reaches it (``_reach`` over the budgets' ends)."""
    bundle = convlens.load_model("efficientnet_lite0", device=dev)
    chans = list(range(args.channels))
    thresholds = tuple(int(s) for s in args.lucent_steps.split(","))
    budgets = [int(b) for b in args.budgets.split(",")]
    print(f"renders: {len(chans)} channels of {LAYER}, {args.size} px, batch {args.batch}")
    from convlens import _alloc

    # "old": the renders as they ran before issue 20 (float32, Lucid's constant schedule,
    # every large buffer a fresh mmap); keep_heap changes no pixel, only the time
    _alloc.ENABLED = False
    try:
        old = _convlens_renders(
            bundle, chans, args.size, max(thresholds), args.every, args.batch, dev
        )
    finally:
        _alloc.ENABLED = True
    for s, m, t in old["points"]:
        if s in thresholds:
            print(f"  convlens old {s:>4} steps: {t:7.1f} s, mean objective {m:.3f}")
    if not args.skip_float32_today:
        # float32 and the constant schedule with today's allocator: the same pixels as "old"
        f32 = _convlens_renders(
            bundle, chans, args.size, max(thresholds), max(thresholds), args.batch, dev
        )
        print(
            f"  convlens float32 constant, heap kept, {max(thresholds)} steps: "
            f"{f32['points'][-1][2]:7.1f} s, mean {f32['points'][-1][1]:.3f} "
            f"(same pixels as old: {f32['final'] == old['final']})"
        )
    new_runs = {}
    for b in budgets:
        run = _convlens_renders(
            bundle, chans, args.size, b, b, args.batch, dev, args.precision, args.schedule
        )
        new_runs[b] = run
        print(
            f"  convlens new {b:>4} steps: {run['points'][-1][2]:7.1f} s, mean {run['points'][-1][1]:.3f}"
        )
    new_points = [run["points"][-1] for _, run in sorted(new_runs.items())]
    doc: dict[str, Any] = {
        "convlens": old,
        "convlens_new": {"budgets": {str(b): r for b, r in new_runs.items()}, "points": new_points},
        "seconds_per_step": {
            "old": round(old["points"][-1][2] / old["points"][-1][0], 4),
            **{str(b): round(r["points"][-1][2] / b, 4) for b, r in new_runs.items()},
        },
    }
    if not args.skip_float32_today:
        doc["convlens_float32_today"] = f32
        doc["seconds_per_step"]["float32_today"] = round(
            f32["points"][-1][2] / f32["points"][-1][0], 4
        )
    old_final = old["points"][-1]
    got = _reach(old_final[1], new_points)
    own = {
        "old_steps": old_final[0],
        "old_seconds": round(old_final[2], 2),
        "old_mean": round(old_final[1], 3),
    }
    if got is not None:
        own.update(
            new_steps=got[0], new_seconds=round(got[1], 2), speedup=round(old_final[2] / got[1], 2)
        )
    doc["own"] = own
    print(f"  new vs old {old_final[0]}-step float32 objective: {own}")
    by_budget = {}
    for steps_, run_ in sorted(new_runs.items()):  # per channel: each budget against old
        a = torch.tensor(run_["final"])
        b_ = torch.tensor(old["final"])
        ratio = a / b_
        by_budget[str(steps_)] = {
            "new_steps": steps_,
            "old_steps": old_final[0],
            "ratio_quantiles": {
                q: round(float(ratio.quantile(q)), 3) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
            },
            "channels_at_least_old": int((a >= b_).sum()),
            "channels": len(chans),
        }
        print(f"  per channel, new {steps_} / old: {by_budget[str(steps_)]}")
    doc["per_channel_by_budget"] = by_budget
    if str(args.default_steps) in by_budget:
        doc["per_channel"] = by_budget[str(args.default_steps)]
    if args.skip_lucent:
        return doc
    theirs = _lucent_renders(bundle, chans, args.size, thresholds, args.batch, dev)
    doc["lucent"] = theirs
    table = []
    for s, m, t in theirs["points"]:
        row: dict[str, Any] = {
            "lucent_steps": s,
            "lucent_seconds": round(t, 2),
            "lucent_mean": round(m, 3),
        }
        for name, points in (("old", old["points"]), ("new", new_points)):
            hit = _reach(m, points)
            if hit is not None:
                row[name] = {
                    "steps": hit[0],
                    "seconds": round(hit[1], 2),
                    "speedup": round(t / hit[1], 2),
                }
        table.append(row)
        print(f"  lucent   {s:>4} steps: {t:7.1f} s, mean objective {m:.3f}; convlens: {row}")
    doc["table"] = table
    return doc


#: (image, channel) pairs per dataset image: --quick (16 channels x k 6 on 1,000 shapes)
#: and the full microscope (112 channels x k 9 on 3,925 Imagenette val images)
PAIRS_PER_IMAGE = {"quick": 16 * 6 / 1000, "full": 112 * 9 / 3925}
#: the attribution budget: the stage at most this share of the dataset pass's time
ATTR_BUDGET = 0.25


def _attr_quality(
    bundle: Any, source: Any, result: Any, chans: list[int], ref_steps: int, dev: Any
) -> dict[str, Any]:
    """Each method's map against integrated gradients at ``ref_steps`` steps, on the first
    top example of each of ``chans``: the Pearson correlation over the receptive-field
    crop, and the completeness error |sum - (f(x) - f(0))| / |f(x) - f(0)|."""
    out: dict[str, Any] = {}
    xs, targets, boxes = [], [], []
    for c in chans:
        e = result.top(LAYER, c)[0]
        xs.append(source.load(e.index)[0])
        targets.append(f"{LAYER}:{c}@{e.y},{e.x}")
        boxes.append(result.receptive_field(LAYER, e.y, e.x))
    x = torch.stack(xs)
    ref = convlens.attribute(
        bundle, x, targets, method="integrated_gradients", steps=ref_steps, device=dev
    )
    at_zero = convlens.attribute(
        bundle, torch.zeros_like(x), targets, method="saliency", device=dev
    )
    change = ref.score.double() - at_zero.score.double()
    for name, method, steps in ATTR_CANDIDATES:
        a = convlens.attribute(bundle, x, targets, method=method, steps=steps, device=dev)
        corr, comp = [], []
        for i, (t, b, le, r) in enumerate(boxes):
            m, m_ref = a.map[i, t:b, le:r].flatten().double(), ref.map[i, t:b, le:r].flatten()
            corr.append(float(torch.corrcoef(torch.stack([m, m_ref.double()]))[0, 1]))
            comp.append(float((a.map[i].double().sum() - change[i]).abs() / change[i].abs()))
        out[name] = {
            "corr_with_reference_median": round(float(torch.tensor(corr).median()), 3),
            "completeness_error_median": round(float(torch.tensor(comp).median()), 4),
        }
    return {"reference": f"integrated_gradients, {ref_steps} steps", "pairs": len(chans), **out}


#: rows per batch for the candidates (divides 144 pairs at 1, 2, 4 and 8 rows per pair)
ATTR_CANDIDATE_ROWS = 72
#: the methods measured: (name, method, steps)
ATTR_CANDIDATES = [
    ("input_x_gradient", "input_x_gradient", 1),
    ("integrated_gradients_2", "integrated_gradients", 2),
    ("integrated_gradients_4", "integrated_gradients", 4),
    ("integrated_gradients_8", "integrated_gradients", 8),
]


def _part_attribution(args: argparse.Namespace, dev: Any) -> dict[str, Any]:
    """The microscope's attribution stage against its budget (at most a quarter of the
    dataset pass), on ``--attr-images`` Imagenette val images (all 3,925 by default: the
    full microscope's pairs per image). The dataset pass over them (efficientnet_lite0
    ``blocks.4``, k 9, as the microscope runs it), then the microscope's own attribution
    code (``convlens.microscope._attribution_units``: rows batched, the forward stopped at
    the layer, the next batch's images read in a thread, overlays and numbers written) with
    the chosen method on the top 9 of ``--attr-channels`` channels (all 112: the stage as
    the full microscope runs it), then the pass again; the share is the stage's time over
    the mean of the two passes. Then every candidate method on ``--attr-ig-channels``
    channels, back to back (seconds per pair, and the share they would take at the full
    microscope's pairs per image), and their maps against integrated gradients at 64 steps
    on ``--attr-quality`` pairs (Pearson correlation over the crop, completeness error)."""
    from convlens.analysis._sources import make_source
    from convlens.microscope import _attr_plan, _attribution_units, _AttrPlan, _Unit
    from examples import ARCHIVE, CACHE, _subset, _val_folder

    if not ARCHIVE.is_file():
        print(f"attribution: no {ARCHIVE}; skipped")
        return {"skipped": f"no {ARCHIVE}"}
    folder = _subset(_val_folder(ARCHIVE, CACHE), args.attr_images)
    bundle = convlens.load_model("efficientnet_lite0", device=dev)
    source = make_source(str(folder), bundle.preprocess)

    # wall time, and the CPU time of the process (all its threads): on a shared machine the
    # CPU time of each part depends less on what else runs
    def one_pass() -> tuple[Any, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        r = convlens.dataset_examples(bundle, str(folder), [LAYER], k=9, device=dev, progress=False)
        return r, time.perf_counter() - t0, time.process_time() - c0

    def stage(result: Any, chans: list[int], plan: Any) -> tuple[float, int, float]:
        units = [_Unit(LAYER, 0, c) for c in chans]
        n = sum(len(plan.examples(result, LAYER, c)) for c in chans)
        with tempfile.TemporaryDirectory() as tmp:
            t0, c0 = time.perf_counter(), time.process_time()
            _attribution_units(
                result, source, bundle.model, units, {LAYER: Path(tmp)}, plan, dev, True, False
            )
            return time.perf_counter() - t0, n, time.process_time() - c0

    result, t_pass, c_pass = one_pass()
    n_images = result.length
    chosen = _attr_plan(dev, n_images, args.attr_channels, 9)
    t_stage, n_pairs, c_stage = stage(result, list(range(args.attr_channels)), chosen)
    _, t_pass2, c_pass2 = one_pass()
    pass_mean = (t_pass + t_pass2) / 2
    share = t_stage / pass_mean
    cpu_share = c_stage / ((c_pass + c_pass2) / 2)
    print(
        f"attribution: pass {t_pass:.1f} s and {t_pass2:.1f} s over {n_images} images; "
        f"{chosen.method} on the top {chosen.top} of {args.attr_channels} channels "
        f"({n_pairs} pairs) {t_stage:.1f} s: {share:.1%} of the pass "
        f"(CPU time: {c_pass:.0f} s, {c_pass2:.0f} s and {c_stage:.0f} s: {cpu_share:.1%})"
    )
    got: dict[str, Any] = {
        "images": n_images,
        "channels": args.attr_channels,
        "pairs": n_pairs,
        "method": chosen.method,
        "top": chosen.top,
        "pass_seconds": [round(t_pass, 2), round(t_pass2, 2)],
        "stage_seconds": round(t_stage, 2),
        "share_of_pass": round(share, 3),
        "pass_cpu_seconds": [round(c_pass, 1), round(c_pass2, 1)],
        "stage_cpu_seconds": round(c_stage, 1),
        "cpu_share_of_pass": round(cpu_share, 3),
        "budget": ATTR_BUDGET,
        "within_budget": share <= ATTR_BUDGET,
    }
    per_image = pass_mean / n_images
    got.update(
        pass_seconds_per_image=round(per_image, 4), pairs_per_image=round(n_pairs / n_images, 4)
    )
    if args.attr_ig_channels < 1:
        return got
    methods: dict[str, Any] = {}
    ig_chans = list(range(args.attr_ig_channels))
    for name, method, steps in ATTR_CANDIDATES:
        # 72 rows: 16 channels x k 9 = 144 pairs fill every batch of every method exactly
        secs, n, _ = stage(result, ig_chans, _AttrPlan(method, steps, ATTR_CANDIDATE_ROWS))
        per_pair = secs / n
        methods[name] = {
            "seconds_per_pair": round(per_pair, 4),
            "share_at_full": round(PAIRS_PER_IMAGE["full"] * per_pair / per_image, 3),
            "share_at_quick_ratio": round(PAIRS_PER_IMAGE["quick"] * per_pair / per_image, 3),
        }
        print(f"  {name}: {per_pair * 1e3:.0f} ms per pair; {methods[name]}")
    quality = _attr_quality(bundle, source, result, ig_chans[: args.attr_quality], 64, dev)
    for name, q in quality.items():
        if isinstance(q, dict):
            methods[name].update(q)
            print(f"  {name}: {q}")
    got.update(
        candidates_on=f"top 9 of channels 0-{ig_chans[-1]}",
        reference=quality["reference"],
        methods=methods,
    )
    return got


def _stages(site: Path) -> dict[str, Any]:
    doc = json.loads((site / "microscope.json").read_text())
    stages = doc["stages"]
    share = None
    if "attributions" in stages and stages.get("dataset pass"):
        share = round(float(stages["attributions"]) / float(stages["dataset pass"]), 3)
    return {
        "stages": {k: round(float(v), 2) for k, v in doc["stages"].items()},
        "attribution_share_of_pass": share,
        "work": doc["work"],
        "channels": sum(len(layer["units"]) for layer in doc["layers"]),
        "images": doc["dataset"]["size"],
        "settings": {
            k: doc["settings"][k]
            for k in ("steps", "k", "diversity", "batch", "device", "precision", "schedule")
        },
        "render_vs_dataset": _checks(doc),
    }


def _quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    v = sorted(values)
    at = {"min": 0.0, "p25": 0.25, "median": 0.5, "p75": 0.75, "max": 1.0}
    return {k: round(v[round(q * (len(v) - 1))], 3) for k, q in at.items()}


def _checks(doc: dict[str, Any]) -> dict[str, Any]:
    """Every unit's render against its top dataset example (``render_vs_dataset``) and the
    diversity images relative to the channel render, summarised over the site's units."""
    units = [u for layer in doc["layers"] for u in layer["units"]]
    checks = [u["render_vs_dataset"] for u in units if u.get("render_vs_dataset")]
    ratios = [c["ratio"] for c in checks if c["ratio"] is not None]
    relative = [
        d["relative"]
        for u in units
        for d in (u.get("renders") or {}).get("diversity", [])
        if d.get("relative") is not None
    ]
    return {
        "checked": len(checks),
        "below": sum(bool(c["below"]) for c in checks),
        "ratio": _quantiles(ratios),
        "diversity_relative": _quantiles(relative),
    }


def _cli(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall


def _part_quick(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        env = {**os.environ, "CONVLENS_HOME": str(Path(tmp) / "home")}
        cmd = [sys.executable, "-m", "convlens", "microscope", "--quick", "--quiet"]
        cmd += ["--out", str(site), "--device", args.device]
        wall = _cli(cmd, env)
        got = {"command": " ".join(cmd[2:]), "wall_s": round(wall, 1), **_stages(site)}
    print(f"--quick: {got['wall_s']} s wall; stages {got['stages']}")
    return got


def _part_full(args: argparse.Namespace) -> dict[str, Any]:
    from examples import ARCHIVE, _val_folder

    if not ARCHIVE.is_file():
        print(f"full: no {ARCHIVE}; skipped")
        return {"skipped": f"no {ARCHIVE}"}
    val = _val_folder(ARCHIVE, HERE / "results" / "imagenette2-224")
    out: dict[str, Any] = {}
    runs = [("plain", None)] + ([("torchrun", args.torchrun)] if args.torchrun else [])
    for name, nproc in runs:
        with tempfile.TemporaryDirectory() as tmp:
            site = Path(tmp) / "site"
            base = ["-m", "convlens", "microscope", "--data", str(val), "--layers", LAYER]
            if args.full_steps:
                base += ["--steps", str(args.full_steps)]
            base += ["--quiet", "--out", str(site)]
            base += ["--device", args.device]
            if args.full_channels:
                base += ["--channels", args.full_channels]
            if nproc:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                cmd += ["--nproc-per-node", str(nproc), *base]
            else:
                cmd = [sys.executable, *base]
            wall = _cli(cmd)
            got = {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1), **_stages(site)}
            n = got["channels"]
            got["render_s_per_channel"] = round(got["stages"]["renders"] / max(1, n), 2)
            out[name] = got
            print(f"full ({name}): {got['wall_s']} s wall, {n} channels; {got['stages']}")
            print(f"  render vs dataset: {got['render_vs_dataset']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="channels per render batch")
    ap.add_argument("--lucent-steps", default="64,256")
    ap.add_argument(
        "--budgets",
        default="16,24,32,48,64,96,104,112,120,128,160",
        help="convlens's new step budgets",
    )
    ap.add_argument(
        "--skip-float32-today",
        action="store_true",
        help="skip the float32 constant-schedule run with the heap kept",
    )
    ap.add_argument("--precision", default="auto", help="convlens's new precision")
    ap.add_argument("--schedule", default="cosine", help="convlens's new schedule")
    ap.add_argument("--default-steps", type=int, default=160, help="the microscope's default")
    ap.add_argument("--every", type=int, default=2, help="convlens measures every N steps")
    ap.add_argument("--skip-lucent", action="store_true")
    ap.add_argument("--skip-renders", action="store_true")
    ap.add_argument("--skip-quick", action="store_true")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--full-steps", type=int, default=None, help="default: the command's")
    ap.add_argument("--full-channels", default=None, help="e.g. 0-15 (default: all 112)")
    ap.add_argument("--torchrun", type=int, default=0, help="also run the full one under torchrun")
    ap.add_argument("--skip-attribution", action="store_true")
    ap.add_argument("--attr-images", type=int, default=3925, help="Imagenette val images")
    ap.add_argument("--attr-channels", type=int, default=112, help="channels attributed (k 9)")
    ap.add_argument("--attr-ig-channels", type=int, default=16, help="channels per candidate")
    ap.add_argument("--attr-quality", type=int, default=8, help="pairs against the reference")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    from _machine import cpu_name

    dev = resolve_device(args.device)
    args.device = dev.type
    doc: dict[str, Any] = {
        "benchmark": "microscope",
        "device": str(dev),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "versions": versions(),
    }
    if not args.skip_renders:
        doc["renders"] = _part_renders(args, dev)
    if not args.skip_quick:
        doc["quick"] = _part_quick(args)
    if not args.skip_full:
        doc["full"] = _part_full(args)
    if not args.skip_attribution:
        doc["attribution"] = _part_attribution(args, dev)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if dev.type == "cpu" else f"_{dev.type}"
    path = args.out / f"microscope{suffix}.json"
    if path.is_file():  # parts not run this time keep their last figures
        old = json.loads(path.read_text())
        parts = ("renders", "quick", "full", "attribution")
        doc = {**{k: old[k] for k in parts if k in old}, **doc}
    path = write_json(path, doc)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
