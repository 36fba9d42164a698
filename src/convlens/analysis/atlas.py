"""The activation atlas's arithmetic (Carter et al., Distill 2019): sample activation
vectors over a dataset, accumulate the layer's uncentered covariance, lay the samples out
in 2-D with UMAP, cut the layout into a grid and average each cell into a direction.

Pure tensor code: no files, no figures. :func:`convlens.atlas` runs these and renders
each cell's direction as an icon.

- :func:`sample_activations` is one streaming pass over a dataset on the dataset engine
  (the same sources, loader, batching and sharding as :func:`convlens.dataset_examples`).
  Per image it draws ``samples_per_image`` positions of the layer's map away from the
  border from a generator seeded by the seed and the image's global index, so the samples
  do not depend on the batch size or on how many ranks share the pass. It keeps each
  sample's activation vector, image index, position, label, the model's predicted class
  and the attribution of that class at the position (activation times the gradient of
  the logit, summed over channels, as Lucid stores it). In the same pass it accumulates
  the layer's uncentered covariance over every position of every image, in 128-bit fixed
  point, so the merge across ranks is an integer sum: exactly one pass's value.
- :func:`layout` is UMAP (cosine, Lucid's simple notebook's 20 neighbours and min-dist
  0.01, a fixed ``random_state``): deterministic for a seed.
- :func:`grid_cells` cuts the layout into a ``grid x grid`` lattice; a cell with at least
  ``min_count`` samples is one icon, its direction the mean of its samples, whitened
  (Lucid: the mean times the inverse of the uncentered covariance) when asked.

Example:
    >>> s = sample_activations(model, convlens.data.shapes(), "bn3", seed=0)
    >>> xy = layout(s.vectors, seed=0)
    >>> cells = grid_cells(xy, 20, min_count=3)
    >>> d = directions(s, cells, whiten=True)
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens import distributed
from convlens.errors import ConvlensError

__all__ = [
    "AtlasCell",
    "AtlasSamples",
    "directions",
    "grid_cells",
    "layout",
    "neighbour_agreement",
    "sample_activations",
    "sample_positions",
]

FORMAT = 1
# Lucid's simple activation-atlas notebook: UMAP(n_neighbors=20, min_dist=0.01, "cosine").
UMAP_NEIGHBORS = 20
UMAP_MIN_DIST = 0.01
UMAP_METRIC = "cosine"
# Covariance in fixed point: each image's sum of outer products times 2**_FRAC, split
# into a high part (units) and a low part (the fraction), both int64.
_FRAC = 32
_LIMIT = float(2**61)
# The ridge added to the covariance's diagonal before whitening, relative to its mean
# diagonal: dead channels (a ReLU that never fires) make it singular.
RIDGE = 1e-3


def _umap_missing() -> ConvlensError:
    return ConvlensError(
        "the activation atlas lays its samples out with UMAP, which is not installed: "
        'pip install "convlens[atlas]" (or pip install umap-learn)'
    )


def require_umap() -> Any:
    """The ``umap`` module, or one line naming the install command.

    Example:
        >>> umap = require_umap()
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Tensorflow not installed; ParametricUMAP ..."
            import umap
    except ImportError:
        raise _umap_missing() from None
    return umap


# ------------------------------------------------------------------ sampling


def _seed_of(seed: int, index: int) -> int:
    # a splitmix-like mix of (seed, index): different images get unrelated generators
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 1) % (1 << 64)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _interior(h: int, w: int) -> tuple[range, range]:
    """The positions a sample may take: away from the border (a margin of one position
    on maps of at least 3, none on smaller ones)."""
    my = 1 if h >= 3 else 0
    mx = 1 if w >= 3 else 0
    return range(my, h - my), range(mx, w - mx)


