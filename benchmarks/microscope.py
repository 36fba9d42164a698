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

    .venv-bench/bin/python benchmarks/microscope.py [--device auto|cpu|cuda] [--skip-lucent]
        [--skip-quick] [--skip-full] [--full-steps 256] [--full-channels 0-111]
        [--torchrun 1]   # also the full run under torchrun --nproc-per-node N (GPUs)

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
    bundle: Any, chans: list[int], size: int, steps: int, every: int, batch: int, dev: Any
) -> dict[str, Any]:
    from convlens.analysis.featurevis import score
    from convlens.analysis.featurevis.objectives import channel
    from convlens.analysis.featurevis.render import _fold_checked, _frozen
    from convlens.microscope import _plan, _render_batch
    from convlens.models.layers import evaluating

    net = bundle.model
    plan = _plan(net, bundle, size, steps, 0.05, 0, 0)
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
    return {"points": points, "folded_batchnorms": folded}


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
    bundle = convlens.load_model("efficientnet_lite0", device=dev)
    chans = list(range(args.channels))
    thresholds = tuple(int(s) for s in args.lucent_steps.split(","))
    print(f"renders: {len(chans)} channels of {LAYER}, {args.size} px, batch {args.batch}")
    ours = _convlens_renders(bundle, chans, args.size, max(thresholds), args.every, args.batch, dev)
    for s, m, t in ours["points"]:
        if s in thresholds:
            print(f"  convlens {s:>4} steps: {t:7.1f} s, mean objective {m:.3f}")
    doc: dict[str, Any] = {"convlens": ours}
    if args.skip_lucent:
        return doc
    theirs = _lucent_renders(bundle, chans, args.size, thresholds, args.batch, dev)
    doc["lucent"] = theirs
    table = []
    for s, m, t in theirs["points"]:
        got = _reach(m, ours["points"])
        row = {"lucent_steps": s, "lucent_seconds": round(t, 2), "lucent_mean": round(m, 3)}
        if got is not None:
            row.update(
                convlens_steps=got[0],
                convlens_seconds=round(got[1], 2),
                speedup=round(t / got[1], 2),
            )
        table.append(row)
        print(f"  lucent   {s:>4} steps: {t:7.1f} s, mean objective {m:.3f}; convlens: {row}")
    doc["table"] = table
    return doc


def _stages(site: Path) -> dict[str, Any]:
    doc = json.loads((site / "microscope.json").read_text())
    return {
        "stages": {k: round(float(v), 2) for k, v in doc["stages"].items()},
        "work": doc["work"],
        "channels": sum(len(layer["units"]) for layer in doc["layers"]),
        "images": doc["dataset"]["size"],
        "settings": {k: doc["settings"][k] for k in ("steps", "k", "diversity", "batch", "device")},
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
            base += ["--steps", str(args.full_steps), "--quiet", "--out", str(site)]
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
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="channels per render batch")
    ap.add_argument("--lucent-steps", default="16,64")
    ap.add_argument("--every", type=int, default=2, help="convlens measures every N steps")
    ap.add_argument("--skip-lucent", action="store_true")
    ap.add_argument("--skip-renders", action="store_true")
    ap.add_argument("--skip-quick", action="store_true")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--full-steps", type=int, default=256)
    ap.add_argument("--full-channels", default=None, help="e.g. 0-15 (default: all 112)")
    ap.add_argument("--torchrun", type=int, default=0, help="also run the full one under torchrun")
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
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if dev.type == "cpu" else f"_{dev.type}"
    path = args.out / f"microscope{suffix}.json"
    if path.is_file():  # parts not run this time keep their last figures
        old = json.loads(path.read_text())
        doc = {**{k: old[k] for k in ("renders", "quick", "full") if k in old}, **doc}
    path = write_json(path, doc)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
