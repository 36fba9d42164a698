"""Decode every image once into a compact, memory-mapped uint8 cache.

Training images are stored as decoded (``[3, h, w]`` uint8, any size), so random crops
are drawn from the same pixels the course's PIL pipeline sees. Validation images are
stored after the course's deterministic ``Resize`` + ``CenterCrop``, computed with PIL
exactly as the course does, so a validation pass is only the model's forward.

The cache lives under ``$CONVLENS_HOME/cache/<key>/`` where the key hashes the dataset's
file list, sizes and modification times and the stored transform: change a file and
the cache is rebuilt. It is written into a temporary folder and renamed when complete.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from convlens.data.folder import ImageFolderData, _pil_rgb
from convlens.errors import DatasetError

__all__ = ["DecodedImages", "decode_cache"]

_VERSION = "convlens-decoded/1"


def _key(data: ImageFolderData, mode: str) -> str:
    h = hashlib.sha256()
    head: dict[str, Any] = {"version": _VERSION, "mode": mode, "classes": data.class_ids}
    if mode == "val":
        head["resize"], head["crop"] = data.spec.resize, data.spec.crop
    h.update(json.dumps(head, sort_keys=True).encode())
    for path, label in data.samples:
        st = path.stat()
        rel = os.path.relpath(path, data.root)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    return h.hexdigest()[:24]


def _decode_full(path: Path) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(_pil_rgb(path), dtype=np.uint8).transpose(2, 0, 1))


def _decode_val(path: Path, resize: int, crop: int) -> np.ndarray:
    from torchvision import transforms as T

    img = T.CenterCrop(crop)(T.Resize(resize)(_pil_rgb(path)))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


@dataclass
class DecodedImages:
    """Decoded uint8 images of one split, memory-mapped from the cache.

    ``mode="full"``: images as decoded, any size (``image(i)`` is ``[3, h, w]``).
    ``mode="val"``: the course's Resize + CenterCrop already applied (``[N, 3, c, c]``).
    ``labels[i]`` is the class of image ``i``; ``kept[i]`` its index in the dataset's
    ``samples`` (unreadable files are left out).

    Example:
        >>> cache = convlens.data.decode_cache(train)
        >>> len(cache.labels), cache.mode
    """

    path: Path
    mode: str
    labels: np.ndarray
    kept: np.ndarray
    _data: np.ndarray
    _index: np.ndarray  # full mode: [N, 3] (offset, h, w)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as a ``[3, h, w]`` uint8 array (a view into the memory map)."""
        if self.mode == "val":
            return self._data[i]
        off, h, w = (int(v) for v in self._index[i])
        return self._data[off : off + 3 * h * w].reshape(3, h, w)

    @property
    def sizes(self) -> np.ndarray:
        """``[N, 2]`` heights and widths."""
        if self.mode == "val":
            return np.tile(np.array(self._data.shape[2:]), (len(self), 1))
        return self._index[:, 1:3]

    @property
    def array(self) -> np.ndarray:
        """All images as one ``[N, 3, c, c]`` array (``mode="val"`` only)."""
        if self.mode != "val":
            raise ValueError("only a validation cache holds same-size images")
        return self._data

    @classmethod
    def open(cls, path: Path) -> DecodedImages:
        meta = json.loads((path / "meta.json").read_text())
        labels = np.load(path / "labels.npy")
        kept = np.load(path / "kept.npy")
        if meta["mode"] == "val":
            shape = tuple(meta["shape"])
            data = np.memmap(path / "images.u8", dtype=np.uint8, mode="c", shape=shape)
            index = np.zeros((0, 3), dtype=np.int64)
        else:
            data = np.memmap(path / "images.u8", dtype=np.uint8, mode="c")
            index = np.load(path / "index.npy")
        return cls(path, meta["mode"], labels, kept, data, index)


def _cache_root() -> Path:
    from convlens.data.download import convlens_home

    return convlens_home() / "cache"


def decode_cache(
    data: ImageFolderData,
    *,
    mode: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    strict: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> DecodedImages:
    """Decode ``data`` once into the cache (or open the cache made earlier).

    ``mode`` defaults to ``"full"`` for a training split and ``"val"`` otherwise.
    Unreadable images are skipped with a warning naming each file; ``strict=True``
    raises :class:`convlens.DatasetError` instead.

    Example:
        >>> cache = decode_cache(train)  # ~15 s for Imagenette-160 on 2 cores, once
        >>> cache.image(0).shape
        (3, 160, 213)
    """
    mode = mode or ("full" if data.train else "val")
    if mode not in ("full", "val"):
        raise ValueError(f"mode must be 'full' or 'val', got {mode!r}")
    root = Path(cache_dir) if cache_dir is not None else _cache_root()
    final = root / _key(data, mode)
    if (final / "meta.json").exists():
        return DecodedImages.open(final)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".decode-", dir=root))
    try:
        _build(data, mode, tmp, strict=strict, workers=workers, progress=progress)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DecodedImages.open(final)


def _build(
    data: ImageFolderData,
    mode: str,
    out: Path,
    *,
    strict: bool,
    workers: int | None,
    progress: bool,
) -> None:
    from convlens._progress import tqdm

    spec = data.spec
    paths = [p for p, _ in data.samples]

    def work(p: Path) -> np.ndarray | Exception:
        try:
            return _decode_val(p, spec.resize, spec.crop) if mode == "val" else _decode_full(p)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            return e

    labels: list[int] = []
    kept: list[int] = []
    index: list[tuple[int, int, int]] = []
    skipped: list[str] = []
    offset = 0
    n_workers = workers or min(8, os.cpu_count() or 1)
    with (
        open(out / "images.u8", "wb") as fh,
        concurrent.futures.ThreadPoolExecutor(n_workers) as pool,
        tqdm(
            total=len(paths),
            desc=f"decoding {data.name} {data.split}",
            unit="img",
            disable=not progress,
        ) as bar,
    ):
        for i, result in enumerate(pool.map(work, paths, chunksize=16)):
            bar.update(1)
            if isinstance(result, Exception):
                msg = f"cannot read image {str(paths[i])!r}: {result}"
                if strict:
                    raise DatasetError(msg)
                skipped.append(msg)
                continue
            fh.write(result.tobytes())
            labels.append(data.samples[i][1])
            kept.append(i)
            index.append((offset, result.shape[1], result.shape[2]))
            offset += result.size
    for msg in skipped:
        warnings.warn(f"skipped {msg}", stacklevel=3)
    if not labels:
        raise DatasetError(f"no readable images in {str(data.root / data.split)!r}")
    np.save(out / "labels.npy", np.asarray(labels, dtype=np.int64))
    np.save(out / "kept.npy", np.asarray(kept, dtype=np.int64))
    meta: dict[str, Any] = {
        "version": _VERSION,
        "mode": mode,
        "count": len(labels),
        "skipped": len(skipped),
        "dataset": data.name,
        "split": data.split,
    }
    if mode == "val":
        meta["shape"] = [len(labels), 3, spec.crop, spec.crop]
    else:
        np.save(out / "index.npy", np.asarray(index, dtype=np.int64))
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: complete
