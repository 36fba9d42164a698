"""A microscope for your own model: every channel of some layers as a static site.

:func:`microscope` runs three stages and then writes the pages:

1. **The dataset pass** (:func:`convlens.dataset_examples`): the top-k and bottom-k images
   of every channel, its statistics, a histogram of its per-image scores and, with labels,
   its class selectivity. Its result is kept in ``OUT/cache/examples-<key>/``; the pass
   checkpoints as it goes, so an interrupted one continues.
2. **The renders**: for every channel, feature visualizations as in the Distill appendix:
   the channel objective, the neuron objective at the centre position, the negative (the
   channel minimised) and a diversity set (``diversity`` images with Lucid's diversity
   term). Many channels share one optimisation batch; each channel's starting images come
   from its own generator (seeded by the settings, the layer and the channel) and every
   batch draws the same transform sequence, so a channel's images depend on the settings
   and the channel only. Batches are padded to exactly ``batch`` channels, so no kernel
   sees a different shape when fewer channels, or more ranks, share the work.
   **Every render checked against the dataset**: each channel's saved PNGs (the channel
   render and the diversity set) are read back and fed to the model as the renders are
   (upsampled to the model's input size, normalised, in the model's own dtype, BatchNorm
   not folded, no autocast: the way the dataset pass feeds a preprocessed image), one
   forward per channel. The channel render's unit, reduced like the dataset pass (the max
   over positions by default), is set against the unit's top dataset example
   (``render_vs_dataset``: ``render``, ``top_example``, ``ratio`` = render / top example
   when the top example scores above 0, ``below`` = render < top example, ``reduce``); each
   diversity image's channel mean against the channel render's (``png_value``,
   ``relative``). The numbers go to ``NNNN-check.json`` beside the renders, with the
   SHA-256 of the PNGs they were measured on: a rerun measures again only a PNG that
   changed, so renders reused from disk are measured from the files on disk.
3. **The examples**: each channel's top-k examples cut out at their receptive field with
   the activation overlaid, the whole top images small, and the bottom-k.
4. **The attributions** (``attributions=True``): for the top examples, the channel's value
   at the example's arg-max position attributed to the input pixels (input x gradient),
   cut at the receptive-field crop and drawn as a signed overlay on one symmetric scale per
   channel. Its budget is a quarter of the dataset pass's time: one (image, channel) pair
   costs 1.2 (wall) to 2 (CPU time) images of the pass, so each channel gets as many of its
   top examples as 0.125 pairs per dataset image afford, at least 3 (all 9 for a large
   dataset; integrated gradients' steps each cost a pair again). Many pairs share one
   forward, stopped at the layer, and one backward; only the winners' images are read
   again.

Every channel's images are written atomically as their own files under a folder named by
a hash of the settings that decide them (``<layer>/r-<key>/``, ``<layer>/e-<key>/``,
``<layer>/a-<key>/``); a
channel is finished when its ``NNNN.json`` is there, and a rerun skips finished channels
(after Ctrl-C, a crash or a restarted torchrun job). ``force=True`` recomputes everything.
SIGTERM or Ctrl-C during the pass, the renders, the crops or the attributions stops at the
next batch (or channel) boundary, its work written, and raises :class:`convlens.Preempted`.

Under ``torchrun`` the dataset pass is sharded (``range(rank, N, world)``), the channels
are split ``units[rank::world]`` (each rank on its own GPU), and rank 0 writes
``microscope.json`` and the pages (:mod:`convlens.report.site`) after a barrier. The site is
the same for any ``batch`` and any world size, given the same threads per process (oneDNN
splits a convolution's work by thread count; torchrun gives every rank one thread). Mean,
std and selectivity are float64 merges that agree across world sizes to about 1e-15; the
site shows them to 10 significant digits. ``OUT`` must be a folder every rank sees.

Example:
    >>> site = convlens.microscope(convlens.load_model("efficientnet_lite0"),
    ...                            convlens.data.shapes(), ["blocks.4"], out="site/")
    >>> site / "index.html"
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convlens import _signals, distributed
from convlens._io import atomic_open, folder_lock, versions, write_json
from convlens.analysis.attribution.result import SCALE_PERCENTILE
from convlens.capture import model_device
from convlens.device import DeviceLike, resolve_device
from convlens.errors import CheckpointError, ConvlensError, ConvlensWarning, ResourceError

__all__ = ["FORMAT", "microscope"]

FORMAT = 1
#: what the render files' key covers besides the settings (bump to invalidate old renders)
_RENDER_VERSION = 1
#: The diversity term's weight against the channel mean (per image: its mean minus the weight
#: times the sum of its Gram similarities to the others of its set). Lucid's 1e2 left the
#: diversity images of the pretrained efficientnet_lite0's blocks.4 at 20-50% of the channel
#: render's objective; 5 keeps them at 83% on average (at least 60%) with a Gram distance
#: between them of 0.79 (0.05 without the term, 0.87 at 10): benchmarks/diversity.py,
#: benchmarks/README.md. Lucid's 1e2 stays available as ``diversity_weight=100``.
_DIVERSITY_WEIGHT = 5.0
#: the longest side of the whole top images on a channel page
_THUMB = 96
#: strongest input channels listed for a connected convolution
_CONNECTED = 6
#: The attribution of a unit's top examples: input x gradient, one forward and backward per
#: (image, unit) pair. Integrated gradients' steps cost one pair each: at 2 steps the budget
#: (the stage at most a quarter of the dataset pass) affords half the examples
#: (benchmarks/README.md, "microscope.py").
_ATTR_METHOD = "input_x_gradient"
_ATTR_STEPS = 1
#: what the attribution files' key covers besides the settings (bump to invalidate them)
_ATTR_VERSION = 1
#: the colour scale of a unit's overlays: this percentile of |map| over its crops
#: winners' images kept while a layer's pairs are attributed (an image is often a winner of
#: several channels)
_ATTR_CACHE = 128
#: (image, unit) pairs per dataset image the attribution stage can afford: one pair (a forward
#: to the layer and a backward) costs about 1.2 images of the dataset pass in wall time on a
#: quiet 2-core CPU and 2 in CPU time (efficientnet_lite0 blocks.4 on Imagenette val), and
#: the stage's budget is a quarter of the pass (benchmarks/README.md): 0.25 / 2
_ATTR_PAIRS_PER_IMAGE = 0.125
#: the fewest top examples attributed per unit, whatever the budget
_ATTR_MIN_TOP = 3
#: the most rows per attribution batch on a CPU (4x on a GPU): 128 rows of efficientnet_lite0
#: to blocks.4 take 0.75x the time per row of 32
_ATTR_MAX_ROWS = 128


# ------------------------------------------------------------------------ keys and files


def _key(obj: Any) -> str:
    """A short hash of a JSON-able object (the settings that decide some files)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _layer_dir(i: int, layer: str) -> str:
    """A folder name for the ``i``-th requested layer: its index (unique) and its name with
    anything but letters, digits, ``.``, ``-`` and ``_`` replaced."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in layer)[:60]
    return f"{i}-{safe}"


def _save_png(image: torch.Tensor, path: Path) -> None:
    """``[C, H, W]`` in [0, 1] as a PNG, atomically (1 channel grey, else the first 3)."""
    from PIL import Image

    x = image.detach().float().cpu().clamp(0, 1)
    if x.shape[0] >= 3:
        arr = (x[:3].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        img = Image.fromarray(arr, "RGB")
    else:
        arr = (x[0] * 255).round().to(torch.uint8).numpy()
        img = Image.fromarray(arr, "L")
    with atomic_open(path, "wb") as fh:
        img.save(fh, format="PNG")


def _overlay(image: torch.Tensor, act: torch.Tensor, peak: float) -> torch.Tensor:
    """The image with the activation over it: orange where the channel is high (relative to
    ``peak``, the example's maximum), the image itself where it is at or below zero."""
    rgb = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
    heat = (act / peak).clamp(0, 1) if peak > 0 else torch.zeros_like(act)
    color = torch.tensor([1.0, 0.55, 0.0]).view(3, 1, 1)
    alpha = 0.55 * heat[None]
    return rgb * (1 - alpha) + color * alpha


def _outline(image: torch.Tensor, box: tuple[int, int, int, int], width: int = 2) -> torch.Tensor:
    """``image`` with the box ``(top, bottom, left, right)`` drawn in yellow."""
    rgb = (image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)).clone()
    t, b, left, r = box
    yellow = torch.tensor([1.0, 0.9, 0.0]).view(3, 1)
    for y in range(t, min(t + width, b)):
        rgb[:, y, left:r] = yellow
    for y in range(max(b - width, t), b):
        rgb[:, y, left:r] = yellow
    for x in range(left, min(left + width, r)):
        rgb[:, t:b, x] = yellow.expand(3, b - t)
    for x in range(max(r - width, left), r):
        rgb[:, t:b, x] = yellow.expand(3, b - t)
    return rgb


