"""Deletion and insertion: does the target fall when the map's pixels go first?

RISE's causal metrics (Petsiuk et al., 2018; ``eclique/RISE`` ``evaluation.py``): order
the pixels by the map, most salient first, and change ``ceil(H * W / steps)`` of them per
step.

- **deletion** starts from the image and replaces pixels with zeros (in normalised space:
  the dataset's mean colour); a faithful map makes the score fall fast (a low AUC).
- **insertion** starts from a blurred copy (RISE's Gaussian, an 11 x 11 kernel with
  sigma 5, zero padding) and restores the image's pixels; a faithful map makes the score
  rise fast (a high AUC).

Each curve has ``steps + 1`` points (nothing changed, then after each step); its AUC is
RISE's trapezoid over ``[0, 1]``. A random pixel ordering, drawn from a seeded
``torch.Generator``, is measured in the same batched pass as the baseline a map must beat.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from convlens._io import versions
from convlens.analysis.attribution import _core
from convlens.capture import model_device
from convlens.device import DeviceLike, resolve_device
from convlens.models.forms import model_dtype
from convlens.models.layers import unwrap

__all__ = [
    "Faithfulness",
    "auc",
    "blur",
    "deletion_insertion",
    "faithfulness",
    "gaussian_kernel",
    "pixel_order",
]

Metric = Literal["deletion", "insertion"]
METRICS = ("deletion", "insertion")
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: RISE's blur for the insertion substrate: kernel side and sigma (pixels).
BLUR_SIZE = 11
BLUR_SIGMA = 5.0


# ------------------------------------------------------------------------ pure parts


def gaussian_kernel(size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """RISE's ``gkern(size, sigma)``: a ``[size, size]`` float32 kernel, exactly what
    ``scipy.ndimage.gaussian_filter`` makes of a centred delta (a normalised Gaussian of
    radius ``int(4 * sigma + 0.5)``, its tails folded back in by the ``"reflect"``
    boundary), computed here without scipy.

    Example:
        >>> k = gaussian_kernel(11, 5.0)
        >>> k.shape, round(float(k.sum()), 4)
        (torch.Size([11, 11]), 1.0)
    """
    if size < 1 or sigma <= 0:
        raise ValueError(f"the blur needs size >= 1 and sigma > 0, got {size} and {sigma}")
    radius = int(4.0 * sigma + 0.5)
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (d / sigma) ** 2)
    w = w / w.sum()
    centre = size // 2
    k1 = torch.zeros(size, dtype=torch.float64)
    for i in range(size):
        for j, wj in zip(range(i - radius, i + radius + 1), w.tolist(), strict=True):
            k1[i] += wj if _reflect(j, size) == centre else 0.0
    return torch.outer(k1, k1).float()


def _reflect(j: int, n: int) -> int:
    """scipy's ``mode="reflect"`` (``d c b a | a b c d | d c b a``) index into ``[0, n)``."""
    period = 2 * n
    j %= period
    return j if j < n else period - 1 - j


