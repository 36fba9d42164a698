"""The activation atlas: its wall time stage by stage, UMAP at 100,000 samples, and the
icons' objective against Lucid's schedule.

Three measurements, in one run:

1. **The atlas** of the pretrained ``efficientnet_lite0`` ``blocks.5`` on the 3,925
   Imagenette validation JPEGs in ``../shared/data/imagenette2-224.tar`` (extracted once
   into ``benchmarks/results/imagenette2-224/``), at a ``--grid`` (20) grid and the
   function's defaults otherwise (one sample per image, 80 px icons, ``--steps``, zoom
   levels 10 and 20), through :func:`convlens.atlas`: the wall time of the pass, the UMAP
   layout, the icons and the pages, from its ``atlas.json``; the neighbour agreement of
   the layout against chance.
2. **UMAP at about 100,000 samples**: the same pass at ``--umap-per-image`` (25, every
   position of ``blocks.5``'s 7 x 7 map away from the border) samples per image (98,125
   vectors), then :func:`convlens.analysis.atlas.layout` on them.
3. **Icon steps**: the first ``--cells`` (32) cells of the atlas's 20 x 20 level rendered
   again, one batch, with Lucid's constant 0.05 at 512 (the atlas's default) and 256
   steps and with convlens's cosine schedule at 256 and 512 steps, all in float32, and
   the default in bfloat16 (``--runs`` picks): each cell's final direction objective,
   the seconds, and the ratios to the first run's objective.

    python benchmarks/atlas.py [--device auto|cpu|cuda] [--grid 20] [--steps 512]
        [--skip-atlas] [--skip-umap] [--skip-steps] [--cells 32] [--runs ...]

Results: ``results/atlas.json`` (a part skipped keeps its figures from the last run that
made them). Without the Imagenette archive the script says so and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LAYER = "blocks.5"
RESULTS = HERE / "results" / "atlas.json"


def _atlas(args: argparse.Namespace, val: Path, out: Path) -> dict[str, Any]:
    import convlens

    bundle = convlens.load_model("efficientnet_lite0", device=args.device)
    t0 = time.perf_counter()
    convlens.atlas(
        bundle,
        str(val),
        LAYER,
        out=out,
        grid=args.grid,
        steps=args.steps,
        device=args.device,
        force=True,
        progress=False,
    )
    return _atlas_doc(args, out, time.perf_counter() - t0)


def _atlas_doc(args: argparse.Namespace, out: Path, wall: float | None) -> dict[str, Any]:
    """Part 1's figures from the atlas's own atlas.json (``wall``: None reads its total)."""
    doc = json.loads((out / "atlas.json").read_text())
    icons = {lv["grid"]: len(lv["cells"]) for lv in doc["levels"]}
    return {
        "layer": LAYER,
        "grid": doc["settings"]["grid"],
        "steps": doc["settings"]["steps"],
        "schedule": doc["settings"]["schedule"],
        "samples": doc["samples"]["count"],
        "images": doc["samples"]["images"],
        "icons": icons,
        "precision": doc["settings"]["precision"],
        "timing": doc["timing"],
        "wall": round(wall if wall is not None else doc["timing"]["total"], 1),
        "neighbour_agreement": doc["layout"]["neighbour_agreement"],
        "chance": doc["layout"]["chance"],
        "objective_median": _median([c["objective"] for lv in doc["levels"] for c in lv["cells"]]),
    }


def _median(v: list[float]) -> float | None:
    v = sorted(x for x in v if x is not None)
    return v[len(v) // 2] if v else None


def _umap(args: argparse.Namespace, val: Path) -> dict[str, Any]:
    import convlens
    from convlens.analysis.atlas import layout, sample_activations

    bundle = convlens.load_model("efficientnet_lite0", device=args.device)
    t0 = time.perf_counter()
    s = sample_activations(
        bundle,
        str(val),
        LAYER,
        samples_per_image=args.umap_per_image,
        device=args.device,
        progress=False,
    )
    t_pass = time.perf_counter() - t0
    t0 = time.perf_counter()
    layout(s.vectors, seed=0)
    t_umap = time.perf_counter() - t0
    return {
        "samples": len(s),
        "samples_per_image": args.umap_per_image,
        "pass": round(t_pass, 1),
        "umap": round(t_umap, 1),
    }


def _steps(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The atlas's first cells rendered again under each schedule."""
    import convlens
    from convlens.analysis.atlas import AtlasSamples, directions, grid_cells
    from convlens.analysis.featurevis.render import _normalizer, _Pipeline
    from convlens.microscope import _plan

    M = sys.modules["convlens.atlas"]
    doc = json.loads((out / "atlas.json").read_text())
    samples = AtlasSamples.load(out / doc["samples"]["file"])
    (lpath,) = sorted((out / "cache").glob("layout-*.safetensors"))
    points = M._load_points(lpath, len(samples))
    cells = grid_cells(points, args.grid, 3)[: args.cells]
    _, dirs = directions(samples, cells, whiten=True)
    jobs = [M._Job("main", c, d.float()) for c, d in zip(cells, dirs)]
    bundle = convlens.load_model("efficientnet_lite0", device=args.device)
    dev = torch.device(args.device)
    got: dict[str, Any] = {}
    for name in args.runs.split(","):
        sched, steps_s, precision = [*name.split("-"), "float32"][:3]
        steps = int(steps_s)
        plan = _plan(
            bundle.model,
            bundle,
            80,
            steps,
            None,
            0,
            0,
            0.0,
            precision,
            sched,
            dev,
        )
        normalize, _ = _normalizer("auto", bundle, plan.channels)
        plan.pipe = _Pipeline(normalize, None, True, plan.dtype)
        with contextlib.ExitStack() as stack:  # the model as the atlas renders through it
            net = M._icon_net(stack, bundle.model, LAYER, plan, dev)
            t0 = time.perf_counter()
            _, _, final = M._render_icons(net, LAYER, jobs, plan, 0, dev, len(jobs))
        got[name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "objective": [round(float(v), 5) for v in final],
        }
        print(f"  {name}: {got[name]['seconds']} s", flush=True)
    base = torch.tensor(got[args.runs.split(",")[0]]["objective"])
    for r in got.values():
        ratio = torch.tensor(r["objective"]) / base
        r["ratio_median"] = round(float(ratio.median()), 3)
        r["ratio_min"] = round(float(ratio.min()), 3)
        r["at_least_lucid"] = int((ratio >= 1).sum())
    return {"cells": len(jobs), "runs": got}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--grid", type=int, default=20)
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--cells", type=int, default=32)
    ap.add_argument(
        "--runs",
        default="constant-512,constant-256,cosine-256,cosine-512,constant-512-bfloat16",
        help="icon runs of part 3, SCHEDULE-STEPS[-PRECISION] (float32 unless named); the "
        "first is the baseline of the ratios",
    )
    ap.add_argument("--umap-per-image", type=int, default=25)
    ap.add_argument("--images", type=int, default=0, help="a subset (a dry run); 0: all")
    ap.add_argument("--skip-atlas", action="store_true")
    ap.add_argument("--skip-umap", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    args = ap.parse_args()

    from _machine import cpu_name
    from convlens.device import resolve_device
    from examples import ARCHIVE, CACHE, _subset, _val_folder

    if not ARCHIVE.is_file():
        print(f"no {ARCHIVE}: the atlas benchmark needs the Imagenette archive")
        return
    dev = resolve_device(args.device)
    args.device = dev.type
    val = _val_folder(ARCHIVE, CACHE)
    if args.images:
        val = _subset(val, args.images)
    out = HERE / "results" / ("atlas-blocks5" if not args.images else "atlas-dry")
    doc: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    doc.update(
        {
            "benchmark": "atlas",
            "device": str(dev),
            "machine": cpu_name() if dev.type == "cpu" else torch.cuda.get_device_name(dev),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
    )
    if not args.skip_atlas:
        print("atlas ...", flush=True)
        doc["atlas"] = _atlas(args, val, out)
    elif (out / "atlas.json").is_file() and not args.images:
        doc["atlas"] = _atlas_doc(args, out, None)  # the last run's
    if "atlas" in doc:
        print(json.dumps(doc["atlas"], indent=1), flush=True)
        _write(doc, args)
    if not args.skip_umap:
        print("umap ...", flush=True)
        doc["umap"] = _umap(args, val)
        print(json.dumps(doc["umap"], indent=1), flush=True)
        _write(doc, args)
    if not args.skip_steps:
        print("steps ...", flush=True)
        old = doc.get("steps", {}).get("runs", {})
        doc["steps"] = _steps(args, out)
        # runs not named this time keep the last run's figures (float32 repeats exactly)
        doc["steps"]["runs"] = {**old, **doc["steps"]["runs"]}
        print(
            json.dumps(
                {
                    k: {kk: vv for kk, vv in v.items() if kk != "objective"}
                    for k, v in doc["steps"]["runs"].items()
                },
                indent=1,
            ),
            flush=True,
        )
    _write(doc, args)
    print(
        "a dry run on a subset: results/atlas.json not written"
        if args.images
        else f"wrote {RESULTS}"
    )


def _write(doc: dict[str, Any], args: argparse.Namespace) -> None:
    """After each part, so a later part's failure loses nothing."""
    if args.images:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
