"""Any dataset a user has, as indexed model inputs: what a dataset-wide pass reads.

A :class:`Source` turns convlens's datasets (``shapes()``, ``imagenette()``), torchvision's
``ImageFolder``, any ``Dataset`` of images or ``(image, label)`` pairs, or a folder path
(labelled sub-folders or a flat folder of images) into ``load(i) -> (input, label, path)``.

- Files (a folder, an ``ImageFolderData``, an ``ImageFolder``) are decoded with
  :func:`convlens.load_image` and given the model's preprocessing when there is one (a
  bundle's, or ``preprocess=``); without it, a dataset's own transform is used (or the
  pixels in [0, 1] for a bare folder).
- A tensor a dataset yields is the model's input as it is; a PIL image or an array gets
  the preprocessing (or becomes [0, 1] pixels).
- Inputs of different sizes without a preprocessing are resized to the size of the first
  image (global index 0), once said.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from convlens.errors import DatasetError, ImageLoadError

__all__ = ["LoadFailure", "Source", "make_source"]

Preprocessing = Callable[[torch.Tensor], torch.Tensor]

# What a corrupt item may raise while it is read: named, counted and skipped.
_READ_ERRORS = (ImageLoadError, DatasetError, OSError, SyntaxError)


class LoadFailure(Exception):
    """Item ``index`` could not be read (``path`` when it is a file)."""

    def __init__(self, index: int, path: str | None, reason: str) -> None:
        self.index = index
        self.path = path
        self.reason = reason
        where = repr(path) if path else f"item {index}"
        super().__init__(f"cannot read {where}: {reason}")


@dataclass
class Source:
    """Indexed inputs: ``load(i)`` gives ``(tensor [C, H, W], label or None, path or None)``.

    ``display`` maps an input back to [0, 1] pixels for figures (the inverse of the
    normalisation when it is known).
    """

    name: str
    length: int
    classes: list[str] | None
    _load: Callable[[int], tuple[Any, int | None, str | None]] = field(repr=False)
    _to_input: Callable[[Any], torch.Tensor] = field(repr=False)
    _display: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    _path_of: Callable[[int], str | None] = field(repr=False)
    preprocessed: bool = False
    size: tuple[int, int] | None = None  # the one size raw inputs are resized to
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.length

    def path(self, index: int) -> str | None:
        """The file of item ``index`` (``None`` for an in-memory dataset)."""
        return self._path_of(index)

    def load(self, index: int) -> tuple[torch.Tensor, int | None, str | None]:
        """The model input of item ``index``, its label and its file; raises
        :class:`LoadFailure` when the item cannot be read."""
        path = self._path_of(index)
        try:
            raw, label, path = self._load(index)
            x = self._to_input(raw)
        except LoadFailure:
            raise
        except _READ_ERRORS as e:
            reason = getattr(e, "reason", None) or str(e)
            raise LoadFailure(index, path, reason) from None
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DatasetError(
                f"item {index} of {self.name!r} is {shape}, not an image [C, H, W]: give a "
                "dataset of images or (image, label) pairs"
            )
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            import torch.nn.functional as F

            msg = (
                f"{self.name!r} has images of different sizes and no preprocessing: each is "
                f"resized to {self.size[0]}x{self.size[1]} (the first image's size); pass a "
                "bundle or preprocess= to choose"
            )
            if msg not in self.notes:
                self.notes.append(msg)
            x = F.interpolate(x[None].float(), size=self.size, mode="bilinear", antialias=True)[
                0
            ].to(x.dtype)
        return x, label, path

    def display(self, x: torch.Tensor) -> torch.Tensor:
        """An input (``[C, H, W]``) as [0, 1] pixels for a figure."""
        return self._display(x)

    def fingerprint(self) -> str:
        """A short hash of the dataset's name, length and first and last files."""
        h = hashlib.sha256(f"{self.name}\0{self.length}".encode())
        if self.length:
            h.update(f"\0{self.path(0)}\0{self.path(self.length - 1)}".encode())
        return h.hexdigest()[:16]


def _to_tensor01(raw: Any) -> torch.Tensor:
    """A PIL image, an array or a tensor as float [C, H, W] pixels (PIL/arrays via
    load_image: RGB in [0, 1])."""
    if isinstance(raw, torch.Tensor):
        return raw
    from convlens.images import load_image

    if isinstance(raw, (Image.Image, np.ndarray)):
        return load_image(raw)
    raise DatasetError(
        f"the dataset yields {type(raw).__name__}: give images (tensors, PIL images) or "
        "(image, label) pairs"
    )


