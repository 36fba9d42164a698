"""The embedded offline dataset: ten procedurally drawn shape and texture classes.

Every image is drawn from a seed (NumPy's PCG64 per image, so any one image can be
re-drawn alone), with a random colour, size, position and rotation on a textured
background, and written as PNG into the ImageFolder layout (``train/<class>/*.png``,
``val/<class>/*.png``) that Imagenette uses. Pure PIL drawing; no downloads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["SHAPE_CLASSES", "draw_shape", "generate_shapes"]

#: The ten classes, in label order.
SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "horizontal stripes",
    "vertical stripes",
    "checkerboard",
    "diagonal bars",
)
_SS = 2  # supersampling factor for anti-aliased edges
_FORMAT = "convlens-shapes/6"


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _luma(c: tuple[int, int, int]) -> float:
    return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]


def _contrasting(rng: np.random.Generator, other: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random colour whose brightness differs from ``other``'s by at least 70 of 255, so
    the outline is an edge in brightness, not only in hue."""
    for _ in range(100):
        c = _colour(rng)
        if abs(_luma(c) - _luma(other)) >= 70:
            return c
    return (255, 255, 255) if _luma(other) < 128 else (0, 0, 0)


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, tuple[int, int, int]]:
    """A textured background: a linear gradient between two colours plus blurred noise."""
    c1 = np.array(_colour(rng), dtype=np.float32)
    c2 = np.clip(c1 + rng.normal(0, 40, 3), 0, 255).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.0) / 2.0
    img = c1[None, None, :] * (1 - t[..., None]) + c2[None, None, :] * t[..., None]
    noise_scale = rng.uniform(4, 22)
    noise = rng.normal(0, noise_scale, (size, size, 1)).astype(np.float32)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    mean = tuple(int(v) for v in img.reshape(-1, 3).mean(0))
    blurred = Image.fromarray(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2)))
    return blurred, mean  # type: ignore[return-value]


def _rot(
    points: list[tuple[float, float]], cx: float, cy: float, angle: float
) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _polygon(n: int, r: float, inner: float | None = None) -> list[tuple[float, float]]:
    pts = []
    k = 2 * n if inner is not None else n
    for i in range(k):
        rad = r if inner is None or i % 2 == 0 else r * inner
        a = -math.pi / 2 + 2 * math.pi * i / k
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


def _draw_pattern(
    draw: ImageDraw.ImageDraw,
    kind: str,
    cx: float,
    cy: float,
    r: float,
    angle: float,
    colour: tuple[int, int, int],
    rng: np.random.Generator,
) -> None:
    """Stripes, checkerboard and bars: a patch of radius ``r`` filled with a pattern."""
    period = r * (rng.uniform(0.3, 0.42) if kind == "checkerboard" else rng.uniform(0.35, 0.6))
    width = period * rng.uniform(0.4, 0.6)
    n = math.ceil(r / period) + 1
    if kind == "checkerboard":
        for i in range(-n, n):
            for j in range(-n, n):
                if (i + j) % 2:
                    continue
                x0, y0 = i * period, j * period
                sq = [(x0, y0), (x0 + period, y0), (x0 + period, y0 + period), (x0, y0 + period)]
                if abs(x0 + period / 2) <= r and abs(y0 + period / 2) <= r:
                    draw.polygon(_rot(sq, cx, cy, angle), fill=colour)
        return
    for i in range(-n, n + 1):
        x0 = i * period
        if abs(x0) + width / 2 > r:
            continue
        bar = [(x0 - width / 2, -r), (x0 + width / 2, -r), (x0 + width / 2, r), (x0 - width / 2, r)]
        draw.polygon(_rot(bar, cx, cy, angle), fill=colour)


