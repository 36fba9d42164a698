"""Stage 2, the renders: for every channel, feature visualizations as in the Distill
appendix: the channel objective, the neuron objective at the centre position, the negative
(the channel minimised) and a diversity set (``diversity`` images with Lucid's diversity
term). Many channels share one optimisation batch; each channel's starting images come from
its own generator (seeded by the settings, the layer and the channel) and every batch draws
the same transform sequence, so a channel's images depend on the settings and the channel
only. Batches are padded to exactly ``batch`` channels, so no kernel sees a different shape
when fewer channels, or more ranks, share the work.

Inputs: the model, ``ctx.mine`` (this rank's units, from the dataset pass), ``size``,
``steps``, ``lr``, ``seed``, ``diversity``, ``diversity_weight``, ``precision``,
``schedule``, ``batch``.
Outputs: per layer ``<layer>/r-<key>/`` (``<key>`` hashes the render plan's settings, the
weights, the device type, the layer and :data:`_RENDER_VERSION`), per channel
``NNNN-channel.png``, ``NNNN-neuron.png``, ``NNNN-negative.png``, ``NNNN-diversity-J.png``
and last ``NNNN.json`` (the objective values and the centre); in the context: ``plan`` and
``render_dirs``.
Resume: a channel whose ``NNNN.json`` and PNGs are whole is not rendered again
(:func:`convlens.microscope._common._finished`); ``force`` renders every channel.
SIGTERM or Ctrl-C stops at the next batch boundary, its channels written.

Example:
    >>> renders.run(ctx)
    >>> ctx.counts["rendered"], ctx.counts["renders_reused"]
    (8, 0)
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convlens import _signals, distributed
from convlens._alloc import keep_heap
from convlens._io import write_json
from convlens.capture import model_device
from convlens.errors import ConvlensError, ResourceError
from convlens.microscope._common import (
    _KINDS,
    Context,
    _finished,
    _key,
    _save_png,
    _Unit,
)

#: what the render files' key covers besides the settings (bump to invalidate old renders)
_RENDER_VERSION = 1
#: The diversity term's weight against the channel mean (per image: its mean minus the weight
#: times the sum of its Gram similarities to the others of its set). Lucid's 1e2 left the
#: diversity images of the pretrained efficientnet_lite0's blocks.4 at 20-50% of the channel
#: render's objective; 5 keeps them at 83% on average (at least 60%) with a Gram distance
#: between them of 0.79 (0.05 without the term, 0.87 at 10): benchmarks/diversity.py,
#: benchmarks/README.md. Lucid's 1e2 stays available as ``diversity_weight=100``.
_DIVERSITY_WEIGHT = 5.0


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
    with fwd.hooked(False), keep_heap():
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


def run(ctx: Context) -> None:
    """Render this rank's unfinished channels; fills ``ctx.plan`` and ``ctx.render_dirs``."""
    s = ctx.settings
    result = ctx.need("result", "dataset_pass")
    t0 = time.perf_counter()
    plan = _plan(
        ctx.net,
        ctx.bundle,
        s.size,
        s.steps,
        s.lr,
        s.seed,
        s.diversity,
        s.diversity_weight,
        precision=s.precision,
        schedule=s.schedule,
        dev=ctx.dev,
    )
    r_settings = {
        **plan.settings,
        "weights": ctx.weights,
        "device": ctx.dev.type,
        "v": _RENDER_VERSION,
    }
    ctx.plan = plan
    ctx.render_dirs = {
        key: ctx.out / ctx.dirs[key] / f"r-{_key({**r_settings, 'layer': key})}"
        for key in result.layers
    }
    rendered, reused = _render_units(
        ctx.net,
        ctx.mine,
        ctx.render_dirs,
        plan,
        s.batch,
        ctx.dev,
        s.force,
        ctx.bar,
        s.strict,
    )
    ctx.counts["rendered"], ctx.counts["renders_reused"] = rendered, reused
    ctx.stages["renders"] = time.perf_counter() - t0
