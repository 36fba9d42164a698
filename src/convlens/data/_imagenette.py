"""Where Imagenette lives on disk: download, verify and extract once, then reuse.

:func:`imagenette_root` returns a folder holding ``train/`` and ``val/`` with the ten
WordNet-id class folders; ``convlens.data.imagenette(...)`` builds the datasets on top of
it. Downloads and extractions go to ``convlens_home() / "datasets"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from convlens.data.download import EXTRACTED_MARKER, convlens_home, safe_extract, sha256_file
from convlens.data.download import download as _download
from convlens.errors import DatasetError

__all__ = ["IMAGENETTE_CHECKSUMS", "IMAGENETTE_URLS", "WNID_TO_NAME", "imagenette_root"]

_BASE = "https://s3.amazonaws.com/fast-ai-imageclas"

#: The official fast.ai archives by image size (shorter side in pixels, or ``"full"``).
IMAGENETTE_URLS: dict[int | str, str] = {
    160: f"{_BASE}/imagenette2-160.tgz",
    320: f"{_BASE}/imagenette2-320.tgz",
    "full": f"{_BASE}/imagenette2.tgz",
}

#: ``(bytes, sha256)`` pinned per size. Only 160 px is pinned; the others are checked
#: against the server's Content-Length and their computed sha256 is recorded, not verified.
IMAGENETTE_CHECKSUMS: dict[int | str, tuple[int, str]] = {
    160: (99_003_388, "64d0c4859f35a461889e0147755a999a48b49bf38a7e0f9bd27003f10db02fe5"),
}

#: The ten Imagenette classes: WordNet id (the folder name) to a readable name.
WNID_TO_NAME: dict[str, str] = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}

_SPLITS = ("train", "val")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def _size_key(size: int | str) -> int | str:
    key: int | str = int(size) if isinstance(size, str) and size.isdigit() else size
    if key not in IMAGENETTE_URLS:
        choices = ", ".join(repr(k) for k in IMAGENETTE_URLS)
        raise DatasetError(f"unknown Imagenette size {size!r}; choose one of {choices}")
    return key


def _archive_stem(name: str) -> str | None:
    """``imagenette2-160.tgz`` -> ``imagenette2-160``; ``None`` for other files."""
    lower = name.lower()
    for suffix in _ARCHIVE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _has_splits(folder: Path) -> bool:
    return all((folder / s).is_dir() for s in _SPLITS)


def _split_root(folder: Path) -> Path:
    """``folder`` if it holds train/ and val/, else its one subfolder that does; validated."""
    if _has_splits(folder):
        root = folder
    else:
        try:
            subs = [
                d
                for d in sorted(folder.iterdir())
                if not d.name.startswith(".") and d.is_dir() and _has_splits(d)
            ]
        except OSError as e:
            raise DatasetError(f"cannot read {str(folder)!r}: {e.strerror or e}") from None
        if len(subs) > 1:
            names = ", ".join(d.name for d in subs)
            raise DatasetError(
                f"{str(folder)!r} holds several datasets ({names}); pass one of them as root"
            )
        if not subs:
            lacks = " and ".join(f"{s}/" for s in _SPLITS if not (folder / s).is_dir())
            raise DatasetError(
                f"{str(folder)!r} is not an Imagenette folder: it lacks {lacks} (and has no "
                "subfolder holding train/ and val/); pass the folder that holds them, or "
                "root=None to download Imagenette"
            )
        root = subs[0]
    for split in _SPLITS:
        missing = [w for w in WNID_TO_NAME if not (root / split / w).is_dir()]
        if missing:
            names = ", ".join(f"{w} ({WNID_TO_NAME[w]})" for w in missing)
            raise DatasetError(
                f"{str(root / split)!r} lacks {len(missing)} of the 10 Imagenette class "
                f"folders: {names}; extract the full archive again or pass a complete folder"
            )
        empty = [w for w in WNID_TO_NAME if not any(os.scandir(root / split / w))]
        if empty:
            raise DatasetError(
                f"{str(root / split)!r} has empty class folders: {', '.join(empty)}; extract "
                "the full archive again or pass a complete folder"
            )
    return root


def _extract_once(archive: Path, target: Path, info: dict[str, object]) -> Path:
    """Extract ``archive`` into ``target`` unless a completed extraction is already there."""
    marker = target / EXTRACTED_MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            record = {}
        recorded = record.get("archive_bytes") if isinstance(record, dict) else None
        if archive.is_file() and recorded is not None and recorded != archive.stat().st_size:
            raise DatasetError(
                f"{str(target)!r} was extracted from a different archive than "
                f"{str(archive)!r} ({recorded:,} vs {archive.stat().st_size:,} bytes); delete "
                "the folder to extract this archive"
            )
        return _split_root(target)
    if target.exists():
        raise DatasetError(
            f"{str(target)!r} exists but holds no completed extraction (no {EXTRACTED_MARKER}); "
            "delete it and run again"
        )
    safe_extract(archive, target, info=info)
    return _split_root(target)


def imagenette_root(
    root: str | os.PathLike[str] | None = None,
    size: int | str = 160,
    download: bool = True,
    *,
    progress: bool = True,
) -> Path:
    """The folder holding Imagenette's ``train/`` and ``val/`` (ten WordNet-id folders each).

    ``root`` is one of:

    - ``None``: ``imagenette2-<size>.tgz`` is downloaded into ``convlens_home()/datasets``
      (resumable, verified), extracted safely next to it, and reused by later calls. With
      ``download=False`` an archive already there is used, and nothing is fetched.
    - a folder holding ``train/`` and ``val/``, or holding exactly one subfolder that
      does: returned as is (``size`` is ignored).
    - a local ``.tgz``/``.tar.gz``/``.tar`` archive: extracted once into
      ``convlens_home()/datasets/<archive stem>/``; later calls reuse it.

    ``size`` is 160, 320 or ``"full"``. Only the 160 px archive has a pinned byte count and
    sha256 (:data:`IMAGENETTE_CHECKSUMS`); for 320 and full the hash is not pinned: the
    byte count is checked against the server's Content-Length and the sha256 computed is
    printed and recorded beside the archive (``<archive>.sha256``) and in the extraction
    marker. The downloaded archive is kept beside the extracted folder.

    Raises :class:`convlens.DatasetError` naming what is missing and how to fix it.

    Example:
        >>> root = imagenette_root("../shared/data/imagenette2-224.tar")
        >>> root
        PosixPath('/home/me/.cache/convlens/datasets/imagenette2-224/imagenette2-224')
        >>> sorted(p.name for p in root.iterdir())
        ['noisy_imagenette.csv', 'train', 'val']
    """
    if root is not None:
        path = Path(root).expanduser()
        if path.is_dir():
            return _split_root(path)
        if not path.is_file():
            raise DatasetError(
                f"no such file or folder: {str(path)!r}; pass a folder holding train/ and "
                "val/, a .tgz/.tar archive, or root=None to download Imagenette"
            )
        stem = _archive_stem(path.name)
        if stem is None:
            raise DatasetError(
                f"{str(path)!r} is neither a folder nor a .tgz/.tar.gz/.tar archive; pass a "
                "folder holding train/ and val/ or an Imagenette archive"
            )
        target = convlens_home() / "datasets" / stem
        return _extract_once(path, target, {"source": str(path.resolve())})

    key = _size_key(size)
    url = IMAGENETTE_URLS[key]
    name = url.rsplit("/", 1)[-1]
    datasets = convlens_home() / "datasets"
    target = datasets / (_archive_stem(name) or name)
    if (target / EXTRACTED_MARKER).is_file():
        return _extract_once(datasets / name, target, {})
    archive = datasets / name
    expected_bytes, expected_sha = IMAGENETTE_CHECKSUMS.get(key, (None, None))
    if download:
        _download(url, archive, sha256=expected_sha, size=expected_bytes, progress=progress)
    elif not archive.is_file():
        raise DatasetError(
            f"Imagenette ({key} px) is not on disk: neither {str(target)!r} nor the archive "
            f"{str(archive)!r} exists; call with download=True (or `convlens train --data "
            "imagenette`) to download it, or pass root= a folder holding train/ and val/ "
            "or a local .tgz/.tar archive"
        )
    elif (expected_bytes is not None and archive.stat().st_size != expected_bytes) or (
        expected_sha is not None and sha256_file(archive) != expected_sha
    ):
        raise DatasetError(
            f"{str(archive)!r} does not match the published Imagenette ({key} px) archive "
            f"(bytes {expected_bytes}, sha256 {expected_sha}); delete it and call with "
            "download=True"
        )
    sidecar = archive.with_name(archive.name + ".sha256")
    sha = sidecar.read_text().split()[0] if sidecar.is_file() else expected_sha
    return _extract_once(archive, target, {"url": url, "sha256": sha})