def _label_of(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point():
        return int(v)
    return None


def _normalization(preprocess: Any) -> tuple[Sequence[float], Sequence[float]] | None:
    mean, std = getattr(preprocess, "mean", None), getattr(preprocess, "std", None)
    if mean is not None and std is not None:
        return tuple(mean), tuple(std)
    return None


def _displayer(norm: tuple[Sequence[float], Sequence[float]] | None) -> Callable[..., Any]:
    def display(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float().cpu()
        if norm is not None and len(norm[0]) == x.shape[0]:
            m = torch.tensor(norm[0]).view(-1, 1, 1)
            s = torch.tensor(norm[1]).view(-1, 1, 1)
            return (x * s + m).clamp(0, 1)
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0.0 and hi <= 1.0:
            return x
        return (x - lo) / max(hi - lo, 1e-12)

    return display


def _files_source(
    name: str,
    files: Sequence[tuple[Path, int | None]],
    classes: list[str] | None,
    preprocess: Preprocessing | None,
) -> Source:
    from convlens.images import load_image

    def load(i: int) -> tuple[Any, int | None, str | None]:
        path, label = files[i]
        return load_image(path), label, str(path)

    return Source(
        name=name,
        length=len(files),
        classes=classes,
        _load=load,
        _to_input=preprocess if preprocess is not None else (lambda x: x),
        _display=_displayer(_normalization(preprocess)),
        _path_of=lambda i: str(files[i][0]),
        preprocessed=preprocess is not None,
    )


def _folder_source(path: Path, preprocess: Preprocessing | None) -> Source:
    """A folder as torchvision's ``ImageFolder`` reads it (class folders, images at any
    depth), or a flat folder of images (no labels); the scan's notes become the source's."""
    from convlens.data._imagenette import WNID_TO_NAME
    from convlens.data.folder import scan_image_folder

    if not path.is_dir():
        raise DatasetError(
            f"no folder {str(path)!r}: give a folder of images, one with a sub-folder per "
            "class, shapes or imagenette"
        )
    scan = scan_image_folder(path)
    classes: list[str] | None = None
    if scan.labelled:
        classes = [WNID_TO_NAME.get(c, c.replace("_", " ")) for c in scan.classes]
    source = _files_source(path.name or str(path), scan.samples, classes, preprocess)
    source.notes.extend(scan.notes)
    return source


def _dataset_source(data: Any, preprocess: Preprocessing | None) -> Source:
    name = str(getattr(data, "name", "") or type(data).__name__)
    classes = getattr(data, "classes", None)
    classes = [str(c) for c in classes] if isinstance(classes, (list, tuple)) else None
    samples = getattr(data, "samples", None)
    data_notes = [str(m) for m in getattr(data, "notes", None) or [] if isinstance(m, str)]
    if preprocess is not None and isinstance(samples, list) and samples:
        first = samples[0]
        if isinstance(first, tuple) and len(first) == 2 and isinstance(first[0], (str, Path)):
            # Files with labels (ImageFolderData, torchvision's ImageFolder): decoded and
            # given the model's own preprocessing instead of the dataset's transform.
            files = [(Path(p), _label_of(lab)) for p, lab in samples]
            source = _files_source(name, files, classes, preprocess)
            source.notes.extend(data_notes)
            return source
    n = len(data)

    def path_of(i: int) -> str | None:
        if isinstance(samples, list) and i < len(samples):
            s = samples[i]
            if isinstance(s, tuple) and s and isinstance(s[0], (str, Path)):
                return str(s[0])
        return None

    def load(i: int) -> tuple[Any, int | None, str | None]:
        item = data[i]
        label = None
        if isinstance(item, (tuple, list)):
            if not item:
                raise DatasetError(f"item {i} of {name!r} is empty")
            label = _label_of(item[1]) if len(item) > 1 else None
            item = item[0]
        return item, label, path_of(i)

    def to_input(raw: Any) -> torch.Tensor:
        if isinstance(raw, torch.Tensor):
            return raw  # a tensor is the model's input as it is
        if preprocess is not None:
            return preprocess(_to_tensor01(raw))
        return _to_tensor01(raw)

    spec = getattr(data, "spec", None)  # ImageFolderData: its transform's normalisation
    norm = _normalization(preprocess) or _normalization(spec)
    return Source(
        name=name,
        length=n,
        classes=classes,
        _load=load,
        _to_input=to_input,
        _display=_displayer(norm),
        _path_of=path_of,
        preprocessed=preprocess is not None,
        notes=data_notes,
    )


def make_source(data: Any, preprocess: Preprocessing | None, *, split: str = "val") -> Source:
    """A :class:`Source` over ``data``; see the module docstring for what is accepted.

    A ``(train, val)`` pair, as ``convlens.data.shapes()`` returns, reads ``split``.

    Example:
        >>> src = make_source("photos/", load_model("simple_cnn").preprocess)
        >>> x, label, path = src.load(0)
    """
    from torch.utils.data import Dataset

    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(d, Dataset) for d in data):
        if split not in ("train", "val"):
            raise ValueError(f"split is 'train' or 'val', got {split!r}")
        data = data[0] if split == "train" else data[1]
    if isinstance(data, (str, os.PathLike)):
        source = _folder_source(Path(data).expanduser(), preprocess)
    elif (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, (torch.Tensor, str, bytes))
    ):
        source = _dataset_source(data, preprocess)
    elif isinstance(data, torch.Tensor) and data.ndim == 4:
        source = _dataset_source(list(data), preprocess)
        source.name = "tensor"
    else:
        raise TypeError(
            f"data is a folder path, a Dataset of images or (image, label) pairs, or "
            f"convlens.data.shapes()/imagenette(); got {type(data).__name__}"
        )
    if source.length == 0:
        raise DatasetError(f"the dataset {source.name!r} is empty: nothing to look at")
    return source


def fix_size(source: Source) -> tuple[int, ...]:
    """The input shape ``[C, H, W]`` every item gets: the first readable item's. Without a
    preprocessing, items of another size are then resized to it (noted once)."""
    for i in range(source.length):
        try:
            x, _, _ = source.load(i)
        except LoadFailure:
            continue
        shape = tuple(int(v) for v in x.shape)
        if not source.preprocessed:
            source.size = (shape[1], shape[2])
        return shape
    raise DatasetError(f"no item of {source.name!r} could be read ({source.length} tried)")
