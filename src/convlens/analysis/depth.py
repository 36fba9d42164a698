"""Feature maps at depth: the channel-mean map of an early and a deep layer for one image.

The course compares ResNet18's ``layer1`` (56x56, edges and textures, still image-shaped)
with ``layer4`` (7x7, coarse blobs where the object is). :func:`depth_maps` does it for
any registered model, with sensible default layers per family
(:func:`convlens.models.zoo.default_layers`); :func:`convlens.plot.depth_comparison`
draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from convlens.analysis.activations import mean_map
from convlens.capture import capture
from convlens.device import DeviceLike
from convlens.images import ImageSource, load_image
from convlens.models.zoo import ModelBundle, default_layers

__all__ = ["DepthMaps", "depth_maps"]


@dataclass(frozen=True)
class DepthMaps:
    """Channel-mean maps of several layers for one image, shallow to deep.

    ``image`` is the model's input back in pixel space (``[3, H, W]`` in [0, 1], after
    resize and crop); ``maps[layer]`` is ``[h, w]``; ``shapes[layer]`` the layer's
    ``(channels, h, w)``; ``model`` the bundle's description (it says "random init" for
    an untrained model).

    Example:
        >>> from convlens.analysis import depth_maps
        >>> d = depth_maps(bundle, convlens.sample_image())
        >>> d.layers, d.shapes[d.layers[0]]
    """

    model: str
    image: torch.Tensor = field(repr=False)
    layers: tuple[str, ...]
    maps: dict[str, torch.Tensor] = field(repr=False)
    shapes: dict[str, tuple[int, int, int]]
    relu: bool

    def _repr_html_(self) -> str:
        from convlens._notebook import depth_maps

        return depth_maps(self)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the tensors: model, layers, shapes, and each map's range."""
        return {
            "model": self.model,
            "relu": self.relu,
            "layers": {
                name: {
                    "shape": list(self.shapes[name]),
                    "min": float(self.maps[name].min()),
                    "max": float(self.maps[name].max()),
                    "mean": float(self.maps[name].mean()),
                }
                for name in self.layers
            },
        }


def depth_maps(
    bundle: ModelBundle,
    image: ImageSource | torch.Tensor,
    layers: Sequence[str] | None = None,
    *,
    relu: bool = True,
    device: DeviceLike | None = None,
) -> DepthMaps:
    """The channel-mean activation map of each layer in ``layers`` for one image.

    ``image``: anything :func:`convlens.load_image` takes, or a ``[3, H, W]`` tensor in
    [0, 1]; it is preprocessed with ``bundle.preprocess``. ``layers`` defaults to the
    model family's early and deep layer (resnet: layer1/layer4; googlenet:
    inception3a/inception4e; efficientnet: blocks.1/blocks.5; simple_cnn: bn1/bn3).
    ``relu`` applies ReLU before averaging, so negative values (BatchNorm outputs,
    EfficientNet's linear bottlenecks) do not cancel positive ones. ``device``: ``None``
    runs where the model is.

    Example:
        >>> d = depth_maps(convlens.load_model("efficientnet_lite0"), convlens.sample_image())
        >>> d.layers, d.shapes["blocks.5"]
        (('blocks.1', 'blocks.5'), (192, 7, 7))
    """
    if not isinstance(bundle, ModelBundle):
        raise TypeError(
            f"depth_maps takes a ModelBundle (convlens.load_model(...)), not "
            f"{type(bundle).__name__}"
        )
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an RGB image [3, H, W] in [0, 1], got {list(image.shape)}")
        if float(image.min()) < -1e-3 or float(image.max()) > 1 + 1e-3:
            raise ValueError(
                "image values are outside [0, 1]: pass the image itself (load_image(...)), "
                "not the preprocessed model input"
            )
        pixels = image.float()
    else:
        pixels = load_image(image)
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    names = list(layers) if layers is not None else default_layers(bundle)
    if not names:
        raise ValueError("no layers given: pass e.g. layers=['layer1', 'layer4'], or None")
    x = bundle.preprocess(pixels)
    acts = capture(bundle.model, x, names, device=device)
    maps: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    for name, act in acts.items():
        if act.ndim != 4:
            raise ValueError(
                f"layer {name!r} outputs {list(act.shape[1:])}, not a feature map [C, H, W]: "
                "choose a convolutional layer (`convlens layers MODEL` shows shapes)"
            )
        maps[name] = mean_map(act[0], relu=relu)
        c, h, w = act.shape[1:]
        shapes[name] = (int(c), int(h), int(w))
    return DepthMaps(
        model=bundle.description,
        image=bundle.preprocess.unnormalize(x),
        layers=tuple(maps),
        maps=maps,
        shapes=shapes,
        relu=relu,
    )
