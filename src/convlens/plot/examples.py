"""Dataset-example figures: one row per channel, its top images cut at the receptive field
with the channel's activation over them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from matplotlib.figure import Figure

from convlens.plot._base import hide_ticks, new_figure, to_numpy_image

__all__ = ["examples"]


def examples(
    result: Any,
    data: Any,
    layer: str,
    channels: Sequence[int] | None = None,
    *,
    which: Literal["top", "bottom"] = "top",
    model: Any = None,
    max_channels: int = 16,
    alpha: float = 0.35,
    crop_list: dict[int, list[Any]] | None = None,
) -> Figure:
    """One row per channel of ``layer`` (the first ``max_channels`` collected unless
    ``channels`` says which): the top-k (or bottom-k) receptive-field crops, each with
    the channel's activation map over it (upsampled, one colour scale per row) and its
    score and dataset index below.

    ``data`` (and ``model``, for a result read from disk) as for
    :func:`convlens.analysis.examples.crops`; ``crop_list`` gives crops already made.

    Example:
        >>> fig = convlens.plot.examples(r, val, "bn3", channels=range(8))
    """
    from convlens.analysis.examples import crops

    chans = list(channels) if channels is not None else result.channels(layer)[:max_channels]
    if not chans:
        raise ValueError(f"no channels to show for {layer!r}")
    rows = {
        c: (crop_list or {}).get(c) or crops(result, data, layer, c, which=which, model=model)
        for c in chans
    }
    k = max((len(v) for v in rows.values()), default=0)
    if k == 0:
        raise ValueError(f"no examples to show for {layer!r}")
    cell = 1.25
    height = cell * 1.18 * len(chans) + 0.5
    fig = new_figure(cell * k + 0.9, height)
    axes = fig.subplots(len(chans), k, squeeze=False)
    for r, c in enumerate(chans):
        found = rows[c]
        vmax = max((float(cr.full_activation.max()) for cr in found), default=1.0)
        vmin = min((float(cr.full_activation.min()) for cr in found), default=0.0)
        for j in range(k):
            ax = axes[r, j]
            hide_ticks(ax)
            if j >= len(found):
                ax.set_axis_off()
                continue
            cr = found[j]
            img = to_numpy_image(cr.image[:3] if cr.image.shape[0] >= 3 else cr.image[0])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.imshow(
                cr.activation.numpy(),
                cmap="inferno",
                alpha=alpha,
                vmin=vmin,
                vmax=vmax if vmax > vmin else vmin + 1e-6,
                extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5),
            )
            ax.set_xlabel(f"{cr.example.score:.3g}  #{cr.example.index}", fontsize=6, labelpad=1)
            if j == 0:
                ax.set_ylabel(f"ch {c}", fontsize=8)
    word = "top" if which == "top" else "bottom"
    fig.suptitle(
        f"{result.model_name}: {layer}, {word} {k} of {result.length} images "
        f"({result.dataset}, score = {result.reduce} over positions)",
        fontsize=8,
    )
    fig.tight_layout(pad=0.4, rect=(0, 0, 1, 1 - 0.4 / height))
    return fig
