"""Dataset examples: what every channel responds to across a whole dataset, in one pass.

For every requested layer and channel, :func:`dataset_examples` streams the dataset once
and keeps the top-k and bottom-k images (each image scored by its maximum over positions,
as netdissect and the deep-visualization toolbox do, or its mean, the channel objective
of ``render``), the position of each image's maximum, running statistics of the scores
(count, mean, std in float64 by Chan's parallel formula, min, max, the fraction of
positions above zero) and, with labels, the mean score per class and a class-selectivity
index. Every feature map is reduced inside the hook that sees it and dropped with its
batch, so memory is ``O(layers x channels x k)`` whatever the dataset's size.

Order is exact and deterministic: score descending (ascending for the bottom-k), ties by
dataset index ascending. Under ``torchrun`` (or in a process group the caller made) each
rank takes ``range(rank, N, world)``, keeps its own state and the states are merged once
after the loop (:mod:`convlens.distributed`); the result is the one a single process
computes. :func:`crops` re-reads only the winners and cuts out their receptive fields.

Example:
    >>> train, val = convlens.data.shapes()
    >>> r = convlens.dataset_examples(convlens.load_model("run/"), val, ["bn3"], k=9)
    >>> r.top("bn3", 0)[0]
    Example(index=412, score=5.31, y=7, x=3, label=4, path='.../star/0012.png')
    >>> r.stats("bn3", 0).mean
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import re
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from convlens import _signals, distributed
from convlens._io import atomic_open, versions, write_json
from convlens.analysis._sources import LoadFailure, Source, fix_size, make_source
from convlens.analysis.receptive import ReceptiveField, receptive_field
from convlens.capture import model_device
from convlens.device import DeviceLike, resolve_device
from convlens.errors import CheckpointError, ConvlensError, ConvlensWarning, DatasetError
from convlens.models.forms import model_dtype
from convlens.models.layers import LayerRef, evaluating, find_layers, trace_calls

__all__ = [
    "HIST_EDGES",
    "ChannelStats",
    "Crop",
    "DatasetExamples",
    "Example",
    "Histogram",
    "LayerExamples",
    "RunningChannels",
    "Selectivity",
    "Skipped",
    "crops",
    "dataset_examples",
    "parse_channels",
]

Reduce = Literal["max", "mean"]
FORMAT = "convlens-examples/1"
#: Images between two checkpoint writes (rounded up to whole batches).
CHECKPOINT_EVERY = 256
_CKPT_VERSION = 2  # 2: the state has a histogram

#: The fixed bins of every channel's histogram of per-image scores, signed and
#: logarithmic: 8 per octave for magnitudes 2^-12 .. 2^12, mirrored for negative scores,
#: one bin around zero and an open bin at each end. Fixed edges make the histogram a
#: plain count per bin: exact, and merged over ranks or checkpoints by addition.
_HIST_PER_OCTAVE = 8
_HIST_OCTAVES = 12
_POS_EDGES = [
    2.0 ** (j / _HIST_PER_OCTAVE)
    for j in range(-_HIST_OCTAVES * _HIST_PER_OCTAVE, _HIST_OCTAVES * _HIST_PER_OCTAVE + 1)
]
HIST_EDGES: tuple[float, ...] = tuple([-e for e in reversed(_POS_EDGES)] + _POS_EDGES)
_HIST_BINS = len(HIST_EDGES) + 1  # bucket i holds [edge[i-1], edge[i]); 0 and last are open


class _StopForward(BaseException):
    """Ends the forward once the deepest requested output is reduced."""


# ---------------------------------------------------------------------- results


class _Record:
    """A frozen record that unpacks like a tuple (``index, score, *_ = example``)."""

    def __iter__(self) -> Iterator[Any]:
        return iter(tuple(getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    def _asdict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class Example(_Record):
    """One dataset example of a channel: the image's global ``index`` in the dataset, its
    ``score``, the position ``(y, x)`` of its maximum on the layer's map, its ``label``
    (``None`` without labels) and its file (``None`` for an in-memory dataset).

    Example:
        >>> e = r.top("bn3", 5)[0]
        >>> e.index, e.score, (e.y, e.x), e.label
    """

    index: int
    score: float
    y: int
    x: int
    label: int | None
    path: str | None


@dataclass(frozen=True)
class ChannelStats(_Record):
    """A channel's per-image scores over the dataset: how many, their mean and (population)
    standard deviation, min and max, and ``active``, the fraction of all positions of all
    images where the channel is above zero."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    active: float


@dataclass(frozen=True)
class Selectivity(_Record):
    """Class selectivity (Morcos et al., 2018): ``(mu_max - mu_rest) / (mu_max + mu_rest)``
    over the mean score per class, with ``top_class`` the class of ``mu_max``. In [0, 1]
    for non-negative scores (after a ReLU); ``nan`` with fewer than two classes or a zero
    denominator."""

    index: float
    top_class: int | None
    class_means: tuple[float, ...]


@dataclass(frozen=True)
class Histogram(_Record):
    """A channel's per-image scores binned: ``counts[i]`` images in
    ``[edges[i], edges[i + 1])``. Bins are signed-logarithmic (:data:`HIST_EDGES`) and cut
    to the occupied range; an open end bin takes the observed min or max as its edge."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True)
class Skipped(_Record):
    """An image that could not be read: its index, its file and why."""

    index: int
    path: str | None
    reason: str


@dataclass(frozen=True, eq=False)
class LayerExamples:
    """One layer's merged results, for the ``channels`` collected (rows of every tensor).

    ``top_*`` / ``bottom_*`` are ``[C, k]`` (index ``-1``: no image, when fewer than ``k``
    were read); moments are float64; ``shape`` is the layer's ``[C, H, W]`` (``H = W = 1``
    for a 2-D output).
    """

    layer: str
    channels: tuple[int, ...]
    shape: tuple[int, int, int]
    top_scores: torch.Tensor = field(repr=False)
    top_index: torch.Tensor = field(repr=False)
    top_pos: torch.Tensor = field(repr=False)
    top_label: torch.Tensor = field(repr=False)
    bottom_scores: torch.Tensor = field(repr=False)
    bottom_index: torch.Tensor = field(repr=False)
    bottom_pos: torch.Tensor = field(repr=False)
    bottom_label: torch.Tensor = field(repr=False)
    count: int = 0
    mean: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    m2: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    active_count: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    positions: int = 0
    class_sum: torch.Tensor | None = field(repr=False, default=None)
    class_count: torch.Tensor | None = field(repr=False, default=None)
    receptive: ReceptiveField | None = None
    hist: torch.Tensor | None = field(repr=False, default=None)

    def row(self, channel: int) -> int:
        try:
            return self.channels.index(int(channel))
        except ValueError:
            raise ValueError(
                f"channel {channel} of {self.layer!r} was not collected; collected: "
                f"{_ranges(self.channels)} (the layer has {self.shape[0]} channels)"
            ) from None


def _histogram(counts: torch.Tensor, st: ChannelStats) -> Histogram:
    """The occupied bins of one channel's fixed-bin counts, with finite edges."""
    nz = torch.nonzero(counts).flatten().tolist()
    if not nz:
        return Histogram((), ())
    lo, hi = nz[0], nz[-1]
    edges = []
    for i in range(lo, hi + 2):  # bucket i spans [HIST_EDGES[i-1], HIST_EDGES[i])
        if i == 0:
            edges.append(float(st.min))
        elif i == _HIST_BINS:
            edges.append(float(st.max))
        else:
            edges.append(HIST_EDGES[i - 1])
    return Histogram(tuple(edges), tuple(int(v) for v in counts[lo : hi + 1].tolist()))