def _thumbnail(image: torch.Tensor, side: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    scale = side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(image[None], size=size, mode="area")[0]


#: the last 12 bytes of every complete PNG: the IEND chunk (length 0, type, CRC)
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_problem(path: Path) -> str | None:
    """Why the PNG at ``path`` is not complete (missing, truncated, not a PNG), else None.
    Reads its first and last bytes only."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            size = fh.seek(0, os.SEEK_END)
            if size < len(_PNG_MAGIC) + len(_PNG_END):
                return f"truncated ({size} bytes)"
            fh.seek(size - len(_PNG_END))
            tail = fh.read()
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if head != _PNG_MAGIC:
        return "not a PNG"
    if tail != _PNG_END:
        return f"truncated (no IEND chunk at its end, {size} bytes)"
    return None


def _finished(marker: Path, files: Sequence[Path], strict: bool = False) -> dict[str, Any] | None:
    """The marker's content when it and every file it vouches for are complete, else
    None: not started (no marker), or damaged (a marker that is not JSON, a file missing
    or truncated), which a :class:`ConvlensWarning` names, and the marker is removed so
    the unit is computed again (``strict``: :class:`CheckpointError` instead)."""
    if not marker.is_file():
        return None
    bad: tuple[Path, str] | None = None
    record: Any = None
    try:
        record = json.loads(marker.read_text())
        if not isinstance(record, dict):
            bad = (marker, "not a record (a JSON object)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        bad = (marker, "truncated or not JSON")
    for f in files if bad is None else ():
        why = _png_problem(f) if f.suffix == ".png" else (None if f.is_file() else "missing")
        if why is not None:
            bad = (f, why)
            break
    if bad is None:
        return record
    file, why = bad
    if strict:
        raise CheckpointError(
            f"{str(file)!r} is {why}; --strict refuses to redo it: delete {str(marker)!r}, or "
            "rerun without --strict, to compute that channel again"
        )
    warnings.warn(
        f"{str(file)!r} is {why}: its channel ({marker.name} in {marker.parent}) is computed again",
        ConvlensWarning,
        stacklevel=3,
    )
    marker.unlink(missing_ok=True)
    return None


# ------------------------------------------------------------------------ the renders


@dataclass(frozen=True)
class _Unit:
    layer: str  # the key as requested
    index: int  # which requested layer
    channel: int


_KINDS = ("channel", "neuron", "negative")


def _rows(diversity: int) -> list[tuple[str, int]]:
    """The images of one channel: ``(kind, j)`` per batch row."""
    return [(k, 0) for k in _KINDS] + [("diversity", j) for j in range(diversity)]


def _row_seed(seed: int, layer: str, channel: int, kind: str, j: int) -> int:
    h = hashlib.sha256(f"{seed}\0{layer}\0{channel}\0{kind}\0{j}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class _UnitObjective:
    """The values of a batch of channels' rows: mean of the channel (``channel`` and the
    diversity rows), its centre unit (``neuron``), minus its mean (``negative``), plus the
    diversity term within each channel's diversity set. One value per row, computed from
    that row (and its own set) only."""

    def __init__(
        self,
        layer: str,
        channels: list[int],
        diversity: int,
        rows: list[tuple[str, int]] | None = None,
        weight: float = _DIVERSITY_WEIGHT,
    ) -> None:
        self.layer = layer
        self.weight = float(weight)
        rows = rows if rows is not None else _rows(diversity)
        self.diversity = sum(1 for kind, _ in rows if kind == "diversity")
        self.per = len(rows)
        self.first_div = self.per - self.diversity  # the diversity rows come last
        ch, sign, neuron = [], [], []
        for c in channels:
            for kind, _ in rows:
                ch.append(c)
                sign.append(-1.0 if kind == "negative" else 1.0)
                neuron.append(kind == "neuron")
        self.ch = torch.tensor(ch)
        self.sign = torch.tensor(sign)
        self.neuron = torch.tensor(neuron)
        self.n_units = len(channels)
        self.centre: tuple[int, int] | None = None
        self._dev: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, dev: torch.device) -> tuple[torch.Tensor, ...]:
        if dev not in self._dev:
            self._dev[dev] = (self.ch.to(dev), self.sign.to(dev), self.neuron.to(dev))
        return self._dev[dev]

    def measured(self, t: torch.Tensor) -> torch.Tensor:
        """What each row's image scores (no sign, no diversity term): the channel mean, or
        the centre unit for a neuron row."""
        ch, _, neuron = self._on(t.device)
        if t.ndim == 2:
            t = t[:, :, None, None]
        sel = t[torch.arange(t.shape[0], device=t.device), ch]  # [N, H, W]
        h, w = sel.shape[-2:]
        self.centre = (h // 2, w // 2)
        mean = sel.flatten(1).mean(1)
        unit = sel[:, h // 2, w // 2]
        return torch.where(neuron, unit, mean)

    def __call__(self, acts: Callable[[str], torch.Tensor]) -> torch.Tensor:
        t = acts(self.layer)
        _, sign, _ = self._on(t.device)
        v = self.measured(t) * sign
        d = self.diversity
        if d >= 2 and t.ndim == 4:
            n, c = t.shape[:2]
            per = self.per
            # the diversity rows of every channel: [units, d, C, P]
            flat = t.reshape(self.n_units, per, c, -1)[:, self.first_div :]
            grams = flat @ flat.transpose(-1, -2)  # [units, d, C, C]
            grams = F.normalize(grams.flatten(2), dim=-1, eps=1e-10)
            sim = (grams[:, :, None, :] * grams[:, None, :, :]).sum(-1)  # [units, d, d]
            others = sim.sum(-1) - sim.diagonal(dim1=-2, dim2=-1)
            term = -self.weight * others  # Lucid's balance at weight 1e2
            pad = torch.zeros(self.n_units, self.first_div, device=t.device, dtype=term.dtype)
            v = v + torch.cat([pad, term], dim=1).reshape(n)
        return v


def _render_batch(
    net: nn.Module,
    layer: str,
    channels: list[int],
    plan: _RenderPlan,
    dev: torch.device,
    rows: list[tuple[str, int]] | None = None,
    snapshots: Sequence[int] = (),
    record: Callable[[int, torch.Tensor, torch.Tensor, float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """Optimise the rows of ``channels`` together; ``(images [N, C, h, w], values [N],
    centre)``, values measured on the final images without transforms. ``rows``: the
    images of each channel (default: channel, neuron, negative, the diversity set);
    ``record(step, images, values, seconds)`` is called after each step in
    ``snapshots`` (for benchmarks; its own time is not counted)."""
    from convlens.analysis.featurevis._amp import MixedPrecision
    from convlens.analysis.featurevis.objectives import Objective
    from convlens.analysis.featurevis.param import ImageParam
    from convlens.analysis.featurevis.render import _Forward

    rows = rows if rows is not None else _rows(plan.diversity)
    obj_fn = _UnitObjective(layer, channels, plan.diversity, rows, plan.diversity_weight)
    obj = Objective(obj_fn, [layer], description=f"microscope({layer})")
    n = len(channels) * len(rows)
    param = ImageParam(
        plan.size, batch=n, generator=torch.Generator().manual_seed(0), channels=plan.channels
    )
    with torch.no_grad():  # each row's start from its own generator
        shape = param.raw.shape[1:]
        inits = [
            torch.randn(
                shape,
                generator=torch.Generator().manual_seed(_row_seed(plan.seed, layer, c, kind, j)),
            )
            * 0.01
            for c in channels
            for kind, j in rows
        ]
        param.raw.copy_(torch.stack(inits))
    param = param.to(dev)
    params = list(param.parameters())
    opt = torch.optim.Adam(params, lr=plan.lr, betas=plan.schedule.betas)
    mp = MixedPrecision(plan.precision, dev, plan.dtype)
    tgen = torch.Generator().manual_seed(plan.seed)  # the same transforms for every batch
    fwd = _Forward(net, obj)
    elapsed, t0 = 0.0, time.perf_counter()
    with fwd.hooked(False):
        for step in range(plan.steps):
            for group in opt.param_groups:
                group["lr"] = plan.schedule.rate(step, plan.steps, plan.lr)
            opt.zero_grad(set_to_none=True)
            image = param()
            x = plan.pipe(plan.transform(image, tgen))
            with mp.autocast():
                acts = fwd(x, image)
            v = obj(acts)
            loss = -v.sum()
            if not torch.isfinite(loss):
                raise ConvlensError(
                    f"a render of {layer!r} became {float(loss.detach())}: lower lr "
                    f"(now {plan.lr}) or check the layer"
                )
            if mp.backward(loss, params):
                opt.step()
            if record is not None and step + 1 in snapshots:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                elapsed += time.perf_counter() - t0
                with torch.no_grad():
                    img = param().detach()
                    vals = obj_fn.measured(fwd(plan.pipe(img), img)(layer).float()).cpu()
                record(step + 1, img.cpu(), vals, elapsed)
                t0 = time.perf_counter()
        with torch.no_grad():
            img = param().detach()
            acts = fwd(plan.pipe(img), img)
            values = obj_fn.measured(acts(layer).float()).cpu()
    return img[:, : plan.channels].cpu(), values, obj_fn.centre


@dataclass
class _RenderPlan:
    size: int
    steps: int
    lr: float
    seed: int
    diversity: int
    diversity_weight: float
    channels: int
    pipe: Any
    transform: Any
    settings: dict[str, Any]
    precision: str = "float32"
    schedule: Any = None
    dtype: torch.dtype = torch.float32


def _plan(
    net: nn.Module,
    bundle: Any,
    size: int,
    steps: int,
    lr: float | None,
    seed: int,
    diversity: int,
    diversity_weight: float = _DIVERSITY_WEIGHT,
    precision: str = "auto",
    schedule: Any = "cosine",
    dev: torch.device | None = None,
) -> _RenderPlan:
    """How the renders run. ``lr`` ``None``: the schedule's peak. The precision is
    resolved here (on ``dev``, default the model's device) so that the settings, and the
    folder key derived from them, name what actually ran."""
    from convlens.analysis.featurevis._amp import MixedPrecision
    from convlens.analysis.featurevis.render import (
        _normalizer,
        _Pipeline,
        _transforms,
        _upsample_size,
    )
    from convlens.analysis.featurevis.schedule import get_schedule
    from convlens.models.forms import dtype_name, input_channels, model_dtype

    channels = input_channels(net, bundle)
    normalize, norm_text = _normalizer("auto", bundle, channels)
    transform, transform_text = _transforms("standard")
    up = _upsample_size(True, bundle, (size, size))
    dtype = model_dtype(net)
    pipe = _Pipeline(normalize, up, True, dtype)
    sched = get_schedule(schedule)
    peak = float(sched.lr if lr is None else lr)
    mp = MixedPrecision(precision, dev if dev is not None else model_device(net), dtype)
    settings = {
        "size": size,
        "steps": steps,
        "lr": peak,
        "schedule": sched.describe(peak),
        "precision": mp.name,
        "seed": seed,
        "diversity": diversity,
        "diversity_weight": diversity_weight,
        "transforms": transform_text,
        "preprocess": norm_text,
        "upsample_to": up,
        "parameterization": "fft, decorrelated" if channels == 3 else "fft",
        "optimizer": "Adam",
        "input_channels": channels,
        "dtype": dtype_name(dtype),
    }
    return _RenderPlan(
        size,
        steps,
        peak,
        seed,
        diversity,
        diversity_weight,
        channels,
        pipe,
        transform,
        settings,
        mp.name,
        sched,
        dtype,
    )


def _render_files(folder: Path, channel: int, diversity: int) -> dict[str, Path]:
    base = f"{channel:04d}"
    files = {k: folder / f"{base}-{k}.png" for k in _KINDS}
    files.update({f"diversity-{j}": folder / f"{base}-diversity-{j}.png" for j in range(diversity)})
    return files


def _render_units(
    net: nn.Module,
    units: list[_Unit],
    folders: dict[str, Path],
    plan: _RenderPlan,
    batch: int,
    dev: torch.device,
    force: bool,
    progress: bool,
    strict: bool = False,
) -> tuple[int, int]:
    """Render every unfinished unit of ``units`` (this rank's), ``batch`` channels at a
    time; returns ``(rendered, reused)``."""
    from convlens._progress import tqdm
    from convlens.analysis.featurevis.objectives import channel as channel_obj
    from convlens.analysis.featurevis.render import _fold_checked, _frozen
    from convlens.models.forms import dtype_support, is_scripted
    from convlens.models.layers import evaluating

    todo: dict[str, list[int]] = {}
    reused = 0
    for u in units:
        folder = folders[u.layer]
        files = _render_files(folder, u.channel, plan.diversity)
        marker = folder / f"{u.channel:04d}.json"
        if not force and _finished(marker, list(files.values()), strict) is not None:
            reused += 1
            continue
        todo.setdefault(u.layer, []).append(u.channel)
    total = sum(len(v) for v in todo.values())
    if not total:
        return 0, reused
    bar = tqdm(total=total, desc="renders", unit="channel", disable=not progress)
    done = 0
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_signals.deferred())  # SIGTERM, Ctrl-C: stop between batches
            stack.enter_context(dtype_support(plan.pipe.dtype, dev))
            stack.enter_context(evaluating(net))
            stack.enter_context(_frozen(net))
            for layer, chans in todo.items():
                run_net = net
                if not is_scripted(net):
                    probe = torch.rand(
                        1,
                        plan.channels,
                        plan.size,
                        plan.size,
                        generator=torch.Generator().manual_seed(0),
                    )
                    run_net, _ = _fold_checked(
                        net, channel_obj(layer, chans[0]), plan.pipe(probe).to(dev), True
                    )
                folder = folders[layer]
                folder.mkdir(parents=True, exist_ok=True)
                for start in range(0, len(chans), batch):
                    part = chans[start : start + batch]
                    padded = part + [part[-1]] * (batch - len(part))  # a fixed shape
                    images, values, centre = _render_batch(run_net, layer, padded, plan, dev)
                    _write_renders(folder, layer, part, images, values, centre, plan)
                    done += len(part)
                    bar.update(len(part))
                    if _signals.requested() is not None:
                        _signals.stop(
                            f"{reused + done} of this rank's {len(units)} channels rendered"
                        )
    finally:
        bar.close()
    return done, reused


def _write_renders(
    folder: Path,
    layer: str,
    channels: list[int],
    images: torch.Tensor,
    values: torch.Tensor,
    centre: tuple[int, int] | None,
    plan: _RenderPlan,
) -> None:
    rows = _rows(plan.diversity)
    per = len(rows)
    for u, c in enumerate(channels):
        files = _render_files(folder, c, plan.diversity)
        record: dict[str, Any] = {"channel": c, "layer": layer, "diversity": []}
        for r, (kind, j) in enumerate(rows):
            i = u * per + r
            name = kind if kind != "diversity" else f"diversity-{j}"
            _save_png(images[i], files[name])
            v = float(values[i])
            if kind == "diversity":
                record["diversity"].append({"image": files[name].name, "value": v})
            else:
                record[kind] = {"image": files[name].name, "value": v}
        record["centre"] = list(centre) if centre is not None else None
        write_json(folder / f"{c:04d}.json", record)  # last: the channel is finished


# ------------------------------------------------------------------------ the render checks

#: what a channel's check file holds besides the measured numbers (bump to measure again)
_CHECK_VERSION = 1
#: how the renders are checked against the dataset, for the index page and microscope.json
_CHECK_ABOUT = (
    "each saved render PNG read back, fed to the model as the renders are (upsampled to the "
    "model's input size, normalised, the model's own dtype, no autocast, BatchNorm not "
    "folded) and the unit reduced like the dataset pass ({reduce} over positions), against "
    "the unit's top dataset example; the diversity images' channel mean relative to the "
    "channel render's, on the PNGs too"
)


def _check_path(folder: Path, channel: int) -> Path:
    """A channel's check file, beside its renders."""
    return folder / f"{channel:04d}-check.json"


def _read_png(path: Path, channels: int) -> torch.Tensor:
    """A saved render as the float image ``[C, H, W]`` in [0, 1] it stands for: 8-bit
    values / 255, grey for a 1-channel model."""
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    x = torch.from_numpy(arr.copy())
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def _png_check_why(channels: int) -> str | None:
    """Why a model's renders cannot be checked from their PNGs, or None when they can."""
    if channels in (1, 3):
        return None
    return (
        f"the model takes {channels}-channel images and a render's PNG keeps "
        f"{'3' if channels > 3 else '1'} of them, so the saved image is not what was optimised"
    )


def _measure(
    net: nn.Module, layer: str, channel: int, images: torch.Tensor, pipe: Any, dev: torch.device
) -> tuple[list[float], list[float]]:
    """The unit's maximum and mean over positions on each of ``images`` ``[N, C, h, w]``
    in [0, 1], fed through ``pipe`` (upsampled, normalised, the model's dtype) to ``net``
    (in eval mode, without gradients): ``(maxima, means)``.

    Example:
        >>> _measure(net, "conv2", 1, torch.rand(2, 3, 16, 16), plan.pipe, torch.device("cpu"))
    """
    from convlens.analysis.featurevis.objectives import Objective
    from convlens.analysis.featurevis.render import _Forward

    fwd = _Forward(net, Objective(lambda acts: acts(layer), [layer], description=layer))
    x = images.to(dev, torch.float32)
    with fwd.hooked(False), torch.no_grad():
        t = fwd(pipe(x), x)(layer).float()
    sel = t[:, channel].reshape(t.shape[0], -1)  # [N, positions] ([N, 1] for an [N, C] output)
    return [float(v) for v in sel.amax(1).cpu()], [float(v) for v in sel.mean(1).cpu()]


def _check_units(
    net: nn.Module,
    units: list[_Unit],
    folders: dict[str, Path],
    plan: _RenderPlan,
    dev: torch.device,
    force: bool,
    progress: bool,
) -> tuple[int, int]:
    """Measure every rendered unit of ``units`` (this rank's) from its saved PNGs: the
    channel render and the diversity images, one forward per unit (a fixed batch of
    ``1 + diversity`` images, so the numbers do not depend on the batch or the world size).
    Each unit's numbers go to ``NNNN-check.json`` with the SHA-256 of the PNGs they were
    measured on; a rerun reuses them only while the PNGs on disk are those bytes. Returns
    ``(measured, reused)``."""
    from tqdm.auto import tqdm

    from convlens.models.forms import dtype_support
    from convlens.models.layers import evaluating

    if _png_check_why(plan.channels) is not None:
        return 0, 0
    todo: list[tuple[_Unit, list[tuple[str, Path]], list[str]]] = []
    reused = 0
    for u in units:
        folder = folders[u.layer]
        if _read(folder / f"{u.channel:04d}.json") is None:
            continue  # not rendered: nothing to check
        files = _render_files(folder, u.channel, plan.diversity)
        named = [("channel", files["channel"])]
        named += [(f"diversity-{j}", files[f"diversity-{j}"]) for j in range(plan.diversity)]
        try:
            digests = [hashlib.sha256(f.read_bytes()).hexdigest() for _, f in named]
        except OSError:
            continue
        old = _read(_check_path(folder, u.channel))
        if (
            not force
            and old is not None
            and old.get("v") == _CHECK_VERSION
            and [old.get("images", {}).get(n, {}).get("sha256") for n, _ in named] == digests
        ):
            reused += 1
            continue
        todo.append((u, named, digests))
    if not todo:
        return 0, reused
    done = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(_signals.deferred())  # SIGTERM, Ctrl-C: stop between channels
        stack.enter_context(dtype_support(plan.pipe.dtype, dev))
        stack.enter_context(evaluating(net))
        for u, named, digests in tqdm(
            todo, desc="render checks", unit="channel", disable=not progress
        ):
            images = torch.stack([_read_png(f, plan.channels) for _, f in named])
            maxima, means = _measure(net, u.layer, u.channel, images, plan.pipe, dev)
            record = {
                "channel": u.channel,
                "layer": u.layer,
                "v": _CHECK_VERSION,
                "images": {
                    name: {"image": f.name, "sha256": h, "max": mx, "mean": mn}
                    for (name, f), h, mx, mn in zip(named, digests, maxima, means)
                },
            }
            write_json(_check_path(folders[u.layer], u.channel), record)
            done += 1
            if _signals.requested() is not None:
                _signals.stop(f"{reused + done} of this rank's {len(units)} channels checked")
    return done, reused


def _ratio(value: float, base: float) -> float | None:
    """``value / base`` when ``base`` is a positive finite number, else None (a ratio to
    zero or a negative number says nothing)."""
    if not (math.isfinite(base) and base > 0 and math.isfinite(value)):
        return None
    return value / base


def _render_vs_dataset(
    check: dict[str, Any] | None, top: Sequence[Any], reduce: str, why_not: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """A unit's ``render_vs_dataset`` entry of microscope.json (its channel render's drive
    of the unit against its best dataset example, the same reduction for both) and, without
    one, why not."""
    if why_not is not None:
        return None, why_not
    if check is None or "channel" not in check.get("images", {}):
        return None, "this channel's render check is missing"
    if not top:
        return None, "the unit has no top dataset example"
    render = float(check["images"]["channel"][reduce])
    best = float(top[0].score)
    return (
        {
            "render": render,
            "top_example": best,
            "ratio": _ratio(render, best),
            "below": render < best,
            "reduce": reduce,
            "top_index": top[0].index,
        },
        None,
    )


# ------------------------------------------------------------------------ the examples


def _example_units(
    result: Any,
    source_data: Any,
    net: nn.Module,
    units: list[_Unit],
    folders: dict[str, Path],
    force: bool,
    split: str,
    preprocess: Any,
    progress: bool,
    strict: bool = False,
) -> tuple[int, int]:
    """Write each unit's example crops (top with the activation overlaid, the whole top
    images small with the box drawn, bottom); returns ``(written, reused)``."""
    from convlens._progress import tqdm
    from convlens.analysis.examples import crops

    written = reused = 0
    pending = []
    for u in units:
        folder = folders[u.layer]
        k_top = len(result.top(u.layer, u.channel))
        k_bot = len(result.bottom(u.layer, u.channel))
        files = _example_files(folder, u.channel, k_top, k_bot)
        if not force and _finished(folder / f"{u.channel:04d}.json", files, strict) is not None:
            reused += 1
            continue
        pending.append(u)
    with _signals.deferred():  # SIGTERM, Ctrl-C: stop between channels
        for u in tqdm(pending, desc="examples", unit="channel", disable=not progress):
            folder = folders[u.layer]
            folder.mkdir(parents=True, exist_ok=True)
            record: dict[str, Any] = {"channel": u.channel, "layer": u.layer}
            for which in ("top", "bottom"):
                cs = crops(
                    result,
                    source_data,
                    u.layer,
                    u.channel,
                    which=which,
                    model=net,
                    preprocess=preprocess,
                    split=split,
                )
                entries = []
                for rank, c in enumerate(cs):
                    full_peak = float(c.full_activation.max())
                    crop_path = folder / f"{u.channel:04d}-{which}-{rank}.png"
                    _save_png(_overlay(c.image, c.activation, full_peak), crop_path)
                    entry = {"rank": rank, "crop": crop_path.name, "box": list(c.box)}
                    if which == "top":
                        full_path = folder / f"{u.channel:04d}-top-{rank}-full.png"
                        _save_png(_thumbnail(_outline(c.full, c.box), _THUMB), full_path)
                        entry["full"] = full_path.name
                    entries.append(entry)
                record[which] = entries
            write_json(folder / f"{u.channel:04d}.json", record)
            written += 1
            if _signals.requested() is not None:
                _signals.stop(
                    f"{reused + written} of this rank's {len(units)} channels' crops written"
                )
    return written, reused


def _example_files(folder: Path, channel: int, k_top: int, k_bot: int) -> list[Path]:
    b = f"{channel:04d}"
    files = [folder / f"{b}-top-{i}.png" for i in range(k_top)]
    files += [folder / f"{b}-top-{i}-full.png" for i in range(k_top)]
    files += [folder / f"{b}-bottom-{i}.png" for i in range(k_bot)]
    return files


# ------------------------------------------------------------------------ the attributions


@dataclass(frozen=True)
class _AttrPlan:
    """How a unit's top examples are attributed to their pixels: ``method``
    (``"input_x_gradient"`` or ``"integrated_gradients"``, ``steps`` Gauss-Legendre points
    from the zero baseline), ``top`` examples per unit and ``rows`` inputs per forward and
    backward (``None``: :func:`_attr_rows`; every batch
    padded to exactly that many, so no kernel sees another shape when fewer pairs, or more
    ranks, share the work)."""

    method: str = "input_x_gradient"
    steps: int = 1
    rows: int | None = None
    top: int | None = None  # the top examples attributed per unit (None: all)

    def examples(self, result: Any, layer: str, channel: int) -> list[Any]:
        """The examples of ``channel`` this plan attributes: its first ``top``."""
        return list(result.top(layer, channel))[: self.top]

    @property
    def per_pair(self) -> int:
        """Rows one (image, unit) pair takes."""
        return self.steps if self.method == "integrated_gradients" else 1

    def pairs(self, rows: int) -> int:
        """(image, unit) pairs per forward and backward of ``rows`` rows."""
        return max(1, rows // self.per_pair)

    def settings(self) -> dict[str, Any]:
        """What decides the maps (the files' key covers it)."""
        return {
            "method": self.method,
            "steps": self.steps if self.method == "integrated_gradients" else None,
            "baseline": "zero" if self.method == "integrated_gradients" else None,
            "top_n": self.top,
            "colour_scale": f"the {SCALE_PERCENTILE}th percentile of |map| over the unit's crops",
        }

    def about(self) -> str:
        """One sentence for the page: what the maps are."""
        what = (
            f"integrated gradients ({self.steps} Gauss-Legendre steps from a zero baseline)"
            if self.method == "integrated_gradients"
            else "input × gradient"
        )
        which = "each top example" if self.top is None else f"each of the top {self.top} examples"
        return (
            f"{what} of the unit's value at the example's arg-max position, with respect to "
            f"the input pixels (summed over colour channels), for {which}, shown over its "
            "receptive-field crop: red raises the unit, blue lowers it"
        )


def _attr_plan(dev: torch.device, images: int = 0, units: int = 1, k: int = 0) -> _AttrPlan:
    """The microscope's attribution: input x gradient (the cheapest gradient method) of the
    top :func:`_attr_top` examples of each unit."""
    return _AttrPlan(_ATTR_METHOD, _ATTR_STEPS, top=_attr_top(images, units, k))


def _attr_top(images: int, units: int, k: int) -> int:
    """How many top examples of each unit are attributed: as many as the budget allows (the
    stage at most a quarter of the dataset pass, at :data:`_ATTR_PAIRS_PER_IMAGE` (image,
    unit) pairs per image of the dataset), at least :data:`_ATTR_MIN_TOP`, at most ``k``.
    It depends on the counts only, so every rank and every rerun attributes the same."""
    afford = int(_ATTR_PAIRS_PER_IMAGE * images // max(1, units))
    return max(1, min(k, max(_ATTR_MIN_TOP, afford)))


def _total_memory(dev: torch.device) -> int:
    """The device's total memory in bytes (a container's cgroup limit when lower): the
    same for every rank on a machine, so every rank sizes its batches alike."""
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < total:
            total = int(raw)
        break
    return int(total)


def _attr_rows(run: nn.Module, scorer: Any, x1: torch.Tensor, dev: torch.device) -> int:
    """Rows per forward and backward: the bytes one row holds (every distinct module output
    up to the layer, kept for the backward, measured on one image) into a third of the
    device's memory, at most :data:`_ATTR_MAX_ROWS` (efficientnet_lite0 to blocks.4 at 224
    px: 128 rows peak at 7.3 GB on a CPU)."""
    outs: list[torch.Tensor] = []  # kept alive, so no two outputs share an address

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            outs.append(out)

    leaves = [m for m in run.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            scorer(x1, torch.zeros(1, dtype=torch.long, device=x1.device))
    finally:
        for h in handles:
            h.remove()
    sizes = {o.data_ptr(): o.numel() * o.element_size() for o in outs}  # in place: once
    per_row = sum(sizes.values()) + 2 * x1.numel() * 4 + 1
    cap = _ATTR_MAX_ROWS if dev.type == "cpu" else 4 * _ATTR_MAX_ROWS
    return max(1, min(cap, _total_memory(dev) // 3 // per_row))


# RdBu_r: blue (lowers the unit) through near-white to red (raises it), 11 stops
_RDBU_R = (
    np.array(
        [
            [5, 48, 97],
            [33, 102, 172],
            [67, 147, 195],
            [146, 197, 222],
            [209, 229, 240],
            [247, 247, 247],
            [253, 219, 199],
            [244, 165, 130],
            [214, 96, 77],
            [178, 24, 43],
            [103, 0, 31],
        ],
        dtype=np.float64,
    )
    / 255
)

# The overlays and their numbers are per-pixel work on one crop at a time: numpy (one
# thread), where torch would split each small op over its threads and wait for them.


def _diverging(v: np.ndarray) -> np.ndarray:
    """``v`` ``[h, w]`` in [-1, 1] (clamped) to RdBu_r colours ``[h, w, 3]``."""
    n = _RDBU_R.shape[0] - 1
    p = (np.clip(v, -1, 1) + 1) * (n / 2)
    lo = np.clip(np.floor(p), 0, n - 1).astype(np.int64)
    t = (p - lo)[..., None]
    return _RDBU_R[lo] * (1 - t) + _RDBU_R[lo + 1] * t


def _signed_overlay(image: torch.Tensor, amap: torch.Tensor, scale: float) -> np.ndarray:
    """The signed map ``[h, w]`` over a faded grey copy of the image ``[C, h, w]`` in [0, 1]:
    its RdBu_r colour, opaque in proportion to ``|map| / scale`` (the image itself where
    the map is 0, full colour at ``±scale`` and beyond); ``[h, w, 3]`` in [0, 1]."""
    x = image.detach().float().cpu().numpy().astype(np.float64)
    grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2] if x.shape[0] >= 3 else x[0]
    bg = (0.25 + 0.5 * np.clip(grey, 0, 1))[..., None]
    v = amap.detach().float().cpu().numpy().astype(np.float64) / scale
    alpha = np.clip(np.abs(v), 0, 1)[..., None]
    return bg * (1 - alpha) + _diverging(v) * alpha


def _save_rgb(rgb: np.ndarray, path: Path) -> None:
    """``[h, w, 3]`` in [0, 1] as a PNG, atomically."""
    from PIL import Image

    arr = np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(arr, "RGB").save(fh, format="PNG", compress_level=1)


def _attr_scale(maps: Sequence[np.ndarray]) -> float:
    """One symmetric colour scale for a unit's maps (the figures' rule, see
    :func:`convlens.analysis.attribution.result.symmetric_scale`)."""
    from convlens.analysis.attribution.result import symmetric_scale

    return symmetric_scale(maps)


def _attr_numbers(amap: np.ndarray, box: tuple[int, int, int, int]) -> dict[str, Any]:
    """A map's numbers, over the crop: its sum, positive and negative mass, and the share of
    the image's positive mass that lies inside the crop (None when it has none)."""
    t, b, left, r = box
    m = np.asarray(amap, dtype=np.float64)
    crop = m[t:b, left:r]
    pos_all = float(np.clip(m, 0, None).sum())
    pos = float(np.clip(crop, 0, None).sum())
    return {
        "sum": float(crop.sum()),
        "positive": pos,
        "negative": float(np.clip(crop, None, 0).sum()),
        "inside": pos / pos_all if pos_all > 0 else None,
    }


def _attr_files(folder: Path, channel: int, k_top: int) -> list[Path]:
    return [folder / f"{channel:04d}-top-{r}.png" for r in range(k_top)]


def _attribution_units(
    result: Any,
    source: Any,
    net: nn.Module,
    units: list[_Unit],
    folders: dict[str, Path],
    plan: _AttrPlan,
    dev: torch.device,
    force: bool,
    progress: bool,
    strict: bool = False,
) -> tuple[int, int]:
    """Attribute each unit's top examples to their pixels (``plan``), many (image, unit)
    pairs per forward and backward, the forward stopped at the layer; each unit's overlays
    and numbers written as soon as its examples are done. Returns ``(written, reused)``."""
    from convlens._progress import tqdm
    from convlens.analysis._sources import fix_size
    from convlens.analysis.attribution._core import clean
    from convlens.models.layers import unwrap

    todo: dict[str, list[_Unit]] = {}
    reused = 0
    for u in units:
        folder = folders[u.layer]
        files = _attr_files(folder, u.channel, len(plan.examples(result, u.layer, u.channel)))
        if not force and _finished(folder / f"{u.channel:04d}.json", files, strict) is not None:
            reused += 1
            continue
        todo.setdefault(u.layer, []).append(u)
    total = sum(len(v) for v in todo.values())
    if not total:
        return 0, reused
    fix_size(source)
    base = unwrap(net)
    bar = tqdm(total=total, desc="attributions", unit="channel", disable=not progress)
    written = 0
    try:
        with _signals.deferred(), clean(base):  # SIGTERM, Ctrl-C: stop between channels
            for layer, todo_units in todo.items():
                folders[layer].mkdir(parents=True, exist_ok=True)
                written += _attribute_layer(
                    base, result, source, layer, todo_units, folders[layer], plan, dev, bar
                )
    finally:
        bar.close()
    return written, reused


def _attribute_layer(
    net: nn.Module,
    result: Any,
    source: Any,
    layer: str,
    units: list[_Unit],
    folder: Path,
    plan: _AttrPlan,
    dev: torch.device,
    bar: Any,
) -> int:
    """The attributions of ``units`` of one layer (see :func:`_attribution_units`): their
    (image, unit) pairs in unit order, ``plan.pairs(rows)`` per forward and backward. A
    reader thread loads the next batch's images while this one runs, and a writer thread
    writes each finished unit, in order (after a failed write the later ones are skipped
    and the error is raised here)."""
    from concurrent.futures import Future, ThreadPoolExecutor

    le = result.layers[layer]
    spatial = tuple(le.shape[1:]) != (1, 1)  # else one value per image: "layer:channel"
    pairs = [
        (u, r, e) for u in units for r, e in enumerate(plan.examples(result, layer, u.channel))
    ]
    done: dict[int, list[tuple[dict[str, Any], torch.Tensor, torch.Tensor, Any]]] = {
        u.channel: [] for u in units
    }
    written = 0
    writes: list[Future[None]] = []
    failed = threading.Event()

    def write(channel: int, items: list[Any]) -> None:
        if failed.is_set():
            return
        try:
            _write_attributions(folder, layer, channel, items, plan)
        except BaseException:
            failed.set()
            raise

    with (
        ThreadPoolExecutor(1, thread_name_prefix="convlens-attr-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="convlens-attr-write") as writer,
    ):

        def finish(u: _Unit) -> None:
            nonlocal written
            for f in [f for f in writes if f.done()]:
                f.result()  # a failed write stops the stage
                writes.remove(f)
            writes.append(writer.submit(write, u.channel, done.pop(u.channel)))
            written += 1
            bar.update(1)
            if _signals.requested() is not None:
                _signals.stop(f"{written} more of this rank's channels' attributions written")

        for u in units:  # a unit without top examples is finished as it is
            if not plan.examples(result, layer, u.channel):
                finish(u)
        if pairs:
            _attribute_pairs(
                net, result, source, layer, spatial, pairs, plan, dev, reader, done, finish
            )
    for f in writes:
        f.result()
    return written


def _attribute_pairs(
    net: nn.Module,
    result: Any,
    source: Any,
    layer: str,
    spatial: bool,
    pairs: list[tuple[_Unit, int, Any]],
    plan: _AttrPlan,
    dev: torch.device,
    reader: Any,
    done: dict[int, list[tuple[dict[str, Any], torch.Tensor, torch.Tensor, Any]]],
    finish: Callable[[_Unit], None],
) -> None:
    """Attribute ``pairs`` batch by batch into ``done[channel]``; ``finish(unit)`` when a
    unit's last example is done."""
    from collections import OrderedDict
    from concurrent.futures import Future

    from convlens.analysis.attribution._core import Scorer, fast_model, parse_targets
    from convlens.analysis.attribution.gradients import ig_points, path_rows

    def spec(c: int, e: Any) -> str:
        return f"{layer}:{c}@{e.y},{e.x}" if spatial else f"{layer}:{c}"

    def read(indices: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for i in indices:
            x = source.load(i)[0]
            out[i] = (x, source.display(x))
        return out

    # the model to run and the rows per batch, from the first pair
    u0, _, e0 = pairs[0]
    first = read([e0.index])[e0.index][0][None].to(dev, torch.float32)
    probe = parse_targets([spec(u0.channel, e0)], 1)
    keep = {str(probe[0].layer)}  # type: ignore[index]
    rows1 = torch.zeros(1, dtype=torch.long, device=dev)

    def check(m: nn.Module) -> torch.Tensor:
        return Scorer(m, probe)(first, rows1).detach()

    run, _ = fast_model(net, first, keep, check)
    rows = plan.rows or _attr_rows(run, Scorer(run, probe), first, dev)
    P = plan.pairs(rows)
    chunks = [pairs[s : s + P] for s in range(0, len(pairs), P)]
    cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
    keep_images = max(_ATTR_CACHE, 2 * P)

    def fetch(k: int) -> Future[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        wanted = list(dict.fromkeys(e.index for _, _, e in chunks[k] if e.index not in cache))
        return reader.submit(read, wanted)

    all_rows = torch.arange(P, device=dev)
    pending = fetch(0)
    for k, part in enumerate(chunks):
        cache.update(pending.result())
        for _, _, e in part:  # this batch's images are the newest: never dropped here
            cache.move_to_end(e.index)
        while len(cache) > keep_images:
            cache.popitem(last=False)
        if k + 1 < len(chunks):
            pending = fetch(k + 1)
        padded = part + [part[-1]] * (P - len(part))  # a fixed shape
        x = torch.stack([cache[e.index][0] for _, _, e in padded]).to(dev, torch.float32)
        scorer = Scorer(run, parse_targets([spec(u.channel, e) for u, _, e in padded], P))
        fb: torch.Tensor | None = None
        if plan.method == "integrated_gradients":
            alphas, weights = ig_points(plan.steps)
            zero = torch.zeros_like(x)
            n_rows, make = path_rows(
                x, zero, alphas, weights, multiply="path", samples=0, sigma=0.0, seed=0
            )
            xb, ri, weight = make(0, n_rows)
            xb = xb.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(scorer(xb, ri).sum(), [xb])
            pixels = torch.zeros_like(x).index_add_(0, ri, grad.float() * weight.float())
            with torch.no_grad():
                fb = scorer(zero, all_rows).float().cpu()
        else:  # input x gradient: the image itself, one row per pair
            xb = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(scorer(xb, all_rows).sum(), [xb])
            pixels = grad.float() * x
        maps = pixels.sum(dim=1).cpu()
        H, W = int(x.shape[-2]), int(x.shape[-1])
        for j, (u, _, e) in enumerate(part):
            box = result.receptive_field(layer, e.y, e.x) if spatial else (0, H, 0, W)
            extra: dict[str, Any] = {"delta": None}
            if fb is not None:
                extra["delta"] = float(maps[j].double().sum()) - (e.score - float(fb[j]))
            t, b, left, r = box
            shown = cache[e.index][1][:, t:b, left:r]
            done[u.channel].append((extra, maps[j], shown, box))
            if len(done[u.channel]) == len(plan.examples(result, layer, u.channel)):
                finish(u)


def _write_attributions(
    folder: Path,
    layer: str,
    channel: int,
    items: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor, tuple[int, int, int, int]]],
    plan: _AttrPlan,
) -> None:
    """A unit's overlays (one symmetric scale) and ``NNNN.json``, which comes last."""
    maps = [amap.numpy() for _, amap, _, _ in items]
    crops = [m[t:b, left:r] for m, (_, _, _, (t, b, left, r)) in zip(maps, items)]
    scale = _attr_scale(crops) if crops else 1.0
    top = []
    for rank, ((extra, _, shown, box), amap, crop) in enumerate(zip(items, maps, crops)):
        path = folder / f"{channel:04d}-top-{rank}.png"
        _save_rgb(_signed_overlay(shown, torch.from_numpy(crop), scale), path)
        entry = {"rank": rank, "image": path.name, "box": list(box), **_attr_numbers(amap, box)}
        if extra.get("delta") is not None:
            entry["delta"] = extra["delta"]
        top.append(entry)
    record = {"channel": channel, "layer": layer, **plan.settings(), "scale": scale, "top": top}
    write_json(folder / f"{channel:04d}.json", record)  # last: the channel is finished


# ------------------------------------------------------------------------ connections


_CHANNELWISE = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
)
_CHANNELWISE_FUNCS = {
    "relu",
    "relu6",
    "silu",
    "gelu",
    "hardswish",
    "sigmoid",
    "tanh",
    "leaky_relu",
    "elu",
    "dropout",
    "max_pool2d",
    "avg_pool2d",
    "contiguous",
    "clone",
}


def _connections(
    net: nn.Module, layers: list[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[str | None, str | None, torch.Tensor | None]]:
    """For every requested layer: ``(the requested layer it directly follows, why not,
    strengths [out, in])``. A layer follows another when it is a convolution whose input
    is that layer's output, through channel-wise ops only (BatchNorm, activations,
    pooling, dropout), so input channel ``i`` is that layer's channel ``i``."""
    from convlens.analysis._incremental import Unsupported, trace_model
    from convlens.models.forms import hooks_aside
    from convlens.models.layers import unwrap

    base = unwrap(net)
    modules = dict(base.named_modules())
    out: dict[str, tuple[str | None, str | None, torch.Tensor | None]] = {}
    names = {layer.partition("#")[0]: layer for layer in layers}
    try:
        with hooks_aside(base):
            traced = trace_model(base)
    except Unsupported as e:
        return {layer: (None, f"{e}, so its inputs cannot be followed", None) for layer in layers}
    producer: dict[Any, str] = {}
    for name, nodes in traced.module_outputs.items():
        if name in names and nodes:
            producer[nodes[0]] = names[name]
    for layer in layers:
        name = layer.partition("#")[0]
        mod = modules.get(name)
        if not isinstance(mod, nn.Conv2d):
            kind = type(mod).__name__ if mod is not None else "not a module"
            out[layer] = (
                None,
                f"{layer} is a {kind}, not a convolution: only a convolution's weights say "
                "which input channels it reads",
                None,
            )
            continue
        nodes = traced.module_outputs.get(name) or []
        if "#" in layer or len(nodes) != 1:
            out[layer] = (None, f"{layer} runs more than once: its input is ambiguous", None)
            continue
        node: Any = nodes[0].args[0] if nodes[0].args else None
        found = None
        via: Any = None
        while node is not None and hasattr(node, "op"):
            if node in producer and producer[node] != layer:
                found = producer[node]
                break
            via = via or node
            nxt: Any = None
            if node.op == "call_module" and isinstance(modules.get(node.target), _CHANNELWISE):
                nxt = node.args[0] if node.args else None
            elif node.op in ("call_function", "call_method"):
                fname = getattr(node.target, "__name__", str(node.target))
                if fname in _CHANNELWISE_FUNCS and node.args:
                    nxt = node.args[0]
            node = nxt
        if found is None:
            before = _describe_node(via, traced)
            out[layer] = (
                None,
                f"its input is not the output of another requested layer (it reads "
                f"{before}); request that layer too to see which of its channels it reads",
                None,
            )
            continue
        w = mod.weight.detach().float().cpu()
        o, i_per, *_ = w.shape
        groups = mod.groups
        n_in = i_per * groups
        if shapes.get(found) and shapes[found][0] != n_in:
            out[layer] = (
                None,
                f"{found} has {shapes[found][0]} channels, {layer} reads {n_in}",
                None,
            )
            continue
        strength = torch.zeros(o, n_in)
        per_group = o // groups
        norms = w.flatten(2).norm(dim=2)  # [o, i_per]
        for oc in range(o):
            g = oc // per_group
            strength[oc, g * i_per : (g + 1) * i_per] = norms[oc]
        out[layer] = (found, None, strength)
    return out


def _describe_node(node: Any, traced: Any) -> str:
    if node is None:
        return "the model's input"
    for name, nodes in traced.module_outputs.items():
        if node in nodes:
            return f"the output of {name}"
    if node.op == "placeholder":
        return "the model's input"
    return f"the result of {getattr(node.target, '__name__', node.target)}"


# ------------------------------------------------------------------------ data


def _data_key(source: Any) -> str:
    """The dataset's fingerprint, with the content of a few items for in-memory data (whose
    fingerprint has no file names)."""
    fp = source.fingerprint()
    if source.length and source.path(0) is None:
        h = hashlib.sha256(fp.encode())
        picks = sorted({round(i * (source.length - 1) / 15) for i in range(16)})
        for i in picks:
            try:
                x = source.load(i)[0]
            except Exception:  # an unreadable item: the pass will say so
                continue
            h.update(x.detach().float().cpu().contiguous().numpy().tobytes())
        fp = h.hexdigest()[:16]
    return fp


def _check_render_memory(
    net: nn.Module,
    bundle: Any,
    layers: Sequence[str],
    size: int,
    batch: int,
    diversity: int,
    dev: torch.device,
) -> None:
    """Refuse, before anything is allocated, a ``size`` or ``batch`` whose render batch
    cannot fit: at least the convolution outputs up to the layer, for every row of the
    batch, against the free memory (the least of any rank's). Names the value that fits."""
    from convlens._memory import activation_bytes, available_memory, format_bytes, may_exceed
    from convlens.analysis.featurevis.render import _upsample_size
    from convlens.models.forms import input_channels, model_dtype

    modules = dict(net.named_modules())
    known = [name for name in layers if name.partition("#")[0] in modules]
    if not known:
        return  # an unknown layer: the dataset pass names it
    per = len(_KINDS) + diversity
    rows = batch * per
    chans, dtype = input_channels(net, bundle), model_dtype(net)
    free = available_memory(dev)
    if distributed.context(dev).world > 1:
        free = min(int(v) for v in distributed.all_gather_objects(free))

    side0 = max(size + 24, _upsample_size(True, bundle, (size, size)) or 0)
    if not may_exceed(4.0 * rows * chans * side0 * side0, free):
        return

    def need(side_px: int, layer: str) -> float:
        side = max(side_px + 24, _upsample_size(True, bundle, (side_px, side_px)) or 0)
        return rows * activation_bytes(net, (chans, side, side), dtype, until=layer)

    worst = max(known, key=lambda name: need(size, name))
    total = need(size, worst)
    if total <= free:
        return
    lo, hi = 8, size - 1
    culprit = f"size {size}"
    if need(lo, worst) > free:
        culprit = f"batch {batch}"
        fit = int(free // (total / batch))
        fix = (
            f"use batch <= {fit}"
            if fit >= 1
            else "this layer's renders do not fit one channel at a time; use an earlier layer"
        )
    else:
        while lo < hi:  # the largest size that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if need(mid, worst) <= free else (lo, mid - 1)
        fix = f"use size <= {lo} (or a smaller batch)"
    where = "this machine" if dev.type == "cpu" else str(dev)
    raise ResourceError(
        f"{culprit}: one render batch ({batch} channel(s) x {per} images of {size} px) "
        f"at {worst!r} needs at least {format_bytes(total)}; {where} has "
        f"{format_bytes(free)} available: {fix}"
    )


def _auto_batch(dev: torch.device) -> int:
    """Channels per render batch: 8 on a CPU, 32 on a GPU."""
    return 32 if dev.type in ("cuda", "mps") else 8


# ------------------------------------------------------------------------ the public function


def microscope(
    model: Any,
    data: Any,
    layers: str | Sequence[str],
    *,
    out: str | os.PathLike[str],
    channels: Any = None,
    k: int = 9,
    steps: int = 128,
    size: int = 128,
    diversity: int = 4,
    batch: int | str = "auto",
    device: DeviceLike | None = None,
    force: bool = False,
    seed: int = 0,
    lr: float | None = None,
    diversity_weight: float = _DIVERSITY_WEIGHT,
    split: str = "val",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    title: str | None = None,
    settings: dict[str, Any] | None = None,
    attributions: bool = True,
    strict: bool = False,
    precision: str = "auto",
    schedule: Any = "cosine",
) -> Path:
    """Build a browsable static site of every channel of ``layers``: feature
    visualizations beside dataset examples, statistics and connections; returns ``out``.

    ``model``: a :class:`convlens.ModelBundle` or an ``nn.Module``; ``data``: anything
    :func:`convlens.dataset_examples` reads (``convlens.data.shapes()``, a folder, a
    dataset). ``channels`` (``"0-63"``, a list or ``{layer: ...}``) limits the channels;
    ``k`` examples each way; ``steps``, ``size``, ``lr``, ``seed``, ``schedule``,
    ``precision``: the renders, as :func:`convlens.render` takes them (``size``
    px, upsampled to a bundle's input size as ``render`` does; ``precision="auto"``:
    bfloat16 autocast where the hardware is fast at it; ``schedule="constant"``, Lucid's
    constant 0.05, reproduces renders made before the ``"cosine"`` default); ``diversity`` images in
    the diversity set (0 for none), pushed apart by Lucid's diversity term with
    ``diversity_weight`` (5 against the channel's mean, which keeps the diversity images at
    about 80% of the channel render's objective on efficientnet_lite0; Lucid's is 1e2);
    ``batch`` channels rendered together (``"auto"``: 8
    on a CPU, 32 on a GPU; it changes the speed, not the images). ``force`` recomputes
    what earlier runs left in ``out``. ``settings``: extra entries for the index page.
    ``attributions``: attribute the top examples to their pixels (input x gradient of the
    unit's value at the example's position, over the receptive-field crop: "what in this
    crop drives the unit"; as many examples per channel as a quarter of the dataset pass's
    time affords, at least 3); ``False`` skips it.

    Every unit's channel render is checked against the dataset: ``render_vs_dataset`` in
    microscope.json and on its page compares the unit's value on the saved render PNG
    (fed as the renders are: upsampled to the model's input size and normalised) with its
    top dataset example's score, under the dataset pass's reduction (max over positions);
    the layer's grid marks the units whose render stays below. Each diversity image's
    ``relative`` is its channel mean over the channel render's, both on the PNGs.

    Resuming: what an earlier run left in ``out`` (the dataset pass's checkpoint and
    result, each channel's files) is reused only when complete; a truncated or corrupt
    file, or a checkpoint of other settings, is named in a
    :class:`~convlens.errors.ConvlensWarning` and computed again. ``strict``: an unreadable
    dataset image, or such a file, raises instead. One live run writes ``out`` at a time
    (:func:`convlens._io.folder_lock`; rank 0's under torchrun): a second one raises
    :class:`~convlens.errors.FolderLockedError` naming the first.

    Example:
        >>> site = microscope(convlens.load_model("efficientnet_lite0"), "photos/",
        ...                   ["blocks.4"], out="site/", steps=128)
        >>> sorted(p.name for p in site.iterdir())[:2]
        ['0-blocks.4', 'cache']
    """
    from convlens.analysis._sources import make_source
    from convlens.analysis.examples import (
        _fingerprint,
        _ranges,
        dataset_examples,
    )
    from convlens.models.layers import unwrap
    from convlens.models.zoo import model_and_bundle
    from convlens.report.site import write_site

    t_start = time.perf_counter()
    for name, v, lo in (
        ("k", k, 1),
        ("steps", steps, 1),
        ("size", size, 8),
        ("diversity", diversity, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer of at least {lo}, got {v!r}")
    if diversity == 1:
        raise ValueError("diversity is 0 (no diversity set) or at least 2 images, got 1")
    if not isinstance(attributions, bool):
        raise TypeError(f"attributions is True or False, got {attributions!r}")
    if not (isinstance(diversity_weight, (int, float)) and math.isfinite(diversity_weight)):
        raise ValueError(f"diversity_weight must be a finite number, got {diversity_weight!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    from convlens.analysis.featurevis.schedule import get_schedule
    from convlens.device import PRECISIONS

    get_schedule(schedule)  # an unknown name fails before the dataset pass, not after
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if batch != "auto" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive integer or 'auto', got {batch!r}")
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ValueError("no layers given: name at least one, e.g. ['blocks.4']")
    net, bundle = model_and_bundle(model)
    out_dir = Path(out)
    dev = distributed.local_device(model_device(net) if device is None else resolve_device(device))
    ctx = distributed.context(dev)
    render_batch = _auto_batch(dev) if batch == "auto" else int(batch)
    # before anything is written or allocated
    _check_render_memory(net, bundle, layers, size, render_batch, diversity, dev)
    lock = folder_lock(out_dir, "microscope", ctx=ctx)  # one live run writes out
    with lock:
        if dev != model_device(net):
            net.to(dev)
        prep = preprocess if preprocess is not None else (bundle.preprocess if bundle else None)
        source = make_source(data, prep, split=split)
        weights = _fingerprint(unwrap(net))
        stages: dict[str, float] = {}
        counts: dict[str, int] = {}
        cache = out_dir / "cache"
        if ctx.is_main:
            cache.mkdir(parents=True, exist_ok=True)
        distributed.barrier()

        # 1. the dataset pass (sharded; every rank gets the merged result)
        t0 = time.perf_counter()
        ex_settings = {
            "weights": weights,
            "data": _data_key(source),
            "split": split,
            "layers": layers,
            "channels": channels if not isinstance(channels, range) else list(channels),
            "k": k,
            "device": dev.type,
            "format": 2,
        }
        ex_key = _key(ex_settings)
        ex_dir = cache / f"examples-{ex_key}"
        result: Any = None
        if not force and (ex_dir / "examples.json").is_file():
            result = _cached_examples(ex_dir / "examples.json", strict)
        if result is None:
            ckpt = cache / f"examples-{ex_key}.ckpt"
            if force and ctx.is_main:
                for p in cache.glob(f"examples-{ex_key}.ckpt*"):
                    p.unlink()
            distributed.barrier()

            def run_pass() -> Any:
                return dataset_examples(
                    model,
                    data,
                    layers,
                    k=k,
                    channels=channels,
                    device=dev,
                    progress=progress,
                    checkpoint=ckpt,
                    preprocess=preprocess,
                    split=split,
                    strict=strict,
                )

            # A checkpoint of other settings (a batch size, a format) is named and not used.
            result = run_pass()
            distributed.barrier()
            if ctx.is_main:
                result.save(ex_dir)
                for p in cache.glob(f"examples-{ex_key}.ckpt*"):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
            distributed.barrier()
            counts["dataset_pass"] = 1
        else:
            counts["dataset_pass"] = 0
        stages["dataset pass"] = time.perf_counter() - t0
        keys = list(result.layers)

        # 2. the renders, split over the ranks
        t0 = time.perf_counter()
        plan = _plan(
            net,
            bundle,
            size,
            steps,
            lr,
            seed,
            diversity,
            diversity_weight,
            precision=precision,
            schedule=schedule,
            dev=dev,
        )
        r_settings = {**plan.settings, "weights": weights, "device": dev.type, "v": _RENDER_VERSION}
        dirs = {key: _layer_dir(i, key) for i, key in enumerate(keys)}
        render_dirs = {
            key: out_dir / dirs[key] / f"r-{_key({**r_settings, 'layer': key})}" for key in keys
        }
        example_dirs = {key: out_dir / dirs[key] / f"e-{ex_key}" for key in keys}
        units = [_Unit(key, i, c) for i, key in enumerate(keys) for c in result.channels(key)]
        mine = units[ctx.rank :: ctx.world]
        rendered, reused = _render_units(
            net, mine, render_dirs, plan, render_batch, dev, force, progress and ctx.is_main, strict
        )
        counts["rendered"], counts["renders_reused"] = rendered, reused
        stages["renders"] = time.perf_counter() - t0

        # 2b. each render checked against the dataset: its saved PNGs measured as the pass
        # measures a dataset image (split the same way)
        t0 = time.perf_counter()
        checked, c_reused = _check_units(
            net, mine, render_dirs, plan, dev, force, progress and ctx.is_main
        )
        counts["render_checks"], counts["render_checks_reused"] = checked, c_reused
        stages["render checks"] = time.perf_counter() - t0

        # 3. the example crops, split the same way
        t0 = time.perf_counter()
        written, ex_reused = _example_units(
            result,
            data,
            net,
            mine,
            example_dirs,
            force,
            split,
            prep,  # also for a pass read from the cache, which has no preprocessing
            progress and ctx.is_main,
            strict,
        )
        counts["examples_written"], counts["examples_reused"] = written, ex_reused
        stages["examples"] = time.perf_counter() - t0

        # 4. the attributions of the top examples, split the same way
        attr_plan = _attr_plan(dev, result.length, len(units), result.k) if attributions else None
        attr_dirs: dict[str, Path] = {}
        counts["attributions_written"] = counts["attributions_reused"] = 0
        if attr_plan is not None:
            t0 = time.perf_counter()
            a_key = _key({"examples": ex_key, **attr_plan.settings(), "v": _ATTR_VERSION})
            attr_dirs = {key: out_dir / dirs[key] / f"a-{a_key}" for key in keys}
            written, a_reused = _attribution_units(
                result,
                make_source(data, prep, split=split),
                net,
                mine,
                attr_dirs,
                attr_plan,
                dev,
                force,
                progress and ctx.is_main,
                strict,
            )
            counts["attributions_written"], counts["attributions_reused"] = written, a_reused
            stages["attributions"] = time.perf_counter() - t0
        if ctx.world > 1:
            gathered = distributed.all_gather_objects(counts)
            counts = {key: sum(int(g[key]) for g in gathered) for key in counts}
            times = distributed.all_gather_objects(stages)
            stages = {key: max(float(t[key]) for t in times) for key in stages}
        distributed.barrier()

        # 4. the pages, by rank 0
        if ctx.is_main:
            shapes = {key: tuple(result.layers[key].shape) for key in keys}
            conns = _connections(net, keys, shapes)
            doc = _document(
                result,
                keys,
                dirs,
                render_dirs,
                example_dirs,
                attr_dirs,
                attr_plan,
                conns,
                plan,
                out_dir,
                bundle,
                net,
                {
                    "k": result.k,
                    "steps": steps,
                    "size": size,
                    "diversity": diversity,
                    "diversity_weight": diversity_weight,
                    "batch": render_batch,
                    "seed": seed,
                    "lr": plan.lr,
                    "schedule": plan.schedule.name,
                    "precision": plan.precision,
                    "device": str(dev),
                    "world_size": ctx.world,
                    "dtype": plan.settings["dtype"],
                    "transforms": plan.settings["transforms"],
                    "upsample_to": plan.settings["upsample_to"],
                    "attribution": attr_plan.settings()["method"] if attr_plan else "off",
                    "attribution_top": attr_plan.top if attr_plan else None,
                    "render_check": _png_check_why(plan.channels)
                    or _CHECK_ABOUT.format(reduce=result.reduce),
                    "channels": {key: _ranges(result.channels(key)) for key in keys},
                    **(settings or {}),
                },
                title,
            )
            doc["work"] = counts
            stages["pages"] = 0.0
            doc["stages"] = dict(stages)
            t_pages = time.perf_counter()
            write_site(doc, out_dir)
            stages["pages"] = time.perf_counter() - t_pages
            doc["stages"] = {**stages, "total": time.perf_counter() - t_start}
            write_site(doc, out_dir)  # the index page with the pages' own time
            write_json(out_dir / "microscope.json", doc)
        distributed.barrier()
    return out_dir


def _cached_examples(path: Path, strict: bool) -> Any:
    """The dataset pass's saved result, or None (with a note, ``strict``: an error) when
    it cannot be read: the pass runs again."""
    from convlens.analysis.examples import DatasetExamples

    try:
        return DatasetExamples.load(path)
    except ConvlensError as e:
        why = str(e).splitlines()[0]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        why = f"malformed ({type(e).__name__})"
    if strict:
        raise CheckpointError(
            f"the saved dataset pass {str(path)!r} cannot be used: {why}; --strict refuses to "
            "redo it: delete it, or rerun without --strict, to run the pass again"
        )
    warnings.warn(
        f"ignoring the saved dataset pass {str(path)!r}: {why}; the pass runs again",
        ConvlensWarning,
        stacklevel=3,
    )
    return None


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
) -> dict[str, Any]:
    """``microscope.json``: everything the pages show, paths relative to ``out_dir``."""
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


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