def blur(x: torch.Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """RISE's insertion substrate: each channel of ``x [N, C, H, W]`` convolved with
    :func:`gaussian_kernel` under zero padding (RISE's ``conv2d(x, kern, padding=klen//2)``).

    Example:
        >>> blur(torch.ones(1, 3, 32, 32))[0, 0, 16, 16].item()  # the interior keeps its value
        1.0
    """
    c = x.shape[1]
    k = gaussian_kernel(size, sigma).to(device=x.device, dtype=x.dtype)
    weight = k.expand(c, 1, size, size).contiguous()
    return F.conv2d(x, weight, padding=size // 2, groups=c)


def pixel_order(saliency: torch.Tensor) -> torch.Tensor:
    """Pixel indices (row-major, ``[N, H * W]``) from most to least salient; equal values
    keep their index order (a stable sort), so ``0`` goes before ``1`` on a tie.

    Example:
        >>> pixel_order(torch.tensor([[[0.1, 0.4], [0.4, 0.2]]])).tolist()
        [[1, 2, 3, 0]]
    """
    flat = saliency.detach().reshape(saliency.shape[0], -1).float().cpu()
    if not torch.isfinite(flat).all():
        raise ValueError("the saliency map holds NaN or inf values: pass a finite map")
    return torch.sort(flat, dim=1, descending=True, stable=True).indices


def auc(curve: torch.Tensor) -> torch.Tensor:
    """The area under ``curve [..., K]`` by the trapezoid rule over ``[0, 1]`` (equal
    spacing), RISE's ``(sum - first / 2 - last / 2) / (K - 1)``.

    Example:
        >>> float(auc(torch.tensor([10.0, 8.0, 5.0, 1.0, 0.0])))
        4.75
    """
    if curve.shape[-1] < 2:
        raise ValueError(f"a curve needs at least 2 points for an AUC, got {curve.shape[-1]}")
    c = curve.double()
    area = (c.sum(-1) - c[..., 0] / 2 - c[..., -1] / 2) / (c.shape[-1] - 1)
    return area.to(curve.dtype if curve.is_floating_point() else torch.float32)


def _per_step(hw: int, steps: int) -> int:
    return math.ceil(hw / steps)


def _fractions(hw: int, steps: int) -> torch.Tensor:
    """The fraction of the pixels changed after each step (``0`` first, ``1`` last)."""
    per = _per_step(hw, steps)
    changed = torch.clamp(torch.arange(steps + 1) * per, max=hw)
    return changed.double().div(hw).float()


def _curves(
    score_fn: ScoreFn,
    start: torch.Tensor,
    finish: torch.Tensor,
    orders: torch.Tensor,
    image: torch.Tensor,
    steps: int,
    batch: int,
) -> torch.Tensor:
    """``[M, steps + 1]`` scores: row ``m`` walks image ``image[m]`` from ``start`` to
    ``finish`` in the pixel order ``orders[m]``; every (order, step) pair is one row of a
    batched forward of ``batch`` rows."""
    h, w = start.shape[2:]
    hw = h * w
    m = orders.shape[0]
    per = _per_step(hw, steps)
    dev = start.device
    # rank[m, p]: where pixel p comes in order m
    ranks = torch.empty_like(orders)
    ranks.scatter_(1, orders, torch.arange(hw).expand(m, hw).contiguous())
    ranks = ranks.to(dev)
    image = image.to(dev)
    total = m * (steps + 1)
    out = torch.empty(total, dtype=torch.float32)
    with torch.no_grad():
        for lo in range(0, total, batch):
            r = torch.arange(lo, min(lo + batch, total), device=dev)
            which, k = r // (steps + 1), r % (steps + 1)
            img = image[which]
            changed = ranks[which] < torch.clamp(k * per, max=hw).unsqueeze(1)
            mask = changed.view(-1, 1, h, w)
            xb = torch.where(mask, finish[img], start[img])
            scores = score_fn(xb, img)
            if scores.shape != (r.numel(),):
                raise ValueError(
                    f"the score function returned shape {list(scores.shape)} for "
                    f"{r.numel()} inputs: it must return one score per input"
                )
            out[lo : lo + r.numel()] = scores.detach().float().cpu()
    return out.view(m, steps + 1)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use 'deletion' or 'insertion'")


def _check_batch(batch: object) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1 or 'auto', got {batch!r}")


def _start_finish(
    x: torch.Tensor, substrate: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if substrate.shape != x.shape:
        raise ValueError(
            f"the substrate has shape {list(substrate.shape)}, the input {list(x.shape)}: "
            "pass one substrate image per input"
        )
    substrate = substrate.to(device=x.device, dtype=x.dtype)
    return (x, substrate) if metric == "deletion" else (substrate, x)


def deletion_insertion(
    score_fn: ScoreFn,
    x: torch.Tensor,
    saliency: torch.Tensor,
    *,
    metric: Metric,
    steps: int = 50,
    batch: int,
    substrate: torch.Tensor,
) -> torch.Tensor:
    """RISE's deletion or insertion curves ``[N, steps + 1]`` of ``score_fn``.

    ``score_fn(xb [B, C, H, W], rows LongTensor[B]) -> Tensor[B]`` scores perturbed
    inputs, ``rows[b]`` naming the image ``xb[b]`` came from. Pixels go in the order of
    ``saliency [N, H, W]`` (descending, ties by index), ``ceil(H * W / steps)`` per step
    (all channels of a pixel together): ``"deletion"`` walks from ``x`` to ``substrate``,
    ``"insertion"`` from ``substrate`` to ``x``. Point ``k`` is the score with
    ``min(k * ceil(H * W / steps), H * W)`` pixels changed; all steps of all images run
    batched, ``batch`` inputs per call, without gradients.

    Example:
        >>> score = lambda xb, rows: xb.sum(dim=(1, 2, 3))
        >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        >>> s = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])
        >>> deletion_insertion(score, x, s, metric="deletion", steps=4, batch=8,
        ...                    substrate=torch.zeros_like(x)).tolist()
        [[10.0, 8.0, 5.0, 1.0, 0.0]]
    """
    _check_metric(metric)
    _check_steps(steps)
    _check_batch(batch)
    if x.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W], got shape {list(x.shape)}")
    if saliency.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"the saliency map has shape {list(saliency.shape)} for inputs "
            f"{list(x.shape)}: pass one [H, W] map per image ([N, H, W])"
        )
    start, finish = _start_finish(x, substrate, metric)
    orders = pixel_order(saliency)
    return _curves(score_fn, start, finish, orders, torch.arange(x.shape[0]), steps, batch)


# ------------------------------------------------------------------------ result


@dataclass(frozen=True, eq=False)
class Faithfulness:
    """Deletion or insertion curves of an attribution, beside a random ordering's.

    - ``metric``: ``"deletion"`` (lower AUC is better) or ``"insertion"`` (higher is
      better).
    - ``curves`` ``[N, steps + 1]``: the target's score (a class's softmax probability, a
      unit's value) as the map's pixels are changed, most salient first; ``auc`` ``[N]``
      their areas over ``[0, 1]``.
    - ``random_curves`` / ``random_auc``: the same for a random pixel order (seeded).
    - ``fractions`` ``[steps + 1]``: the fraction of pixels changed at each point (the x
      axis).
    - ``target``, ``method``: the attribution's; ``settings``: steps, pixels per step,
      substrate, seed, batch.

    Example:
        >>> f = convlens.faithfulness(bundle, x, convlens.attribute(bundle, x), steps=20)
        >>> bool(f.auc.mean() < f.random_auc.mean())  # deletion: a good map drops faster
        True
    """

    metric: str
    curves: torch.Tensor = field(repr=False)
    auc: torch.Tensor
    random_curves: torch.Tensor = field(repr=False)
    random_auc: torch.Tensor
    fractions: torch.Tensor = field(repr=False)
    target: tuple[str, ...] = ()
    method: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.curves.shape[0])

    def __repr__(self) -> str:
        return (
            f"Faithfulness(metric={self.metric!r}, method={self.method!r}, images={len(self)}, "
            f"steps={self.curves.shape[1] - 1}, auc={float(self.auc.mean()):.4g}, "
            f"random_auc={float(self.random_auc.mean()):.4g})"
        )

    def _repr_html_(self) -> str:
        from convlens._notebook import faithfulness

        return faithfulness(self)

    def to_dict(self) -> dict[str, Any]:
        """The numbers (per image: target, AUC, random AUC, both curves), the x axis and
        the settings, for JSON.

        Example:
            >>> f.to_dict()["images"][0]["auc"]
            0.123
        """
        images = [
            {
                "target": self.target[i] if i < len(self.target) else None,
                "auc": float(self.auc[i]),
                "random_auc": float(self.random_auc[i]),
                "curve": [float(v) for v in self.curves[i]],
                "random_curve": [float(v) for v in self.random_curves[i]],
            }
            for i in range(len(self))
        ]
        return {
            "metric": self.metric,
            "method": self.method,
            "mean_auc": float(self.auc.mean()) if len(self) else None,
            "mean_random_auc": float(self.random_auc.mean()) if len(self) else None,
            "fractions": [float(v) for v in self.fractions],
            "images": images,
            "settings": self.settings,
            "versions": versions(),
        }