def _ranges(channels: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0-2,5"``."""
    parts, i = [], 0
    chans = list(channels)
    while i < len(chans):
        j = i
        while j + 1 < len(chans) and chans[j + 1] == chans[j] + 1:
            j += 1
        parts.append(str(chans[i]) if i == j else f"{chans[i]}-{chans[j]}")
        i = j + 1
    return ",".join(parts) or "none"


@dataclass(frozen=True, eq=False)
class DatasetExamples:
    """The result of :func:`dataset_examples`. Accessors take a layer key (as asked, e.g.
    ``"bn3"`` or ``"pool#1"``) and a channel number.

    Example:
        >>> r.top("bn3", 5)[:2]      # [Example(index, score, y, x, label, path), ...]
        >>> r.stats("bn3", 5)        # ChannelStats(count, mean, std, min, max, active)
        >>> r.receptive_field("bn3", 2, 3)   # (top, bottom, left, right) in input pixels
        >>> r.save("out/"); DatasetExamples.load("out/")
    """

    layers: dict[str, LayerExamples]
    k: int
    reduce: str
    dataset: str
    length: int
    classes: list[str] | None
    input_shape: tuple[int, ...]
    paths: dict[int, str | None] = field(repr=False, default_factory=dict)
    skipped: tuple[Skipped, ...] = ()
    model_name: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    preprocess: Any = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        layers = ", ".join(f"{n}: {len(le.channels)} ch" for n, le in self.layers.items())
        return (
            f"DatasetExamples({self.dataset!r}, {self.length} images, k={self.k}, "
            f"reduce={self.reduce!r}, layers {{{layers}}})"
        )

    def _repr_html_(self) -> str:
        from convlens._notebook import dataset_examples

        return dataset_examples(self)

    # ---- accessors

    def _layer(self, layer: str) -> LayerExamples:
        if layer not in self.layers:
            import difflib

            close = difflib.get_close_matches(layer, list(self.layers), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"no layer {layer!r} in this result (it has {', '.join(self.layers)}){hint}"
            )
        return self.layers[layer]

    def channels(self, layer: str) -> list[int]:
        """The channels of ``layer`` this result holds."""
        return list(self._layer(layer).channels)

    def _examples(self, layer: str, channel: int, which: str) -> list[Example]:
        le = self._layer(layer)
        r = le.row(channel)
        w = le.shape[2]
        s, i, p, lab = (
            (le.top_scores, le.top_index, le.top_pos, le.top_label)
            if which == "top"
            else (le.bottom_scores, le.bottom_index, le.bottom_pos, le.bottom_label)
        )
        out = []
        for score, index, pos, label in zip(
            s[r].tolist(), i[r].tolist(), p[r].tolist(), lab[r].tolist()
        ):
            if index < 0:
                continue
            y, x = divmod(int(pos), w)
            out.append(
                Example(
                    int(index),
                    float(score),
                    y,
                    x,
                    None if label < 0 else int(label),
                    self.paths.get(int(index)),
                )
            )
        return out

    def top(self, layer: str, channel: int) -> list[Example]:
        """The ``k`` images that make ``channel`` of ``layer`` fire most, best first (ties:
        lower index first).

        Example:
            >>> [e.index for e in r.top("bn3", 0)]
        """
        return self._examples(layer, channel, "top")

    def bottom(self, layer: str, channel: int) -> list[Example]:
        """The ``k`` images with the lowest score, lowest first (ties: lower index first).

        Example:
            >>> r.bottom("bn3", 0)[0].score <= r.top("bn3", 0)[-1].score
            True
        """
        return self._examples(layer, channel, "bottom")

    def stats(self, layer: str, channel: int) -> ChannelStats:
        """``count, mean, std, min, max, active`` of the channel's per-image scores.

        Example:
            >>> count, mean, std, lo, hi, active = r.stats("bn3", 0)
        """
        le = self._layer(layer)
        r = le.row(channel)
        n = le.count
        std = math.sqrt(max(float(le.m2[r]), 0.0) / n) if n else math.nan
        top, bottom = self.top(layer, channel), self.bottom(layer, channel)
        return ChannelStats(
            count=n,
            mean=float(le.mean[r]) if n else math.nan,
            std=std,
            min=bottom[0].score if bottom else math.nan,
            max=top[0].score if top else math.nan,
            active=float(le.active_count[r]) / le.positions if le.positions else math.nan,
        )

    def selectivity(self, layer: str, channel: int) -> Selectivity:
        """The channel's mean score per class and its class-selectivity index.

        Example:
            >>> s = r.selectivity("bn3", 0)
            >>> r.classes[s.top_class], s.index
        """
        le = self._layer(layer)
        if le.class_sum is None or le.class_count is None or le.class_count.numel() == 0:
            return Selectivity(math.nan, None, ())
        r = le.row(channel)
        counts = le.class_count.double()
        means = torch.where(counts > 0, le.class_sum[r] / counts.clamp(min=1), math.nan)
        present = counts > 0
        vals = means[present]
        if vals.numel() == 0:
            return Selectivity(math.nan, None, tuple(means.tolist()))
        best = int(torch.nonzero(present).flatten()[int(torch.argmax(vals))])
        if vals.numel() < 2:
            return Selectivity(math.nan, best, tuple(means.tolist()))
        mu_max = float(means[best])
        mu_rest = float((vals.sum() - mu_max) / (vals.numel() - 1))
        denom = mu_max + mu_rest
        index = (mu_max - mu_rest) / denom if denom != 0 else math.nan
        return Selectivity(index, best, tuple(means.tolist()))

    def histogram(self, layer: str, channel: int) -> Histogram:
        """The channel's per-image scores in signed-logarithmic bins (exact counts).

        Example:
            >>> h = r.histogram("bn3", 0)
            >>> sum(h.counts) == r.stats("bn3", 0).count
            True
        """
        le = self._layer(layer)
        r = le.row(channel)
        if le.hist is None:
            return Histogram((), ())
        return _histogram(le.hist[r], self.stats(layer, channel))

    def receptive_field(self, layer: str, y: int, x: int) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` in input pixels (half-open, clipped at the border)
        of the unit at ``(y, x)`` of ``layer``; the whole image where an op on the way
        cannot be bounded (``result.layers[layer].receptive.reason`` says which).

        Example:
            >>> r.receptive_field("bn3", 0, 0)   # SimpleCNN at 64 px: 18 x 18, clipped
            (0, 11, 0, 11)
        """
        le = self._layer(layer)
        if le.receptive is None:
            h, w = self.input_shape[-2:]
            return (0, int(h), 0, int(w))
        return le.receptive.box(int(y), int(x))

    # ---- saving

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON types: per layer and channel the top-k and bottom-k (index,
        path, score, position, label, receptive-field box), the statistics, the class
        means and selectivity; the dataset, the settings, versions and notes."""
        layers: dict[str, Any] = {}
        for key, le in self.layers.items():
            chans = []
            for c in le.channels:
                st = self.stats(key, c)
                sel = self.selectivity(key, c)
                chans.append(
                    {
                        "channel": c,
                        "top": [self._example_dict(key, e) for e in self.top(key, c)],
                        "bottom": [self._example_dict(key, e) for e in self.bottom(key, c)],
                        "stats": st._asdict(),
                        "selectivity": sel.index,
                        "top_class": sel.top_class,
                        "top_class_name": (
                            self.classes[sel.top_class]
                            if self.classes
                            and sel.top_class is not None
                            and sel.top_class < len(self.classes)
                            else None
                        ),
                        "class_means": list(sel.class_means),
                    }
                )
            layers[key] = {
                "shape": list(le.shape),
                "receptive_field": le.receptive.to_dict() if le.receptive else None,
                "channels": chans,
                "_state": {
                    "m2": le.m2.tolist(),
                    "active_count": le.active_count.tolist(),
                    "positions": le.positions,
                    "class_sum": None if le.class_sum is None else le.class_sum.tolist(),
                    "class_count": None if le.class_count is None else le.class_count.tolist(),
                    "hist": None if le.hist is None else _hist_rows(le.hist),
                },
            }
        return {
            "format": FORMAT,
            "model": self.model_name,
            "dataset": {
                "name": self.dataset,
                "length": self.length,
                "count": next((le.count for le in self.layers.values()), 0),
                "classes": self.classes,
                "skipped": [s._asdict() for s in self.skipped],
                "input_shape": list(self.input_shape),
            },
            "k": self.k,
            "reduce": self.reduce,
            "settings": self.settings,
            "notes": list(self.notes),
            "versions": self.settings.get("versions") or versions(),
            "layers": layers,
        }

    def _example_dict(self, layer: str, e: Example) -> dict[str, Any]:
        d = e._asdict()
        d["class"] = (
            self.classes[e.label]
            if self.classes is not None and e.label is not None and e.label < len(self.classes)
            else None
        )
        d["box"] = list(self.receptive_field(layer, e.y, e.x))
        return d

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``examples.json`` into ``out_dir`` (atomically); returns its path. Scores
        and moments are written exactly (float32 and float64 both round-trip).

        Example:
            >>> path = r.save("out/")
            >>> DatasetExamples.load("out/").top("bn3", 0) == r.top("bn3", 0)
            True
        """
        return write_json(Path(out_dir) / "examples.json", self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DatasetExamples:
        """Read what :meth:`save` wrote (a folder or the ``examples.json`` in it).

        Example:
            >>> r = DatasetExamples.load("out/")
        """
        p = Path(path)
        if p.is_dir() or p.suffix != ".json":
            p = p / "examples.json"
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConvlensError(
                f"no {p.name} at {str(p.parent)!r}: run `convlens examples --out "
                f"{p.parent}` (or save a result there) first"
            ) from None
        except json.JSONDecodeError as e:
            raise ConvlensError(f"{str(p)!r} is not valid JSON ({e})") from None
        if d.get("format") != FORMAT:
            raise ConvlensError(f"{str(p)!r} is not a convlens examples file ({FORMAT})")
        return _from_dict(d)


