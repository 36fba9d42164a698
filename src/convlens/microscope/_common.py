"""What every stage of the microscope shares: :class:`Settings` (its arguments, checked),
:class:`Context` (what the stages read and what each one leaves for the next), the folder
keys, the PNG helpers and :func:`_finished`, the resume rule of every per-channel file.

A channel's files are finished when its ``NNNN.json`` marker is there and every file the
marker vouches for is whole (a PNG ends with its IEND chunk); a damaged one is named in a
:class:`~convlens.errors.ConvlensWarning`, its marker removed, and the channel computed
again (``strict``: :class:`~convlens.errors.CheckpointError` instead).

Example:
    >>> _key({"k": 9})  # the folder key of some settings
    '6c196e161a70'
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from convlens._io import atomic_open
from convlens.errors import CheckpointError, ConvlensError, ConvlensWarning

if TYPE_CHECKING:
    from convlens.distributed import DistContext


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


@dataclass(frozen=True)
class _Unit:
    layer: str  # the key as requested
    index: int  # which requested layer
    channel: int


_KINDS = ("channel", "neuron", "negative")


def _read(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``; None when it is missing, unreadable, not JSON (or not
    UTF-8), or not an object."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return d if isinstance(d, dict) else None


# ------------------------------------------------------------------------ the stages' context


@dataclass(frozen=True)
class Settings:
    """:func:`convlens.microscope`'s arguments, checked (``batch`` resolved from
    ``"auto"``): what decides the files and the pages."""

    layers: list[str]
    channels: Any = None
    k: int = 9
    steps: int = 160
    size: int = 128
    diversity: int = 4
    diversity_weight: float = 5.0
    batch: int = 8
    seed: int = 0
    lr: float | None = None
    split: str = "val"
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None
    precision: str = "auto"
    schedule: Any = "cosine"
    attributions: bool = True
    atlas: bool = False
    force: bool = False
    strict: bool = False
    title: str | None = None
    extra: dict[str, Any] | None = None  # more entries for the index page's settings


@dataclass
class Context:
    """What the stages share. The first fields are the run's inputs (the model as given and
    as a module, the data, the settings, the output folder, the distributed context, the
    device); :func:`convlens.microscope._prepare` adds the fingerprints of the weights and
    the data. Each stage then fills its own fields for the stages after it (the dataset
    pass ``result`` ... ``mine``, the renders ``plan`` and ``render_dirs``, the
    attributions ``attr_plan`` and ``attr_dirs``), adds its seconds to ``stages`` and
    its work to ``counts``. ``atlas``: per layer key, the href (relative to ``out``) of its
    activation atlas, linked from the layer's page; empty: no link.

    Example:
        >>> from convlens.microscope import _context, _prepare, dataset_pass, renders
        >>> ctx = _context(model, data, ["conv1"], out="site/", steps=8)
        >>> _prepare(ctx)
        >>> dataset_pass.run(ctx); renders.run(ctx)  # two stages alone
        >>> ctx.counts["dataset_pass"], ctx.counts["rendered"]
        (1, 16)
    """

    model: Any
    data: Any
    net: nn.Module
    bundle: Any
    settings: Settings
    out: Path
    dist: DistContext
    dev: torch.device
    progress: bool = True
    prep: Callable[[torch.Tensor], torch.Tensor] | None = None
    weights: str = ""
    data_key: str = ""
    t_start: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    # the dataset pass
    result: Any = None
    ex_key: str = ""
    keys: list[str] = field(default_factory=list)
    dirs: dict[str, str] = field(default_factory=dict)
    example_dirs: dict[str, Path] = field(default_factory=dict)
    units: list[_Unit] = field(default_factory=list)
    mine: list[_Unit] = field(default_factory=list)
    # the renders
    plan: Any = None
    render_dirs: dict[str, Path] = field(default_factory=dict)
    # the attributions
    attr_plan: Any = None
    attr_dirs: dict[str, Path] = field(default_factory=dict)
    # the activation atlas: layer key -> href of its page
    atlas: dict[str, str] = field(default_factory=dict)

    @property
    def cache(self) -> Path:
        """``out/cache``: the dataset pass's result and checkpoint."""
        return self.out / "cache"

    @property
    def bar(self) -> bool:
        """Whether this process shows progress bars (rank 0 only)."""
        return self.progress and self.dist.is_main

    def need(self, name: str, stage: str) -> Any:
        """The field ``name`` an earlier stage filled; a :class:`ConvlensError` naming
        that stage when it has not run."""
        value = getattr(self, name)
        if value is None:
            raise ConvlensError(
                f"this stage reads ctx.{name}, which convlens.microscope.{stage}.run(ctx) "
                "fills: run that stage first"
            )
        return value
