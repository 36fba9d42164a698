"""Attribution figures: signed maps on a shared symmetric scale, the sanity test, and the
deletion / insertion curves."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from convlens.analysis.attribution.faithfulness import Faithfulness
from convlens.analysis.attribution.result import SCALE_PERCENTILE, Attribution, symmetric_scale
from convlens.analysis.attribution.sanity import Sanity
from convlens.plot._base import hide_ticks, new_figure, show_image

__all__ = ["attribution", "faithfulness_curves", "sanity"]

CMAP = "RdBu_r"  # red: raises the target; blue: lowers it
PERCENTILE = SCALE_PERCENTILE  # the colour scale: this percentile of |map|
MAX_SANITY_COLUMNS = 8  # randomized states drawn per method (a spread subset beyond it)
_DEFAULT_IMAGES = 8


# ---------------------------------------------------------------- helpers


def _text(s: object, limit: int = 40) -> str:
    """A label safe to draw: one line, no control characters, at most ``limit``
    characters. Titles are drawn with ``parse_math=False``, so ``$`` is literal."""
    out = "".join(
        " " if unicodedata.category(c)[0] in "CZ" and c != " " else c for c in str(s)
    ).strip()
    out = " ".join(out.split())
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _robust_vmax(maps: Sequence[torch.Tensor]) -> float:
    """The maps' symmetric colour scale (:func:`~convlens.analysis.attribution.result.symmetric_scale`)."""
    return symmetric_scale(maps)