def _rf_from_dict(d: dict[str, Any]) -> ReceptiveField:
    return ReceptiveField(
        layer=str(d["layer"]),
        input_hw=(int(d["input_hw"][0]), int(d["input_hw"][1])),
        stride=(int(d["stride"][0]), int(d["stride"][1])),
        size=(int(d["size"][0]), int(d["size"][1])),
        offset=(int(d["offset"][0]), int(d["offset"][1])),
        bounded=bool(d["bounded"]),
        reason=str(d.get("reason", "")),
    )


def _hist_rows(hist: torch.Tensor) -> list[list[int]]:
    """Each channel's counts as ``[first occupied bin, count, count, ...]`` (compact JSON)."""
    rows = []
    for row in hist.tolist():
        nz = [i for i, v in enumerate(row) if v]
        rows.append([nz[0], *row[nz[0] : nz[-1] + 1]] if nz else [])
    return rows


def _hist_from_rows(rows: list[list[int]] | None, n: int) -> torch.Tensor:
    out = torch.zeros((n, _HIST_BINS), dtype=torch.long)
    for r, row in enumerate(rows or []):
        if row:
            out[r, row[0] : row[0] + len(row) - 1] = torch.tensor(row[1:], dtype=torch.long)
    return out


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _from_dict(d: dict[str, Any]) -> DatasetExamples:
    k = int(d["k"])
    layers: dict[str, LayerExamples] = {}
    paths: dict[int, str | None] = {}
    for key, ld in d["layers"].items():
        chans = ld["channels"]
        n = len(chans)
        t: dict[str, torch.Tensor] = {}
        for which in ("top", "bottom"):
            s = torch.full((n, k), math.nan, dtype=torch.float32)
            i = torch.full((n, k), -1, dtype=torch.long)
            pos = torch.zeros((n, k), dtype=torch.long)
            lab = torch.full((n, k), -1, dtype=torch.long)
            w = int(ld["shape"][2])
            for r, ch in enumerate(chans):
                for j, e in enumerate(ch[which]):
                    s[r, j] = _nan(e["score"])
                    i[r, j] = int(e["index"])
                    pos[r, j] = int(e["y"]) * w + int(e["x"])
                    lab[r, j] = -1 if e["label"] is None else int(e["label"])
                    paths[int(e["index"])] = e["path"]
            t[which] = s
            t[which + "_i"], t[which + "_p"], t[which + "_l"] = i, pos, lab
        state = ld["_state"]
        st = {
            "top_scores": t["top"],
            "top_index": t["top_i"],
            "top_pos": t["top_p"],
            "top_label": t["top_l"],
            "bottom_scores": t["bottom"],
            "bottom_index": t["bottom_i"],
            "bottom_pos": t["bottom_p"],
            "bottom_label": t["bottom_l"],
            "count": torch.tensor(int(chans[0]["stats"]["count"]) if chans else 0),
            "mean": torch.tensor([_nan(c["stats"]["mean"]) for c in chans], dtype=torch.float64),
            "m2": torch.tensor(state["m2"], dtype=torch.float64),
            "active_count": torch.tensor(state["active_count"], dtype=torch.long),
            "positions": torch.tensor(int(state["positions"])),
            "class_sum": torch.tensor(state["class_sum"] or [], dtype=torch.float64).reshape(n, -1),
            "class_count": torch.tensor(state["class_count"] or [], dtype=torch.long),
            "hist": _hist_from_rows(state.get("hist"), n),
        }
        rf = ld.get("receptive_field")
        layers[key] = _layer_examples(
            key,
            tuple(int(c["channel"]) for c in chans),
            (int(ld["shape"][0]), int(ld["shape"][1]), int(ld["shape"][2])),
            st,
            _rf_from_dict(rf) if rf else None,
        )
    ds = d["dataset"]
    return DatasetExamples(
        layers=layers,
        k=k,
        reduce=str(d["reduce"]),
        dataset=str(ds["name"]),
        length=int(ds["length"]),
        classes=ds["classes"],
        input_shape=tuple(int(v) for v in ds["input_shape"]),
        paths=paths,
        skipped=tuple(Skipped(int(s["index"]), s["path"], s["reason"]) for s in ds["skipped"]),
        model_name=str(d.get("model", "")),
        settings=dict(d.get("settings", {})),
        notes=tuple(d.get("notes", [])),
    )


# ------------------------------------------------------------------ running state


