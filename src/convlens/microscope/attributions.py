"""Stage 5, the attributions (``attributions=True``): for the top examples, the channel's
value at the example's arg-max position attributed to the input pixels (input x gradient),
cut at the receptive-field crop and drawn as a signed overlay on one symmetric scale per
channel. Its budget is a quarter of the dataset pass's time: one (image, channel) pair costs
1.2 (wall) to 2 (CPU time) images of the pass, so each channel gets as many of its top
examples as 0.125 pairs per dataset image afford, at least 3 (all 9 for a large dataset;
integrated gradients' steps each cost a pair again). Many pairs share one forward, stopped
at the layer, and one backward; only the winners' images are read again.

Inputs: ``ctx.result`` and ``ctx.ex_key`` (the dataset pass), the data and its
preprocessing, the model, ``ctx.mine``.
Outputs: per layer ``<layer>/a-<key>/`` (``<key>`` hashes the dataset pass's key, the
attribution plan's settings and :data:`_ATTR_VERSION`), per channel ``NNNN-top-I.png``
overlays and last ``NNNN.json`` (the numbers); in the context: ``attr_plan`` and
``attr_dirs`` (``None`` and empty when ``attributions=False``, and nothing is written).
Resume: a channel whose ``NNNN.json`` and PNGs are whole is not attributed again;
``force`` attributes every channel. SIGTERM or Ctrl-C stops at the next batch boundary.

Example:
    >>> attributions.run(ctx)
    >>> ctx.counts["attributions_written"]
    8
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens import _signals
from convlens._io import atomic_open, write_json
from convlens.analysis.attribution.result import SCALE_PERCENTILE
from convlens.microscope._common import Context, _finished, _key, _Unit

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


def run(ctx: Context) -> None:
    """Attribute this rank's unfinished channels' top examples (nothing when
    ``attributions=False``); fills ``ctx.attr_plan`` and ``ctx.attr_dirs``."""
    from convlens.analysis._sources import make_source

    s = ctx.settings
    result = ctx.need("result", "dataset_pass")
    ctx.attr_plan = (
        _attr_plan(ctx.dev, result.length, len(ctx.units), result.k) if s.attributions else None
    )
    ctx.attr_dirs = {}
    ctx.counts["attributions_written"] = ctx.counts["attributions_reused"] = 0
    if ctx.attr_plan is None:
        return
    t0 = time.perf_counter()
    a_key = _key({"examples": ctx.ex_key, **ctx.attr_plan.settings(), "v": _ATTR_VERSION})
    ctx.attr_dirs = {key: ctx.out / ctx.dirs[key] / f"a-{a_key}" for key in ctx.keys}
    written, reused = _attribution_units(
        result,
        make_source(ctx.data, ctx.prep, split=s.split),
        ctx.net,
        ctx.mine,
        ctx.attr_dirs,
        ctx.attr_plan,
        ctx.dev,
        s.force,
        ctx.bar,
        s.strict,
    )
    ctx.counts["attributions_written"], ctx.counts["attributions_reused"] = written, reused
    ctx.stages["attributions"] = time.perf_counter() - t0
