"""The last stage, the pages, by rank 0: ``microscope.json`` (everything the pages show,
paths relative to ``OUT``) and the static site (:func:`convlens.report.site.write_site`).

Inputs: every earlier stage's outputs in the context (the dataset pass's ``result`` and
folders, the renders' ``plan`` and ``render_dirs``, the checks and example files on disk,
the attributions' ``attr_plan`` and ``attr_dirs``, ``atlas``: a layer's activation atlas
page, linked from the layer's page when present), the connections between the layers
(:mod:`convlens.microscope.connections`), and every rank's ``counts`` and ``stages``
(gathered here: work summed, seconds the slowest rank's).
Outputs: ``OUT/index.html``, ``OUT/style.css``, per layer ``<i>-<layer>/index.html``,
``by-selectivity.html``, ``by-mean.html`` and one ``NNNN.html`` per channel, and
``OUT/microscope.json`` last.
Resume: none needed: the pages are written again on every run, from the files on disk, and
are the same bytes for the same settings (but the index page's creation time and seconds).

Example:
    >>> pages.run(ctx)
    >>> (ctx.out / "microscope.json").is_file()
    True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens import distributed
from convlens._io import versions, write_json
from convlens.microscope._common import Context, _read
from convlens.microscope.attributions import _AttrPlan
from convlens.microscope.checks import (
    _CHECK_ABOUT,
    _check_path,
    _png_check_why,
    _ratio,
    _render_vs_dataset,
)
from convlens.microscope.connections import _connections
from convlens.microscope.renders import _RenderPlan

FORMAT = 1
#: strongest input channels listed for a connected convolution
_CONNECTED = 6


def _document(
    result: Any,
    keys: list[str],
    dirs: dict[str, str],
    render_dirs: dict[str, Path],
    example_dirs: dict[str, Path],
    attr_dirs: dict[str, Path],
    attr_plan: _AttrPlan | None,
    conns: dict[str, tuple[str | None, str | None, torch.Tensor | None]],
    plan: _RenderPlan,
    out_dir: Path,
    bundle: Any,
    net: nn.Module,
    settings: dict[str, Any],
    title: str | None,
    atlas: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``microscope.json``: everything the pages show, paths relative to ``out_dir``.
    ``atlas``: per layer key, its activation atlas page (relative to ``out_dir``), the
    layer's ``"atlas"`` entry; a layer without one has no such entry."""
    from convlens.models.layers import unwrap

    def rel(p: Path) -> str:
        return p.relative_to(out_dir).as_posix()

    classes = result.classes
    layers_doc = []
    for key in keys:
        le = result.layers[key]
        chans = result.channels(key)
        src, why, strength = conns[key]
        src_chans = set(result.channels(src)) if src is not None else set()
        units = []
        for c in chans:
            st = result.stats(key, c)
            sel = result.selectivity(key, c)
            hist = result.histogram(key, c)
            rmark = _read(render_dirs[key] / f"{c:04d}.json")
            emark = _read(example_dirs[key] / f"{c:04d}.json")
            renders = None
            check = _read(_check_path(render_dirs[key], c)) if rmark is not None else None
            png = (check or {}).get("images", {})
            if rmark is not None:
                rd = render_dirs[key]
                y, x = rmark.get("centre") or (None, None)
                base = png.get("channel", {}).get("mean")
                renders = {
                    "channel": {
                        "image": rel(rd / rmark["channel"]["image"]),
                        "value": rmark["channel"]["value"],
                        "objective": f"channel({key}, {c})",
                        "png_value": base,
                    },
                    "neuron": {
                        "image": rel(rd / rmark["neuron"]["image"]),
                        "value": rmark["neuron"]["value"],
                        "objective": f"neuron({key}, {c}) at y={y}, x={x}",
                    },
                    "negative": {
                        "image": rel(rd / rmark["negative"]["image"]),
                        "value": rmark["negative"]["value"],
                        "objective": f"-channel({key}, {c})",
                    },
                    "diversity": [
                        {
                            "image": rel(rd / d["image"]),
                            "value": d["value"],
                            **_relative(png.get(f"diversity-{j}", {}).get("mean"), base),
                        }
                        for j, d in enumerate(rmark["diversity"])
                    ],
                }
            check_doc, check_why = _render_vs_dataset(
                check,
                result.top(key, c),
                result.reduce,
                "this channel has no renders" if rmark is None else _png_check_why(plan.channels),
            )
            examples: dict[str, list[dict[str, Any]]] = {}
            for which in ("top", "bottom"):
                exs = result.top(key, c) if which == "top" else result.bottom(key, c)
                files = (emark or {}).get(which, [])
                rows = []
                for rank, e in enumerate(exs):
                    f = files[rank] if rank < len(files) else {}
                    rows.append(
                        {
                            "rank": rank,
                            "index": e.index,
                            "score": e.score,
                            "y": e.y,
                            "x": e.x,
                            "label": (
                                classes[e.label]
                                if classes and e.label is not None and e.label < len(classes)
                                else None
                            ),
                            "path": e.path,
                            "box": list(result.receptive_field(key, e.y, e.x)),
                            "crop": rel(example_dirs[key] / f["crop"]) if "crop" in f else None,
                            "full": rel(example_dirs[key] / f["full"]) if "full" in f else None,
                        }
                    )
                examples[which] = rows
            attribution, attribution_why = _attribution_doc(
                attr_dirs.get(key), attr_plan, c, examples["top"], rel
            )
            top_classes = None
            if classes:
                tally: dict[str, int] = {}
                for e in examples["top"]:
                    if e["label"] is not None:
                        tally[e["label"]] = tally.get(e["label"], 0) + 1
                top_classes = [
                    {"class": name, "count": n}
                    for name, n in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))
                ]
            connected = None
            connected_why = why
            if strength is not None and src is not None:
                row = strength[c]
                order = sorted(range(row.numel()), key=lambda i: (-float(row[i]), i))
                connected = [
                    {
                        "layer": src,
                        "channel": i,
                        "strength": float(row[i]),
                        "page": f"{dirs[src]}/{i:04d}.html" if i in src_chans else None,
                    }
                    for i in order[:_CONNECTED]
                    if float(row[i]) > 0
                ]
            units.append(
                {
                    "channel": c,
                    "page": f"{dirs[key]}/{c:04d}.html",
                    "stats": _stats(st),
                    "selectivity": (
                        {
                            "index": _rounded(sel.index),
                            "top_class": classes[sel.top_class]
                            if classes
                            and sel.top_class is not None
                            and sel.top_class < len(classes)
                            else None,
                        }
                        if classes and not math.isnan(sel.index)
                        else None
                    ),
                    "histogram": {
                        "edges": list(hist.edges),
                        "counts": list(hist.counts),
                        "scale": "symlog",
                    },
                    "renders": renders,
                    "render_vs_dataset": check_doc,
                    "render_vs_dataset_why": check_why,
                    "top": examples["top"],
                    "bottom": examples["bottom"],
                    "attribution": attribution,
                    "attribution_why": attribution_why,
                    "top_classes": top_classes,
                    "connected": connected,
                    "connected_why": connected_why,
                }
            )
        rf = le.receptive
        layers_doc.append(
            {
                "name": key,
                "dir": dirs[key],
                "shape": [int(v) for v in le.shape],
                "channels": int(le.shape[0]),
                "receptive_field": (
                    {
                        "size": list(rf.size),
                        "stride": list(rf.stride),
                        "bounded": rf.bounded,
                        "reason": rf.reason or None,
                    }
                    if rf is not None
                    else None
                ),
                "connections": {"from": src, "why": why},
                "render_vs_dataset": {
                    "reduce": result.reduce,
                    "checked": sum(u["render_vs_dataset"] is not None for u in units),
                    "below": sum(
                        u["render_vs_dataset"] is not None and u["render_vs_dataset"]["below"]
                        for u in units
                    ),
                },
                "units": units,
                **({"atlas": atlas[key]} if atlas and key in atlas else {}),
            }
        )
    base = unwrap(net)
    n_params = sum(p.numel() for p in base.parameters())
    return {
        "format": FORMAT,
        "title": title or "convlens microscope",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": result.model_name,
            "description": bundle.description if bundle is not None else type(base).__name__,
            "parameters": n_params,
        },
        "dataset": {
            "name": result.dataset,
            "size": result.length,
            "labelled": bool(result.classes),
            "classes": result.classes,
            "skipped": len(result.skipped),
        },
        "settings": settings,
        "versions": versions(),
        "notes": list(result.notes),
        "layers": layers_doc,
    }


