"""The spatial experiment: black out a box, see where each layer's activations change.

The course occludes ``x[:, :, 30:90, 40:110]`` and shows that early and deep layers change
mostly *inside* the box: spatial information survives convolution and pooling.
:func:`occlude` turns that into a number per layer, ``inside_fraction``, the share of the
total change that falls inside the box once the box is mapped to the layer's resolution,
to be read beside ``area_fraction``, the box's share of the map (what a change spread
evenly over the map would give).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from convlens._io import versions, write_json
from convlens.capture import capture
from convlens.device import DeviceLike
from convlens.models.forms import dtype_name, model_dtype
from convlens.models.layers import unwrap

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LayerChange",
    "OcclusionResult",
    "apply_fill",
    "box_at_resolution",
    "occlude",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
Box = tuple[int, int, int, int]
Fill = Literal["zero", "black", "mean", "blur"]
FILLS = ("zero", "black", "mean", "blur")


def _check_box(box: Sequence[int], height: int, width: int) -> Box:
    if len(box) != 4:
        raise ValueError(f"box must be (top, bottom, left, right), got {tuple(box)}")
    top, bottom, left, right = (int(v) for v in box)
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(
            f"box (top={top}, bottom={bottom}, left={left}, right={right}) must satisfy "
            f"0 <= top < bottom <= {height} and 0 <= left < right <= {width} "
            f"(the input is {height}x{width} pixels)"
        )
    return top, bottom, left, right


def box_at_resolution(box: Box, input_hw: tuple[int, int], map_hw: tuple[int, int]) -> Box:
    """Map an input-pixel box to a ``map_hw`` grid: the cells the box touches.

    Rows ``floor(top * h / H) .. ceil(bottom * h / H)`` (half-open), likewise for columns,
    so a box always covers at least one cell.

    Example:
        >>> box_at_resolution((30, 90, 40, 110), (224, 224), (7, 7))
        (0, 3, 1, 4)
    """
    top, bottom, left, right = box
    (H, W), (h, w) = input_hw, map_hw
    t = math.floor(top * h / H)
    b = max(math.ceil(bottom * h / H), t + 1)
    le = math.floor(left * w / W)
    r = max(math.ceil(right * w / W), le + 1)
    return t, min(b, h), le, min(r, w)


def apply_fill(
    x: torch.Tensor,
    box: Sequence[int],
    fill: Fill = "zero",
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    blur_sigma: float = 8.0,
) -> torch.Tensor:
    """A copy of the normalised input ``x`` (``[C, H, W]`` or ``[N, C, H, W]``) with ``box``
    filled. See :func:`occlude` for the fills.

    Example:
        >>> apply_fill(torch.ones(3, 4, 4), (1, 3, 1, 3))[0]
        tensor([[1., 1., 1., 1.],
                [1., 0., 0., 1.],
                [1., 0., 0., 1.],
                [1., 1., 1., 1.]])
    """
    if fill not in FILLS:
        raise ValueError(f"unknown fill {fill!r}: use one of {', '.join(FILLS)}")
    batched = x.ndim == 4
    xb = x if batched else x.unsqueeze(0)
    if xb.ndim != 4:
        raise ValueError(f"x must be [C, H, W] or [N, C, H, W], got {list(x.shape)}")
    t, b, le, r = _check_box(box, xb.shape[-2], xb.shape[-1])
    out = xb.clone()
    c = xb.shape[1]
    if fill == "zero":
        out[:, :, t:b, le:r] = 0.0
    elif fill == "black":
        if len(mean) != c or len(std) != c:
            raise ValueError(
                f"fill='black' needs mean and std with one value per channel of the input "
                f"({c}), got {len(mean)} and {len(std)}: pass the model's normalisation "
                "(mean=..., std=...; a bundle's bundle.normalize)"
            )
        m = torch.tensor(mean, dtype=xb.dtype, device=xb.device).view(1, c, 1, 1)
        s = torch.tensor(std, dtype=xb.dtype, device=xb.device).view(1, c, 1, 1)
        out[:, :, t:b, le:r] = ((0.0 - m) / s).expand(xb.shape[0], c, b - t, r - le)
    elif fill == "mean":
        per_channel = xb.mean(dim=(2, 3), keepdim=True)
        out[:, :, t:b, le:r] = per_channel.expand(-1, -1, b - t, r - le)
    else:  # blur
        import torchvision.transforms.v2.functional as TF

        if blur_sigma <= 0:
            raise ValueError(f"blur_sigma must be positive, got {blur_sigma}")
        # 3 sigma each side, but reflect padding needs the kernel to fit in the image
        k = min(2 * math.ceil(3 * blur_sigma) + 1, 2 * min(xb.shape[-2:]) - 1)
        blurred = TF.gaussian_blur(xb, [k, k], [blur_sigma, blur_sigma])
        out[:, :, t:b, le:r] = blurred[:, :, t:b, le:r]
    return out if batched else out[0]


@dataclass(frozen=True)
class LayerChange:
    """How one layer's output changed under the occlusion.

    Example:
        >>> ch = convlens.occlude(model, x, box=(30, 90, 40, 110), layers=["bn1"]).layers["bn1"]
        >>> ch.inside_fraction, ch.area_fraction, ch.diff.shape
    """

    layer: str
    diff: torch.Tensor  # [h, w] channel-mean absolute difference
    box: Box  # the occlusion box at this layer's resolution (top, bottom, left, right)
    inside_fraction: float  # share of the total change inside the box (NaN if no change)
    area_fraction: float  # the box's share of the map
    total_change: float  # sum of ``diff``
    shape: tuple[int, ...]  # the layer's output shape [C, h, w]

    def to_dict(self) -> dict[str, Any]:
        return {
            "inside_fraction": None if math.isnan(self.inside_fraction) else self.inside_fraction,
            "area_fraction": self.area_fraction,
            "concentration": (
                None
                if math.isnan(self.inside_fraction)
                else self.inside_fraction / self.area_fraction
            ),
            "total_change": self.total_change,
            "box_at_layer": list(self.box),
            "shape": list(self.shape),
        }


@dataclass(frozen=True)
class OcclusionResult:
    """The result of :func:`occlude`: per-layer change maps and how much stays in the box.

    ``original`` and ``occluded`` are the model inputs ``[C, H, W]`` (normalised);
    ``mean``/``std`` undo that for display (:meth:`display_images`).

    Example:
        >>> r = convlens.occlude(model, x, box=(30, 90, 40, 110), layers=["bn1", "layer4"])
        >>> r.inside_fraction  # {'bn1': ..., 'layer4': ...}
        >>> r.save("occ/")  # occ/occlusion.json
    """

    box: Box
    fill: str
    layers: dict[str, LayerChange]
    original: torch.Tensor = field(repr=False)
    occluded: torch.Tensor = field(repr=False)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    model_name: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def inside_fraction(self) -> dict[str, float]:
        """``{layer: inside_fraction}``."""
        return {k: v.inside_fraction for k, v in self.layers.items()}

    @property
    def area_fraction(self) -> dict[str, float]:
        """``{layer: area_fraction}``."""
        return {k: v.area_fraction for k, v in self.layers.items()}

    def display_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Original and occluded inputs in ``[0, 1]`` pixel space, for plotting."""

        def undo(t: torch.Tensor) -> torch.Tensor:
            if self.mean is None or self.std is None:
                lo, hi = float(self.original.min()), float(self.original.max())
                return ((t - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
            m = torch.tensor(self.mean).view(-1, 1, 1)
            s = torch.tensor(self.std).view(-1, 1, 1)
            return (t * s + m).clamp(0, 1)

        return undo(self.original), undo(self.occluded)

    def __repr__(self) -> str:
        inside = ", ".join(f"{k}={v:.3g}" for k, v in self.inside_fraction.items())
        return (
            f"OcclusionResult(box={tuple(self.box)}, fill={self.fill!r}, "
            f"inside_fraction: {inside or '-'})"
        )

    def _repr_html_(self) -> str:
        from convlens._notebook import occlusion_result

        return occlusion_result(self)

    def to_dict(self) -> dict[str, Any]:
        """The numbers: box, fill, and per layer ``inside_fraction``, ``area_fraction``, ..."""
        return {
            "model": self.model_name,
            "box": {
                "top": self.box[0],
                "bottom": self.box[1],
                "left": self.box[2],
                "right": self.box[3],
            },
            "fill": self.fill,
            "input_shape": list(self.original.shape),
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "settings": self.settings,
            "versions": versions(),
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``occlusion.json`` (the numbers) into ``out_dir``; returns its path."""
        return write_json(Path(out_dir) / "occlusion.json", self.to_dict())


def one_image(x: torch.Tensor, what: str) -> torch.Tensor:
    """``x`` as one image ``[C, H, W]`` (a batch of one is unwrapped); else a ValueError
    naming ``what`` took it."""
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"{what} takes one image, got a batch of {x.shape[0]}")
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"x must be one image [C, H, W], got shape {list(x.shape)}")
    return x


def occlude(
    model: nn.Module,
    x: torch.Tensor,
    box: Sequence[int],
    layers: str | Iterable[str],
    fill: Fill = "zero",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    blur_sigma: float = 8.0,
    device: DeviceLike | None = None,
    model_name: str = "",
) -> OcclusionResult:
    """Occlude ``box`` in the normalised input ``x`` and measure each layer's change.

    ``box = (top, bottom, left, right)`` in input pixels, half-open as in
    ``x[:, top:bottom, left:right]`` (the course's example: ``(30, 90, 40, 110)``).

    ``fill``:
      - ``"zero"``: 0 in normalised space, as the course does. That is the dataset's mean
        colour (a grey-brown for ImageNet statistics), *not* black.
      - ``"black"``: true black, ``(0 - mean) / std`` per channel.
      - ``"mean"``: the image's own mean colour, per channel.
      - ``"blur"``: a Gaussian blur (``blur_sigma`` pixels) of the image inside the box.

    For each layer: ``diff`` = channel-mean ``|act(occluded) - act(original)|``;
    ``inside_fraction`` = sum of ``diff`` inside the box mapped to the layer's grid
    (:func:`box_at_resolution`) / sum of ``diff`` (NaN when nothing changed);
    ``area_fraction`` = the mapped box's share of the grid. A layer keeps spatial
    information where ``inside_fraction`` is well above ``area_fraction``.

    ``mean``/``std``: the input's normalisation, one value per channel (ImageNet's when
    left out and ``x`` has 3 channels); ``"black"`` needs them, and they undo the
    normalisation for display. Every fill works per channel, for inputs of any number of
    channels. The model runs in its own dtype (a float16 / bfloat16 model gets its input
    cast); the changes are computed in float32 and ``settings["dtype"]`` says the model's.

    Example:
        >>> r = occlude(model, x, box=(30, 90, 40, 110), layers=["bn1", "layer4"])
        >>> r.inside_fraction["bn1"] > r.area_fraction["bn1"]
        True
    """
    x = one_image(x, "occlude")
    H, W = x.shape[-2:]
    box_t = _check_box(box, H, W)
    x = x.detach().float().cpu()
    c = int(x.shape[0])
    if mean is None and std is None and c == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if (mean is None) != (std is None):
        raise ValueError("give both mean= and std= (the input's normalisation), or neither")
    if mean is not None and std is not None and (len(mean) != c or len(std) != c):
        raise ValueError(
            f"mean and std have {len(mean)} and {len(std)} values but the input has {c} "
            f"channel(s): give one value per channel"
        )
    if fill == "black" and mean is None:
        raise ValueError(
            f"fill='black' on a {c}-channel input needs its normalisation: pass mean=... and "
            f"std=... with {c} value(s) each"
        )
    fill_mean = mean if mean is not None else IMAGENET_MEAN
    fill_std = std if std is not None else IMAGENET_STD
    x_occ = apply_fill(x, box_t, fill, mean=fill_mean, std=fill_std, blur_sigma=blur_sigma)
    acts = capture(model, torch.stack([x, x_occ]), layers, device=device)
    dtype = model_dtype(unwrap(model))
    changes: dict[str, LayerChange] = {}
    for name, act in acts.items():
        if act.ndim != 4:
            raise ValueError(
                f"layer {name!r} outputs shape {list(act.shape[1:])}, not a feature map "
                "[C, H, W]: occlude needs convolutional (spatial) layers"
            )
        diff = (act[1].float() - act[0].float()).abs().mean(dim=0)
        h, w = diff.shape
        t, b, le, r = box_at_resolution(box_t, (H, W), (h, w))
        total = float(diff.sum())
        inside = float(diff[t:b, le:r].sum())
        changes[name] = LayerChange(
            layer=name,
            diff=diff,
            box=(t, b, le, r),
            inside_fraction=inside / total if total > 0 else float("nan"),
            area_fraction=(b - t) * (r - le) / (h * w),
            total_change=total,
            shape=tuple(act.shape[1:]),
        )
    return OcclusionResult(
        box=box_t,
        fill=fill,
        layers=changes,
        original=x,
        occluded=x_occ,
        mean=tuple(float(v) for v in mean) if mean is not None else None,
        std=tuple(float(v) for v in std) if std is not None else None,
        model_name=model_name,
        settings={
            **({"blur_sigma": blur_sigma} if fill == "blur" else {}),
            "dtype": dtype_name(dtype),
        },
    )
