"""Datasets: Imagenette (download, verify, extract), the embedded shapes set, and the
fast decoded cache that feeds training.

Example:
    >>> train, val = convlens.data.shapes()          # offline, seconds
    >>> train, val = convlens.data.imagenette()      # downloads imagenette2-160 once
    >>> train.classes[:3]
    ['tench', 'English springer', 'cassette player']
"""

from __future__ import annotations

import os
from pathlib import Path

from convlens.data._imagenette import IMAGENETTE_URLS, WNID_TO_NAME, imagenette_root
from convlens.data._shapes import SHAPE_CLASSES, draw_shape, generate_shapes
from convlens.data.cache import DecodedImages, decode_cache
from convlens.data.download import convlens_home, download, safe_extract
from convlens.data.folder import (
    COURSE_SPEC,
    FolderScan,
    ImageFolderData,
    TransformSpec,
    scan_image_folder,
)
from convlens.data.loader import BatchLoader
from convlens.errors import DatasetError

__all__ = [
    "COURSE_SPEC",
    "IMAGENETTE_URLS",
    "SHAPES_SPEC",
    "SHAPE_CLASSES",
    "WNID_TO_NAME",
    "BatchLoader",
    "DecodedImages",
    "FolderScan",
    "ImageFolderData",
    "TransformSpec",
    "convlens_home",
    "decode_cache",
    "download",
    "draw_shape",
    "generate_shapes",
    "image_folder",
    "imagenette",
    "imagenette_root",
    "load_data",
    "safe_extract",
    "scan_image_folder",
    "shapes",
]

#: Shapes are drawn at 64 px: crops keep at least 35% of the image so the shape stays in.
SHAPES_SPEC = TransformSpec(crop=64, resize=64, scale=(0.35, 1.0))


def imagenette(
    root: str | os.PathLike[str] | None = None,
    size: int | str = 160,
    download: bool = True,
    *,
    spec: TransformSpec = COURSE_SPEC,
    progress: bool = True,
) -> tuple[ImageFolderData, ImageFolderData]:
    """Imagenette's train and val splits with the course's transforms and readable names.

    ``root``: ``None`` (download ``imagenette2-<size>.tgz`` into ``$CONVLENS_HOME``, once),
    a folder holding ``train/`` and ``val/``, or a local ``.tgz``/``.tar`` archive.
    ``size``: 160, 320 or ``"full"``.

    Example:
        >>> train, val = imagenette("../shared/data/imagenette2-224.tar")
        >>> len(train), len(val)
        (9469, 3925)
    """
    path = imagenette_root(root, size=size, download=download, progress=progress)
    name = f"imagenette ({path.name})"
    return (
        ImageFolderData(path, "train", train=True, spec=spec, class_names=WNID_TO_NAME, name=name),
        ImageFolderData(path, "val", train=False, spec=spec, class_names=WNID_TO_NAME, name=name),
    )


def shapes(
    root: str | os.PathLike[str] | None = None,
    *,
    train_per_class: int = 1500,
    val_per_class: int = 100,
    size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> tuple[ImageFolderData, ImageFolderData]:
    """The embedded offline dataset: 10 drawn classes, generated once (seconds) from
    ``seed`` into ``root`` (default ``$CONVLENS_HOME/datasets/shapes-...``).

    Example:
        >>> train, val = shapes(train_per_class=100, val_per_class=20)
        >>> train.classes[:3]
        ['circle', 'square', 'triangle']
    """
    if root is None:
        root = (
            convlens_home()
            / "datasets"
            / f"shapes-v6-s{seed}-{train_per_class}x{val_per_class}-{size}px"
        )
    path = generate_shapes(
        root,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        size=size,
        seed=seed,
        progress=progress,
    )
    spec = SHAPES_SPEC if size == 64 else TransformSpec(crop=size, resize=size, scale=(0.35, 1.0))
    names = {c.replace(" ", "_"): c for c in SHAPE_CLASSES}
    order = {c.replace(" ", "_"): i for i, c in enumerate(SHAPE_CLASSES)}
    train = ImageFolderData(path, "train", train=True, spec=spec, class_names=names, name="shapes")
    val = ImageFolderData(path, "val", train=False, spec=spec, class_names=names, name="shapes")
    for d in (train, val):  # label order = SHAPE_CLASSES order, not alphabetical
        remap = [order[c] for c in d.class_ids]
        d.class_ids = sorted(d.class_ids, key=order.__getitem__)
        d.classes = [names[c] for c in d.class_ids]
        d.samples = sorted(
            ((p, remap[label]) for p, label in d.samples), key=lambda s: (s[1], s[0])
        )
    return train, val


def image_folder(
    root: str | os.PathLike[str], *, spec: TransformSpec = COURSE_SPEC
) -> tuple[ImageFolderData, ImageFolderData]:
    """Any dataset laid out as ``root/train/<class>/*`` and ``root/val/<class>/*``, with the
    course's transforms (folder names become class names; WordNet ids are made readable).

    Example:
        >>> train, val = image_folder("my_photos")
    """
    path = Path(root)
    if not ((path / "train").is_dir() and (path / "val").is_dir()):
        raise DatasetError(f"{str(path)!r} needs train/ and val/ folders, one subfolder per class")
    train = ImageFolderData(path, "train", train=True, spec=spec, class_names=WNID_TO_NAME)
    val = ImageFolderData(path, "val", train=False, spec=spec, class_names=WNID_TO_NAME)
    if train.class_ids != val.class_ids:
        raise DatasetError(
            f"{str(path)!r}: train/ and val/ have different class folders "
            f"({len(train.class_ids)} vs {len(val.class_ids)})"
        )
    return train, val


def load_data(
    spec: str, *, size: int | str = 160, download: bool = True, progress: bool = True
) -> tuple[ImageFolderData, ImageFolderData]:
    """``"shapes"``, ``"imagenette"``, a folder with ``train/`` and ``val/``, or an
    Imagenette archive (``.tgz``/``.tar``, extracted once).

    Example:
        >>> train, val = load_data("shapes")
    """
    if spec == "shapes":
        return shapes(progress=progress)
    if spec == "imagenette":
        return imagenette(None, size=size, download=download, progress=progress)
    path = Path(spec).expanduser()
    marker = path / "shapes.json"
    if marker.is_file():  # a shapes dataset made by generate_shapes: its own 64 px recipe
        import json

        settings = json.loads(marker.read_text())
        return shapes(
            path,
            train_per_class=settings["train_per_class"],
            val_per_class=settings["val_per_class"],
            size=settings["size"],
            seed=settings["seed"],
            progress=progress,
        )
    if path.is_dir() and (path / "train").is_dir():
        return image_folder(path)
    if not path.exists():
        raise DatasetError(
            f"no dataset at {spec!r}: use shapes, imagenette, a folder with train/ and val/, "
            "or a .tgz/.tar archive"
        )
    return imagenette(path, size=size, download=False, progress=progress)