#: Significant digits of the float64 moments on the site. Chan's merge gives another
#: world size the same moments to about 1e-15 (relative), not bitwise; at 10 digits the
#: pages are the same for any world size unless a value lies within that of a rounding
#: boundary. Scores, min, max, counts and the histogram are exact either way.
_MOMENT_DIGITS = 10


def _attribution_doc(
    folder: Path | None,
    plan: _AttrPlan | None,
    channel: int,
    top: list[dict[str, Any]],
    rel: Callable[[Path], str],
) -> tuple[dict[str, Any] | None, str | None]:
    """A unit's ``attribution`` entry of microscope.json and, without one, why not."""
    if plan is None or folder is None:
        return None, "attributions were not computed in this run (attributions=False)"
    mark = _read(folder / f"{channel:04d}.json")
    if mark is None:
        return None, "this channel's attributions are missing"
    rows = []
    for rank, a in enumerate(mark.get("top", [])):
        ex = top[rank] if rank < len(top) else {}
        rows.append(
            {
                "rank": rank,
                "index": ex.get("index"),
                "image": rel(folder / a["image"]),
                "box": a["box"],
                "sum": a["sum"],
                "positive": a["positive"],
                "negative": a["negative"],
                "inside": a["inside"],
                **({"delta": a["delta"]} if "delta" in a else {}),
            }
        )
    doc = {
        "method": mark.get("method"),
        "steps": mark.get("steps"),
        "baseline": mark.get("baseline"),
        "target": "the unit's value at the example's arg-max position (its y, x)",
        "about": plan.about(),
        "scale": mark.get("scale"),
        "colour_scale": mark.get("colour_scale"),
        "top": rows,
    }
    return doc, None


