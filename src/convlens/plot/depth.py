"""The course's "layer1 (early) vs layer4 (deep)" figure, for any model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from convlens.analysis.depth import DepthMaps, depth_maps
from convlens.device import DeviceLike
from convlens.images import ImageSource
from convlens.models.zoo import ModelBundle
from convlens.plot._base import hide_ticks, new_figure, show_image

__all__ = ["depth_comparison"]


def _depth_word(i: int, n: int) -> str:
    if n == 1:
        return ""
    return " (early)" if i == 0 else " (deep)" if i == n - 1 else ""


def depth_comparison(
    bundle: ModelBundle | DepthMaps,
    image: ImageSource | torch.Tensor | None = None,
    layers: Sequence[str] | None = None,
    *,
    relu: bool = True,
    device: DeviceLike | None = None,
    cmap: str = "viridis",
) -> Figure:
    """The model's input, then the channel-mean map of each layer, shallow to deep, with
    its channels and resolution; the title names the model (and says "random init" for
    an untrained one).

    ``bundle`` and ``image`` are computed with :func:`convlens.analysis.depth.depth_maps`
    (``layers`` defaults to the family's early and deep layer, e.g. resnet's
    layer1/layer4); a :class:`~convlens.analysis.depth.DepthMaps` is drawn as it is.

    Example:
        >>> bundle = convlens.load_model("resnet18")  # pretrained: downloads once
        >>> fig = convlens.plot.depth_comparison(bundle, convlens.sample_image(), layers=["layer1", "layer4"])
    """
    if isinstance(bundle, DepthMaps):
        if image is not None or layers is not None:
            raise ValueError("a DepthMaps result is drawn as it is: drop image and layers")
        result = bundle
    else:
        if image is None:
            raise ValueError("depth_comparison needs an image, e.g. convlens.sample_image()")
        result = depth_maps(bundle, image, layers, relu=relu, device=device)
    n = len(result.layers)
    fig = new_figure(3.4 * (n + 1), 3.9)
    axes = fig.subplots(1, n + 1, squeeze=False)[0]
    show_image(axes[0], result.image)
    h, w = result.image.shape[1:]
    axes[0].set_title(f"input {h}x{w}")
    hide_ticks(axes[0])
    for i, (ax, name) in enumerate(zip(axes[1:], result.layers)):
        im = ax.imshow(result.maps[name].numpy(), cmap=cmap)
        c, mh, mw = result.shapes[name]
        ax.set_title(f"{name}{_depth_word(i, n)}\n{c} ch, {mh}x{mw}")
        hide_ticks(ax)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    what = "mean of ReLU(activation)" if result.relu else "channel-mean activation"
    fig.suptitle(f"{result.model}: {what} by depth")
    fig.tight_layout()
    return fig
