"""What does a filter do? Hand-made 3x3 kernels on tiny synthetic images.

The course's three kernels (vertical, horizontal, diagonal) and its two 10x10 test images
(a vertical edge and a diagonal line), plus Sobel, Laplacian and box-blur kernels and a
horizontal-edge and checkerboard image. :func:`filter_responses` applies every kernel to
every image with ``conv2d(padding=1)`` (cross-correlation, as every CNN layer computes
it), and :func:`selectivity` tabulates each kernel's peak response on each image.

Kernel conventions (the course's choice where it made one): ``VERTICAL`` is Prewitt's
left-to-right derivative, positive where dark turns bright going right; ``HORIZONTAL`` is
the top-to-bottom one; ``DIAGONAL`` is the classic line detector matched to a ``\\``
line from the top-left to the bottom-right corner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from convlens._io import versions, write_json
from convlens.device import DeviceLike, resolve_device

__all__ = [
    "BOX_BLUR",
    "COURSE_IMAGES",
    "COURSE_KERNELS",
    "DIAGONAL",
    "HORIZONTAL",
    "KERNELS",
    "LAPLACIAN",
    "SOBEL_X",
    "SOBEL_Y",
    "VERTICAL",
    "SelectivityTable",
    "checkerboard_image",
    "diagonal_line_image",
    "filter_responses",
    "horizontal_edge_image",
    "selectivity",
    "test_images",
    "vertical_edge_image",
]


def _k(rows: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return t


#: The course's vertical-edge kernel: responds where brightness changes from left to right.
VERTICAL = _k([[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]])
#: The course's horizontal-edge kernel: responds where brightness changes from top to bottom.
HORIZONTAL = _k([[-1, -1, -1], [0, 0, 0], [1, 1, 1]])
#: The course's diagonal kernel: a line detector for a ``\\`` diagonal line.
DIAGONAL = _k([[2, -1, -1], [-1, 2, -1], [-1, -1, 2]])
SOBEL_X = _k([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
SOBEL_Y = _k([[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
LAPLACIAN = _k([[0, 1, 0], [1, -4, 1], [0, 1, 0]])
BOX_BLUR = torch.full((3, 3), 1.0 / 9.0)

#: Every named kernel, in display order.
KERNELS: dict[str, torch.Tensor] = {
    "vertical": VERTICAL,
    "horizontal": HORIZONTAL,
    "diagonal": DIAGONAL,
    "sobel_x": SOBEL_X,
    "sobel_y": SOBEL_Y,
    "laplacian": LAPLACIAN,
    "box_blur": BOX_BLUR,
}
#: The three kernels the course compares.
COURSE_KERNELS: tuple[str, ...] = ("vertical", "horizontal", "diagonal")
#: The two test images the course draws.
COURSE_IMAGES: tuple[str, ...] = ("vertical_edge", "diagonal_line")

for _t in KERNELS.values():  # constants: guard against accidental in-place edits
    _t.requires_grad_(False)


def vertical_edge_image(size: int = 10) -> torch.Tensor:
    """The course's test image: dark left half, bright from column ``size // 2`` on.

    Example:
        >>> vertical_edge_image()[0].tolist()
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    """
    img = torch.zeros(size, size)
    img[:, size // 2 :] = 1.0
    return img


def horizontal_edge_image(size: int = 10) -> torch.Tensor:
    """Dark top half, bright from row ``size // 2`` on (the vertical edge, transposed)."""
    return vertical_edge_image(size).t().contiguous()


def diagonal_line_image(size: int = 10) -> torch.Tensor:
    """The course's second test image: a one-pixel ``\\`` line on the main diagonal."""
    return torch.eye(size)


def checkerboard_image(size: int = 10, square: int = 2) -> torch.Tensor:
    """A checkerboard of ``square``-pixel squares, starting dark at the top-left."""
    idx = torch.arange(size) // square
    return ((idx[:, None] + idx[None, :]) % 2).float()


def test_images(size: int = 10) -> dict[str, torch.Tensor]:
    """All four synthetic test images by name, each ``[size, size]`` in ``{0, 1}``.

    Example:
        >>> list(test_images())
        ['vertical_edge', 'diagonal_line', 'horizontal_edge', 'checkerboard']
    """
    return {
        "vertical_edge": vertical_edge_image(size),
        "diagonal_line": diagonal_line_image(size),
        "horizontal_edge": horizontal_edge_image(size),
        "checkerboard": checkerboard_image(size),
    }


test_images.__test__ = False  # type: ignore[attr-defined]  # not a pytest test