def _relative(value: float | None, channel: float | None) -> dict[str, Any]:
    """A diversity image's numbers measured on its PNG: its channel mean (``png_value``)
    and that relative to the channel render's (``relative``; None when either is missing
    or the channel render's is not positive)."""
    if value is None:
        return {"png_value": None, "relative": None}
    return {
        "png_value": value,
        "relative": None if channel is None else _ratio(value, channel),
    }


def _rounded(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(f"{v:.{_MOMENT_DIGITS}g}")


def _stats(st: Any) -> dict[str, Any]:
    d = _finite(st._asdict())
    d["mean"], d["std"] = _rounded(st.mean), _rounded(st.std)
    return d


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def run(ctx: Context) -> None:
    """Gather every rank's work and seconds, then (rank 0) write ``microscope.json`` and
    the pages."""
    from convlens.analysis.examples import _ranges
    from convlens.report.site import write_site

    if ctx.dist.world > 1:
        gathered = distributed.all_gather_objects(ctx.counts)
        ctx.counts = {key: sum(int(g[key]) for g in gathered) for key in ctx.counts}
        times = distributed.all_gather_objects(ctx.stages)
        ctx.stages = {key: max(float(t[key]) for t in times) for key in ctx.stages}
    distributed.barrier()
    if ctx.dist.is_main:
        s, result, plan = (
            ctx.settings,
            ctx.need("result", "dataset_pass"),
            ctx.need("plan", "renders"),
        )
        attr_plan, keys, stages = ctx.attr_plan, ctx.keys, ctx.stages
        shapes = {key: tuple(result.layers[key].shape) for key in keys}
        conns = _connections(ctx.net, keys, shapes)
        doc = _document(
            result,
            keys,
            ctx.dirs,
            ctx.render_dirs,
            ctx.example_dirs,
            ctx.attr_dirs,
            attr_plan,
            conns,
            plan,
            ctx.out,
            ctx.bundle,
            ctx.net,
            {
                "k": result.k,
                "steps": s.steps,
                "size": s.size,
                "diversity": s.diversity,
                "diversity_weight": s.diversity_weight,
                "batch": s.batch,
                "seed": s.seed,
                "lr": plan.lr,
                "schedule": plan.schedule.name,
                "precision": plan.precision,
                "device": str(ctx.dev),
                "world_size": ctx.dist.world,
                "dtype": plan.settings["dtype"],
                "transforms": plan.settings["transforms"],
                "upsample_to": plan.settings["upsample_to"],
                "attribution": attr_plan.settings()["method"] if attr_plan else "off",
                "attribution_top": attr_plan.top if attr_plan else None,
                "render_check": _png_check_why(plan.channels)
                or _CHECK_ABOUT.format(reduce=result.reduce),
                "channels": {key: _ranges(result.channels(key)) for key in keys},
                **(s.extra or {}),
            },
            s.title,
            atlas=ctx.atlas,
        )
        doc["work"] = ctx.counts
        stages["pages"] = 0.0
        doc["stages"] = dict(stages)
        t_pages = time.perf_counter()
        write_site(doc, ctx.out)
        stages["pages"] = time.perf_counter() - t_pages
        doc["stages"] = {**stages, "total": time.perf_counter() - ctx.t_start}
        write_site(doc, ctx.out)  # the index page with the pages' own time
        write_json(ctx.out / "microscope.json", doc)
    distributed.barrier()