class RunningChannels:
    """The running state of one layer: top-k and bottom-k (score, index, position, label),
    float64 moments (Chan), positive-position counts and per-class score sums.

    ``add`` takes one batch's per-image scores; ``state_dict`` / ``load_state_dict``
    checkpoint it; :meth:`merge` combines several states (ranks) exactly as one pass
    over their union would. Its size depends on channels and ``k``, not on the data.

    Example:
        >>> st = RunningChannels(channels=4, k=2, device=torch.device("cpu"))
        >>> st.add(torch.rand(8, 4), torch.zeros(8, 4, dtype=torch.long), torch.arange(8),
        ...        torch.zeros(4, dtype=torch.long), positions=1)
        >>> st.state_dict()["top_index"].shape
        torch.Size([4, 2])
    """

    KEYS = (
        "top_scores",
        "top_index",
        "top_pos",
        "top_label",
        "bottom_scores",
        "bottom_index",
        "bottom_pos",
        "bottom_label",
        "count",
        "mean",
        "m2",
        "active_count",
        "positions",
        "class_sum",
        "class_count",
        "hist",
    )

    def __init__(self, channels: int, k: int, device: torch.device) -> None:
        self.k = k
        f32, i64, f64 = torch.float32, torch.long, torch.float64
        c = channels
        self.t: dict[str, torch.Tensor] = {
            "top_scores": torch.full((c, k), -math.inf, dtype=f32, device=device),
            "top_index": torch.full((c, k), -1, dtype=i64, device=device),
            "top_pos": torch.zeros((c, k), dtype=i64, device=device),
            "top_label": torch.full((c, k), -1, dtype=i64, device=device),
            "bottom_scores": torch.full((c, k), math.inf, dtype=f32, device=device),
            "bottom_index": torch.full((c, k), -1, dtype=i64, device=device),
            "bottom_pos": torch.zeros((c, k), dtype=i64, device=device),
            "bottom_label": torch.full((c, k), -1, dtype=i64, device=device),
            "count": torch.zeros((), dtype=f64, device=device),
            "mean": torch.zeros(c, dtype=f64, device=device),
            "m2": torch.zeros(c, dtype=f64, device=device),
            "active_count": torch.zeros(c, dtype=i64, device=device),
            "positions": torch.zeros((), dtype=i64, device=device),
            "class_sum": torch.zeros((c, 0), dtype=f64, device=device),
            "class_count": torch.zeros(0, dtype=i64, device=device),
            "hist": torch.zeros((c, _HIST_BINS), dtype=i64, device=device),
        }
        self._edges = torch.tensor(HIST_EDGES, dtype=f64, device=device)

    def add(
        self,
        scores: torch.Tensor,
        pos: torch.Tensor,
        index: torch.Tensor,
        active: torch.Tensor,
        positions: int,
        labels: torch.Tensor | None = None,
        n_classes: int | None = None,
    ) -> None:
        """One batch: ``scores`` and ``pos`` ``[B, C]``, global ``index`` ``[B]``, ``active``
        ``[C]`` (positive positions in the batch), ``positions`` per image, ``labels``
        ``[B]`` (``-1`` for none) with ``n_classes`` at least their maximum plus one (found
        from ``labels`` when not given)."""
        t = self.t
        B = int(scores.shape[0])
        if B == 0:
            return
        s = scores.t().float()  # [C, B]
        p = pos.t()
        idx = index.view(1, -1).expand_as(s)
        lab = labels.view(1, -1).expand_as(s) if labels is not None else torch.full_like(idx, -1)
        for which, largest in (("top", True), ("bottom", False)):
            ks, ki, (kp, kl) = distributed.merge_topk(
                [t[f"{which}_scores"], s],
                [t[f"{which}_index"], idx],
                [[t[f"{which}_pos"], t[f"{which}_label"]], [p, lab]],
                k=self.k,
                largest=largest,
            )
            t[f"{which}_scores"], t[f"{which}_index"] = ks, ki
            t[f"{which}_pos"], t[f"{which}_label"] = kp, kl
        sd = s.double()
        bmean = sd.mean(dim=1)
        bm2 = ((sd - bmean[:, None]) ** 2).sum(dim=1)
        bn = torch.full_like(t["count"], float(B))
        n, mean, m2 = distributed.merge_moments(
            [t["count"], bn], [t["mean"], bmean], [t["m2"], bm2]
        )
        t["count"], t["mean"], t["m2"] = n, mean, m2
        # float64 comparisons against the published edges: exact
        bins = torch.bucketize(sd.contiguous(), self._edges, right=True)  # [C, B]
        t["hist"].scatter_add_(1, bins, (~torch.isnan(s)).long())  # a NaN has no bin
        t["active_count"] = t["active_count"] + active
        t["positions"] = t["positions"] + B * positions
        if labels is not None:
            # Rows with a label (``-1``: none) and the class count come from the host, so
            # the state stays on the device without a sync per batch.
            valid = labels >= 0
            if n_classes is None:
                n_classes = int(labels.max()) + 1 if bool(valid.any()) else 0
            self._grow(n_classes)
            if n_classes:
                w = valid.to(sd.dtype)
                lv = labels.clamp(min=0)
                t["class_sum"].index_add_(1, lv, sd * w)
                t["class_count"].index_add_(0, lv, valid.to(torch.long))

    def _grow(self, n_classes: int) -> None:
        t = self.t
        have = int(t["class_count"].numel())
        if n_classes <= have:
            return
        extra = n_classes - have
        t["class_sum"] = torch.cat(
            [t["class_sum"], t["class_sum"].new_zeros((t["class_sum"].shape[0], extra))], dim=1
        )
        t["class_count"] = torch.cat([t["class_count"], t["class_count"].new_zeros(extra)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The state as CPU tensors (for a checkpoint)."""
        return {k: v.detach().cpu().clone() for k, v in self.t.items()}

    def check_state(self, state: Any) -> str | None:
        """Why ``state`` cannot be loaded into this state (a missing key, a value that is
        not a tensor, another dtype or shape), or ``None`` when it can.

        Example:
            >>> st = RunningChannels(channels=4, k=2, device=torch.device("cpu"))
            >>> st.check_state({"count": 1})
            'lacks top_scores, top_index, ...'
        """
        if not isinstance(state, dict):
            return f"its state is a {type(state).__name__}, not a dict of tensors"
        missing = [k for k in self.KEYS if k not in state]
        if missing:
            return f"its state lacks {', '.join(missing)}"
        for k in self.KEYS:
            v, want = state[k], self.t[k]
            if not isinstance(v, torch.Tensor):
                return f"its {k} is a {type(v).__name__}, not a tensor"
            if v.dtype != want.dtype:
                return f"its {k} is {v.dtype}, this run needs {want.dtype}"
            shape = tuple(v.shape)
            if k == "class_count":  # one per class seen so far
                ok = v.dim() == 1
            elif k == "class_sum":  # [channels, classes seen so far]
                ok = v.dim() == 2 and shape[0] == want.shape[0]
            else:
                ok = shape == tuple(want.shape)
            if not ok:
                return f"its {k} has shape {shape}, this run needs {tuple(want.shape)}"
        n_cls = int(state["class_count"].numel())
        if int(state["class_sum"].shape[1]) != n_cls:
            return f"its class_sum has {state['class_sum'].shape[1]} classes, class_count {n_cls}"
        return None

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from a :meth:`state_dict`; :class:`ConvlensError` when it does not fit
        (:meth:`check_state` says why)."""
        why = self.check_state(state)
        if why is not None:
            raise ConvlensError(f"the checkpoint does not fit: {why}")
        dev = self.t["mean"].device
        for k in self.KEYS:
            self.t[k] = state[k].to(dev)

    @staticmethod
    def merge(states: Sequence[dict[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
        """One state for the union of ``states`` (in rank order)."""
        out: dict[str, torch.Tensor] = {}
        for which, largest in (("top", True), ("bottom", False)):
            ks, ki, (kp, kl) = distributed.merge_topk(
                [s[f"{which}_scores"] for s in states],
                [s[f"{which}_index"] for s in states],
                [[s[f"{which}_pos"], s[f"{which}_label"]] for s in states],
                k=k,
                largest=largest,
            )
            out[f"{which}_scores"], out[f"{which}_index"] = ks, ki
            out[f"{which}_pos"], out[f"{which}_label"] = kp, kl
        n, mean, m2 = distributed.merge_moments(
            [s["count"] for s in states], [s["mean"] for s in states], [s["m2"] for s in states]
        )
        out["count"], out["mean"], out["m2"] = n, mean, m2
        out["active_count"] = torch.stack([s["active_count"] for s in states]).sum(0)
        out["hist"] = torch.stack([s["hist"].cpu() for s in states]).sum(0)
        out["positions"] = torch.stack([s["positions"] for s in states]).sum(0)
        n_cls = max(int(s["class_count"].numel()) for s in states)
        c = int(states[0]["mean"].numel())
        cs = torch.zeros((c, n_cls), dtype=torch.float64)
        cc = torch.zeros(n_cls, dtype=torch.long)
        for s in states:
            m = int(s["class_count"].numel())
            cs[:, :m] += s["class_sum"].cpu().reshape(c, m)
            cc[:m] += s["class_count"].cpu()
        out["class_sum"], out["class_count"] = cs, cc
        return {key: v.cpu() for key, v in out.items()}


# ----------------------------------------------------------------------- the pass


@dataclass
class _Target:
    """A requested layer output: its key, its module, which call, the channels kept."""

    key: str
    name: str
    module: nn.Module
    call: int | None
    channels: list[int]
    shape: tuple[int, int, int]
    state: RunningChannels | None = None


def parse_channels(spec: str) -> list[int]:
    """``"0-15"``, ``"3"`` or ``"0,4,8-11"`` as a list of channel numbers.

    Example:
        >>> parse_channels("0-2,7")
        [0, 1, 2, 7]
    """
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise ValueError(
                f"channels {spec!r}: use numbers and ranges such as 0-15 or 0,4,8-11"
            ) from None
        if a < 0 or b < a:
            raise ValueError(f"channels {spec!r}: {part!r} is not a range lo-hi with 0 <= lo <= hi")
        out.extend(range(a, b + 1))
    if not out:
        raise ValueError(f"channels {spec!r} selects nothing: use e.g. 0-15")
    return out


def _parse_channels(spec: Any, n: int, key: str) -> list[int]:
    if spec is None:
        return list(range(n))
    if isinstance(spec, str):
        chans = parse_channels(spec)
    elif isinstance(spec, int):
        chans = [spec]
    else:
        chans = [int(c) for c in spec]
    bad = [c for c in chans if not 0 <= c < n]
    if bad:
        raise ValueError(
            f"channel {bad[0]} is out of range for {key!r}, which has {n} channels (0-{n - 1})"
        )
    if not chans:
        raise ValueError(f"no channels selected for {key!r}")
    return sorted(dict.fromkeys(chans))


# model -> {(input shape, dtype, names, module ids): output shapes per call}
_SHAPES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Any]] = (
    weakref.WeakKeyDictionary()
)


def _shapes(
    net: nn.Module, input_shape: tuple[int, ...], names: list[str], dtype: torch.dtype
) -> dict[str, list[tuple[int, ...] | None]]:
    """``trace_calls`` of ``names``, cached per model while its modules stay the same."""
    modules = dict(net.named_modules())
    key = (input_shape, dtype, tuple(names), tuple(id(modules[n]) for n in names))
    per_model = _SHAPES.setdefault(net, {})
    if key not in per_model:
        if len(per_model) > 32:
            per_model.clear()
        per_model[key] = trace_calls(net, input_shape, names, dtype=dtype)
    return per_model[key]


def _resolve_targets(
    net: nn.Module,
    layers: Sequence[str],
    input_shape: tuple[int, ...],
    channels: Any,
    dtype: torch.dtype,
) -> list[_Target]:
    refs: list[LayerRef] = find_layers(net, list(layers))
    names = list(dict.fromkeys(r.name for r in refs))
    shapes = _shapes(net, input_shape, names, dtype)
    targets: list[_Target] = []
    for r in refs:
        calls = shapes.get(r.name, [])
        if not calls:
            raise ValueError(
                f"layer {r.name!r} does not run during the model's forward: choose another"
            )
        picks = (
            [(r.key, r.call)]
            if r.call is not None
            else (
                [(r.name, None)]
                if len(calls) == 1
                else [(f"{r.name}#{i}", i) for i in range(len(calls))]
            )
        )
        for key, call in picks:
            if call is not None and call >= len(calls):
                raise ValueError(
                    f"layer {r.name!r} runs {len(calls)} time(s) per forward; {key!r} does "
                    f"not exist (use #0..#{len(calls) - 1})"
                )
            shape = calls[0 if call is None else call]
            if shape is None:
                raise ValueError(
                    f"layer {r.name!r} does not return a tensor: choose one of its submodules "
                    "(`convlens layers MODEL` lists them)"
                )
            if len(shape) == 4:
                chw = (int(shape[1]), int(shape[2]), int(shape[3]))
            elif len(shape) == 2:
                chw = (int(shape[1]), 1, 1)
            else:
                raise ValueError(
                    f"layer {key!r} returns a {len(shape)}-D tensor {list(shape)}: dataset "
                    "examples need a feature map [N, C, H, W] or an output [N, C]"
                )
            chan_spec = (
                channels.get(key, channels.get(r.name)) if isinstance(channels, dict) else channels
            )
            targets.append(
                _Target(key, r.name, r.module, call, _parse_channels(chan_spec, chw[0], key), chw)
            )
    unique: dict[str, _Target] = {}
    for t in targets:  # the same output asked twice ("pool", "pool#1") is collected once
        unique.setdefault(t.key, t)
    return list(unique.values())


def _reduce_output(
    out: Any, tgt: _Target, reduce: str, real: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per-image scores and argmax positions ``[B, C]``, positive-position counts ``[C]``
    and positions per image, for the kept channels of the first ``real`` images (the rest
    of the batch is padding)."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(
            f"layer {tgt.key!r} returns {type(out).__name__}, not a tensor: choose one of "
            "its submodules"
        )
    x = out.detach()[:real]
    if x.ndim == 2:
        x = x[:, :, None]
    elif x.ndim == 4:
        x = x.flatten(2)
    else:
        raise ValueError(f"layer {tgt.key!r} returned a {x.ndim}-D tensor during the pass")
    if len(tgt.channels) != x.shape[1]:
        x = x[:, tgt.channels]
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    mx, arg = x.max(dim=2)
    scores = mx if reduce == "max" else x.mean(dim=2)
    active = (x > 0).sum(dim=(0, 2))
    return scores, arg, active, int(x.shape[2])


def _fingerprint(net: nn.Module) -> str:
    """Names, shapes and sums of the model's parameters and buffers: a different model or
    other weights give another value."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in [*net.named_parameters(), *net.named_buffers()]:
            v = float(t.detach().double().sum()) if t.numel() and t.is_floating_point() else 0.0
            h.update(f"{name}:{tuple(t.shape)}:{v!r};".encode())
    return h.hexdigest()[:16]


def _auto_batch(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 32


def checkpoint_path(path: Path, ctx: distributed.DistContext) -> Path:
    """The checkpoint file of this rank: ``path`` itself in one process, else
    ``path.rank{r}-of-{world}``."""
    if ctx.world == 1:
        return path
    return path.with_name(f"{path.name}.rank{ctx.rank}-of-{ctx.world}")


def _other_world_checkpoints(path: Path, world: int) -> list[tuple[Path, int]]:
    """Checkpoints beside ``path`` written by a run with another number of processes:
    ``path`` itself (one process) and ``path.rank{r}-of-{w}`` for ``w != world``."""
    found: list[tuple[Path, int]] = []
    if world != 1 and path.is_file():
        found.append((path, 1))
    pattern = re.compile(re.escape(path.name) + r"\.rank(\d+)-of-(\d+)")
    if path.parent.is_dir():
        for p in sorted(path.parent.iterdir()):
            m = pattern.fullmatch(p.name)
            if m and int(m[2]) != world and p.is_file():
                found.append((p, int(m[2])))
    return found


def _checkpoint_problem(
    ck: Any, settings: dict[str, Any], targets: list[_Target], batches: list[range]
) -> tuple[str, str] | None:
    """Why the checkpoint ``ck`` cannot be continued by this run, and how to continue it
    (``None``: it can). Checks the format, the settings, and that every value has the type
    and shape this run needs and adds up (images scored plus skipped = images read)."""
    if not isinstance(ck, dict) or not {"version", "states", "settings"} <= set(ck):
        return "is not a convlens examples checkpoint", ""
    if ck["version"] != _CKPT_VERSION:
        from convlens import __version__

        by = f"convlens {ck['convlens']}" if isinstance(ck.get("convlens"), str) else "a convlens"
        return (
            f"was written by {by} in checkpoint format {ck['version']!r}; this convlens "
            f"({__version__}) reads format {_CKPT_VERSION}",
            "resume it with the convlens that wrote it",
        )
    old = ck["settings"]
    if not isinstance(old, dict):
        return "has no settings", ""
    diffs = [
        f"{key} {old.get(key)!r} (checkpoint) vs {settings.get(key)!r} (now)"
        for key in sorted(set(old) | set(settings))
        if old.get(key) != settings.get(key)
    ]
    if diffs:
        return f"was made with other settings: {'; '.join(diffs)}", "rerun with the same settings"
    nb, done = ck.get("next_batch"), ck.get("done")
    if isinstance(nb, bool) or not isinstance(nb, int) or not 0 <= nb <= len(batches):
        return f"is corrupt: next_batch {nb!r} is not a batch from 0 to {len(batches)}", ""
    if not isinstance(done, bool) or done != (nb == len(batches)):
        return f"is corrupt: done {done!r} with batch {nb} of {len(batches)}", ""
    skipped = ck.get("skipped")
    if not isinstance(skipped, list) or not all(
        isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], int) for e in skipped
    ):
        return "is corrupt: its list of skipped images is malformed", ""
    states = ck["states"]
    if not isinstance(states, dict):
        return "is corrupt: its states are not a dict", ""
    read = sum(len(b) for b in batches[:nb])
    for t in targets:
        if t.key not in states:
            return f"is corrupt: it has no state for {t.key!r}", ""
        why = _state(t).check_state(states[t.key])
        if why is not None:
            return f"is corrupt: {t.key}: {why}", ""
        count = float(states[t.key]["count"])
        if count + len(skipped) != read:
            return (
                f"is corrupt: {t.key} scored {count:.0f} images and {len(skipped)} were skipped, "
                f"but batch {nb} means {read} were read",
                "",
            )
    return None


def _load_checkpoint(
    path: Path,
    settings: dict[str, Any],
    targets: list[_Target],
    batches: list[range],
    strict: bool,
    who: str = "the pass",
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` when this run can continue it; ``None`` when there is
    none, or (with a :class:`ConvlensWarning` naming the file and why) when it cannot be
    used and ``who`` starts over; :class:`CheckpointError` instead with ``strict``."""
    if not path.is_file():
        return None
    problem: tuple[str, str] | None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        problem = (f"cannot be read: truncated or corrupt ({type(e).__name__})", "")
    else:
        problem = _checkpoint_problem(ck, settings, targets, batches)
    if problem is None:
        return ck
    why, fix = problem
    if strict:
        start_over = "delete it or rerun without --strict to start over"
        raise CheckpointError(
            f"the checkpoint {str(path)!r} {why}; --strict refuses to start over: "
            + (f"{fix} to continue it, or {start_over}" if fix else start_over)
        )
    warnings.warn(
        f"ignoring the checkpoint {str(path)!r}: it {why}; {who} starts over",
        ConvlensWarning,
        stacklevel=3,
    )
    return None


def _refuse_other_world(path: Path, ctx: distributed.DistContext) -> None:
    """A run of another world size left checkpoints and this rank has none: refuse. A
    rank's state is a summary (top-k, moments, histogram) of its shard
    ``range(rank, N, world)``; it cannot be split by image index into other shards."""
    if checkpoint_path(path, ctx).is_file():
        return
    found = _other_world_checkpoints(path, ctx.world)
    if not found:
        return
    file, world = found[0]
    raise CheckpointError(
        f"the checkpoint {str(file)!r} is from a run of {world} process(es), this one has "
        f"{ctx.world}: a rank's state summarises its shard range(rank, N, {world}) and cannot "
        f"be re-sharded by image index; to continue it rerun with {world} process(es)"
        + (f" (torchrun --nproc-per-node {world})" if world > 1 else " (without torchrun)")
        + f", or delete {path}* to start over"
    )


def _save_checkpoint(
    path: Path,
    settings: dict[str, Any],
    next_batch: int,
    targets: list[_Target],
    skipped: list[Skipped],
    done: bool,
) -> None:
    from convlens import __version__

    ck = {
        "version": _CKPT_VERSION,
        "convlens": __version__,
        "settings": settings,
        "next_batch": next_batch,
        "done": done,
        "states": {t.key: t.state.state_dict() for t in targets if t.state is not None},
        "skipped": [list(s) for s in skipped],
    }
    with atomic_open(path, "wb") as fh:
        torch.save(ck, fh)


def open_pass(
    net: nn.Module,
    bundle: Any,
    data: Any,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None,
    split: str,
    device: DeviceLike | None,
    batch_size: int | str,
    auto_batch: Callable[[torch.device], int],
) -> tuple[Any, Source, torch.device, distributed.DistContext, int]:
    """What every dataset-wide pass starts with: the preprocessing (``preprocess``, else
    the bundle's), the data as a :class:`Source`, the device (where the model is, or the
    one asked for; each torchrun rank on its own GPU, the model moved there), the
    distributed context, and the batch size (``"auto"``: ``auto_batch(device)``).

    Example:
        >>> prep, source, dev, ctx, bs = open_pass(net, None, data, None, "val", "cpu", 8, f)
    """
    prep = preprocess if preprocess is not None else (bundle.preprocess if bundle else None)
    source = make_source(data, prep, split=split)
    dev = distributed.local_device(model_device(net) if device is None else resolve_device(device))
    ctx = distributed.context(dev)
    if device is not None or dev != model_device(net):
        net.to(dev)
    bs = auto_batch(dev) if batch_size == "auto" else batch_size
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    return prep, source, dev, ctx, bs


def _batches(indices: range, size: int) -> list[range]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


class _Loader:
    """Reads batches of a source on a thread pool, one batch ahead of the model."""

    def __init__(self, source: Source, workers: int, strict: bool) -> None:
        self.source = source
        self.strict = strict
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), "convlens-read")

    def submit(self, batch: range) -> list[concurrent.futures.Future[Any]]:
        return [self.pool.submit(self.source.load, i) for i in batch]

    def collect(
        self, batch: range, futures: list[concurrent.futures.Future[Any]]
    ) -> tuple[list[torch.Tensor], list[int], list[int], list[Skipped]]:
        xs, idx, labels, skipped = [], [], [], []
        for i, fut in zip(batch, futures):
            try:
                x, label, _ = fut.result()
            except LoadFailure as e:
                if self.strict:
                    raise DatasetError(
                        f"{e} (strict: the pass stops at the first unreadable image)"
                    ) from None
                skipped.append(Skipped(e.index, e.path, e.reason))
                continue
            xs.append(x)
            idx.append(i)
            labels.append(-1 if label is None else int(label))
        return xs, idx, labels, skipped

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _hooks(targets: list[_Target], reduce: str, batch: dict[str, Any]) -> Iterator[None]:
    """Forward hooks that reduce each requested output as it is returned and stop the
    forward after the last one."""
    by_module: dict[str, list[_Target]] = {}
    for t in targets:
        by_module.setdefault(t.name, []).append(t)
    needed = {
        name: max((t.call if t.call is not None else 0) for t in ts) + 1
        for name, ts in by_module.items()
    }

    def make(name: str, ts: list[_Target]) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            calls: dict[str, int] = batch["calls"]  # reset for every forward
            c = calls.get(name, 0)
            calls[name] = c + 1
            for t in ts:
                if (t.call is None and c == 0) or t.call == c:
                    scores, pos, active, positions = _reduce_output(out, t, reduce, batch["real"])
                    _state(t).add(
                        scores,
                        pos,
                        batch["index"],
                        active,
                        positions,
                        batch["labels"],
                        batch["n_classes"],
                    )
            if all(calls.get(n, 0) >= needed[n] for n in needed):
                raise _StopForward

        return hook

    handles = []
    try:
        for name, ts in by_module.items():
            handles.append(ts[0].module.register_forward_hook(make(name, ts)))
        yield
    finally:
        for h in handles:
            h.remove()


def _state(t: _Target) -> RunningChannels:
    if t.state is None:  # set before the loop starts
        raise RuntimeError(f"no state for {t.key!r}")
    return t.state


def _check_batch_memory(
    net: nn.Module,
    item_shape: Sequence[int],
    dtype: torch.dtype,
    bs: int,
    dev: torch.device,
    ctx: distributed.DistContext,
) -> None:
    """Refuse, before the first batch is allocated, a batch size whose forward cannot fit:
    at least the batch itself and the largest convolution output, for every row, against
    the free memory (the least of any rank's)."""
    from convlens._memory import activation_bytes, available_memory, format_bytes, may_exceed
    from convlens.errors import ResourceError

    size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    per_row = 4.0 * math.prod(item_shape) + size * math.prod(item_shape)
    free = available_memory(dev)
    if ctx.world > 1:
        free = min(int(v) for v in distributed.all_gather_objects(free))
    if not may_exceed(bs * per_row, free):
        return
    per_row += activation_bytes(net, item_shape, dtype, backward=False)
    if bs * per_row > free:
        shape = "x".join(str(int(v)) for v in item_shape)
        where = "this machine" if dev.type == "cpu" else str(dev)
        raise ResourceError(
            f"batch size {bs}: a batch of {bs} images of {shape} needs at least "
            f"{format_bytes(bs * per_row)}; {where} has {format_bytes(free)} available: use "
            f"batch size <= {max(1, int(free // per_row))}"
        )


def _fill_batch(
    state: dict[str, Any],
    xs: list[torch.Tensor],
    idx: list[int],
    labels: list[int],
    bs: int,
    dev: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The model input of one batch, on ``dev``, and what the hooks need to know of it.

    Every batch has ``bs`` rows (a short one is padded with copies of its last image,
    which are not scored): kernels are chosen by shape, so an image's numbers do not depend
    on how many ranks run or which images share its batch.
    """
    cuda = dev.type == "cuda"
    state["real"] = len(xs)
    state["calls"] = {}
    x = torch.stack(xs + [xs[-1]] * (bs - len(xs)))
    if cuda:
        x = x.pin_memory()
    state["index"] = torch.tensor(idx, dtype=torch.long).to(dev, non_blocking=cuda)
    state["labels"] = (
        torch.tensor(labels, dtype=torch.long).to(dev, non_blocking=cuda)
        if any(v >= 0 for v in labels)
        else None
    )
    return x.to(dev, dtype=dtype, non_blocking=cuda)


def _merge(
    targets: list[_Target], skipped: list[Skipped], ctx: distributed.DistContext, k: int
) -> tuple[dict[str, dict[str, torch.Tensor]], list[Skipped]]:
    """Every layer's state merged over the ranks (one all_gather per state tensor), and
    the skipped images of all ranks, by index: the one exact merge after the loop."""
    merged: dict[str, dict[str, torch.Tensor]] = {}
    for t in targets:
        state = _state(t)
        if ctx.world == 1:
            merged[t.key] = state.state_dict()
            continue
        per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(ctx.world)]
        for key in RunningChannels.KEYS:
            for r, g in enumerate(distributed.all_gather_tensors(state.t[key])):
                per_rank[r][key] = g.cpu()
        merged[t.key] = RunningChannels.merge(per_rank, k)
    if ctx.world > 1:
        parts = distributed.all_gather_objects([tuple(s) for s in skipped])
        skipped = [Skipped(int(i), p, str(why)) for part in parts for i, p, why in part]
    return merged, sorted(skipped, key=lambda s: s.index)


def _layer_result(
    t: _Target,
    st: dict[str, torch.Tensor],
    net: nn.Module,
    input_shape: tuple[int, ...],
    notes: list[str],
) -> LayerExamples:
    """One layer's merged state as a :class:`LayerExamples`, with its receptive field."""
    try:
        rf: ReceptiveField | None = receptive_field(net, t.key, input_shape)
    except Exception as e:  # a bookkeeping gap must not lose the pass
        rf = None
        notes.append(f"receptive field of {t.key!r} unknown ({e}): the whole image is used")
    if rf is not None and not rf.bounded and t.shape[1:] != (1, 1):
        notes.append(f"{t.key}: {rf.reason}; its examples show the whole image")
    return _layer_examples(t.key, tuple(t.channels), t.shape, st, rf)


def _layer_examples(
    key: str,
    channels: tuple[int, ...],
    shape: tuple[int, int, int],
    st: dict[str, torch.Tensor],
    rf: ReceptiveField | None,
) -> LayerExamples:
    """A :class:`LayerExamples` from a state (:meth:`RunningChannels.state_dict`'s keys)."""
    has_classes = bool(st["class_count"].numel())
    return LayerExamples(
        layer=key,
        channels=channels,
        shape=shape,
        top_scores=st["top_scores"],
        top_index=st["top_index"],
        top_pos=st["top_pos"],
        top_label=st["top_label"],
        bottom_scores=st["bottom_scores"],
        bottom_index=st["bottom_index"],
        bottom_pos=st["bottom_pos"],
        bottom_label=st["bottom_label"],
        count=int(st["count"]),
        mean=st["mean"],
        m2=st["m2"],
        active_count=st["active_count"],
        positions=int(st["positions"]),
        class_sum=st["class_sum"] if has_classes else None,
        class_count=st["class_count"] if has_classes else None,
        receptive=rf,
        hist=st.get("hist"),
    )


def dataset_examples(
    model: Any,
    data: Any,
    layers: str | Sequence[str],
    *,
    k: int = 9,
    reduce: Reduce = "max",
    batch_size: int | str = "auto",
    device: DeviceLike | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike[str] | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    channels: Any = None,
    split: str = "val",
    strict: bool = False,
    workers: int | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> DatasetExamples:
    """The top-k and bottom-k images of every channel of ``layers`` over ``data``, with
    running statistics, in one streaming pass.

    ``model`` is a :class:`convlens.ModelBundle` (its preprocessing is used) or an
    ``nn.Module`` (give ``preprocess=``, or a dataset that yields model-ready tensors).
    ``data``: ``convlens.data.shapes()`` / ``imagenette()`` (a ``(train, val)`` pair reads
    ``split``, default val) or one of their splits, a torchvision ``ImageFolder``, any
    ``Dataset`` of images or ``(image, label)``, or a folder (sub-folders per class, or a
    flat folder of images). Files are decoded once per pass with :func:`convlens.load_image`
    on ``workers`` threads (default: the CPU count, at most 8); an unreadable one is skipped
    with a warning naming it (``strict=True`` raises instead, for a checkpoint too).

    Each image's score for a channel is its maximum over positions (``reduce="max"``) or
    its mean (``"mean"``); the position of the maximum is kept either way. ``channels``
    (a list, ``"0-15"``, or ``{layer: ...}``) limits what is collected. ``k`` larger than
    the dataset is clamped (with a warning). ``checkpoint=PATH`` writes the state
    atomically every ``checkpoint_every`` images and continues from it when it exists. A
    checkpoint that cannot be continued (truncated or corrupt, another checkpoint format,
    other settings) is never used: a :class:`~convlens.errors.ConvlensWarning` names the
    file and why and the pass starts over (``strict=True``: a
    :class:`~convlens.errors.CheckpointError` instead). Checkpoints of a run with another
    number of processes are refused (a rank's state cannot be split by image index): rerun
    with that many, or delete them.
    With a checkpoint, SIGTERM or Ctrl-C stops the pass at the next batch boundary: the
    checkpoint is written and :class:`convlens.Preempted` raised (the signal handlers are
    restored as they were); the same call continues.

    Under ``torchrun`` or in an initialised process group each rank reads
    ``range(rank, N, world)`` on its ``LOCAL_RANK`` GPU, and the merged result (on every
    rank) equals one process's. ``device``: ``None`` runs where the model is; otherwise
    the model is moved there (in place). The model runs in eval mode under ``no_grad``;
    its training flags are restored and every hook removed, also on error.

    Example:
        >>> r = dataset_examples(load_model("efficientnet_lite0"), "photos/", ["blocks.4"], k=9)
        >>> r.top("blocks.4", 3)[0].path
    """
    from convlens.models.zoo import model_and_bundle

    t0 = time.perf_counter()
    net, bundle = model_and_bundle(model)
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce is 'max' or 'mean', got {reduce!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    if not layers:
        raise ValueError("no layers given: name at least one, e.g. ['layer4']")
    prep, source, dev, ctx, bs = open_pass(
        net, bundle, data, preprocess, split, device, batch_size, _auto_batch
    )

    item_shape = fix_size(source)
    dtype = model_dtype(net)
    input_shape = (1, *item_shape)
    targets = _resolve_targets(net, layers, input_shape, channels, dtype)
    notes: list[str] = []
    n = len(source)
    bs = min(bs, n)  # never more rows than images: a batch is padded to bs rows
    _check_batch_memory(net, item_shape, dtype, bs, dev, ctx)
    k_eff = k
    if k > n:
        k_eff = n
        msg = f"k={k} is more than the dataset's {n} images: clamped to k={n}"
        notes.append(msg)
        warnings.warn(msg, stacklevel=2)
    for t in targets:
        t.state = RunningChannels(len(t.channels), k_eff, dev)

    settings = {
        "model": (bundle.description if bundle else type(net).__name__),
        "weights": _fingerprint(net),  # names the weights in the JSON; matches checkpoints
        "dataset": source.fingerprint(),
        "layers": [t.key for t in targets],
        "channels": {t.key: _ranges(t.channels) for t in targets},
        "k": k_eff,
        "reduce": reduce,
        "batch_size": bs,
        "world_size": ctx.world,
        "input_shape": list(input_shape),
    }
    shard = distributed.shard(n, ctx.rank, ctx.world)
    batches = _batches(shard, bs)
    skipped: list[Skipped] = []
    start = 0
    ckpt = checkpoint_path(Path(checkpoint), ctx) if checkpoint is not None else None
    if ckpt is not None:
        _refuse_other_world(Path(checkpoint), ctx)  # type: ignore[arg-type]
        who = "the pass" if ctx.world == 1 else f"rank {ctx.rank}'s shard"
        ck = _load_checkpoint(ckpt, settings, targets, batches, strict, who)
        if ck is not None:
            for t in targets:
                _state(t).load_state_dict(ck["states"][t.key])
            skipped = [Skipped(int(s[0]), s[1], str(s[2])) for s in ck["skipped"]]
            start = int(ck["next_batch"])
    every = max(1, math.ceil(checkpoint_every / bs))

    from convlens._progress import tqdm

    done_images = sum(len(b) for b in batches[:start])
    bar = tqdm(
        total=len(shard),
        initial=done_images,
        desc="examples",
        unit="img",
        disable=not (progress and ctx.is_main),
        dynamic_ncols=True,
    )
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    loader = _Loader(source, workers, strict)
    batch_state: dict[str, Any] = {}
    n_seen = len(source.classes) if source.classes else 0  # classes known so far
    # With a checkpoint, SIGTERM and Ctrl-C stop the pass at the next batch boundary.
    stoppable = _signals.deferred() if ckpt is not None else contextlib.nullcontext()
    try:
        with stoppable, evaluating(net), torch.no_grad(), _hooks(targets, reduce, batch_state):
            pending = loader.submit(batches[start]) if start < len(batches) else None
            for b in range(start, len(batches)):
                if pending is None:
                    break
                xs, idx, labels, bad = loader.collect(batches[b], pending)
                pending = loader.submit(batches[b + 1]) if b + 1 < len(batches) else None
                for s in bad:
                    warnings.warn(
                        f"skipped {s.path or f'item {s.index}'}: {s.reason}", stacklevel=2
                    )
                skipped.extend(bad)
                if xs:
                    x = _fill_batch(batch_state, xs, idx, labels, bs, dev, dtype)
                    n_seen = max(n_seen, max(labels) + 1)
                    batch_state["n_classes"] = n_seen
                    with contextlib.suppress(_StopForward):
                        net(x)
                bar.update(len(batches[b]))
                stopping = ckpt is not None and _signals.requested() is not None
                last = b + 1 == len(batches)
                if ckpt is not None and ((b + 1) % every == 0 or last or stopping):
                    _save_checkpoint(ckpt, settings, b + 1, targets, skipped, last)
                if stopping:
                    _signals.stop(
                        f"the checkpoint {str(ckpt)!r} holds {b + 1} of "
                        + (f"rank {ctx.rank}'s " if ctx.world > 1 else "")
                        + f"{len(batches)} batches"
                    )
    finally:
        loader.close()
        bar.close()
    for msg in source.notes:
        if msg not in notes:
            notes.append(msg)
            warnings.warn(msg, stacklevel=2)

    merged, skipped = _merge(targets, skipped, ctx, k_eff)
    count = int(next(iter(merged.values()))["count"]) if merged else 0
    if count + len(skipped) != n:
        raise RuntimeError(
            f"internal error: {count} images scored and {len(skipped)} skipped, but the "
            f"dataset has {n}"
        )

    layers_out: dict[str, LayerExamples] = {}
    paths: dict[int, str | None] = {}
    for t in targets:
        st = merged[t.key]
        for key in ("top_index", "bottom_index"):
            for i in st[key].flatten().tolist():
                if i >= 0 and i not in paths:
                    paths[int(i)] = source.path(int(i))
        layers_out[t.key] = _layer_result(t, st, net, input_shape, notes)
    seconds = time.perf_counter() - t0
    run = {
        **settings,
        "device": str(dev),
        "dtype": str(dtype).removeprefix("torch."),
        "split": split if isinstance(data, tuple) else None,
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else None,
        "versions": {**versions(), "device": str(dev)},
    }
    return DatasetExamples(
        layers=layers_out,
        k=k_eff,
        reduce=reduce,
        dataset=source.name,
        length=n,
        classes=source.classes,
        input_shape=tuple(int(v) for v in item_shape),
        paths=paths,
        skipped=tuple(skipped),
        model_name=str(settings["model"]),
        settings=run,
        notes=tuple(notes),
        model=net,
        preprocess=prep,
    )


# ----------------------------------------------------------------------- crops


@dataclass(frozen=True)
class Crop:
    """One example cut out at its receptive field: ``image`` ``[C, h, w]`` in [0, 1] (the
    model's input pixels), ``activation`` ``[h, w]`` (the channel's map upsampled to the
    input, bilinear, over the same box), ``box`` ``(top, bottom, left, right)``, and the
    whole input ``full`` with its ``full_activation``."""

    example: Example
    box: tuple[int, int, int, int]
    image: torch.Tensor = field(repr=False)
    activation: torch.Tensor = field(repr=False)
    full: torch.Tensor = field(repr=False)
    full_activation: torch.Tensor = field(repr=False)


def crops(
    result: DatasetExamples,
    data: Any,
    layer: str,
    channel: int,
    *,
    which: Literal["top", "bottom"] = "top",
    model: Any = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: DeviceLike | None = None,
    split: str = "val",
) -> list[Crop]:
    """Re-read only the top-k (or bottom-k) images of ``channel`` and cut out each one's
    receptive field around its maximum, with the channel's activation map over it.

    ``data`` is the dataset the result was computed on (indices are global). ``model``
    defaults to the one the pass ran (a result read from disk needs ``model=``).

    Example:
        >>> for c in crops(r, val, "bn3", 0):
        ...     c.image.shape, c.activation.shape, c.box
    """
    import torch.nn.functional as F

    from convlens.capture import capture
    from convlens.models.zoo import model_and_bundle

    if which not in ("top", "bottom"):
        raise ValueError(f"which is 'top' or 'bottom', got {which!r}")
    examples = result.top(layer, channel) if which == "top" else result.bottom(layer, channel)
    if model is None:
        if result.model is None:
            raise ValueError(
                "this result was read from disk: pass model= (the model it was computed with)"
            )
        net, bundle = result.model, None
    else:
        net, bundle = model_and_bundle(model)
    prep = preprocess or (bundle.preprocess if bundle else None) or result.preprocess
    source = make_source(data, prep, split=split)
    if len(source) != result.length:
        raise ValueError(
            f"data has {len(source)} images but the result was computed on {result.length}: "
            "pass the same dataset (and split)"
        )
    if not examples:
        return []
    fix_size(source)
    le = result.layers[layer]
    xs = [source.load(e.index)[0] for e in examples]
    x = torch.stack(xs)
    want = tuple(int(v) for v in result.input_shape[-2:])
    if tuple(x.shape[-2:]) != want:
        # positions and receptive fields are in the pass's input grid: another size
        # would cut the wrong box (or none at all)
        raise ValueError(
            f"the images load at {x.shape[-2]}x{x.shape[-1]} px but the result was computed "
            f"on {want[0]}x{want[1]} inputs: pass the preprocessing the pass used "
            "(preprocess=, or model= as the bundle it ran)"
        )
    dev = model_device(net) if device is None else resolve_device(device)
    with torch.no_grad():
        out = capture(net, x.to(dev, dtype=model_dtype(net)), [layer], device=device)[layer]
    maps = out[:, channel].float() if out.ndim == 4 else out[:, channel].float().view(-1, 1, 1)
    H, W = int(x.shape[-2]), int(x.shape[-1])
    up = F.interpolate(maps[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    res = []
    for e, xi, a in zip(examples, xs, up):
        top, bot, left, right = (
            result.receptive_field(layer, e.y, e.x) if le.shape[1:] != (1, 1) else (0, H, 0, W)
        )
        img = source.display(xi)
        box = (top, bot, left, right)
        res.append(Crop(e, box, img[:, top:bot, left:right], a[top:bot, left:right], img, a))
    return res