# ------------------------------------------------------------------------ public


def faithfulness(
    model: Any,
    x: torch.Tensor,
    attribution: Any,
    *,
    metric: Metric = "deletion",
    steps: int = 50,
    batch: int | str = "auto",
    seed: int = 0,
    device: DeviceLike | None = None,
) -> Faithfulness:
    """RISE's deletion or insertion test of ``attribution`` (from
    :func:`convlens.attribute`) on the images ``x`` it explains.

    The score is the attribution's target on each image: a class's softmax probability,
    or a unit's value for ``"layer:channel"`` targets (the output picked by the
    attribution's ``output`` setting). ``metric="deletion"`` replaces the most salient
    pixels with zeros (the mean colour after normalisation) first; ``"insertion"`` restores
    them onto RISE's blurred copy (11 x 11, sigma 5). ``steps`` steps change
    ``ceil(H * W / steps)`` pixels each. A random order drawn from
    ``torch.Generator().manual_seed(seed)`` is measured in the same pass. ``batch`` inputs
    per forward (``"auto"``: sized from the device's memory).

    Example:
        >>> a = convlens.attribute(bundle, x, method="integrated_gradients")
        >>> f = convlens.faithfulness(bundle, x, a, metric="deletion", steps=50)
        >>> f.curves.shape, f.auc.shape
        (torch.Size([1, 51]), torch.Size([1]))
    """
    _check_metric(metric)
    _check_steps(steps)
    if batch != "auto":
        _check_batch(batch)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    saliency = getattr(attribution, "map", None)
    targets = getattr(attribution, "target", None)
    if not isinstance(saliency, torch.Tensor) or targets is None:
        raise TypeError(
            f"attribution must be an Attribution (from convlens.attribute), "
            f"got {type(attribution).__name__}"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor [N, C, H, W], got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"x must be [N, C, H, W] or [C, H, W], got shape {list(x.shape)}")
    if saliency.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"the attribution's map is {list(saliency.shape)} but x is {list(x.shape)}: "
            "pass the images the attribution was computed on"
        )
    targets = tuple(str(t) for t in targets)
    if len(targets) != x.shape[0]:
        raise ValueError(
            f"the attribution has {len(targets)} targets for {x.shape[0]} images: "
            "pass the images the attribution was computed on"
        )
    if "callable" in targets:
        raise ValueError(
            "a callable target cannot be re-scored: attribute a class index or "
            "'layer:channel' to measure faithfulness"
        )
    settings_in = getattr(attribution, "settings", None) or {}
    output = settings_in.get("output")
    from convlens.models.zoo import model_and_bundle

    net = unwrap(model_and_bundle(model)[0])
    dev = resolve_device(device) if device is not None else model_device(net)
    n, _c, h, w = x.shape
    hw = h * w
    xd = x.detach().to(dev)
    if not xd.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    substrate = torch.zeros_like(xd) if metric == "deletion" else blur(xd)
    start, finish = _start_finish(xd, substrate, metric)

    g = torch.Generator().manual_seed(seed)
    random_orders = torch.stack([torch.randperm(hw, generator=g) for _ in range(n)])
    orders = torch.cat([pixel_order(saliency), random_orders.view(n, hw)])
    image = torch.arange(n).repeat(2)
    total = 2 * n * (steps + 1)

    def per_row() -> float:
        try:
            return _core.row_bytes(net, tuple(xd.shape[1:]), model_dtype(net))
        except Exception:  # a model the meta trace cannot run: a generous guess
            return 64.0 * xd[0].numel() * xd.element_size()

    rows = _core.batch_rows(batch, total, per_row, dev)
    score_fn = _core.score_function(model, targets, output=output, probability=True, device=device)
    both = _curves(score_fn, start, finish, orders, image, steps, rows)
    curves, random_curves = both[:n], both[n:]
    settings = {
        "steps": steps,
        "pixels_per_step": _per_step(hw, steps),
        "substrate": "zeros" if metric == "deletion" else f"blur({BLUR_SIZE}, {BLUR_SIGMA})",
        "score": "probability of a class, value of a unit",
        "order": "saliency descending, ties by pixel index",
        "seed": seed,
        "batch": rows,
        "output": output,
        "device": str(dev),
    }
    return Faithfulness(
        metric=metric,
        curves=curves,
        auc=auc(curves),
        random_curves=random_curves,
        random_auc=auc(random_curves),
        fractions=_fractions(hw, steps),
        target=targets,
        method=str(getattr(attribution, "method", "")),
        settings=settings,
    )