def sample_positions(seed: int, index: int, h: int, w: int, k: int) -> list[tuple[int, int]]:
    """The ``k`` positions ``(y, x)`` sampled from image ``index``'s ``h x w`` map: drawn
    without replacement from the interior (away from the border) by a generator seeded by
    ``seed`` and ``index`` only, so they are the same in any batch and on any rank.

    Example:
        >>> sample_positions(0, 5, 14, 14, 2)
        [(9, 4), (3, 11)]
    """
    ys, xs = _interior(h, w)
    n = len(ys) * len(xs)
    if k > n:
        raise ValueError(f"{k} samples per image but the map's interior has only {n} positions")
    g = torch.Generator().manual_seed(_seed_of(seed, index))
    picks = torch.randperm(n, generator=g)[:k].tolist()
    return [(ys[p // len(xs)], xs[p % len(xs)]) for p in picks]


@dataclass
class AtlasSamples:
    """The samples of one layer: ``vectors`` ``[N, C]`` float32, image ``index`` ``[N]``,
    ``position`` ``[N, 2]`` ``(y, x)`` in the layer's map, ``label`` ``[N]`` (-1 without
    labels), ``predicted`` ``[N]`` (the model's top class of the image, -1 when its output
    is not class scores), ``attribution`` ``[N]`` (the predicted class's activation x
    gradient at the position, summed over channels; NaN without class scores), and
    ``covariance`` ``[C, C]`` float64: the uncentered covariance of the layer's vectors
    over every position of every image (``positions`` of them).

    Example:
        >>> s = sample_activations(model, data, "bn3")
        >>> s.vectors.shape, s.covariance.shape
        (torch.Size([600, 32]), torch.Size([32, 32]))
    """

    layer: str
    vectors: torch.Tensor
    index: torch.Tensor
    position: torch.Tensor
    label: torch.Tensor
    predicted: torch.Tensor
    attribution: torch.Tensor
    covariance: torch.Tensor
    positions: int
    map_size: tuple[int, int]
    input_shape: tuple[int, ...]
    images: int
    classes: list[str] | None = None
    skipped: list[tuple[int, str | None, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def __repr__(self) -> str:
        return (
            f"AtlasSamples({self.layer!r}: {len(self)} samples of {self.vectors.shape[1]} "
            f"channels from {self.images} images)"
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the samples to one safetensors file, atomically.

        Example:
            >>> s.save("out/samples.safetensors")
        """
        from safetensors.torch import save

        from convlens._io import atomic_open

        meta = {
            "format": FORMAT,
            "layer": self.layer,
            "positions": self.positions,
            "map_size": list(self.map_size),
            "input_shape": list(self.input_shape),
            "images": self.images,
            "classes": self.classes,
            "skipped": [list(s) for s in self.skipped],
            "settings": self.settings,
        }
        tensors = {
            "vectors": self.vectors.contiguous(),
            "index": self.index.contiguous(),
            "position": self.position.contiguous(),
            "label": self.label.contiguous(),
            "predicted": self.predicted.contiguous(),
            "attribution": self.attribution.contiguous(),
            "covariance": self.covariance.contiguous(),
        }
        data = save(tensors, metadata={"convlens": json.dumps(meta)})
        with atomic_open(path, "wb") as f:
            f.write(data)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AtlasSamples:
        """Read samples :meth:`save` wrote; a damaged or foreign file names itself.

        Example:
            >>> AtlasSamples.load("out/samples.safetensors").layer
            'bn3'
        """
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["convlens"])
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, not {FORMAT}")
            return cls(
                layer=str(meta["layer"]),
                vectors=t["vectors"],
                index=t["index"],
                position=t["position"],
                label=t["label"],
                predicted=t["predicted"],
                attribution=t["attribution"],
                covariance=t["covariance"],
                positions=int(meta["positions"]),
                map_size=(int(meta["map_size"][0]), int(meta["map_size"][1])),
                input_shape=tuple(int(v) for v in meta["input_shape"]),
                images=int(meta["images"]),
                classes=meta.get("classes"),
                skipped=[(int(a), b, str(c)) for a, b, c in meta.get("skipped", [])],
                settings=dict(meta.get("settings") or {}),
            )
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise ConvlensError(
                f"{str(path)!r} is not atlas samples convlens wrote ({e}): delete it to "
                "sample again"
            ) from None


class _Covariance:
    """The sum of outer products over positions, exactly, as 128-bit fixed point: every
    image's float64 sum is rounded to 2**-32 once, then only integers are added, so any
    order of images (any batch, any world size) gives the same bits."""

    def __init__(self, c: int, dev: torch.device) -> None:
        self.hi = torch.zeros(c, c, dtype=torch.int64, device=dev)
        self.lo = torch.zeros(c, c, dtype=torch.int64, device=dev)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """``x`` ``[B, C, P]``: each row one image's vectors at its ``P`` positions."""
        x = x.double()
        # one matrix product per image, always of the same shape: a batched product's
        # rounding can depend on how many images share the batch
        g = torch.stack([xi @ xi.T for xi in x])  # [B, C, C]
        q = g * float(2**_FRAC)
        if not bool(torch.isfinite(q).all()) or float(q.abs().max()) >= _LIMIT:
            raise ConvlensError(
                "the layer's activations are too large (or not finite) for the atlas's "
                "covariance: check the model's output at this layer (NaN or inf?)"
            )
        q = torch.round(q).to(torch.int64)
        hi = torch.div(q, 2**_FRAC, rounding_mode="floor")
        self.hi += hi.sum(0)
        self.lo += (q - hi * 2**_FRAC).sum(0)
        self._carry()
        self.count += int(x.shape[0]) * int(x.shape[2])

    def _carry(self) -> None:
        c = torch.div(self.lo, 2**_FRAC, rounding_mode="floor")
        self.hi += c
        self.lo -= c * 2**_FRAC

    def merge(self) -> None:
        """Sum every rank's (integers: exact in any order)."""
        his = distributed.all_gather_tensors(self.hi.cpu())
        los = distributed.all_gather_tensors(self.lo.cpu())
        counts = distributed.all_gather_objects(self.count)
        self.hi = torch.stack(his).sum(0)
        self.lo = torch.stack(los).sum(0)
        self.count = int(sum(counts))
        self._carry()

    def value(self) -> torch.Tensor:
        total = self.hi.double() + self.lo.double() / float(2**_FRAC)
        return total / max(1, self.count)


def _auto_batch(dev: torch.device) -> int:
    return 64 if dev.type == "cuda" else 16


def forward_rows(dev: torch.device) -> int:
    """The rows of every forward of the sampling pass on ``dev`` (a batch is cut into
    such chunks, the last one padded): kernels are chosen by shape, so a fixed shape keeps
    each image's vectors the same for any ``batch_size`` and world size.

    Example:
        >>> forward_rows(torch.device("cpu"))
        8
    """
    return 32 if dev.type == "cuda" else 8


def sample_activations(
    model: Any,
    data: Any,
    layer: str,
    *,
    samples_per_image: int = 1,
    seed: int = 0,
    batch_size: int | str = "auto",
    device: Any = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    split: str = "val",
    progress: bool = True,
    strict: bool = False,
    workers: int | None = None,
) -> AtlasSamples:
    """Sample ``layer``'s activation vectors over ``data`` in one pass (see the module
    docstring): ``samples_per_image`` positions per image, the predicted class's
    attribution at each, and the layer's uncentered covariance.

    ``data`` is anything :func:`convlens.dataset_examples` reads. Under ``torchrun`` each
    rank reads ``range(rank, N, world)``; the merged samples (sorted by image index, then
    draw) and covariance are the same on every rank and equal one process's.

    Example:
        >>> s = sample_activations(load_model("efficientnet_lite0"), "photos/", "blocks.5")
        >>> s.vectors.shape
    """
    from convlens._progress import tqdm
    from convlens.analysis._sources import fix_size
    from convlens.analysis.examples import _fill_batch, _Loader, _resolve_targets, open_pass
    from convlens.models.forms import model_dtype, select_output
    from convlens.models.layers import evaluating
    from convlens.models.zoo import model_and_bundle

    if not isinstance(samples_per_image, int) or samples_per_image < 1:
        raise ValueError(f"samples_per_image must be a positive integer, got {samples_per_image!r}")
    net, bundle = model_and_bundle(model)
    _, source, dev, ctx, bs = open_pass(
        net, bundle, data, preprocess, split, device, batch_size, _auto_batch
    )
    n = len(source)
    if n == 0:
        raise ConvlensError("the dataset is empty: the atlas needs images")
    bs = min(bs, n)
    fwd_rows = forward_rows(dev)
    item_shape = fix_size(source)
    dtype = model_dtype(net)
    (target,) = _resolve_targets(net, [layer], (1, *item_shape), None, dtype)
    c, h, w = target.shape
    ys, xs = _interior(h, w)
    if samples_per_image > len(ys) * len(xs):
        raise ValueError(
            f"samples_per_image={samples_per_image} but {target.key!r} has only "
            f"{len(ys) * len(xs)} positions away from the border ({h}x{w} map): use fewer"
        )
    cov = _Covariance(c, dev)
    shard = distributed.shard(n, ctx.rank, ctx.world)
    batches = [shard[i : i + bs] for i in range(0, len(shard), bs)]
    rows: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("vectors", "index", "position", "label", "predicted", "attribution")
    }
    skipped: list[tuple[int, str | None, str]] = []
    state: dict[str, Any] = {}
    captured: dict[str, torch.Tensor] = {}
    no_classes: list[str] = []
    calls = {"n": 0}

    def hook(_m: nn.Module, _i: Any, out: Any) -> Any:
        call = calls["n"]
        calls["n"] += 1
        want = 0 if target.call is None else target.call
        if call != want or not isinstance(out, torch.Tensor):
            return None
        torch.set_grad_enabled(True)  # the rest of the forward is differentiated
        a = out.detach().requires_grad_(True)
        captured["act"] = a
        return a

    bar = tqdm(
        total=len(shard),
        desc="atlas samples",
        unit="img",
        disable=not (progress and ctx.is_main),
        dynamic_ncols=True,
    )
    loader = _Loader(
        source, workers if workers is not None else min(8, os.cpu_count() or 1), strict
    )
    handle = target.module.register_forward_hook(hook)
    try:
        with evaluating(net):
            pending = loader.submit(batches[0]) if batches else None
            for b, batch in enumerate(batches):
                if pending is None:
                    break
                xs_, idx, labels, bad = loader.collect(batch, pending)
                pending = loader.submit(batches[b + 1]) if b + 1 < len(batches) else None
                for s in bad:
                    warnings.warn(
                        f"skipped {s.path or f'item {s.index}'}: {s.reason}", stacklevel=2
                    )
                    skipped.append((s.index, s.path, s.reason))
                for q in range(0, len(xs_), fwd_rows):
                    # every forward has fwd_rows rows (padded): an image's numbers do
                    # not depend on batch_size, on the world size, or on its neighbours
                    cidx, clab = idx[q : q + fwd_rows], labels[q : q + fwd_rows]
                    x = _fill_batch(state, xs_[q : q + fwd_rows], cidx, clab, fwd_rows, dev, dtype)
                    real = len(cidx)
                    calls["n"] = 0
                    captured.clear()
                    with torch.no_grad():
                        out = net(x)
                        if "act" not in captured:
                            raise ConvlensError(
                                f"layer {target.key!r} did not run in the forward: choose another"
                            )
                        act = captured["act"]
                        logits = None
                        try:
                            logits, _ = select_output(out, what="the atlas's class attribution")
                        except (TypeError, ValueError) as e:
                            if not no_classes:
                                no_classes.append(str(e))
                        grad = None
                        pred = None
                        if logits is not None and logits.ndim == 2 and logits.requires_grad:
                            pred = logits[:real].detach().float().argmax(1)
                            chosen = logits[torch.arange(real, device=logits.device), pred]
                            (grad,) = torch.autograd.grad(chosen.sum(), act, allow_unused=True)
                    act = act.detach()[:real]
                    if act.ndim == 2:
                        act = act[:, :, None, None]
                    a32 = act.float()
                    cov.add(a32.flatten(2))
                    g32 = grad.detach()[:real].float() if grad is not None else None
                    if g32 is not None and g32.ndim == 2:
                        g32 = g32[:, :, None, None]
                    k = samples_per_image
                    picks = [sample_positions(seed, i, h, w, k) for i in cidx]
                    r_idx = torch.arange(real).repeat_interleave(k)
                    pos = torch.tensor([p for ps in picks for p in ps], dtype=torch.long).view(
                        -1, 2
                    )
                    a_cpu = a32.cpu()
                    vec = a_cpu[r_idx, :, pos[:, 0], pos[:, 1]]
                    rows["vectors"].append(vec)
                    rows["index"].append(torch.tensor(cidx, dtype=torch.long).repeat_interleave(k))
                    rows["position"].append(pos)
                    rows["label"].append(torch.tensor(clab, dtype=torch.long).repeat_interleave(k))
                    if pred is not None and g32 is not None:
                        gv = g32.cpu()[r_idx, :, pos[:, 0], pos[:, 1]]
                        rows["predicted"].append(pred.cpu().long().repeat_interleave(k))
                        rows["attribution"].append((vec * gv).sum(1))
                    else:
                        rows["predicted"].append(torch.full((real * k,), -1, dtype=torch.long))
                        rows["attribution"].append(torch.full((real * k,), float("nan")))
                bar.update(len(batch))
    finally:
        handle.remove()
        loader.close()
        bar.close()
    if no_classes:
        warnings.warn(
            "the atlas has no class attribution (no class atlases): " + no_classes[0], stacklevel=2
        )
    local = _stack(rows, c)
    cov.merge()
    gathered = distributed.all_gather_objects(local) if ctx.world > 1 else [local]
    merged = {k: torch.cat([g[k] for g in gathered]) for k in local}
    order = torch.argsort(merged["index"], stable=True)
    merged = {k: v[order] for k, v in merged.items()}
    all_skipped = (
        sorted(s for part in distributed.all_gather_objects(skipped) for s in part)
        if ctx.world > 1
        else skipped
    )
    if merged["index"].numel() + len(all_skipped) * samples_per_image != n * samples_per_image:
        raise RuntimeError("internal error: the atlas's samples do not add up to the dataset")
    return AtlasSamples(
        layer=target.key,
        vectors=merged["vectors"],
        index=merged["index"],
        position=merged["position"],
        label=merged["label"],
        predicted=merged["predicted"],
        attribution=merged["attribution"],
        covariance=cov.value().cpu(),
        positions=cov.count,
        map_size=(h, w),
        input_shape=tuple(int(v) for v in item_shape),
        images=n - len(all_skipped),
        classes=list(source.classes) if source.classes else None,
        skipped=all_skipped,
        settings={
            "samples_per_image": samples_per_image,
            "seed": seed,
            "dataset": source.fingerprint(),
        },
    )


def _stack(rows: dict[str, list[torch.Tensor]], c: int) -> dict[str, torch.Tensor]:
    if not rows["vectors"]:
        return {
            "vectors": torch.zeros(0, c),
            "index": torch.zeros(0, dtype=torch.long),
            "position": torch.zeros(0, 2, dtype=torch.long),
            "label": torch.zeros(0, dtype=torch.long),
            "predicted": torch.zeros(0, dtype=torch.long),
            "attribution": torch.zeros(0),
        }
    return {
        "vectors": torch.cat(rows["vectors"]).float(),
        "index": torch.cat(rows["index"]).long(),
        "position": torch.cat(rows["position"]).long(),
        "label": torch.cat(rows["label"]).long(),
        "predicted": torch.cat(rows["predicted"]).long(),
        "attribution": torch.cat(rows["attribution"]).float(),
    }


# ------------------------------------------------------------------ layout


def layout(
    vectors: torch.Tensor,
    *,
    seed: int = 0,
    n_neighbors: int = UMAP_NEIGHBORS,
    min_dist: float = UMAP_MIN_DIST,
    metric: str = UMAP_METRIC,
) -> torch.Tensor:
    """The samples' 2-D layout ``[N, 2]`` by UMAP with ``random_state=seed``, scaled to
    [0, 1] on each axis: the same points for the same vectors and seed. Fewer samples
    than ``n_neighbors + 1`` use ``N - 1`` neighbours.

    Example:
        >>> xy = layout(samples.vectors, seed=0)
        >>> float(xy.min()), float(xy.max())
        (0.0, 1.0)
    """
    umap = require_umap()
    v = vectors.detach().cpu().double().numpy()
    n = v.shape[0]
    if n < 4:
        raise ConvlensError(
            f"the atlas needs at least 4 samples to lay out, got {n}: use more images or "
            "a larger samples_per_image"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs overridden by random_state; numba notes
        reducer = umap.UMAP(
            n_neighbors=min(n_neighbors, n - 1),
            min_dist=min_dist,
            metric=metric,
            random_state=seed,
            n_components=2,
            init="spectral" if n > n_neighbors + 1 else "random",
        )
        xy = torch.from_numpy(reducer.fit_transform(v)).double()
    lo, hi = xy.min(0).values, xy.max(0).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return ((xy - lo) / span).float()


def neighbour_agreement(points: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The share of samples whose nearest other sample in ``points`` has the same label,
    and what chance gives (the probability that two samples drawn at random share one).
    Samples with label -1 are left out.

    Example:
        >>> neighbour_agreement(torch.tensor([[0., 0], [0, .1], [1, 1], [1, .9]]),
        ...                     torch.tensor([0, 0, 1, 1]))
        (1.0, 0.5)
    """
    keep = labels >= 0
    p = points[keep].double()
    lab = labels[keep]
    n = int(p.shape[0])
    if n < 2:
        return float("nan"), float("nan")
    hits = 0
    for s in range(0, n, 2048):
        d = torch.cdist(p[s : s + 2048], p)
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        nn_idx = d.argmin(1)
        hits += int((lab[nn_idx] == lab[s : s + 2048]).sum())
    counts = torch.bincount(lab).double()
    chance = float(((counts / n) ** 2).sum())
    return hits / n, chance


@dataclass(frozen=True)
class AtlasCell:
    """One cell of a ``grid x grid`` lattice over the layout: ``row`` (0 at the top),
    ``col`` (0 at the left) and the indices of its samples (ascending).

    Example:
        >>> grid_cells(xy, 20)[0]
        AtlasCell(grid=20, row=0, col=7, members=(12, 98, 301))
    """

    grid: int
    row: int
    col: int
    members: tuple[int, ...]

    @property
    def count(self) -> int:
        """How many samples fall in the cell."""
        return len(self.members)

    @property
    def name(self) -> str:
        """``rRR-cCC``, the cell's file name stem."""
        return f"r{self.row:02d}-c{self.col:02d}"


def cell_of(points: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's ``(row, col)`` in a ``grid x grid`` lattice over [0, 1]^2: column from
    x, row from y with the top row at y = 1 (as the layout is drawn).

    Example:
        >>> cell_of(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), 4)
        (tensor([0, 3]), tensor([0, 3]))
    """
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    col = torch.clamp((points[:, 0].double() * grid).floor().long(), 0, grid - 1)
    row = torch.clamp(((1.0 - points[:, 1].double()) * grid).floor().long(), 0, grid - 1)
    return row, col


def grid_cells(
    points: torch.Tensor, grid: int, min_count: int = 3, subset: torch.Tensor | None = None
) -> list[AtlasCell]:
    """The cells of a ``grid x grid`` lattice over the layout ``points`` that hold at
    least ``min_count`` samples, row by row; ``subset`` (sample indices) counts only
    those samples (a class atlas).

    Example:
        >>> [c.count for c in grid_cells(xy, 2, min_count=1)]
        [150, 140, 160, 150]
    """
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be a positive integer, got {min_count!r}")
    row, col = cell_of(points, grid)
    ids = torch.arange(points.shape[0]) if subset is None else subset.long().sort().values
    flat = (row * grid + col)[ids]
    cells = []
    order = torch.argsort(flat, stable=True)
    flat_sorted, ids_sorted = flat[order], ids[order]
    keys, counts = torch.unique_consecutive(flat_sorted, return_counts=True)
    start = 0
    for k, n in zip(keys.tolist(), counts.tolist()):
        if n >= min_count:
            members = tuple(int(v) for v in ids_sorted[start : start + n].tolist())
            cells.append(AtlasCell(grid, k // grid, k % grid, members))
        start += n
    return cells


def whitening(covariance: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """The matrix that whitens a direction: the inverse of the uncentered covariance with
    ``ridge`` x its mean diagonal added to the diagonal (dead channels make it singular).

    Example:
        >>> whitening(torch.eye(3) * 4)
        tensor([[0.2498, 0, 0], ...])
    """
    c = covariance.double()
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    lam = ridge * float(c.diagonal().mean()) if float(c.diagonal().mean()) > 0 else ridge
    return torch.linalg.inv(c + lam * eye)


def directions(
    samples: AtlasSamples, cells: Sequence[AtlasCell], *, whiten: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means, directions)``, each ``[cells, C]``: the mean of each cell's sample
    vectors, and the direction its icon renders (the mean times the inverse covariance
    when ``whiten``, else the mean), in float64.

    Example:
        >>> means, dirs = directions(samples, cells)
        >>> torch.allclose(means[0], samples.vectors[list(cells[0].members)].double().mean(0))
        True
    """
    c = samples.vectors.shape[1]
    if not cells:
        z = torch.zeros(0, c, dtype=torch.float64)
        return z, z.clone()
    v = samples.vectors.double()
    means = torch.stack([v[list(cell.members)].mean(0) for cell in cells])
    if not whiten:
        return means, means.clone()
    return means, means @ whitening(samples.covariance).T


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------ the icons' objective

# Lucid's activation-atlas notebook: (h . v) x cos(h, v)^4, the cosine floored at 0.1.
COSSIM_POW = 4.0
COSSIM_FLOOR = 0.1


def direction_value(
    h: torch.Tensor, v: torch.Tensor, power: float = COSSIM_POW, floor: float = COSSIM_FLOOR
) -> torch.Tensor:
    """Lucid's direction objective per row: ``(h . v̂) * max(cos(h, v), floor) ** power``
    for activation vectors ``h`` ``[N, C]`` and directions ``v`` ``[N, C]``.

    Example:
        >>> direction_value(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
        tensor([2.])
    """
    v = v.to(h.dtype)
    vhat = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dot = (h * vhat).sum(1)
    cos = dot / h.norm(dim=1).clamp_min(1e-6)
    return dot * cos.clamp_min(floor) ** power
