"""Image-folder datasets (``<split>/<class>/<image>``) with the course's transforms.

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

__all__ = ["COURSE_SPEC", "IMAGE_EXTENSIONS", "ImageFolderData", "TransformSpec"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
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
        self.class_ids: list[str] = sorted(d.name for d in folder.iterdir() if d.is_dir())
        if not self.class_ids:
            raise DatasetError(f"{str(folder)!r} has no class folders")
        names = dict(class_names or {})
        self.classes: list[str] = [names.get(c, c.replace("_", " ")) for c in self.class_ids]
        self.samples: list[tuple[Path, int]] = []
        for label, cid in enumerate(self.class_ids):
            files = sorted(
                p
                for p in (folder / cid).iterdir()
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            self.samples.extend((p, label) for p in files)
        if not self.samples:
            raise DatasetError(f"{str(folder)!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
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