def draw_shape(label: int, seed: int, size: int = 64) -> Image.Image:
    """Draw one image of class ``label`` (an index into :data:`SHAPE_CLASSES`) from ``seed``.

    Example:
        >>> draw_shape(SHAPE_CLASSES.index("star"), seed=0).size
        (64, 64)
    """
    if not 0 <= label < len(SHAPE_CLASSES):
        raise ValueError(f"label must be in 0..{len(SHAPE_CLASSES) - 1}, got {label}")
    rng = np.random.default_rng([seed, label])
    bg, bg_mean = _background(rng, size * _SS)
    colour = _contrasting(rng, bg_mean)
    canvas = bg.copy()
    draw = ImageDraw.Draw(canvas)
    S = size * _SS
    kind = SHAPE_CLASSES[label]
    r = S * rng.uniform(0.2, 0.34)
    margin = r * 1.05
    cx, cy = rng.uniform(margin, S - margin, 2)
    spin = math.radians(rng.uniform(-15, 15))  # upright, give or take 15 degrees
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        ri = r * rng.uniform(0.5, 0.65)
        inner = bg.crop((int(cx - ri), int(cy - ri), int(cx + ri), int(cy + ri)))
        mask = Image.new("L", inner.size, 0)
        ImageDraw.Draw(mask).ellipse([0, 0, inner.size[0] - 1, inner.size[1] - 1], fill=255)
        canvas.paste(inner, (int(cx - ri), int(cy - ri)), mask)
    elif kind == "square":
        draw.polygon(_rot(_polygon(4, r), cx, cy, spin + math.pi / 4), fill=colour)  # square
    elif kind == "triangle":
        draw.polygon(_rot(_polygon(3, r * 1.1), cx, cy, spin), fill=colour)
    elif kind == "star":
        draw.polygon(_rot(_polygon(5, r * 1.1, inner=0.38), cx, cy, spin), fill=colour)
    elif kind == "cross":
        t = r * rng.uniform(0.18, 0.28)  # thin arms: not a notched square
        arm = [
            (-t, -r),
            (t, -r),
            (t, -t),
            (r, -t),
            (r, t),
            (t, t),
            (t, r),
            (-t, r),
            (-t, t),
            (-r, t),
            (-r, -t),
            (-t, -t),
        ]
        draw.polygon(_rot(arm, cx, cy, spin), fill=colour)
    else:
        jitter = math.radians(rng.uniform(-12, 12))
        angle = {
            "horizontal stripes": math.pi / 2,
            "vertical stripes": 0.0,
            "checkerboard": 0.0,
            "diagonal bars": (math.pi / 4) * (1 if rng.random() < 0.5 else -1),
        }[kind] + jitter
        _draw_pattern(draw, kind, cx, cy, r * 1.15, angle, colour, rng)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def _write_split(
    root: Path,
    split: str,
    per_class: int,
    seed: int,
    size: int,
    offset: int,
    progress: Callable[[int], None] | None,
) -> None:
    for label, name in enumerate(SHAPE_CLASSES):
        folder = root / split / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = draw_shape(label, seed=seed * 1_000_003 + offset + i, size=size)
            img.save(folder / f"{split}_{i:05d}.png", optimize=False, compress_level=1)
        if progress is not None:
            progress(per_class)


def generate_shapes(
    root: str | os.PathLike[str],
    *,
    train_per_class: int = 1500,
    val_per_class: int = 100,
    size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Generate the shapes dataset into ``root`` (``train/`` and ``val/``, one folder per
    class). Idempotent: a complete folder made with the same settings is reused; the
    folder appears only when complete (written beside it, then renamed).

    Example:
        >>> generate_shapes("/tmp/shapes", train_per_class=20, val_per_class=5)
        PosixPath('/tmp/shapes')
    """
    root = Path(root)
    settings = {
        "format": _FORMAT,
        "classes": list(SHAPE_CLASSES),
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "size": size,
        "seed": seed,
    }
    marker = root / "shapes.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == settings:
                return root
        except ValueError:
            pass
        raise FileExistsError(
            f"{root} holds a shapes dataset made with other settings: choose another folder"
        )
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not a shapes dataset: choose another folder")
    if train_per_class < 1 or val_per_class < 1 or size < 16:
        raise ValueError("need at least one image per class and split, and size >= 16")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        from convlens._progress import tqdm

        total = (train_per_class + val_per_class) * len(SHAPE_CLASSES)
        with tqdm(total=total, desc="drawing shapes", unit="img", disable=not progress) as bar:
            _write_split(tmp, "train", train_per_class, seed, size, 0, bar.update)
            _write_split(tmp, "val", val_per_class, seed, size, 500_000, bar.update)
        (tmp / "shapes.json").write_text(json.dumps(settings, indent=2) + "\n")
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
