"""The activation atlas: everything a layer represents on one map (Carter et al., Distill
2019), for any model and any image folder, as static pages.

:func:`atlas` runs four stages, each resumable:

1. **Samples** (:func:`convlens.analysis.atlas.sample_activations`): one pass over the
   data, ``samples_per_image`` activation vectors per image at positions away from the
   border, with the predicted class's attribution and the layer's uncentered covariance.
   Kept in ``OUT/cache/samples-<key>.safetensors``: a new layout, grid or icon setting
   needs no new pass.
2. **Layout** (rank 0): UMAP over the samples (cosine, 20 neighbours, min-dist 0.01,
   ``random_state=seed``), kept in ``OUT/cache/layout-<key>.safetensors``. The layout is
   cut into a ``grid x grid`` lattice for each zoom level (``levels``, default
   ``grid // 2`` and ``grid``); a cell with at least ``min_count`` samples becomes an
   icon whose direction is the (whitened) mean of its samples. Class atlases (``classes``)
   use the samples of images the model predicts as the class with a positive attribution
   to it, on the same layout, at ``grid // 2``.
3. **Icons**: each cell's direction rendered at ``size`` px with Lucid's direction
   objective at the centre position (:func:`convlens.objectives.direction_neuron`), with
   the render engine's parameterisation, transforms, precision and schedule. Icons share
   optimisation batches padded to ``batch`` rows; each starts from its own generator, so
   an icon depends on the settings and its cell only. One PNG and one JSON per cell,
   written atomically; a cell whose JSON names the same settings is not rendered again.
   Under ``torchrun`` the cells are split ``cells[rank::world]``.
4. **Pages** (rank 0, after a barrier): receptive-field crops (``OUT/crops/<samples key>/``,
   decoded on threads) of each cell's most typical
   samples, ``atlas.json`` and the static pages (:func:`convlens.report.write_atlas_site`).

Example:
    >>> out = convlens.atlas(convlens.load_model("efficientnet_lite0"), "photos/",
    ...                      "blocks.5", out="atlas/")
    >>> out / "index.html"
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens import distributed
from convlens._alloc import keep_heap
from convlens._io import atomic_open, write_json
from convlens.analysis.atlas import (
    UMAP_METRIC,
    UMAP_MIN_DIST,
    UMAP_NEIGHBORS,
    AtlasCell,
    AtlasSamples,
    direction_value,
    directions,
    grid_cells,
    layout,
    neighbour_agreement,
    require_umap,
    sample_activations,
)
from convlens.errors import ConvlensError
from convlens.microscope._common import _key, _png_problem, _read, _save_png

__all__ = ["atlas"]

FORMAT = 1
_ICON_VERSION = 2  # 2: rendered in eval mode, through the folded copy
_CROPS_PER_CELL = 8
_CROP_SIDE = 96
_CLASS_SAMPLES = 2000  # Lucid's class atlases: the top 2,000-3,000 by class attribution
#: Icons rendered together. On a 2-core CPU, 32 icons of 80 px through efficientnet_lite0 to
#: blocks.5 cost 10 ms per icon-step against 14 ms at 8 (benchmarks/README.md, "atlas.py").
ICON_BATCH = 32


def _icon_rows(n: int) -> int:
    """Rows per icon batch for ``n`` icons in all (every rank's): at most
    :data:`ICON_BATCH`, as even as the batches allow, so the last one is not mostly
    padding (214 icons: 7 batches of 31, not 6 of 32 and one of 22 padded to 32). It
    depends on the total only, so every rank pads to the same shape.

    Example:
        >>> _icon_rows(214), _icon_rows(20), _icon_rows(64)
        (31, 20, 32)
    """
    if n <= 0:
        return ICON_BATCH
    return math.ceil(n / math.ceil(n / ICON_BATCH))


@dataclass
class _Job:
    """One icon: which atlas (``"main"`` or ``"class-NNN"``), its cell and direction."""

    group: str
    cell: AtlasCell
    direction: torch.Tensor

    @property
    def stem(self) -> str:
        return f"icons/{self.group}/g{self.cell.grid}/{self.cell.name}"


def _icon_seed(seed: int, group: str, cell: AtlasCell) -> int:
    h = hashlib.sha256(f"{seed}\0{group}\0{cell.grid}\0{cell.row}\0{cell.col}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class _DirectionRows:
    """One direction per batch row: each row's value is Lucid's direction objective of
    its own image at the layer's centre position."""

    def __init__(self, layer: str, dirs: torch.Tensor) -> None:
        self.layer = layer
        self.dirs = dirs.float()
        self._on: dict[torch.device, torch.Tensor] = {}

    def measured(self, t: torch.Tensor) -> torch.Tensor:
        h = t[:, :, t.shape[2] // 2, t.shape[3] // 2] if t.ndim == 4 else t
        dev = h.device
        if dev not in self._on:
            self._on[dev] = self.dirs.to(dev)
        return direction_value(h.float(), self._on[dev])

    def __call__(self, acts: Callable[[str], torch.Tensor]) -> torch.Tensor:
        return self.measured(acts(self.layer))


def _icon_net(
    stack: contextlib.ExitStack, net: nn.Module, layer: str, plan: Any, dev: torch.device
) -> nn.Module:
    """The model the icons are rendered through, as the microscope's renders: ``net`` in
    eval mode with its parameters frozen (both restored when ``stack`` closes, so a
    model in train mode neither renders with batch statistics nor has its running
    statistics and gradients changed), and a private copy with its BatchNorms folded,
    channels-last, when that copy gives the same activations at ``layer``."""
    from convlens.analysis.featurevis.objectives import channel as channel_obj
    from convlens.analysis.featurevis.render import _fold_checked
    from convlens.models.forms import dtype_support, is_scripted
    from convlens.models.layers import evaluating, frozen

    stack.enter_context(dtype_support(plan.pipe.dtype, dev))
    stack.enter_context(evaluating(net))
    stack.enter_context(frozen(net))
    if is_scripted(net):
        return net
    g = torch.Generator().manual_seed(0)
    probe = torch.rand(1, plan.channels, plan.size, plan.size, generator=g)
    run_net, _ = _fold_checked(net, channel_obj(layer, 0), plan.pipe(probe).to(dev), True)
    return run_net


def _render_icons(
    net: nn.Module, layer: str, jobs: list[_Job], plan: Any, seed: int, dev: torch.device, rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise ``jobs`` together (padded to ``rows``); ``(images, start values, final
    values)`` of the real rows, values measured without transforms."""
    from convlens.analysis.featurevis._amp import MixedPrecision
    from convlens.analysis.featurevis.objectives import Objective
    from convlens.analysis.featurevis.param import ImageParam
    from convlens.analysis.featurevis.render import _Forward

    real = len(jobs)
    padded = jobs + [jobs[-1]] * (rows - real)
    dirs = torch.stack([j.direction.float() for j in padded])
    obj_fn = _DirectionRows(layer, dirs)
    obj = Objective(obj_fn, [layer], description=f"atlas({layer})")
    param = ImageParam(
        plan.size, batch=rows, generator=torch.Generator().manual_seed(0), channels=plan.channels
    )
    with torch.no_grad():
        shape = param.raw.shape[1:]
        inits = [
            torch.randn(
                shape,
                generator=torch.Generator().manual_seed(_icon_seed(seed, j.group, j.cell)),
            )
            * 0.01
            for j in padded
        ]
        param.raw.copy_(torch.stack(inits))
    param = param.to(dev)
    params = list(param.parameters())
    opt = torch.optim.Adam(params, lr=plan.lr, betas=plan.schedule.betas)
    mp = MixedPrecision(plan.precision, dev, plan.dtype)
    tgen = torch.Generator().manual_seed(seed)  # the same transforms for every batch
    fwd = _Forward(net, obj)
    with fwd.hooked(False), keep_heap():
        with torch.no_grad():
            img = param().detach()
            start = obj_fn.measured(fwd(plan.pipe(img), img)(layer).float()).cpu()
        for step in range(plan.steps):
            for group in opt.param_groups:
                group["lr"] = plan.schedule.rate(step, plan.steps, plan.lr)
            opt.zero_grad(set_to_none=True)
            image = param()
            x = plan.pipe(plan.transform(image, tgen))
            with mp.autocast():
                acts = fwd(x, image)
            loss = -obj(acts).sum()
            if not torch.isfinite(loss):
                raise ConvlensError(
                    f"an atlas icon of {layer!r} became {float(loss.detach())}: lower lr "
                    f"(now {plan.lr}) or check the layer"
                )
            if mp.backward(loss, params):
                opt.step()
        with torch.no_grad():
            img = param().detach()
            final = obj_fn.measured(fwd(plan.pipe(img), img)(layer).float()).cpu()
    return img[:real, : plan.channels].cpu(), start[:real], final[:real]


def _icon_done(out: Path, job: _Job, key: str) -> dict[str, Any] | None:

    meta = _read(out / f"{job.stem}.json")
    if meta is None or meta.get("key") != key:
        return None
    if _png_problem(out / f"{job.stem}.png") is not None:
        return None
    return meta


def _resolve_classes(
    classes: Any, names: list[str], present: torch.Tensor
) -> list[tuple[int, str]]:
    """``classes`` (``None``, ``"all"``, names or indices, a comma list) as ``(index,
    name)`` pairs of the model's classes."""
    if classes is None:
        return []
    if isinstance(classes, str):
        if classes.strip().lower() == "all":
            return [(int(i), names[int(i)]) for i in torch.unique(present[present >= 0]).tolist()]
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    out = []
    lower = {n.lower(): i for i, n in enumerate(names)}
    for c in classes:
        if isinstance(c, int) or (isinstance(c, str) and c.isdigit()):
            i = int(c)
            if not 0 <= i < len(names):
                raise ConvlensError(
                    f"class {i} is out of range: the model has {len(names)} classes"
                )
        else:
            i = lower.get(str(c).lower(), -1)
            if i < 0:
                import difflib

                close = difflib.get_close_matches(str(c).lower(), list(lower), n=3)
                hint = (
                    f"; did you mean {', '.join(repr(names[lower[m]]) for m in close)}?"
                    if close
                    else ""
                )
                raise ConvlensError(
                    f"no class {str(c)!r} among the model's {len(names)} classes{hint} "
                    "(use a name, an index, or 'all')"
                )
        out.append((i, names[i]))
    return list(dict.fromkeys(out))


def _class_names(bundle: Any, samples: AtlasSamples) -> list[str]:
    n_pred = int(samples.predicted.max()) + 1 if samples.predicted.numel() else 0
    labels = list(bundle.labels) if bundle is not None and bundle.labels else None
    if labels and len(labels) >= n_pred:
        return [str(v) for v in labels]
    if samples.classes and len(samples.classes) >= n_pred:
        return [str(v) for v in samples.classes]
    return [str(i) for i in range(max(n_pred, 1))]


def _counts(values: list[int], names: Sequence[str] | None) -> list[list[Any]]:
    c: dict[int, int] = {}
    for v in values:
        if v >= 0:
            c[v] = c.get(v, 0) + 1
    order = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))
    return [[names[k] if names and k < len(names) else str(k), n] for k, n in order]


def _typical(samples: AtlasSamples, cell: AtlasCell, mean: torch.Tensor, k: int) -> list[int]:
    """The ``k`` members closest to the cell's mean vector (cosine), ties by index."""
    ids = torch.tensor(cell.members, dtype=torch.long)
    v = samples.vectors[ids].double()
    cos = torch.nn.functional.cosine_similarity(v, mean.double()[None], dim=1)
    order = sorted(range(len(ids)), key=lambda j: (-float(cos[j]), int(ids[j])))
    return [int(ids[j]) for j in order[:k]]


def atlas(
    model: Any,
    data: Any,
    layer: str,
    *,
    out: str | os.PathLike[str],
    samples_per_image: int = 1,
    grid: int = 20,
    min_count: int = 3,
    size: int = 80,
    steps: int = 512,
    whiten: bool = True,
    classes: Any = None,
    seed: int = 0,
    device: Any = None,
    levels: Sequence[int] | None = None,
    batch: int | str = "auto",
    precision: str = "auto",
    schedule: Any = "constant",
    lr: float | None = None,
    split: str = "val",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    force: bool = False,
    title: str | None = None,
    parent: dict[str, str] | None = None,
    unit_pages: Callable[[int], str | None] | None = None,
    pages: bool = True,
) -> Path:
    """The activation atlas of ``layer`` over ``data`` as static pages in ``out``;
    returns ``out`` (``out/index.html`` is the atlas at ``grid``).

    ``model``: a :class:`convlens.ModelBundle` or an ``nn.Module``; ``data``: anything
    :func:`convlens.dataset_examples` reads. ``samples_per_image`` positions per image;
    ``grid`` cells across (``levels``: the zoom levels, default ``grid // 2`` and
    ``grid``); a cell needs ``min_count`` samples; icons of ``size`` px after ``steps``
    optimisation steps (``precision``, ``schedule``, ``lr`` as in :func:`convlens.render`,
    but ``schedule`` defaults to Lucid's constant 0.05: for the direction objective it
    beat the cosine schedule at 512 steps);
    ``whiten``: render the mean times the inverse covariance (Lucid's whitening);
    ``classes``: class atlases (``"all"``, or names/indices of the model's classes).
    ``unit_pages(channel)`` gives the href (relative to ``out``) of a channel's page, to
    link the top channels of each cell; ``parent`` ``{"href", "text"}`` a link back.
    Needs ``umap-learn`` (``pip install "convlens[atlas]"``). Under ``torchrun`` the pass is
    sharded, the icons split by rank, and the pages are the same as one process's.

    Example:
        >>> convlens.atlas(bundle, convlens.data.shapes(), "bn3", out="atlas/", grid=10)
        PosixPath('atlas')
    """
    from convlens._progress import tqdm
    from convlens.analysis.examples import _fingerprint
    from convlens.capture import model_device
    from convlens.device import resolve_device
    from convlens.microscope import _plan
    from convlens.models.zoo import model_and_bundle

    require_umap()  # before any work: a missing extra is one line, not a failure at stage 2
    t_all = time.perf_counter()
    for name, v, lo in (
        ("grid", grid, 1),
        ("min_count", min_count, 1),
        ("size", size, 8),
        ("steps", steps, 1),
        ("samples_per_image", samples_per_image, 1),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    lv = sorted({int(g) for g in (levels if levels is not None else (max(2, grid // 2), grid))})
    if grid not in lv:
        lv = sorted({*lv, grid})
    if any(g < 1 for g in lv):
        raise ValueError(f"levels must be positive grid sizes, got {list(levels or [])}")
    out = Path(out)
    net, bundle = model_and_bundle(model)
    dev = distributed.local_device(model_device(net) if device is None else resolve_device(device))
    ctx = distributed.context(dev)
    if device is not None or dev != model_device(net):
        net.to(dev)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    from convlens._io import folder_lock

    with folder_lock(out, "atlas", ctx=ctx):  # one live run writes out
        timing: dict[str, float] = {}

        # 1. samples
        from convlens.analysis._sources import make_source

        prep = preprocess if preprocess is not None else (bundle.preprocess if bundle else None)
        source = make_source(data, prep, split=split)
        sample_key = _key(
            {
                "model": _fingerprint(net),
                "dataset": source.fingerprint(),
                "layer": layer,
                "samples_per_image": samples_per_image,
                "seed": seed,
                "format": 1,
            }
        )
        spath = out / "cache" / f"samples-{sample_key}.safetensors"
        t0 = time.perf_counter()
        if spath.exists() and not force:
            samples = AtlasSamples.load(spath)
        else:
            samples = sample_activations(
                net if bundle is None else bundle,
                data,
                layer,
                samples_per_image=samples_per_image,
                seed=seed,
                device=dev,
                preprocess=preprocess,
                split=split,
                progress=progress,
            )
            if ctx.is_main:
                samples.save(spath)
            distributed.barrier()
        timing["pass"] = time.perf_counter() - t0

        # 2. layout (rank 0) and cells
        t0 = time.perf_counter()
        umap_settings = {
            "method": "umap",
            "n_neighbors": UMAP_NEIGHBORS,
            "min_dist": UMAP_MIN_DIST,
            "metric": UMAP_METRIC,
            "random_state": seed,
        }
        lpath = out / "cache" / f"layout-{_key([sample_key, umap_settings])}.safetensors"
        if ctx.is_main and (
            force or not lpath.exists() or _load_points(lpath, len(samples)) is None
        ):
            _save_points(lpath, layout(samples.vectors, seed=seed))
        distributed.barrier()
        points = _load_points(lpath, len(samples))
        if points is None:
            raise ConvlensError(f"{str(lpath)!r} could not be read back: delete it and rerun")
        timing["layout"] = time.perf_counter() - t0

        names = _class_names(bundle, samples)
        picked = _resolve_classes(classes, names, samples.predicted)
        if classes is not None and bool((samples.predicted < 0).all()):
            raise ConvlensError(
                "class atlases need class scores from the model, but its output is not "
                "[N, classes]: leave classes out"
            )
        class_grid = max(2, grid // 2)
        groups: list[tuple[str, list[AtlasCell], dict[str, Any]]] = []
        for g in lv:
            groups.append(("main", grid_cells(points, g, min_count), {"grid": g}))
        for ci, cname in picked:
            sel = torch.nonzero((samples.predicted == ci) & (samples.attribution > 0)).flatten()
            if sel.numel() > _CLASS_SAMPLES:
                top = torch.argsort(samples.attribution[sel], descending=True, stable=True)
                sel = sel[top[:_CLASS_SAMPLES]]
            cells = grid_cells(points, class_grid, min_count, subset=sel) if sel.numel() else []
            groups.append(
                (
                    f"class-{ci:04d}",
                    cells,
                    {"grid": class_grid, "label": ci, "name": cname, "n": int(sel.numel())},
                )
            )
        jobs: list[_Job] = []
        means_of: dict[tuple[str, int, str], torch.Tensor] = {}
        for group, cells, _info in groups:
            means, dirs = directions(samples, cells, whiten=whiten)
            for cell, m, d in zip(cells, means, dirs):
                jobs.append(_Job(group, cell, d.float()))
                means_of[(group, cell.grid, cell.name)] = m

        # 3. icons
        t0 = time.perf_counter()
        plan = _plan(
            net,
            bundle,
            size,
            steps,
            lr,
            seed,
            0,
            0.0,
            precision,
            schedule,
            dev,
        )
        from convlens.analysis.featurevis.render import _normalizer, _Pipeline

        normalize, _ = _normalizer("auto", bundle, plan.channels)
        plan.pipe = _Pipeline(normalize, None, True, plan.dtype)  # icons at size px, as Lucid
        icon_settings = {
            **{
                k: v for k, v in plan.settings.items() if k not in ("diversity", "diversity_weight")
            },
            "upsample_to": None,
            "objective": "direction_neuron (dot x max(cos, 0.1)^4, centre position)",
            "whiten": whiten,
            "version": _ICON_VERSION,
        }
        rows = _icon_rows(len(jobs)) if batch == "auto" else int(batch)
        mine = jobs[ctx.rank :: ctx.world]
        todo = []
        for j in mine:
            key = _key(
                [icon_settings, j.direction.tolist(), j.group, j.cell.grid, j.cell.row, j.cell.col]
            )
            if force or _icon_done(out, j, key) is None:
                todo.append((j, key))
        bar = tqdm(
            total=len(mine),
            initial=len(mine) - len(todo),
            desc="atlas icons",
            unit="icon",
            disable=not (progress and ctx.is_main),
            dynamic_ncols=True,
        )
        from convlens import _signals

        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(_signals.deferred())
                run_net = _icon_net(stack, net, samples.layer, plan, dev) if todo else net
                for s in range(0, len(todo), rows):
                    chunk = todo[s : s + rows]
                    imgs, start, final = _render_icons(
                        run_net, samples.layer, [j for j, _ in chunk], plan, seed, dev, rows
                    )
                    for (j, key), img, v0, v1 in zip(chunk, imgs, start, final):
                        (out / j.stem).parent.mkdir(parents=True, exist_ok=True)
                        _save_png(img, out / f"{j.stem}.png")
                        write_json(
                            out / f"{j.stem}.json",
                            {"key": key, "objective": float(v1), "objective_start": float(v0)},
                        )
                    bar.update(len(chunk))
                    if _signals.requested() is not None:
                        _signals.stop(f"{s + len(chunk)} of {len(todo)} icons are written")
        finally:
            bar.close()
        distributed.barrier()
        timing["icons"] = time.perf_counter() - t0

        # 4. pages (rank 0)
        if ctx.is_main:
            t0 = time.perf_counter()
            doc = _document(
                out,
                net,
                bundle,
                source,
                samples,
                points,
                groups,
                means_of,
                icon_settings,
                names,
                timing,
                dict(
                    samples_per_image=samples_per_image,
                    grid=grid,
                    levels=lv,
                    min_count=min_count,
                    size=size,
                    steps=steps,
                    whiten=whiten,
                    seed=seed,
                    classes=classes,
                ),
                umap_settings,
                title,
                parent,
                unit_pages,
                dev,
                crop_dir=f"crops/{sample_key}",
                force=force,
            )
            timing["pages"] = time.perf_counter() - t0
            timing["total"] = time.perf_counter() - t_all
            doc["timing"] = {k: round(v, 3) for k, v in timing.items()}
            doc["samples"]["file"] = f"cache/{spath.name}"
            write_json(out / "atlas.json", doc)
            if pages:
                from convlens.report.atlas import write_atlas_site

                write_atlas_site(doc, out)
        distributed.barrier()
    return out


def _save_points(path: Path, points: torch.Tensor) -> None:
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        f.write(save({"points": points.contiguous()}))


def _load_points(path: Path, n: int) -> torch.Tensor | None:
    from safetensors.torch import load_file

    try:
        p = load_file(str(path))["points"]
    except Exception:
        return None
    return p if p.shape == (n, 2) else None


def _document(
    out: Path,
    net: nn.Module,
    bundle: Any,
    source: Any,
    samples: AtlasSamples,
    points: torch.Tensor,
    groups: list[tuple[str, list[AtlasCell], dict[str, Any]]],
    means_of: dict[tuple[str, int, str], torch.Tensor],
    icon_settings: dict[str, Any],
    names: list[str],
    timing: dict[str, float],
    settings: dict[str, Any],
    umap_settings: dict[str, Any],
    title: str | None,
    parent: dict[str, str] | None,
    unit_pages: Callable[[int], str | None] | None,
    dev: torch.device,
    crop_dir: str = "crops",
    force: bool = False,
) -> dict[str, Any]:
    """``atlas.json``'s content; writes the crops it names (into ``crop_dir``, named by
    the samples' key: other samples never reuse them), decoding on threads."""
    from convlens.analysis.receptive import receptive_field
    from convlens.models.forms import model_dtype

    labels_src = samples.label if bool((samples.label >= 0).any()) else samples.predicted
    agree, chance = neighbour_agreement(points, labels_src)
    rf = None
    try:
        rf = receptive_field(net, samples.layer, (1, *samples.input_shape))
    except Exception:
        rf = None
    crops: dict[int, dict[str, Any]] = {}

    def crop_of(sid: int) -> dict[str, Any]:
        if sid not in crops:
            crops[sid] = _crop_entry(samples, sid, crop_dir)
        return crops[sid]

    data_names = samples.classes
    model_name = bundle.description if bundle is not None else type(net).__name__
    levels, class_atlases = [], []
    for group, cells, info in groups:
        docs = []
        for cell in cells:
            stem = f"icons/{group}/g{cell.grid}/{cell.name}"
            meta = _read(out / f"{stem}.json") or {}
            mean = means_of[(group, cell.grid, cell.name)]
            top = torch.argsort(mean, descending=True, stable=True)[:6].tolist()
            page = (
                f"cells/g{cell.grid}/{cell.name}.html"
                if group == "main"
                else f"classes/{info['label']:04d}/{cell.name}.html"
            )
            docs.append(
                {
                    "row": cell.row,
                    "col": cell.col,
                    "count": cell.count,
                    "icon": f"{stem}.png",
                    "page": page,
                    "objective": _finite(meta.get("objective")),
                    "objective_start": _finite(meta.get("objective_start")),
                    "top_channels": [
                        {
                            "channel": int(c),
                            "weight": round(float(mean[c]), 6),
                            "unit": unit_pages(int(c)) if unit_pages is not None else None,
                        }
                        for c in top
                    ],
                    "labels": _counts(samples.label[list(cell.members)].tolist(), data_names),
                    "predicted": _counts(samples.predicted[list(cell.members)].tolist(), names),
                    "crops": [crop_of(s) for s in _typical(samples, cell, mean, _CROPS_PER_CELL)],
                }
            )
        if group == "main":
            g = info["grid"]
            levels.append(
                {
                    "grid": g,
                    "page": "index.html" if g == settings["grid"] else f"level-{g}.html",
                    "cells": docs,
                }
            )
        else:
            class_atlases.append(
                {
                    "name": info["name"],
                    "label": info["label"],
                    "page": f"classes/{info['label']:04d}.html",
                    "samples": info["n"],
                    "grid": info["grid"],
                    "cells": docs,
                }
            )
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1), "convlens-crops") as pool:
        for f in [
            pool.submit(_crop, out, source, samples, sid, rf, e["image"], force)
            for sid, e in sorted(crops.items())
        ]:
            f.result()
    return {
        "format": FORMAT,
        "title": title or f"Activation atlas of {model_name} {samples.layer}",
        "model": model_name,
        "layer": samples.layer,
        "channels": int(samples.vectors.shape[1]),
        "settings": {
            **{k: v for k, v in settings.items() if v is not None},
            "precision": icon_settings.get("precision"),
            "schedule": icon_settings.get("schedule"),
            "lr": icon_settings.get("lr"),
            "transforms": icon_settings.get("transforms"),
            "objective": icon_settings.get("objective"),
            "class_grid": max(2, settings["grid"] // 2),
            "device": str(dev),
            "dtype": str(model_dtype(net)).removeprefix("torch."),
        },
        "samples": {
            "count": len(samples),
            "images": samples.images,
            "positions": samples.positions,
            "map_size": list(samples.map_size),
            "skipped": len(samples.skipped),
        },
        "layout": {
            **umap_settings,
            "neighbour_agreement": _finite(agree),
            "chance": _finite(chance),
            "agreement_of": "labels" if bool((samples.label >= 0).any()) else "predicted classes",
        },
        "receptive_field": rf.to_dict() if rf is not None else None,
        "levels": levels,
        "class_atlases": class_atlases,
        "parent": parent,
        "timing": {},
    }


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 6) if math.isfinite(f) else None


def _crop_entry(samples: AtlasSamples, sid: int, folder: str) -> dict[str, Any]:
    """What atlas.json says of sample ``sid``'s crop (``folder/sNNNNNN.png``)."""
    label = int(samples.label[sid])
    return {
        "image": f"{folder}/s{sid:06d}.png",
        "index": int(samples.index[sid]),
        "position": [int(v) for v in samples.position[sid].tolist()],
        "label": samples.classes[label]
        if samples.classes and 0 <= label < len(samples.classes)
        else None,
    }


def _crop(
    out: Path, source: Any, samples: AtlasSamples, sid: int, rf: Any, rel: str, force: bool
) -> None:
    """Sample ``sid``'s receptive field cut from its image, the position's own stride
    cell outlined, written to ``rel`` (kept when whole, unless ``force``); an image that
    cannot be read leaves it missing (the page says so)."""
    import torch.nn.functional as F

    idx = int(samples.index[sid])
    y, x = (int(v) for v in samples.position[sid].tolist())
    path = out / rel
    if not force and _png_problem(path) is None:
        return
    try:
        xin, _, _ = source.load(idx)
    except Exception:
        return
    img = source.display(xin).float().clamp(0, 1)
    H, W = img.shape[-2:]
    if tuple(img.shape[-2:]) != tuple(samples.input_shape[-2:]):
        img = F.interpolate(
            img[None], size=tuple(samples.input_shape[-2:]), mode="bilinear", align_corners=False
        )[0]
        H, W = img.shape[-2:]
    if rf is not None and rf.bounded:
        top, bot, left, right = rf.box(y, x)
        sy, sx = max(1, rf.stride[0]), max(1, rf.stride[1])
        cy, cx = (
            rf.offset[0] + y * rf.stride[0] + rf.size[0] // 2,
            rf.offset[1] + x * rf.stride[1] + rf.size[1] // 2,
        )
    else:
        top, bot, left, right = 0, H, 0, W
        mh, mw = samples.map_size
        sy, sx = max(1, H // mh), max(1, W // mw)
        cy, cx = int((y + 0.5) * H / mh), int((x + 0.5) * W / mw)
    crop = img[:, top:bot, left:right].clone()
    if crop.shape[0] == 1:
        crop = crop.expand(3, -1, -1).clone()
    crop = crop[:3]
    # the position: a box of one stride around the unit's centre, yellow
    t, b = max(0, cy - sy // 2 - top), min(crop.shape[1], cy - sy // 2 - top + sy)
    le, r = max(0, cx - sx // 2 - left), min(crop.shape[2], cx - sx // 2 - left + sx)
    if t < b and le < r:
        colour = torch.tensor([1.0, 0.85, 0.0])[:, None, None]
        lw = max(1, round(max(crop.shape[1:]) / 48))  # still visible when shown small
        crop[:, t : t + lw, le:r] = colour
        crop[:, max(t, b - lw) : b, le:r] = colour
        crop[:, t:b, le : le + lw] = colour
        crop[:, t:b, max(le, r - lw) : r] = colour
    side = _CROP_SIDE
    if max(crop.shape[1:]) < side:
        scale = side / max(crop.shape[1:])
        crop = F.interpolate(crop[None], scale_factor=scale, mode="nearest")[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_png(crop, path)
