"""How results show themselves in Jupyter: ``_repr_html_`` bodies and their small figures.

Every result class's ``_repr_html_`` calls one function here. The figures are PNGs drawn
with PIL straight from the tensors (no matplotlib, so importing a compute module stays
light) and embedded as ``data:`` URIs; every name that comes from a model, a dataset or a
user (labels, layer names, class names, objectives) is escaped with :func:`html.escape`.

Example:
    >>> import torch
    >>> from convlens._notebook import esc, png_uri
    >>> esc("<script>")
    '&lt;script&gt;'
    >>> png_uri(torch.rand(3, 8, 8)).startswith("data:image/png;base64,")
    True
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

# A figure's longest side on the page, in CSS pixels (the PNG keeps its own resolution).
THUMB = 96
_MAX_IMAGES = 12  # images drawn per result; the table still lists them all (up to _MAX_ROWS)
_MAX_ROWS = 24


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML (element content and quoted attributes).

    Example:
        >>> esc('a "<b>"')
        'a &quot;&lt;b&gt;&quot;'
    """
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 4) -> str:
    """A number as a short string (``4`` significant digits; ``-`` for ``None``/NaN).

    Example:
        >>> num(0.123456), num(None), num(float("nan"))
        ('0.1235', '-', '-')
    """
    if value is None:
        return "-"
    if isinstance(value, torch.Tensor):
        value = float(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return "-"
    return f"{v:.{digits}g}"


# ------------------------------------------------------------------------ pixels


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` or ``[H, W]`` in ``[0, 1]`` -> ``[H, W, 3]`` (or ``[H, W]``) uint8."""
    t = img.detach().float().cpu()
    if t.ndim == 3:
        c = t.shape[0]
        if c == 1:
            t = t[0]
        elif c == 2:
            t = torch.cat([t, t[:1]], 0).permute(1, 2, 0)
        else:
            t = t[:3].permute(1, 2, 0)
    arr = (t.nan_to_num(0.0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return np.ascontiguousarray(arr)


def png_uri(img: torch.Tensor, size: int | None = None) -> str:
    """An image ``[C, H, W]``/``[H, W]`` in ``[0, 1]`` as a ``data:image/png`` URI,
    resized (nearest) so its longest side is ``size`` when given.

    Example:
        >>> png_uri(torch.zeros(1, 4, 4))[:22]
        'data:image/png;base64,'
    """
    from PIL import Image

    pil = Image.fromarray(_to_uint8(img))
    if size is not None and max(pil.size) != size:
        w, h = pil.size
        s = size / max(w, h)
        pil = pil.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(uri: str, title: str = "", width: int = THUMB) -> str:
    """An ``<img>`` of a data URI with an escaped ``title``/``alt``."""
    t = esc(title)
    return f'<img src="{uri}" width="{width}" alt="{t}" title="{t}" style="margin:1px">'


def signed(m: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """A signed map ``[H, W]`` as RGB ``[3, H, W]``: blue below zero, white at zero, red
    above, on the symmetric scale ``scale`` (default the map's largest ``|value|``).

    Example:
        >>> signed(torch.tensor([[-1.0, 0.0, 1.0]]))[:, 0, :].tolist()
        [[0.0, 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    """
    m = m.detach().float().cpu().nan_to_num(0.0)
    s = scale if scale is not None else float(m.abs().max())
    v = (m / s).clamp(-1, 1) if s > 0 else torch.zeros_like(m)
    pos, neg = v.clamp(min=0), (-v).clamp(min=0)
    return torch.stack([1 - neg, 1 - pos - neg, 1 - pos])


def heat(m: torch.Tensor) -> torch.Tensor:
    """A map ``[H, W]`` scaled to its own range, as RGB ``[3, H, W]`` (dark blue low,
    yellow high).

    Example:
        >>> heat(torch.tensor([[0.0, 1.0]])).shape
        torch.Size([3, 1, 2])
    """
    m = m.detach().float().cpu().nan_to_num(0.0)
    lo, hi = float(m.min()), float(m.max())
    v = (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
    stops = torch.tensor(
        [[0.07, 0.04, 0.3], [0.2, 0.45, 0.55], [0.35, 0.75, 0.35], [0.99, 0.9, 0.15]]
    )
    pos = v * (len(stops) - 1)
    i = pos.floor().clamp(max=len(stops) - 2).long()
    f = (pos - i).unsqueeze(0)
    return stops[i].permute(2, 0, 1) * (1 - f) + stops[i + 1].permute(2, 0, 1) * f


def lines(series: Sequence[Sequence[float]], width: int = 200, height: int = 110) -> str:
    """Line charts of ``series`` on one axis (white ground, colours in order: blue,
    orange, green, red) as a PNG data URI; NaNs are skipped.

    Example:
        >>> lines([[0.1, 0.5, 0.9]])[:22]
        'data:image/png;base64,'
    """
    from PIL import Image, ImageDraw

    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    vals = [float(v) for s in series for v in s if not math.isnan(float(v))]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 6
    d.rectangle([0, 0, width - 1, height - 1], outline=(200, 200, 200))
    for k, s in enumerate(series):
        pts = []
        n = max(len(s) - 1, 1)
        for i, v in enumerate(s):
            if math.isnan(float(v)):
                continue
            x = pad + (width - 2 * pad) * i / n
            y = height - pad - (height - 2 * pad) * (float(v) - lo) / (hi - lo)
            pts.append((x, y))
        colour = colours[k % len(colours)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts if len(pts) <= 30 else ():
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def bars(values: Sequence[float], width: int = 240, height: int = 70) -> str:
    """A bar chart of ``values`` (one bar each, zero line drawn) as a PNG data URI.

    Example:
        >>> bars([1.0, -0.5, 2.0])[:22]
        'data:image/png;base64,'
    """
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    vals = [0.0 if math.isnan(float(v)) else float(v) for v in values] or [0.0]
    lo, hi = min(0.0, *vals), max(0.0, *vals)
    if hi - lo < 1e-12:
        hi = lo + 1.0
    zero = height - 2 - (height - 4) * (0 - lo) / (hi - lo)
    w = (width - 4) / len(vals)
    for i, v in enumerate(vals):
        y = height - 2 - (height - 4) * (v - lo) / (hi - lo)
        x0 = 2 + i * w
        d.rectangle(
            [x0, min(y, zero), x0 + max(w - 1, 1), max(y, zero)],
            fill=(31, 119, 180) if v >= 0 else (214, 39, 40),
        )
    d.line([(0, zero), (width, zero)], fill=(120, 120, 120))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ------------------------------------------------------------------------ layout


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], limit: int = _MAX_ROWS) -> str:
    """An HTML table; every cell escaped; at most ``limit`` rows (a last row says how
    many were left out)."""
    rows = list(rows)
    head = "".join(f"<th style='text-align:left'>{esc(h)}</th>" for h in header)
    body = []
    for r in rows[:limit]:
        body.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>")
    if len(rows) > limit:
        body.append(f"<tr><td colspan='{len(header)}'>... {len(rows) - limit} more</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def facts(items: Mapping[str, Any]) -> str:
    """``name: value`` pairs as one line of escaped text."""
    return " &middot; ".join(f"<b>{esc(k)}</b> {esc(v)}" for k, v in items.items())


def card(title: str, line: str, figures: str = "", tables: str = "") -> str:
    """The box every result is drawn in: an escaped ``title``, a ``line`` of facts
    (already HTML), then figures and tables (already HTML)."""
    fig = f"<div>{figures}</div>" if figures else ""
    return (
        "<div class='convlens-result' style='border:1px solid #ccc;padding:6px;"
        "font-family:sans-serif;font-size:12px'>"
        f"<div><b>{esc(title)}</b></div><div>{line}</div>{fig}{tables}</div>"
    )


def _labelled(uri: str, caption: str, width: int = THUMB) -> str:
    return (
        "<figure style='display:inline-block;margin:2px;text-align:center'>"
        f"{img(uri, caption, width)}<figcaption>{esc(caption)}</figcaption></figure>"
    )


# ------------------------------------------------------------------------ per result


def render_result(r: Any) -> str:
    """The ``_repr_html_`` of :class:`convlens.RenderResult`."""
    n = int(r.images.shape[0])
    labels = list(r.labels) or [f"#{i}" for i in range(n)]
    final = r.values[-1]
    figs = "".join(
        _labelled(png_uri(r.images[i]), f"{labels[i]}: {num(final[i], 3)}")
        for i in range(min(n, _MAX_IMAGES))
    )
    line = facts(
        {
            "objective": r.objective,
            "images": f"{n} x {tuple(r.images.shape[1:])}",
            "steps": r.thresholds[-1],
            "seconds": num(r.times[-1] if r.times else None, 3),
            "seed": r.settings.get("seed", "-"),
        }
    )
    rows = [(labels[i], *(num(r.values[t, i]) for t in range(len(r.thresholds)))) for i in range(n)]
    head = ["image", *(f"value @ {t}" for t in r.thresholds)]
    return card("RenderResult", line, figs, table(head, rows))


def sensitivity_result(r: Any) -> str:
    """The ``_repr_html_`` of :class:`convlens.SensitivityResult`."""
    i, j = divmod(int(r.map.argmax()), r.map.shape[1])
    target = r.target if r.target_label is None else f"{r.target} ({r.target_label})"
    line = facts(
        {
            "model": r.model_name or "-",
            "target": target,
            "score": num(r.score),
            "largest drop": f"{num(r.map[i, j])} at window top {r.ys[i]}, left {r.xs[j]}",
            "window": f"{r.window[0]}x{r.window[1]}",
            "stride": f"{r.stride[0]}x{r.stride[1]}",
            "fill": r.fill,
        }
    )
    figs = _labelled(png_uri(r.display_image()), "input", 128) + _labelled(
        png_uri(signed(r.map), 128), "drop per window (red: hiding it lowers the target)", 128
    )
    return card("SensitivityResult", line, figs)


def occlusion_result(r: Any) -> str:
    """The ``_repr_html_`` of :class:`convlens.OcclusionResult`."""
    orig, occl = r.display_images()
    figs = _labelled(png_uri(orig), "input") + _labelled(png_uri(occl), "occluded")
    for name, ch in list(r.layers.items())[:_MAX_IMAGES]:
        figs += _labelled(png_uri(heat(ch.diff), THUMB), f"{name}: change")
    rows = []
    for name, ch in r.layers.items():
        conc = ch.inside_fraction / ch.area_fraction if ch.area_fraction else float("nan")
        rows.append((name, num(ch.inside_fraction), num(ch.area_fraction), num(conc)))
    t, b, lft, rgt = r.box
    line = facts({"model": r.model_name or "-", "box": f"rows {t}-{b}, cols {lft}-{rgt}"})
    line += facts({"fill": r.fill}) if r.fill else ""
    head = ["layer", "inside_fraction", "area_fraction", "concentration"]
    return card("OcclusionResult", line, figs, table(head, rows))


def attribution(a: Any) -> str:
    """The ``_repr_html_`` of :class:`convlens.Attribution`."""
    n = len(a)
    pics = a.display_images()
    scale = float(a.map.abs().max()) or 1.0
    figs = ""
    for i in range(min(n, _MAX_IMAGES // 2)):
        lab = a.labels[i] if i < len(a.labels) and a.labels[i] else a.target[i]
        figs += _labelled(png_uri(pics[i]), f"{lab}") + _labelled(
            png_uri(signed(a.map[i], scale), pics.shape[-1]), f"{a.method}"
        )
    rows = []
    for i in range(n):
        rows.append(
            (
                i,
                a.target[i],
                a.labels[i] if i < len(a.labels) and a.labels[i] is not None else "-",
                num(a.score[i]),
                num(a.map[i].double().sum()),
                num(a.delta[i]) if a.delta is not None else "-",
            )
        )
    line = facts(
        {
            "method": a.method,
            "model": a.model_name or "-",
            "images": n,
            "map": "x".join(str(s) for s in a.map.shape[1:]),
            **({"layer": a.layer} if a.layer else {}),
            "scale": f"±{num(scale, 3)} (red raises the target)",
        }
    )
    head = ["image", "target", "label", "score", "map sum", "delta"]
    return card("Attribution", line, figs, table(head, rows))


def sanity(s: Any) -> str:
    """The ``_repr_html_`` of :class:`convlens.Sanity`."""
    figs = ""
    for m in s.methods[:4]:
        maps = s.maps[m][:, 0]
        scale = float(maps[0].abs().max()) or 1.0
        for k in range(min(len(maps), 8)):
            cap = f"{m}: original" if k == 0 else f"{m}: {s.units[k - 1]}"
            figs += _labelled(png_uri(signed(maps[k], scale), 64), cap, 64)
        figs += "<br>"
    rows = []
    for k, u in enumerate(s.units):
        rows.append((u, *(num(s.abs_correlation[m][k].nanmean()) for m in s.methods)))
    line = facts(
        {
            "units": len(s.units),
            "cascade": s.cascade,
            "target": ", ".join(s.target[:4]) + (" ..." if len(s.target) > 4 else ""),
        }
    )
    head = ["randomized", *(f"{m} |map| rho" for m in s.methods)]
    note = "<div>near 1 all the way down: the map does not depend on the weights</div>"
    return card("Sanity", line, figs, note + table(head, rows))


def faithfulness(f: Any) -> str:
    """The ``_repr_html_`` of :class:`convlens.Faithfulness`."""
    uri = lines([f.curves.float().mean(0).tolist(), f.random_curves.float().mean(0).tolist()])
    figs = _labelled(uri, "mean curve (blue: the map's order, orange: random)", 200)
    rows = [
        (i, f.target[i] if i < len(f.target) else "-", num(f.auc[i]), num(f.random_auc[i]))
        for i in range(len(f))
    ]
    better = "lower" if f.metric == "deletion" else "higher"
    line = facts(
        {
            "metric": f.metric,
            "method": f.method or "-",
            "auc": num(f.auc.mean()),
            "random auc": num(f.random_auc.mean()),
            "better": better,
        }
    )
    return card("Faithfulness", line, figs, table(["image", "target", "auc", "random auc"], rows))


def dataset_examples(r: Any) -> str:
    """The ``_repr_html_`` of :class:`convlens.DatasetExamples`."""
    figs, rows = "", []
    for name, le in r.layers.items():
        tops = le.top_scores[:, 0].float()
        figs += _labelled(bars(tops.tolist()), f"{name}: top score per channel", 240)
        for row, ch in enumerate(le.channels):
            best = r.top(name, ch)[:1]
            lab = "-"
            if best and best[0].label is not None and r.classes:
                lab = r.classes[best[0].label]
            st = r.stats(name, ch)
            rows.append(
                (name, ch, num(tops[row]), best[0].index if best else "-", lab, num(st.mean))
            )
    line = facts(
        {
            "model": r.model_name or "-",
            "dataset": r.dataset,
            "images": r.length,
            "k": r.k,
            "reduce": r.reduce,
            "layers": ", ".join(f"{n} ({len(le.channels)} ch)" for n, le in r.layers.items()),
        }
    )
    head = ["layer", "channel", "top score", "top image", "its class", "mean"]
    return card("DatasetExamples", line, figs, table(head, rows))


def eval_result(e: Any, classes: Sequence[str] | None = None) -> str:
    """The ``_repr_html_`` of :class:`convlens.train.EvalResult`."""
    names = list(classes) if classes else [str(i) for i in range(len(e.per_class_accuracy))]
    conf = e.confusion.float()
    norm = conf / conf.sum(1, keepdim=True).clamp_min(1)
    figs = _labelled(png_uri(heat(norm), 96), "confusion (rows: true class)")
    rows = [(n, num(a)) for n, a in zip(names, e.per_class_accuracy)]
    line = facts({"accuracy": num(e.accuracy), "loss": num(e.loss), "images": e.labels.numel()})
    return card("EvalResult", line, figs, table(["class", "accuracy"], rows))


def train_result(r: Any) -> str:
    """The ``_repr_html_`` of :class:`convlens.TrainResult`."""
    hist = r.history
    loss = [float(h.get("train_loss", float("nan"))) for h in hist]
    acc = [float(h.get("val_accuracy", float("nan"))) for h in hist]
    figs = _labelled(lines([loss]), "train loss per epoch", 200)
    if any(not math.isnan(a) for a in acc):
        figs += _labelled(lines([acc]), "val accuracy per epoch", 200)
    for name, w in (("conv1 before", r.conv1_before), ("conv1 after", r.conv1_after)):
        if w is not None and w.ndim == 4:
            figs += _labelled(png_uri(_filter_grid(w), 160), name, 160)
    if r.final is not None:
        figs += _labelled(png_uri(heat(_row_norm(r.final.confusion)), 96), "confusion")
    line = facts(
        {
            "val accuracy": num(r.val_accuracy),
            "epochs": len(hist),
            "classes": len(r.classes),
            "seconds": num(r.train_seconds, 3),
            "images/s": num(r.images_per_s, 3),
            "out": r.out if r.out is not None else "-",
        }
    )
    rows: list[tuple[Any, ...]] = []
    if r.final is not None:
        rows = [(c, num(a)) for c, a in zip(r.classes, r.final.per_class_accuracy)]
    tab = table(["class", "val accuracy"], rows) if rows else ""
    return card("TrainResult", line, figs, tab)


def _row_norm(conf: torch.Tensor) -> torch.Tensor:
    c = conf.float()
    return c / c.sum(1, keepdim=True).clamp_min(1)


def _filter_grid(w: torch.Tensor, cols: int = 8) -> torch.Tensor:
    """First-layer kernels ``[K, C, h, w]`` tiled into one ``[C', H, W]`` image, each
    kernel scaled to its own range."""
    w = w.detach().float().cpu()[:32]
    k, c, h, wd = w.shape
    c = 3 if c >= 3 else 1
    w = w[:, :c]
    lo = w.amin(dim=(1, 2, 3), keepdim=True)
    hi = w.amax(dim=(1, 2, 3), keepdim=True)
    w = (w - lo) / (hi - lo).clamp_min(1e-8)
    rows = math.ceil(k / cols)
    out = torch.ones(c, rows * (h + 1), cols * (wd + 1))
    for i in range(k):
        y, x = divmod(i, cols)
        out[:, y * (h + 1) : y * (h + 1) + h, x * (wd + 1) : x * (wd + 1) + wd] = w[i]
    return out


def depth_maps(d: Any) -> str:
    """The ``_repr_html_`` of :class:`convlens.analysis.depth.DepthMaps`."""
    figs = _labelled(png_uri(d.image), "input")
    for name in d.layers:
        c, h, w = d.shapes[name]
        figs += _labelled(png_uri(heat(d.maps[name]), THUMB), f"{name} ({c}x{h}x{w})")
    return card("DepthMaps", facts({"model": d.model, "relu": d.relu}), figs)


def selectivity_table(t: Any) -> str:
    """The ``_repr_html_`` of :class:`convlens.analysis.filters.SelectivityTable`."""
    figs = _labelled(png_uri(heat(t.peak), 160), "peak (rows: images, columns: kernels)", 160)
    rows = [
        (im, t.best_kernel(im), *(num(v, 3) for v in t.peak[i])) for i, im in enumerate(t.images)
    ]
    line = facts(
        {"images": len(t.images), "kernels": len(t.kernels), "ignore_border": t.ignore_border}
    )
    return card("SelectivityTable", line, figs, table(["image", "best", *t.kernels], rows))
