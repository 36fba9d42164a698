"""Random transforms applied to the image at every optimisation step (transformation
robustness): pad, jitter, scale and rotate, as Lucid's standard set.

Each transform draws its parameters from the ``torch.Generator`` it is given (one draw per
step for the whole batch), so a seed reproduces a render exactly. :func:`standard` fuses
jitter, scale, rotation and the second jitter into one affine resample of the padded
image: one bilinear interpolation instead of three.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "STANDARD_ANGLES",
    "STANDARD_SCALES",
    "Compose",
    "FusedAffine",
    "Jitter",
    "Pad",
    "RandomRotate",
    "RandomScale",
    "standard",
]

#: Lucid's standard scales, ``1 + (i - 5) / 50`` for ``i`` in 0..10.
STANDARD_SCALES: tuple[float, ...] = tuple(1 + (i - 5) / 50 for i in range(11))
#: Lucid's standard angles in degrees: -10..10, plus five extra zeros.
STANDARD_ANGLES: tuple[float, ...] = tuple(float(a) for a in range(-10, 11)) + (0.0,) * 5


def _randint(high: int, g: torch.Generator) -> int:
    """Uniform integer in ``0..high`` inclusive."""
    return int(torch.randint(0, high + 1, (1,), generator=g))


def _choice(options: Sequence[float], g: torch.Generator) -> float:
    return float(options[int(torch.randint(0, len(options), (1,), generator=g))])


@dataclass(frozen=True)
class Pad:
    """Pad every side by ``width`` pixels of constant ``value`` (0.5: mid-grey)."""

    width: int
    value: float = 0.5

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        w = self.width
        return F.pad(x, [w, w, w, w], mode="constant", value=self.value)


@dataclass(frozen=True)
class Jitter:
    """A random crop ``d`` pixels smaller in each dimension: the image moves by up to
    ``d / 2`` pixels in either direction, on both axes."""

    d: int

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.d >= min(h, w):
            raise ValueError(f"jitter {self.d} needs an image larger than {h}x{w}")
        oy, ox = _randint(self.d, g), _randint(self.d, g)
        return x[..., oy : oy + h - self.d, ox : ox + w - self.d]


@dataclass(frozen=True)
class RandomScale:
    """Resize by a factor drawn from ``scales`` (bilinear)."""

    scales: Sequence[float] = STANDARD_SCALES

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        s = _choice(self.scales, g)
        h, w = x.shape[-2:]
        size = (max(1, round(h * s)), max(1, round(w * s)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _rotation_grid(
    n: int, h: int, w: int, angle_deg: float, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    # normalised coordinates; correct for the aspect ratio so the rotation is rigid
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], device=device, dtype=dtype)
    return F.affine_grid(theta.expand(n, 2, 3), [n, 1, h, w], align_corners=False)


@dataclass(frozen=True)
class RandomRotate:
    """Rotate about the centre by an angle (degrees) drawn from ``angles`` (bilinear)."""

    angles: Sequence[float] = STANDARD_ANGLES

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        angle = _choice(self.angles, g)
        n, _, h, w = x.shape
        grid = _rotation_grid(n, h, w, angle, x.device, x.dtype)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass(frozen=True)
class FusedAffine:
    """``Jitter(d1)``, ``RandomScale``, ``RandomRotate`` and ``Jitter(d2)`` as one affine
    resample: the same parameter draws (in that order) and the same output size, one
    bilinear interpolation."""

    d1: int = 8
    scales: Sequence[float] = STANDARD_SCALES
    angles: Sequence[float] = STANDARD_ANGLES
    d2: int = 4

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, H, W = x.shape
        o1y, o1x = _randint(self.d1, g), _randint(self.d1, g)
        s = _choice(self.scales, g)
        angle = math.radians(_choice(self.angles, g))
        h1, w1 = H - self.d1, W - self.d1  # after the first jitter
        hs, ws = max(1, round(h1 * s)), max(1, round(w1 * s))  # after scaling
        o2y, o2x = _randint(self.d2, g), _randint(self.d2, g)
        ho, wo = hs - self.d2, ws - self.d2  # the output
        if ho < 1 or wo < 1:
            raise ValueError(f"image {H}x{W} too small for jitters {self.d1} and {self.d2}")
        # output pixel centre (i, j) -> scaled/rotated image -> unrotate -> unscale -> input
        ys = torch.arange(ho, device=x.device, dtype=x.dtype) + o2y + 0.5
        xs = torch.arange(wo, device=x.device, dtype=x.dtype) + o2x + 0.5
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        cy, cx = hs / 2, ws / 2
        c, sn = math.cos(angle), math.sin(angle)
        dy, dx = yy - cy, xx - cx  # the same sampling rotation as RandomRotate's grid
        rx = c * dx - sn * dy + cx
        ry = sn * dx + c * dy + cy
        iy = ry * (h1 / hs) + o1y  # unscale, undo the first crop: input pixel coordinates
        ix = rx * (w1 / ws) + o1x
        grid = torch.stack([ix / W * 2 - 1, iy / H * 2 - 1], dim=-1)  # align_corners=False
        return F.grid_sample(
            x,
            grid.expand(n, ho, wo, 2),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )


@dataclass
class Compose:
    """Apply transforms in order, each drawing from the same generator."""

    transforms: list = field(default_factory=list)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, g)
        return x


def standard(fused: bool = True) -> Compose:
    """Lucid's standard transforms: pad 12 (value 0.5), jitter 8, scale
    ``1 + (i - 5) / 50``, rotate -10..10 degrees (plus extra zeros), jitter 4.

    Example:
        >>> t = standard()
        >>> t(torch.rand(2, 3, 128, 128), torch.Generator().manual_seed(0)).shape[:2]
        torch.Size([2, 3])
    """
    if fused:
        return Compose([Pad(12), FusedAffine()])
    return Compose([Pad(12), Jitter(8), RandomScale(), RandomRotate(), Jitter(4)])