Stack = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def _stack(obj: Stack, what: str) -> tuple[list[str], torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        t = obj
        if t.ndim == 2:
            t = t.unsqueeze(0)
        if t.ndim == 4 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim != 3:
            raise ValueError(
                f"{what} must be [H, W], [N, H, W] or [N, 1, H, W], got {list(obj.shape)}"
            )
        return [f"{what[:-1]}{i}" for i in range(t.shape[0])], t.float()
    if isinstance(obj, Mapping):
        names, items = list(obj.keys()), list(obj.values())
    else:
        items = list(obj)
        names = [f"{what[:-1]}{i}" for i in range(len(items))]
    if not items:
        raise ValueError(f"no {what} given")
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{what} must all be 2-D and of one shape, got {sorted(shapes)}")
    return [str(n) for n in names], torch.stack([t.float() for t in items])


def filter_responses(
    images: Stack,
    kernels: Stack | None = None,
    *,
    device: DeviceLike | None = "cpu",
) -> torch.Tensor:
    """Apply every kernel to every image: ``conv2d(padding=1)``, returns ``[I, K, H, W]``.

    ``images`` and ``kernels`` are a tensor (``[H, W]`` or ``[N, H, W]``), a list, or a
    name -> tensor mapping; ``kernels`` defaults to the course's three. Kernels may be any
    odd size; padding keeps the image size (``padding=1`` for 3x3).

    Example:
        >>> r = filter_responses(vertical_edge_image(), VERTICAL)
        >>> r[0, 0, 5].tolist()  # a middle row: the kernel fires on the edge columns 4 and 5
        [0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 0.0, 0.0, 0.0, -3.0]
    """
    if kernels is None:
        kernels = {k: KERNELS[k] for k in COURSE_KERNELS}
    _, imgs = _stack(images, "images")
    _, ks = _stack(kernels, "kernels")
    kh, kw = ks.shape[-2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernels must have odd sizes to keep the image size, got {kh}x{kw}")
    dev = resolve_device(device)
    out = F.conv2d(imgs.unsqueeze(1).to(dev), ks.unsqueeze(1).to(dev), padding=(kh // 2, kw // 2))
    return out.cpu()


@dataclass(frozen=True)
class SelectivityTable:
    """Peak response of every kernel on every image: ``peak[i, k]``.

    Example:
        >>> t = selectivity()
        >>> t.best_kernel("vertical_edge")
        'vertical'
    """

    images: tuple[str, ...]
    kernels: tuple[str, ...]
    peak: torch.Tensor  # [I, K]
    ignore_border: bool = True

    def __repr__(self) -> str:
        best = ", ".join(f"{im}->{self.best_kernel(im)}" for im in self.images[:6])
        more = ", ..." if len(self.images) > 6 else ""
        return (
            f"SelectivityTable({len(self.images)} images x {len(self.kernels)} kernels, "
            f"best: {best}{more})"
        )

    def _repr_html_(self) -> str:
        from convlens._notebook import selectivity_table

        return selectivity_table(self)

    def value(self, image: str, kernel: str) -> float:
        """The peak response of ``kernel`` on ``image``."""
        return float(self.peak[self.images.index(image), self.kernels.index(kernel)])

    def best_kernel(self, image: str) -> str:
        """The kernel with the highest peak response on ``image``."""
        return self.kernels[int(self.peak[self.images.index(image)].argmax())]

    def to_dict(self) -> dict[str, Any]:
        """``{"images": [...], "kernels": [...], "peak": {image: {kernel: value}}}``."""
        return {
            "images": list(self.images),
            "kernels": list(self.kernels),
            "peak": {
                im: {k: float(self.peak[i, j]) for j, k in enumerate(self.kernels)}
                for i, im in enumerate(self.images)
            },
            "best_kernel": {im: self.best_kernel(im) for im in self.images},
            "ignore_border": self.ignore_border,
            "versions": versions(),
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``selectivity.json`` into ``out_dir``; returns its path."""
        return write_json(Path(out_dir) / "selectivity.json", self.to_dict())

    def __str__(self) -> str:
        w = max(len(s) for s in self.images) + 2
        cols = [max(len(k), 7) for k in self.kernels]
        head = " " * w + "  ".join(k.rjust(c) for k, c in zip(self.kernels, cols))
        rows = [
            im.ljust(w) + "  ".join(f"{float(v):{c}.2f}" for v, c in zip(self.peak[i], cols))
            for i, im in enumerate(self.images)
        ]
        return "\n".join([head, *rows])


def selectivity(
    images: Stack | None = None,
    kernels: Stack | None = None,
    *,
    ignore_border: bool = True,
    device: DeviceLike | None = "cpu",
) -> SelectivityTable:
    """The selectivity table: peak (max) response of every kernel on every image.

    Defaults: the four test images and all seven named kernels. With ``ignore_border``
    (default) the peak is taken where the kernel does not overlap the zero padding: a
    bright image edge against the padding otherwise looks like an edge to every kernel
    (the horizontal kernel would peak at 3 on the vertical-edge image's top row). The
    full maps, border included, come from :func:`filter_responses`.

    Example:
        >>> selectivity().value("vertical_edge", "vertical")
        3.0
    """
    if images is None:
        images = test_images()
    if kernels is None:
        kernels = KERNELS
    img_names, _ = _stack(images, "images")
    k_names, _ = _stack(kernels, "kernels")
    resp = filter_responses(images, kernels, device=device)
    if ignore_border:
        kh, kw = _stack(kernels, "kernels")[1].shape[-2:]
        ph, pw = kh // 2, kw // 2
        if resp.shape[-2] <= 2 * ph or resp.shape[-1] <= 2 * pw:
            raise ValueError("images are too small to have an interior: use ignore_border=False")
        resp = resp[..., ph : resp.shape[-2] - ph, pw : resp.shape[-1] - pw]
    peak = resp.flatten(2).max(dim=2).values
    return SelectivityTable(tuple(img_names), tuple(k_names), peak, ignore_border)
