"""The result of :func:`convlens.attribute`: signed maps with what produced them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from convlens._io import atomic_open, versions, write_json

__all__ = ["SCALE_PERCENTILE", "Attribution", "symmetric_scale"]

#: The colour scale of a figure's signed maps: this percentile of ``|map|`` over the maps.
SCALE_PERCENTILE = 99.5


def symmetric_scale(maps: Any) -> float:
    """``vmax`` of one symmetric colour scale ``[-vmax, vmax]`` for signed maps (tensors or
    arrays): the :data:`SCALE_PERCENTILE` th percentile of ``|map|`` over all of them
    (finite values only), the largest ``|map|`` if that is 0, and 1.0 if every value is 0,
    so the scale is always drawable.

    Example:
        >>> symmetric_scale([torch.tensor([[0.0, -2.0], [1.0, 0.5]])]) <= 2.0
        True
    """
    import numpy as np

    arrays = [
        (m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m))
        for m in maps
    ]
    if not arrays:
        return 1.0
    vals = np.concatenate([np.abs(a.astype(np.float64)).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 1.0
    v = float(np.percentile(vals, SCALE_PERCENTILE))
    if not v > 0:
        v = float(vals.max())
    return v if v > 0 else 1.0


_TENSORS = ("map", "pixels", "layer_map", "score", "delta", "input")


@dataclass(frozen=True, eq=False)
class Attribution:
    """Which pixels a target depends on, for a batch of ``N`` images.

    - ``map`` ``[N, H, W]``: the attribution at input resolution, **signed and unscaled**
      (positive: the pixel raises the target). Pixel-space methods sum ``pixels`` over
      the channels; the CAM family upsamples ``layer_map`` bilinearly; occlusion is
      Captum's ``Occlusion`` (the mean drop of the windows covering a pixel).
    - ``pixels`` ``[N, C, H, W]``: per channel, for pixel-space methods (else ``None``).
    - ``layer_map`` ``[N, h, w]``: the CAM family's map at the layer's resolution.
    - ``target``: per image, what was attributed (``"258"``, ``"layer2:3"`` (the mean of a
      channel), ``"layer2:3@4,5"`` (one neuron), ``"callable"``); ``labels`` its readable
      name when the model's labels know it.
    - ``score`` ``[N]``: the target's value on each image (float32).
    - ``delta`` ``[N]``: integrated gradients' completeness error,
      ``sum(attribution) - (f(x) - f(baseline))`` (``None`` for other methods);
      ``steps`` the number of steps it used.
    - ``input`` ``[N, C, H, W]``: the (normalised) model input; ``mean``/``std`` undo it.

    Example:
        >>> a = convlens.attribute(bundle, x, 258, method="integrated_gradients")
        >>> a.map.shape, float(a.delta[0].abs()) < 1e-2 * abs(float(a.score[0]))
        (torch.Size([1, 224, 224]), True)
    """

    map: torch.Tensor
    score: torch.Tensor
    target: tuple[str, ...]
    method: str
    input: torch.Tensor = field(repr=False)
    pixels: torch.Tensor | None = field(default=None, repr=False)
    layer_map: torch.Tensor | None = field(default=None, repr=False)
    delta: torch.Tensor | None = None
    steps: int | None = None
    layer: str | None = None
    labels: tuple[str | None, ...] = ()
    model_name: str = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.map.shape[0])

    def __repr__(self) -> str:
        n, h, w = self.map.shape
        extra = f", layer={self.layer!r}" if self.layer else ""
        if self.delta is not None:
            extra += f", max|delta|={float(self.delta.abs().max()):.3g}, steps={self.steps}"
        return (
            f"Attribution(method={self.method!r}, images={n}, map={h}x{w}, "
            f"target={list(self.target)}{extra})"
        )

    def _repr_html_(self) -> str:
        from convlens._notebook import attribution

        return attribution(self)

    def display_images(self) -> torch.Tensor:
        """The inputs in ``[0, 1]`` pixel space ``[N, C, H, W]``, for plotting."""
        t = self.input.float()
        if self.mean is None or self.std is None or len(self.mean) != t.shape[1]:
            lo = t.amin(dim=(1, 2, 3), keepdim=True)
            hi = t.amax(dim=(1, 2, 3), keepdim=True)
            return ((t - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        return (t * s + m).clamp(0, 1)

    def to_dict(self) -> dict[str, Any]:
        """The numbers (per image: target, label, score, delta; the map's range and sums)
        and the settings, for ``attribution.json``."""
        images = []
        for i in range(len(self)):
            m = self.map[i]
            entry: dict[str, Any] = {
                "target": self.target[i],
                "label": self.labels[i] if i < len(self.labels) else None,
                "score": float(self.score[i]),
                "map_sum": float(m.double().sum()),
                "map_min": float(m.min()),
                "map_max": float(m.max()),
            }
            if self.delta is not None:
                entry["delta"] = float(self.delta[i])
            images.append(entry)
        return {
            "method": self.method,
            "model": self.model_name,
            "layer": self.layer,
            "steps": self.steps,
            "input_shape": list(self.input.shape),
            "map_shape": list(self.map.shape),
            "layer_map_shape": None if self.layer_map is None else list(self.layer_map.shape),
            "images": images,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "seconds": self.seconds,
            "settings": self.settings,
            "versions": versions(),
        }

    def save(self, out_dir: str | Path, name: str = "attribution") -> Path:
        """Write ``NAME.json`` (the numbers) and ``NAME.safetensors`` (the tensors) into
        ``out_dir``, each atomically; returns the JSON's path.
        :meth:`load` reads them back.

        Example:
            >>> path = a.save("out/")
            >>> Attribution.load("out/").map.equal(a.map)
            True
        """
        from safetensors.torch import save

        out = Path(out_dir)
        tensors = {
            k: getattr(self, k).detach().cpu().contiguous()
            for k in _TENSORS
            if getattr(self, k) is not None
        }
        with atomic_open(out / f"{name}.safetensors", "wb") as fh:
            fh.write(save(tensors))
        doc = self.to_dict()
        doc["fields"] = {
            "target": list(self.target),
            "labels": list(self.labels),
        }
        return write_json(out / f"{name}.json", doc)

    @classmethod
    def load(cls, path: str | Path, name: str = "attribution") -> Attribution:
        """Read an :class:`Attribution` that :meth:`save` wrote (a folder, or its JSON).

        Example:
            >>> Attribution.load("out/attribution.json").method
            'integrated_gradients'
        """
        from safetensors.torch import load_file

        from convlens.errors import ConvlensError

        p = Path(path)
        if p.is_dir():
            p = p / f"{name}.json"
        tensor_file = p.with_suffix(".safetensors")
        if not p.is_file() or not tensor_file.is_file():
            raise ConvlensError(
                f"no saved attribution at {p} (and {tensor_file.name}): write one with "
                "Attribution.save(dir) or `convlens attribute --out DIR`"
            )
        try:
            doc = json.loads(p.read_text())
            tensors = load_file(str(tensor_file))
        except (OSError, ValueError) as e:
            raise ConvlensError(f"cannot read the attribution {p}: {e}") from None
        fields = doc.get("fields", {})
        return cls(
            map=tensors["map"],
            score=tensors["score"],
            target=tuple(fields.get("target", [])),
            method=doc["method"],
            input=tensors["input"],
            pixels=tensors.get("pixels"),
            layer_map=tensors.get("layer_map"),
            delta=tensors.get("delta"),
            steps=doc.get("steps"),
            layer=doc.get("layer"),
            labels=tuple(fields.get("labels", [])),
            model_name=doc.get("model", ""),
            mean=None if doc.get("mean") is None else tuple(doc["mean"]),
            std=None if doc.get("std") is None else tuple(doc["std"]),
            seconds=float(doc.get("seconds", 0.0)),
            settings=dict(doc.get("settings", {})),
        )
