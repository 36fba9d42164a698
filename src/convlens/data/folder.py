"""Image-folder datasets (``<split>/<class>/<image>``) with the course's transforms.

:func:`scan_image_folder` reads a folder exactly as ``torchvision.datasets.ImageFolder``
does (its ``find_classes`` and ``make_dataset``, without importing torchvision): the sorted
class folders (hidden ones too), images at any depth below a class folder, torchvision's
``IMG_EXTENSIONS`` (any case), the same sample order; an empty class folder keeps its
index (``allow_empty=True``). Where torchvision is silent convlens says what it did in
``notes``: empty and hidden class folders, files that are not images, images outside any
class folder, and symlink loops (which convlens ends; torchvision walks them until the
operating system refuses, ~40 levels deep, listing the same images again at each level).

:class:`ImageFolderData` is an ordinary ``torch.utils.data.Dataset``: indexing it decodes
the file with PIL and applies torchvision transforms, exactly the course's pipeline.
:class:`TransformSpec` says what those transforms are, so the fast pipeline
(:mod:`convlens.data.cache`, :mod:`convlens.data.loader`) can apply the same maths to
batches of tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from convlens.errors import DatasetError

__all__ = [
    "COURSE_SPEC",
    "IMAGE_EXTENSIONS",
    "FolderScan",
    "ImageFolderData",
    "TransformSpec",
    "is_image_file",
    "scan_image_folder",
]

#: torchvision's ``datasets.folder.IMG_EXTENSIONS``, matched case-insensitively as it does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformSpec:
    """The course's transforms as numbers.

    Train: ``RandomResizedCrop(crop, scale, ratio)`` + ``RandomHorizontalFlip(flip)`` +
    normalisation. Val: ``Resize(resize)`` (shorter side) + ``CenterCrop(crop)`` +
    normalisation.

    Example:
        >>> TransformSpec().train_transform()  # the course's torchvision Compose
    """

    crop: int = 128
    resize: int = 160
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def train_transform(self, crop: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
        """The torchvision (PIL) train transform: the course's pipeline."""
        from torchvision import transforms as T

        return T.Compose(
            [
                T.RandomResizedCrop(crop or self.crop, scale=self.scale, ratio=self.ratio),
                T.RandomHorizontalFlip(self.flip),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def val_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The torchvision (PIL) validation transform."""
        from torchvision import transforms as T

        return T.Compose(
            [
                T.Resize(self.resize),
                T.CenterCrop(self.crop),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The course: RandomResizedCrop(128) + flip for training, Resize(160) + CenterCrop(128).
COURSE_SPEC = TransformSpec()


def is_image_file(name: str) -> bool:
    """Whether torchvision's ImageFolder takes the file: its name ends with one of
    :data:`IMAGE_EXTENSIONS`, in any case.

    Example:
        >>> is_image_file("cat.JPG"), is_image_file("notes.txt"), is_image_file("a.gif")
        (True, False, False)
    """
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class FolderScan:
    """What :func:`scan_image_folder` found: the classes and samples torchvision's
    ``ImageFolder(root, allow_empty=True)`` has (``labelled``), or a flat folder's images
    with ``None`` labels; ``notes`` says what was skipped or is worth knowing.

    Example:
        >>> scan = convlens.data.scan_image_folder("photos/")
        >>> scan.classes, len(scan.samples), scan.labelled, scan.notes
    """

    root: Path
    classes: list[str]
    class_to_idx: dict[str, int]
    samples: list[tuple[Path, int | None]]
    labelled: bool
    notes: list[str]


def _count_note(where: str, skipped: dict[str, int]) -> str | None:
    n = sum(skipped.values())
    if not n:
        return None
    kinds = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{c} {ext}" for ext, c in kinds[:5])
    more = f", {len(kinds) - 5} more kind(s)" if len(kinds) > 5 else ""
    return (
        f"{n} file(s) in {where} are not images ({shown}{more}): skipped; images are "
        f"{', '.join(IMAGE_EXTENSIONS)} (any case), as torchvision's ImageFolder reads"
    )


def _extension(name: str) -> str:
    ext = os.path.splitext(name)[1].lower()
    return ext or "without extension"


def _class_files(class_dir: str, skipped: dict[str, int], loops: list[str]) -> list[str]:
    """The image files below ``class_dir`` in torchvision's order
    (``sorted(os.walk(class_dir, followlinks=True))``, sorted names), without walking a
    directory that is its own ancestor (a symlink loop: listed in ``loops``)."""
    chains: dict[str, frozenset[str]] = {class_dir: frozenset({os.path.realpath(class_dir)})}
    walked: list[tuple[str, list[str]]] = []
    for top, dirs, names in os.walk(class_dir, followlinks=True):
        chain = chains.pop(top, frozenset())
        keep = []
        for d in dirs:
            sub = os.path.join(top, d)
            real = os.path.realpath(sub)
            if real in chain:
                loops.append(sub)
                continue
            chains[sub] = chain | {real}
            keep.append(d)
        dirs[:] = keep
        walked.append((top, names))
    files: list[str] = []
    for top, names in sorted(walked):
        for name in sorted(names):
            if is_image_file(name):
                files.append(os.path.join(top, name))
            else:
                ext = _extension(name)
                skipped[ext] = skipped.get(ext, 0) + 1
    return files


def scan_image_folder(root: str | os.PathLike[str], *, flat: bool = True) -> FolderScan:
    """Read ``root`` as ``torchvision.datasets.ImageFolder(root, allow_empty=True)`` does:
    ``classes``, ``class_to_idx`` and ``samples`` (paths and targets, in order) are its.

    A folder with no class folder holding an image is, with ``flat=True``, an unlabelled
    set of the images directly in it (labels ``None``); with ``flat=False`` (or with no
    images at all) a :class:`DatasetError`. Symlink loops end at the first directory
    that is its own ancestor, and ``notes`` says where.

    Example:
        >>> scan = scan_image_folder("photos")  # photos/cat/a.jpg, photos/dog/x/b.png
        >>> scan.classes, scan.class_to_idx
        (['cat', 'dog'], {'cat': 0, 'dog': 1})
    """
    top = os.path.expanduser(os.fspath(root))
    shown = repr(str(root))
    if not os.path.isdir(top):
        raise DatasetError(
            f"no folder {shown}: give a folder of images or one with a sub-folder per class"
        )
    try:
        entries = list(os.scandir(top))
    except OSError as e:
        raise DatasetError(f"cannot read {shown}: {e.strerror or e}") from None
    classes = sorted(e.name for e in entries if e.is_dir())
    class_to_idx = {c: i for i, c in enumerate(classes)}
    notes: list[str] = []
    skipped: dict[str, int] = {}
    loops: list[str] = []
    samples: list[tuple[Path, int | None]] = []
    empty: list[str] = []
    for c in classes:
        files = _class_files(os.path.join(top, c), skipped, loops)
        if not files:
            empty.append(c)
        samples.extend((Path(f), class_to_idx[c]) for f in files)
    top_files = sorted(e.name for e in entries if not e.is_dir())
    top_images = [n for n in top_files if is_image_file(n)]
    if not samples:
        if not (flat and top_images):
            where = "in it or in its class folders" if classes else "in it"
            raise DatasetError(
                f"{shown} has no images ({', '.join(IMAGE_EXTENSIONS)}) {where}: give a "
                "folder with one sub-folder of images per class, or a folder of images"
            )
        for n in top_files:
            if not is_image_file(n):
                ext = _extension(n)
                skipped[ext] = skipped.get(ext, 0) + 1
        note = _count_note(shown, skipped)
        notes.extend([note] if note else [])
        flat_samples: list[tuple[Path, int | None]] = [
            (Path(os.path.join(top, n)), None) for n in top_images
        ]
        return FolderScan(Path(top), [], {}, flat_samples, False, notes)
    for c in empty:
        notes.append(
            f"class folder {c!r} in {shown} has no images: it keeps its index "
            f"{class_to_idx[c]} with no images, as torchvision's ImageFolder(allow_empty=True)"
        )
    hidden = [c for c in classes if c.startswith(".")]
    if hidden:
        names = ", ".join(f"{c!r} (index {class_to_idx[c]})" for c in hidden)
        notes.append(
            f"hidden folder(s) {names} in {shown} are classes, as torchvision's ImageFolder "
            "counts them; remove them to drop those classes"
        )
    if top_images:
        notes.append(
            f"{len(top_images)} image(s) directly in {shown} belong to no class folder: "
            "skipped, as torchvision's ImageFolder skips them"
        )
    note = _count_note(shown, skipped)
    notes.extend([note] if note else [])
    if loops:
        first = ", ".join(repr(p) for p in loops[:3])
        more = f" and {len(loops) - 3} more" if len(loops) > 3 else ""
        notes.append(
            f"symlink loop(s) in {shown}: {first}{more} lead back to a folder above them; "
            "not followed (torchvision's ImageFolder would list the same images again at "
            "every level, ~40 deep)"
        )
    return FolderScan(Path(top), classes, class_to_idx, samples, True, notes)


def _pil_rgb(path: Path) -> Image.Image:
    """The loader torchvision's ImageFolder uses: PIL, converted to RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ImageFolderData(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """One split of an image-folder dataset, with readable class names.

    ``root/<split>/<class_id>/*.jpg``; ``class_names`` maps folder names (e.g. WordNet ids)
    to readable names. ``train`` picks the random train transform or the deterministic
    val transform of ``spec``. ``data[i]`` returns ``(tensor [3, crop, crop], label)``.

    Example:
        >>> train = ImageFolderData("imagenette2-160", "train", train=True)
        >>> train.classes[:2]
        ['tench', 'English springer']
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        *,
        train: bool,
        spec: TransformSpec = COURSE_SPEC,
        class_names: Mapping[str, str] | None = None,
        name: str = "",
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.train = train
        self.spec = spec
        folder = self.root / split
        if not folder.is_dir():
            raise DatasetError(f"no {split!r} folder in {str(self.root)!r} (expected {folder})")
        scan = scan_image_folder(folder, flat=False)
        #: class folder names (torchvision's ``classes``), in index order
        self.class_ids: list[str] = scan.classes
        names = dict(class_names or {})
        self.classes: list[str] = [names.get(c, c.replace("_", " ")) for c in self.class_ids]
        self.samples: list[tuple[Path, int]] = [(p, t) for p, t in scan.samples if t is not None]
        #: what the scan skipped or noticed (empty or hidden class folders, other files)
        self.notes: list[str] = list(scan.notes)
        self.name = name or self.root.name
        self.transform: Callable[[Image.Image], torch.Tensor] = (
            spec.train_transform() if train else spec.val_transform()
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            img = _pil_rgb(path)
        except (OSError, SyntaxError, ValueError) as e:
            raise DatasetError(f"cannot read image {str(path)!r}: {e}") from None
        return self.transform(img), label

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Class folder name -> label, as torchvision's ``ImageFolder.class_to_idx``."""
        return {c: i for i, c in enumerate(self.class_ids)}

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def subset(self, indices: Sequence[int]) -> ImageFolderData:
        """A copy holding only ``indices`` (e.g. a quick run on part of the data)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.samples = [self.samples[i] for i in indices]
        return new

    def __repr__(self) -> str:
        return (
            f"ImageFolderData({self.name!r}, split={self.split!r}, {len(self)} images, "
            f"{len(self.classes)} classes)"
        )
