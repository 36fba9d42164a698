"""The course's first figure: what we see vs what the network gets (three channels)."""

from __future__ import annotations

import torch
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure

from convlens.plot._base import hide_ticks, new_figure, to_numpy_image

__all__ = ["channels"]


def channels(img: torch.Tensor, *, title: str | None = None) -> Figure:
    """The image beside its Red, Green and Blue channels, each a ``[H, W]`` grid of numbers
    in [0, 1] shown from black (0) to the pure channel colour (1).

    Example:
        >>> fig = convlens.plot.channels(convlens.sample_image())
        >>> fig.savefig("channels.png")
    """
    if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3:
        raise ValueError("channels() takes an RGB image tensor [3, H, W] (see load_image)")
    fig = new_figure(13, 3.8)
    axes = fig.subplots(1, 4)
    axes[0].imshow(to_numpy_image(img))
    h, w = img.shape[1:]
    axes[0].set_title(f"what we see\n[3, {h}, {w}]")
    names = [("Red", "#ff0000"), ("Green", "#00ff00"), ("Blue", "#0000ff")]
    for c, (ax, (name, colour)) in enumerate(zip(axes[1:], names)):
        # black (0) to the full channel colour (1): bright pixels stay bright
        cmap = LinearSegmentedColormap.from_list(name.lower(), ["#000000", colour])
        ch = img[c]
        im = ax.imshow(ch.detach().cpu().numpy(), cmap=cmap, vmin=0.0, vmax=1.0)
        ax.set_title(f"{name} channel\nmin {float(ch.min()):.2f}, max {float(ch.max()):.2f}")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes:
        hide_ticks(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
