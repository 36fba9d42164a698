"""Gradient attribution: saliency, input x gradient, integrated gradients, guided
backpropagation, each optionally averaged over SmoothGrad noise.

Every method is one accumulation over *rows*: an image (or a point on its integration
path, or a noisy copy) fed to the model, the target's gradient with respect to it taken
by ``torch.autograd.grad`` and added, weighted, into its image's sum. Rows are made batch
by batch, so memory is one batch whatever the number of steps and samples.

Integrated gradients (Sundararajan et al. 2017) integrate the gradient along the straight
path from a baseline to the input; Gauss-Legendre quadrature (Captum's default) or the
trapezoid rule. Completeness says the attribution sums to ``f(x) - f(baseline)``; the
difference is ``delta``, reported per image.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from convlens.analysis.attribution._core import Scorer

__all__ = ["PIXEL_METHODS", "accumulate", "ig_points", "noise_for", "path_rows"]

PIXEL_METHODS = ("saliency", "input_x_gradient", "integrated_gradients", "guided_backprop")
IG_RULES = ("gausslegendre", "riemann_trapezoid")


def _check_points(steps: int, rule: str) -> None:
    """Refuse, before numpy allocates it, a number of points the machine cannot hold:
    Gauss-Legendre's nodes come from the eigenvalues of a ``steps x steps`` matrix
    (numpy's ``leggauss``: ``8 steps^2`` bytes at least, and ``steps^3`` time); the
    trapezoid's are two ``steps``-long float64 vectors."""
    if steps <= 1000:
        return
    from convlens._memory import available_memory, format_bytes
    from convlens.errors import ResourceError

    free = available_memory(torch.device("cpu"))
    if rule == "gausslegendre":
        need = 8.0 * steps * steps
        most = math.isqrt(int(free // 8))
        what = f"Gauss-Legendre's {steps} x {steps} matrix"
    else:
        need = 16.0 * steps
        most = int(free // 16)
        what = f"{steps} trapezoid points"
    if need > free:
        raise ResourceError(
            f"steps {steps}: {what} needs at least {format_bytes(need)}; this machine has "
            f"{format_bytes(free)} available: use steps <= {most} (50 to a few hundred is "
            "usual; Gauss-Legendre's nodes take ~steps^3 time)"
        )


def ig_points(steps: int, rule: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """``(alphas, weights)`` of the integral over ``[0, 1]``: Gauss-Legendre nodes and
    weights (exact for polynomials of degree ``2 * steps - 1``), or the trapezoid rule on
    ``steps`` equally spaced points (both ends included), as Captum places them.

    Example:
        >>> ig_points(3, "riemann_trapezoid")
        (tensor([0.0000, 0.5000, 1.0000], dtype=torch.float64), tensor([0.2500, 0.5000, 0.2500], dtype=torch.float64))
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    _check_points(steps, rule)
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((nodes + 1) / 2), torch.from_numpy(weights / 2)
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs at least 2 steps")
        alphas = torch.linspace(0, 1, steps, dtype=torch.float64)
        w = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return alphas, w
    raise ValueError(f"unknown integration rule {rule!r}: use one of {', '.join(IG_RULES)}")


def noise_for(x: torch.Tensor, sample: int, sigma: float, seed: int) -> torch.Tensor:
    """SmoothGrad's noise for one sample of every image: Gaussian, standard deviation
    ``sigma`` times each image's range ``max - min`` (Smilkov et al. 2017), drawn on the CPU
    from a generator seeded by ``seed`` and the sample (the same for any batch size).

    Example:
        >>> noise_for(torch.zeros(2, 3, 4, 4), 0, 0.15, 0).abs().max()
        tensor(0.)
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + sample)
    z = torch.randn(x.shape, generator=gen, dtype=torch.float32)
    flat = x.detach().float().flatten(1)
    span = (flat.max(dim=1).values - flat.min(dim=1).values).cpu()
    return (z * (sigma * span).view(-1, *([1] * (x.ndim - 1)))).to(x.device)


def accumulate(
    scorer: Scorer,
    n_rows: int,
    make: Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_images: int,
    batch: int,
    shape: tuple[int, ...],
    *,
    context: Callable[[], Any] | None = None,
    bar: Any = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum over rows r of weight[r] * d target / d input[r]`` per image ``[N, C, H, W]``
    (float32, on the input's device).

    ``make(start, stop)`` gives rows ``start..stop``: ``(inputs [B, C, H, W], image index
    [B], multiplier [B, 1, 1, 1] or [B, C, H, W])``. ``context()`` (guided
    backpropagation's) is entered around each batch's forward and backward. ``scores``
    (``[n_rows]``), when given, receives each row's target value from the same forward.

    Example:
        >>> one = lambda a, b: (x, torch.tensor([0]), torch.ones(1, 1, 1, 1))
        >>> grad = accumulate(scorer, 1, one, 1, 1, tuple(x.shape[1:]))
    """
    acc: torch.Tensor | None = None
    for start in range(0, n_rows, batch):
        stop = min(n_rows, start + batch)
        xb, rows, weight = make(start, stop)
        xb = xb.detach().requires_grad_(True)
        if context is not None:
            with context():
                value = scorer(xb, rows)
                (grad,) = torch.autograd.grad(value.sum(), [xb])
        else:
            value = scorer(xb, rows)
            (grad,) = torch.autograd.grad(value.sum(), [xb])
        if scores is not None:
            scores[start:stop] = value.detach().to(scores.device, scores.dtype)
        grad = grad.float() * weight.to(grad.device, torch.float32)
        if acc is None:
            acc = torch.zeros((n_images, *shape), dtype=torch.float32, device=grad.device)
        acc.index_add_(0, rows.to(grad.device), grad)
        if bar is not None:
            bar.update(stop - start)
    if acc is None:
        raise ValueError("nothing to attribute: no rows")
    return acc


def path_rows(
    x: torch.Tensor,
    base: torch.Tensor,
    alphas: torch.Tensor,
    weights: torch.Tensor,
    *,
    multiply: str,
    samples: int,
    sigma: float,
    seed: int,
) -> tuple[int, Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The rows of a (SmoothGrad-averaged) path integral: row ``r`` is sample ``s``, image
    ``i``, step ``k`` (``r = (s * N + i) * K + k``), its input ``base + alpha_k (x~ -
    base)`` with ``x~`` the image plus sample ``s``'s noise (``samples == 0``: no noise).
    Its gradient's multiplier is ``w_k / S`` (``multiply="none"``: saliency, guided
    backpropagation), ``x~ / S`` (``"input"``: input x gradient) or ``w_k (x~ - base) / S``
    (``"path"``: integrated gradients), ``S = max(samples, 1)``, so the sum of the rows'
    weighted gradients is the attribution itself.

    Example:
        >>> n, make = path_rows(x, 0 * x, torch.ones(1), torch.ones(1), multiply="none", samples=0, sigma=0.15, seed=0)
    """
    if multiply not in ("none", "input", "path"):
        raise ValueError(f"unknown multiplier {multiply!r}")
    N = x.shape[0]
    K = len(alphas)
    S = max(samples, 1)
    a = alphas.to(x.device, torch.float32)
    w = (weights / S).to(x.device, torch.float32)
    cache: dict[int, torch.Tensor] = {}

    def noisy(s: int) -> torch.Tensor:
        if samples == 0:
            return x
        if s not in cache:
            cache.clear()
            cache[s] = x + noise_for(x, s, sigma, seed)
        return cache[s]

    def make(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = torch.arange(start, stop, device=x.device)
        s, rest = r // (N * K), r % (N * K)
        i, k = rest // K, rest % K
        inputs, mults = [], []
        for sv in torch.unique_consecutive(s).tolist():
            sel = s == sv
            xs, bs = noisy(int(sv))[i[sel]], base[i[sel]]
            al = a[k[sel]].view(-1, 1, 1, 1)
            wk = w[k[sel]].view(-1, 1, 1, 1)
            inputs.append(bs + al * (xs - bs))
            if multiply == "none":
                mults.append(wk.expand(-1, 1, 1, 1))
            elif multiply == "input":
                mults.append(xs / S)
            else:
                mults.append(wk * (xs - bs))
        return torch.cat(inputs), i, torch.cat(mults)

    return S * N * K, make


def completeness_tolerance(delta: torch.Tensor, change: torch.Tensor, tolerance: float) -> bool:
    """Whether every ``|delta| <= tolerance * |f(x) - f(baseline)|``.

    Example:
        >>> completeness_tolerance(torch.tensor([0.01]), torch.tensor([2.0]), 0.01)
        True
    """
    return bool((delta.abs() <= tolerance * change.abs() + 1e-12).all())


def steps_doubling(steps: int, most: int) -> list[int]:
    """``steps, 2 steps, 4 steps, ...`` up to ``most``.

    Example:
        >>> steps_doubling(50, 400)
        [50, 100, 200, 400]
    """
    out = [steps]
    while out[-1] * 2 <= most:
        out.append(out[-1] * 2)
    return out