def _grey(img: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] to the ``[H, W]`` luminance drawn under a map (one channel:
    itself; 3 or more: Rec. 601 luma of the first 3; 2: the first)."""
    t = img.detach().float().cpu()
    g = 0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2] if t.shape[0] >= 3 else t[0]
    return g.clamp(0, 1).numpy()


def _overlay(ax: Axes, grey: np.ndarray, m: torch.Tensor, vmax: float, alpha: float) -> Any:
    """The map drawn semi-transparent over a faded grey copy of the image."""
    ax.imshow(0.25 + 0.5 * grey, cmap="gray", vmin=0.0, vmax=1.0)
    return ax.imshow(
        m.detach().float().cpu().numpy(), cmap=CMAP, vmin=-vmax, vmax=vmax, alpha=alpha
    )


def _fmt(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def _auc(v: float) -> str:
    """Three decimals (``0.123``); three significant digits below 0.01, where three
    decimals would hide the difference from the random ordering."""
    return f"{v:.3f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"


def _ticks(cb: Any, vmax: float, n: int) -> None:
    """``n`` colourbar ticks from ``-vmax`` to ``vmax``, written out (no offset text)."""
    ticks = np.linspace(-vmax, vmax, n)
    cb.set_ticks(ticks, labels=[_fmt(float(t)) if t else "0" for t in ticks])


def _target_text(a: Attribution, i: int) -> str:
    target = a.target[i] if i < len(a.target) else ""
    label = a.labels[i] if i < len(a.labels) else None
    if label and label != target:
        return f"{_text(label, 28)} ({_text(target, 16)})"
    return _text(target, 40)


def _method_name(a: Attribution) -> str:
    name = _text(a.method, 30)
    return f"{name} @ {_text(a.layer, 20)}" if a.layer else name


def _as_list(x: Any, kind: type, what: str) -> list[Any]:
    items = [x] if not isinstance(x, (list, tuple)) else list(x)
    if not items:
        raise ValueError(f"{what}: give at least one")
    for r in items:
        if not isinstance(r, kind):
            raise TypeError(f"{what}: expected {kind.__name__} objects, got {type(r).__name__}")
    return items


# ---------------------------------------------------------------- attribution


def _faithfulness_lines(
    faithfulness: Mapping[str, Any] | None, method: str, i: int, n: int
) -> list[str]:
    if not faithfulness or method not in faithfulness:
        return []
    lines = []
    for f in _as_list(faithfulness[method], Faithfulness, f"faithfulness[{method!r}]"):
        auc, rnd = f.auc.reshape(-1), f.random_auc.reshape(-1)
        if auc.numel() != n:
            raise ValueError(
                f"faithfulness[{method!r}] ({f.metric}) has {auc.numel()} images, the "
                f"attribution {n}: compute it on the same batch"
            )
        lines.append(
            f"{_text(f.metric, 16)} AUC {_auc(float(auc[i]))} (random {_auc(float(rnd[i]))})"
        )
    return lines


def attribution(
    results: Attribution | Sequence[Attribution],
    *,
    faithfulness: Mapping[str, Faithfulness | Sequence[Faithfulness]] | None = None,
    scale: Literal["figure", "method"] = "figure",
    images: Sequence[int] | None = None,
    titles: Sequence[str] | None = None,
    alpha: float = 0.7,
) -> Figure:
    """One row per image: the image, then each result's (method's) signed map drawn over a
    faded grey copy of it, red where the pixel raises the target and blue where it lowers it.

    The maps are signed and unscaled; display scaling is shared: one symmetric diverging
    scale ``[-vmax, vmax]`` over every map of the figure (``scale="figure"``, so the maps
    compare) or one per method column (``scale="method"``, for methods whose units differ),
    each with its colourbar. ``vmax`` is robust: the 99.5th percentile of ``|map|`` over the
    maps that share the scale (the maximum if that is 0, never 0); larger values saturate,
    and the colourbar's label gives the data's full range. CAM maps are drawn from ``.map``
    (already upsampled to the input).

    Each map's title: the method (and layer), the target's label (else the target), the
    score; for integrated gradients ``delta``; and, where ``faithfulness`` (keyed by method
    name) has results for the method, ``"deletion AUC 0.123 (random 0.301)"`` per metric.
    ``images``: which images of the batch to show (default: the first 8); ``titles``: one
    per shown image, above the image (default: ``"image i"``).

    Example:
        >>> ig = convlens.attribute(bundle, x, 258, method="integrated_gradients")
        >>> cam = convlens.attribute(bundle, x, 258, method="gradcam")
        >>> fig = convlens.plot.attribution([ig, cam], scale="method")
    """
    res: list[Attribution] = _as_list(results, Attribution, "results")
    if scale not in ("figure", "method"):
        raise ValueError(f"scale must be 'figure' or 'method', got {scale!r}")
    n = len(res[0])
    shape = tuple(res[0].map.shape)
    for r in res[1:]:
        if tuple(r.map.shape) != shape:
            raise ValueError(
                f"every result must cover the same images: maps {list(shape)} and "
                f"{list(r.map.shape)} ({r.method}); attribute the same batch with each method"
            )
    idx = list(range(min(n, _DEFAULT_IMAGES))) if images is None else [int(i) for i in images]
    if not idx or any(not -n <= i < n for i in idx):
        raise ValueError(f"images must be indices into the batch of {n}, got {idx}")
    idx = [i % n for i in idx]
    if titles is not None and len(titles) != len(idx):
        raise ValueError(f"give one title per shown image ({len(idx)}), got {len(titles)}")
    if faithfulness:
        methods = {r.method for r in res}
        unknown = [k for k in faithfulness if k not in methods]
        if unknown:
            raise ValueError(
                f"faithfulness has results for {unknown}, which the figure does not show "
                f"(methods: {sorted(methods)}); key it by method name"
            )

    shown = [[r.map[i] for i in idx] for r in res]
    if scale == "figure":
        v = _robust_vmax([m for col in shown for m in col])
        vmaxes = [v] * len(res)
    else:
        vmaxes = [_robust_vmax(col) for col in shown]

    pics = res[0].display_images()
    rows, cols = len(idx), 1 + len(res)
    extra = max(
        (
            2 + (r.delta is not None) + len(_faithfulness_lines(faithfulness, r.method, 0, n))
            for r in res
        ),
        default=2,
    )
    panel_h = 2.6 + 0.14 * extra
    fig = new_figure(
        2.7 * cols + (0.9 if scale == "figure" else 0),
        panel_h * rows + (0.9 if scale == "method" else 0) + (0.3 if res[0].model_name else 0),
        layout="constrained",
    )
    axes = fig.subplots(rows, cols, squeeze=False)
    mappables: list[Any] = [None] * len(res)
    for row, i in enumerate(idx):
        ax = axes[row, 0]
        show_image(ax, pics[i])
        title = _text(titles[row], 40) if titles is not None else f"image {i}"
        ax.set_title(title, fontsize=9, parse_math=False)
        grey = _grey(pics[i])
        for j, r in enumerate(res):
            ax = axes[row, j + 1]
            mappables[j] = _overlay(ax, grey, r.map[i], vmaxes[j], alpha)
            lines = [
                _method_name(r),
                f"target {_target_text(r, i)}, score {_fmt(float(r.score[i]))}",
            ]
            if r.delta is not None:
                lines.append(f"delta {float(r.delta[i]):.2g}")
            lines += _faithfulness_lines(faithfulness, r.method, i, n)
            ax.set_title("\n".join(lines), fontsize=8, parse_math=False)
    for ax in axes.flat:
        hide_ticks(ax)

    def _range(cols_: Sequence[int]) -> str:
        ms = [m for c in cols_ for m in shown[c]]
        lo = min(float(m.min()) for m in ms)
        hi = max(float(m.max()) for m in ms)
        return f"data {_fmt(lo)} .. {_fmt(hi)}"

    if scale == "figure":
        cb = fig.colorbar(
            mappables[0],
            ax=list(axes[:, 1:].flat),
            fraction=0.03,
            pad=0.02,
            extend="both",
            label=f"signed attribution, ±{_fmt(vmaxes[0])} (99.5th pct of |map|)\n"
            + _range(range(len(res))),
        )
        _ticks(cb, vmaxes[0], 5)
    else:
        for j in range(len(res)):
            cb = fig.colorbar(
                mappables[j],
                ax=list(axes[:, j + 1]),
                location="bottom",
                fraction=0.05 / rows,
                pad=0.02,
                extend="both",
                aspect=18,
            )
            cb.set_label(f"±{_fmt(vmaxes[j])}; {_range([j])}", fontsize=7)
            _ticks(cb, vmaxes[j], 3)
            cb.ax.tick_params(labelsize=7)
    if res[0].model_name:
        fig.suptitle(_text(res[0].model_name, 60), fontsize=10, parse_math=False)
    return fig


# ---------------------------------------------------------------- sanity


def _spread(n: int, k: int) -> list[int]:
    """At most ``k`` indices of ``range(n)`` spread evenly, the first and last included."""
    if n <= k:
        return list(range(n))
    return sorted({round(float(v)) for v in np.linspace(0, n - 1, k)})


def sanity(result: Sanity, *, index: int = 0) -> Figure:
    """Adebayo et al. (2018, Fig. 2) for one image: one row per method, the original map
    then the map after each randomized unit (in the order randomized, top-down; of more
    than 8 units a spread subset, the first and last always), and below, each method's
    Spearman rank correlation with the original map after each unit: signed maps solid,
    ``|map|`` dashed. A method that passes decorrelates (falls towards 0) as weights are
    randomized; one that stays near 1 shows the input more than the model.

    Each map is drawn on its own symmetric scale (``±`` the 99.5th percentile of its
    ``|map|``, in its title), since randomized weights change the maps' scale by orders of
    magnitude. ``index``: which image of the batch.

    Example:
        >>> s = convlens.sanity(bundle, x, 258, methods=("saliency", "guided_backprop"))
        >>> fig = convlens.plot.sanity(s)
    """
    if not isinstance(result, Sanity):
        raise TypeError(f"expected a Sanity (convlens.sanity), got {type(result).__name__}")
    units = [str(u) for u in result.units]
    methods = [str(m) for m in result.methods]
    if not methods or not units:
        raise ValueError("the sanity result has no methods or no randomized units to draw")
    n = int(result.maps[methods[0]].shape[1])
    if not -n <= index < n:
        raise ValueError(f"index must be an image of the batch of {n}, got {index}")
    cascade = bool(getattr(result, "cascade", True))
    cols = _spread(len(units), MAX_SANITY_COLUMNS)
    ncols, nrows = 1 + len(cols), len(methods)
    fig = new_figure(max(1.7 * ncols + 0.6, 7.0), 1.95 * nrows + 3.6, layout="constrained")
    grid = fig.add_gridspec(nrows + 1, ncols, height_ratios=[1.0] * nrows + [1.7])
    for r, method in enumerate(methods):
        maps = result.maps[method][:, index]
        if maps.shape[0] != len(units) + 1:
            raise ValueError(
                f"maps[{method!r}] has {maps.shape[0]} states, expected {len(units) + 1} "
                "(the original, then one per unit)"
            )
        for c, state in enumerate([0] + [u + 1 for u in cols]):
            ax = fig.add_subplot(grid[r, c])
            m = maps[state]
            v = _robust_vmax([m])
            ax.imshow(m.detach().float().cpu().numpy(), cmap=CMAP, vmin=-v, vmax=v)
            hide_ticks(ax)
            if state == 0:
                head = "original"
            else:
                unit = _text(units[state - 1], 18)
                head = f"to {unit}" if cascade else f"only {unit}"
            ax.set_title(
                (f"{head}\n" if r == 0 else "") + f"±{_fmt(v)}", fontsize=7, parse_math=False
            )
            if c == 0:
                ax.set_ylabel(_text(method, 24), fontsize=9, parse_math=False)

    ax = fig.add_subplot(grid[nrows, :])
    x = np.arange(len(units))
    colors = [f"C{k % 10}" for k in range(len(methods))]
    for method, color in zip(methods, colors):
        label = _text(method, 24)
        signed = result.correlation[method][:, index].detach().float().cpu().numpy()
        absolute = result.abs_correlation[method][:, index].detach().float().cpu().numpy()
        if signed.shape[0] != len(units) or absolute.shape[0] != len(units):
            raise ValueError(
                f"correlation[{method!r}] has {signed.shape[0]} rows and abs_correlation "
                f"{absolute.shape[0]}, expected one per unit ({len(units)})"
            )
        ax.plot(x, signed, "-o", color=color, ms=3, label=f"{label} (signed)")
        ax.plot(x, absolute, "--s", color=color, ms=3, alpha=0.8, label=f"{label} (|map|)")
    ax.axhline(0.0, color="0.4", lw=0.8)
    step = max(1, math.ceil(len(units) / 30))
    ax.set_xticks(x[::step], [_text(u, 24) for u in units[::step]], rotation=45, ha="right")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlim(-0.5, len(units) - 0.5)
    ax.set_ylim(-1.05, 1.05)
    how = (
        "cascading, top-down: each point randomizes every unit up to it"
        if cascade
        else ("independent: each unit randomized alone")
    )
    ax.set_xlabel(f"units randomized ({how})", fontsize=8)
    ax.set_ylabel("Spearman vs original", fontsize=8)
    ax.legend(fontsize=7, ncols=min(4, 2 * len(methods)), loc="best")
    ax.grid(alpha=0.3)
    name = _text(result.settings.get("model") or "", 40)
    target = result.target[index] if index < len(result.target) else ""
    fig.suptitle(
        (f"{name}: " if name else "")
        + f"model-parameter randomization, image {index}"
        + (f", target {_text(target, 24)}" if target else "")
        + "; each map on its own symmetric scale",
        fontsize=10,
        parse_math=False,
    )
    return fig


# ---------------------------------------------------------------- faithfulness


_WHAT = {
    "deletion": "most important pixels removed first; lower AUC is better",
    "insertion": "most important pixels restored first; higher AUC is better",
}


def faithfulness_curves(
    result: Faithfulness | Sequence[Faithfulness], *, index: int | None = None
) -> Figure:
    """The deletion / insertion curves (Petsiuk et al. 2018): the target's score against
    the fraction of pixels deleted or inserted in the attribution's order (solid), and in a
    random order measured in the same call (dashed, same colour), one panel per metric, the
    AUCs in the legend. ``index=None`` draws the mean over the batch's images (its AUC is
    the mean AUC); an int draws that image.

    Example:
        >>> a = convlens.attribute(bundle, x, 258)
        >>> f = [convlens.faithfulness(bundle, x, a, metric=m) for m in ("deletion", "insertion")]
        >>> fig = convlens.plot.faithfulness_curves(f)
    """
    res: list[Faithfulness] = _as_list(result, Faithfulness, "result")
    metrics: list[str] = []
    for f in res:
        if str(f.metric) not in metrics:
            metrics.append(str(f.metric))
    fig = new_figure(5.0 * len(metrics), 4.0, layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        group = [f for f in res if str(f.metric) == metric]
        for k, f in enumerate(group):
            n = int(f.curves.shape[0])
            if index is not None and not -n <= index < n:
                raise ValueError(f"index must be an image of the batch of {n}, got {index}")
            sel = slice(None) if index is None else slice(index % n, index % n + 1)
            curve = f.curves[sel].float().mean(0).cpu().numpy()
            rnd = f.random_curves[sel].float().mean(0).cpu().numpy()
            auc = float(f.auc[sel].float().mean())
            rauc = float(f.random_auc[sel].float().mean())
            fr = f.fractions.float().cpu().numpy()
            color = f"C{k % 10}"
            label = _text(getattr(f, "method", "") or "attribution", 30)
            ax.plot(fr, curve, "-", color=color, lw=1.8, label=f"{label}: AUC {_auc(auc)}")
            ax.plot(
                fr, rnd, "--", color=color, lw=1.2, alpha=0.8, label=f"random: AUC {_auc(rauc)}"
            )
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"fraction of pixels {'deleted' if metric == 'deletion' else 'inserted'}")
        ax.set_ylabel("target score (a class: its softmax probability)", fontsize=9)
        what = _WHAT.get(metric, "")
        ax.set_title(
            f"{_text(metric, 20)}" + (f"\n({what})" if what else ""), fontsize=9, parse_math=False
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    which = "mean over images" if index is None else f"image {index}"
    fig.suptitle(f"faithfulness ({which})", fontsize=10)
    return fig
