"""``convlens.attribute``: one verb for every attribution method."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from convlens.analysis.attribution import _core
from convlens.analysis.attribution._core import (
    AttrTarget,
    Scorer,
    batch_rows,
    clean,
    fast_model,
    parse_targets,
    row_bytes,
    top1_targets,
)
from convlens.analysis.attribution.gradients import (
    IG_RULES,
    PIXEL_METHODS,
    accumulate,
    completeness_tolerance,
    ig_points,
    path_rows,
    steps_doubling,
)
from convlens.analysis.attribution.result import Attribution
from convlens.capture import model_device
from convlens.device import PRECISIONS, DeviceLike, resolve_device, resolve_precision
from convlens.errors import ConvlensError
from convlens.models.forms import OutputKey, dtype_name, is_scripted, model_dtype, require_hooks
from convlens.models.layers import find_layers, unwrap

__all__ = ["CAM_METHODS", "METHODS", "attribute"]

CAM_METHODS = ("gradcam", "gradcam_pp", "layercam", "scorecam")
METHODS = (*PIXEL_METHODS, *CAM_METHODS, "occlusion")
BASELINES = ("zero", "black", "blur", "uniform")
#: The most steps ``tolerance=`` may raise integrated gradients to.
MAX_STEPS = 4096


def _close(name: str, options: Sequence[str]) -> str:
    import difflib

    near = difflib.get_close_matches(name, options, n=2, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""


def _as_batch(x: Any, bundle: Any) -> torch.Tensor:
    if bundle is not None and not isinstance(x, torch.Tensor):
        if isinstance(x, (list, tuple)):
            return torch.stack(
                [bundle.preprocess(i) if not isinstance(i, torch.Tensor) else i for i in x]
            )
        x = bundle.preprocess(x)
    if isinstance(x, (list, tuple)) and x and all(isinstance(i, torch.Tensor) for i in x):
        x = torch.stack(list(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x must be a tensor [N, C, H, W] or [C, H, W] (normalised), got "
            f"{type(x).__name__}; load images with convlens.load_image and preprocess them "
            "(bundle.preprocess)"
        )
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"x must be [N, C, H, W] or [C, H, W], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    return x


def _baseline(
    base: str | torch.Tensor, x: torch.Tensor, mean: Any, std: Any, seed: int
) -> torch.Tensor:
    """The baseline ``[N, C, H, W]`` in the model's input space."""
    if isinstance(base, torch.Tensor):
        b = base.to(x.device, torch.float32)
        try:
            return torch.broadcast_to(b, x.shape).clone()
        except RuntimeError:
            raise ValueError(
                f"baseline of shape {list(b.shape)} does not broadcast to the input "
                f"{list(x.shape)}: give [C, H, W], [N, C, H, W] or a scalar"
            ) from None
    if base not in BASELINES:
        raise ValueError(
            f"unknown baseline {base!r}{_close(str(base), BASELINES)}: use one of "
            f"{', '.join(BASELINES)} or a tensor"
        )
    if base == "zero":
        return torch.zeros_like(x)
    if base == "blur":
        from convlens.analysis.occlusion import apply_fill

        H, W = x.shape[-2:]
        return apply_fill(x, (0, H, 0, W), "blur").to(x.dtype)
    C = x.shape[1]
    known = mean is not None and std is not None and len(mean) == C
    if base == "black":
        if not known:
            raise ValueError(
                "baseline='black' needs the input normalisation: pass a ModelBundle "
                "(convlens.load_model) or a baseline tensor"
            )
        m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
        return ((0 - m) / s).expand_as(x).clone()
    gen = torch.Generator().manual_seed(int(seed))
    u = torch.rand(x.shape, generator=gen).to(x.device)
    if known:  # uniform pixels in [0, 1], normalised
        m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
        return (u - m) / s
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return lo + u * (hi - lo)


def _labels(targets: Any, bundle: Any, n: int) -> tuple[str | None, ...]:
    if callable(targets):
        return (None,) * n
    labels = getattr(bundle, "labels", None) or []
    return tuple(
        labels[t.index]
        if t.kind == "class" and t.index is not None and t.index < len(labels)
        else None
        for t in targets
    )


def _default_layer(net: nn.Module) -> str:
    from convlens.analysis.attribution.cam import default_cam_layer

    return default_cam_layer(net)


def _normalized(maps: torch.Tensor) -> torch.Tensor:
    from convlens.analysis.attribution.cam import normalize_maps

    return normalize_maps(maps)


def attribute(
    model: Any,
    x: Any,
    target: Any = None,
    *,
    method: str = "integrated_gradients",
    layer: str | None = None,
    baseline: str | torch.Tensor = "zero",
    steps: int = 50,
    samples: int | None = None,
    sigma: float = 0.15,
    batch: int | str = "auto",
    output: OutputKey | None = None,
    tolerance: float | None = None,
    normalize: bool = False,
    device: DeviceLike | None = None,
    rule: str = "gausslegendre",
    seed: int = 0,
    window: int | tuple[int, int] = 32,
    stride: int | tuple[int, int] = 16,
    progress: bool | None = False,
    precision: str = "float32",
) -> Attribution:
    """Which pixels of ``x`` the ``target`` depends on, by ``method``.

    ``model``: a :class:`~convlens.models.zoo.ModelBundle` or any ``nn.Module``
    (``torch.compile``d, DataParallel/DDP, float16/bfloat16, 1 or 4 input channels,
    returning a dict/tuple: ``output=`` picks the class scores as ``classify`` does).
    ``x``: normalised inputs ``[N, C, H, W]`` or ``[C, H, W]`` (with a bundle also PIL
    images). ``target``: a class index, one per image, ``None`` (each image's top-1 class),
    ``"layer:channel"`` (the channel's mean: a unit's attribution), ``"layer:channel@y,x"``
    (one neuron), a list of such strings (one per image), or a callable on the model's
    output returning one value per image.

    Methods: ``"saliency"`` (the gradient, signed), ``"input_x_gradient"``,
    ``"integrated_gradients"`` (``steps`` points of Gauss-Legendre quadrature, or
    ``rule="riemann_trapezoid"``; ``.delta`` is the completeness error; ``tolerance=t``
    doubles ``steps`` until ``|delta| <= t |f(x) - f(baseline)|``), ``"guided_backprop"``
    (every ReLU-family activation, module, in-place or functional), the CAM family
    ``"gradcam"``, ``"gradcam_pp"``, ``"layercam"``, ``"scorecam"`` at ``layer`` (default:
    the model's last convolutional block), and ``"occlusion"``
    (:func:`convlens.sensitivity`, ``window``/``stride``). ``samples=S`` averages any
    pixel-space method over ``S`` noisy copies (SmoothGrad; noise ``sigma`` times each
    image's range, seeded by ``seed``). ``baseline``: ``"zero"`` (0 after normalisation:
    the dataset's mean colour), ``"black"``, ``"blur"``, ``"uniform"`` (seeded noise) or a
    tensor.

    Maps are **signed and unscaled**: ``normalize=True`` gives pytorch-grad-cam's display
    instead (negatives clipped, each map min-max scaled to [0, 1]). ``batch="auto"``
    sizes the rows of one forward (images x steps x samples) from the device's free
    memory. The model is left as it was found: hooks (convlens's removed, the user's
    untouched), train/eval flags, ``requires_grad``, parameter ``.grad``. ``device``:
    ``None`` runs where the model is; otherwise the model is moved there (in place).
    ``precision``: Score-CAM's masked forwards (scores only, no gradient) may run under
    autocast in ``"bfloat16"`` or ``"float16"``; ``"auto"`` picks bfloat16 where the device
    runs it fast (:func:`convlens.device.resolve_precision`). Every other method computes
    in float32 (``"auto"`` means float32 there), so signs and completeness hold.

    Example:
        >>> a = attribute(bundle, x, 258, method="integrated_gradients", steps=64)
        >>> a.map.shape, a.delta.abs().max() < 0.01 * a.score.abs().max()
        (torch.Size([1, 224, 224]), tensor(True))
        >>> attribute(bundle, x, method="gradcam").layer  # the last block
        'layer4'
    """
    t0 = time.perf_counter()
    from convlens.models.zoo import model_and_bundle

    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}{_close(str(method), METHODS)}: use one of {', '.join(METHODS)}"
        )
    net, bundle = model_and_bundle(model)
    net = unwrap(net)
    x = _as_batch(x, bundle)
    if steps < 1 or isinstance(steps, bool):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if samples is not None and (isinstance(samples, bool) or samples < 1):
        raise ValueError(
            f"samples must be a positive int (SmoothGrad's noisy copies), got {samples!r}"
        )
    if samples and method not in PIXEL_METHODS:
        raise ValueError(
            f"samples (SmoothGrad noise) applies to the pixel-space methods "
            f"({', '.join(PIXEL_METHODS)}), not {method!r}"
        )
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if rule not in IG_RULES:
        raise ValueError(f"unknown integration rule {rule!r}: use one of {', '.join(IG_RULES)}")
    if tolerance is not None and (method != "integrated_gradients" or tolerance <= 0):
        raise ValueError("tolerance= needs method='integrated_gradients' and a positive value")
    if layer is not None and method not in CAM_METHODS:
        raise ValueError(
            f"layer= chooses the layer of a CAM method ({', '.join(CAM_METHODS)}), not of {method!r}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision not in ("float32", "auto") and method != "scorecam":
        raise ValueError(
            f"precision={precision!r} applies to 'scorecam' (its map is built from forward "
            f"scores); {method!r} computes in float32 so that its signs and completeness "
            "hold: leave precision at 'float32' (or 'auto')"
        )
    mean, std = bundle.normalize if bundle is not None else (None, None)

    if device is not None:
        dev = resolve_device(device)
        net.to(dev)
    else:
        dev = model_device(net)
    x = x.detach().to(dev, torch.float32)
    N = x.shape[0]
    targets = parse_targets(target, N) if target is not None else None

    if method == "occlusion":
        return _occlusion(
            model, net, bundle, x, targets, window, stride, batch, output, normalize, dev, t0
        )

    if method == "guided_backprop" and is_scripted(net):
        raise ConvlensError(
            "guided backpropagation changes the ReLUs' gradients, which a TorchScript module "
            "hides: pass the eager nn.Module you scripted (the other gradient methods work on it)"
        )
    cam_layer: str | None = None
    if method in CAM_METHODS:
        require_hooks(net, f"{method} (it reads a layer)")
        cam_layer = layer if layer is not None else _default_layer(net)
        find_layers(net, [cam_layer])  # LayerNotFoundError with the closest names

    notes: list[str] = []
    with clean(net):
        if targets is None:  # each image's top-1 class
            targets = top1_targets(net, x, output)

        keep = set()
        if cam_layer is not None:
            keep.add(cam_layer.partition("#")[0])
        if not callable(targets) and targets[0].layer is not None:
            keep.add(targets[0].layer)
        rows0 = torch.arange(N, device=dev)

        def check(m: nn.Module) -> torch.Tensor:
            s = Scorer(m, targets, output=output)
            return s(x[:1], rows0[:1]).detach()

        rows_total = N * (steps if method == "integrated_gradients" else 1) * max(samples or 1, 1)
        if method == "scorecam" or rows_total > _core.SMALL_ROWS:
            run, folded = fast_model(net, x[:1], keep, check)
        else:  # a handful of rows: folding would cost more forwards than it saves
            run, folded = net, 0
        scorer = Scorer(run, targets, output=output, read=cam_layer)
        plain = Scorer(run, targets, output=output)
        amp = (
            resolve_precision(precision, dev)
            if method == "scorecam" and model_dtype(run) == torch.float32
            else torch.float32
        )

        def scores_at(inp: torch.Tensor) -> torch.Tensor:
            # the target's value on images the gradient pass does not evaluate as they are
            with torch.no_grad():
                return plain(inp, rows0).detach().float()

        # the target's value at each image, from the pass that evaluates the images
        # themselves where there is one (no extra forward), else from scores_at
        score: torch.Tensor | None = None

        def per_row() -> float:
            return row_bytes(run, tuple(x.shape[1:]), model_dtype(run))

        settings: dict[str, Any] = {
            "device": str(dev),
            "dtype": dtype_name(model_dtype(net)),
            "batch": batch,
            "folded_batchnorms": folded,
            "normalize": normalize,
            "precision": dtype_name(amp),
        }
        pixels: torch.Tensor | None = None
        layer_map: torch.Tensor | None = None
        delta: torch.Tensor | None = None
        used_steps: int | None = None
        from convlens._progress import tqdm

        bar = tqdm(desc=method, unit="row", disable=None if progress is None else not progress)
        try:
            if method in PIXEL_METHODS:
                S = samples or 0
                settings.update(
                    {"samples": S, "sigma": sigma if S else None, "seed": seed if S else None}
                )
                context: Callable[[], Any] | None = None
                if method == "guided_backprop":
                    from convlens.analysis.attribution.guided import guided_relus

                    seen = {"calls": 0}

                    @contextlib.contextmanager
                    def guided() -> Any:
                        with guided_relus() as stats:
                            yield stats
                        seen["calls"] += stats.calls

                    context = guided
                if method == "integrated_gradients":
                    base = _baseline(baseline, x, mean, std, seed)
                    settings.update(
                        {
                            "baseline": baseline if isinstance(baseline, str) else "tensor",
                            "rule": rule,
                        }
                    )
                    fb = scores_at(base)
                    score = scores_at(x)
                    plan = steps_doubling(steps, MAX_STEPS) if tolerance is not None else [steps]
                    for k in plan:
                        alphas, weights = ig_points(k, rule)
                        n_rows, make = path_rows(
                            x,
                            base,
                            alphas,
                            weights,
                            multiply="path",
                            samples=S,
                            sigma=sigma,
                            seed=seed,
                        )
                        bs = batch_rows(batch, n_rows, per_row, dev)
                        bar.reset(total=n_rows)
                        pixels = accumulate(
                            scorer, n_rows, make, N, bs, tuple(x.shape[1:]), bar=bar
                        )
                        # completeness per noisy copy: f(x~) - f(b), averaged
                        fx = _noisy_scores(plain, x, S, sigma, seed, rows0) if S else score
                        delta = (
                            pixels.double().sum(dim=(1, 2, 3)) - (fx.double() - fb.double())
                        ).float()
                        used_steps = k
                        if tolerance is None or completeness_tolerance(delta, fx - fb, tolerance):
                            break
                    else:
                        delta = cast(torch.Tensor, delta)
                        warnings.warn(
                            f"convlens.attribute: integrated gradients did not reach tolerance "
                            f"{tolerance} within {MAX_STEPS} steps (max |delta| "
                            f"{float(delta.abs().max()):.3g}); the result at {used_steps} steps "
                            "is returned",
                            stacklevel=2,
                        )
                        notes.append(f"tolerance {tolerance} not reached at {used_steps} steps")
                    settings.update({"steps": used_steps, "tolerance": tolerance})
                else:
                    one = torch.ones(1, dtype=torch.float64)
                    multiply = "input" if method == "input_x_gradient" else "none"
                    n_rows, make = path_rows(
                        x,
                        torch.zeros_like(x),
                        one,
                        one,
                        multiply=multiply,
                        samples=S,
                        sigma=sigma,
                        seed=seed,
                    )
                    bs = batch_rows(batch, n_rows, per_row, dev)
                    bar.reset(total=n_rows)
                    row_scores = None if S else torch.zeros(N, device=dev)
                    pixels = accumulate(
                        scorer,
                        n_rows,
                        make,
                        N,
                        bs,
                        tuple(x.shape[1:]),
                        context=context,
                        bar=bar,
                        scores=row_scores,
                    )
                    score = row_scores
                    if method == "guided_backprop" and seen["calls"] == 0:
                        note = (
                            "no ReLU-family activation ran in this model: guided "
                            "backpropagation equals the plain gradient here"
                        )
                        notes.append(note)
                        warnings.warn(f"convlens.attribute: {note}", stacklevel=2)
                amap = cast(torch.Tensor, pixels).sum(dim=1)
            else:
                layer_map, score = _cam(
                    method, scorer, run, targets, x, rows0, batch, per_row, dev, bar, output, amp
                )
                amap = _upsample(layer_map, tuple(x.shape[-2:]))
                settings["layer"] = cam_layer
            if score is None:
                score = scores_at(x)
        finally:
            bar.close()
        output_key = plain.output_key or scorer.output_key
        if output_key is not None:
            settings["output"] = output_key

    if normalize:  # pytorch-grad-cam's display: a CAM is clipped at its own resolution
        if layer_map is not None:
            amap = _normalized(_upsample(layer_map.clamp_min(0), tuple(x.shape[-2:])))
            layer_map = _normalized(layer_map)
        else:
            amap = _normalized(amap)
    if notes:
        settings["notes"] = notes
    parsed: list[AttrTarget] | None = None if callable(targets) else targets
    return Attribution(
        map=amap.detach().float().cpu(),
        score=score.detach().float().cpu(),
        target=tuple(t.spec for t in parsed) if parsed else ("callable",) * N,
        method=method,
        input=x.detach().cpu(),
        pixels=None if pixels is None else pixels.detach().cpu(),
        layer_map=None if layer_map is None else layer_map.detach().float().cpu(),
        delta=None if delta is None else delta.cpu(),
        steps=used_steps,
        layer=cam_layer,
        labels=_labels(parsed if parsed else targets, bundle, N),
        model_name=bundle.description if bundle is not None else type(net).__name__,
        mean=None if mean is None else tuple(float(v) for v in mean),
        std=None if std is None else tuple(float(v) for v in std),
        seconds=time.perf_counter() - t0,
        settings=settings,
    )


def _noisy_scores(
    plain: Scorer, x: torch.Tensor, samples: int, sigma: float, seed: int, rows: torch.Tensor
) -> torch.Tensor:
    from convlens.analysis.attribution.gradients import noise_for

    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for s in range(samples):
            total += plain(x + noise_for(x, s, sigma, seed), rows).double()
    return (total / samples).float()


def _upsample(layer_map: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    from convlens.analysis.attribution.cam import upsample_map

    return upsample_map(layer_map, (int(size[0]), int(size[1])))


def _cam(
    method: str,
    scorer: Scorer,
    run: nn.Module,
    targets: Any,
    x: torch.Tensor,
    rows0: torch.Tensor,
    batch: int | str,
    per_row: Callable[[], float],
    dev: torch.device,
    bar: Any,
    output: OutputKey | None,
    amp: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CAM family's signed layer map ``[N, h, w]`` and the target's value per image."""
    from convlens.analysis.attribution.cam import cam_map, scorecam_map, scorecam_weights

    N = x.shape[0]
    bs = batch_rows(batch, N, per_row, dev)
    maps = []
    acts_all = []
    scores = []
    for start in range(0, N, bs):
        xb = x[start : start + bs].detach().requires_grad_(method != "scorecam")
        rows = rows0[start : start + bs]
        if method == "scorecam":
            with torch.no_grad():
                scores.append(scorer(xb, rows).detach().float())
            acts_all.append(cast(torch.Tensor, scorer.activation).detach().float().contiguous())
            continue
        s = scorer(xb, rows)
        scores.append(s.detach().float())
        act = cast(torch.Tensor, scorer.activation)
        if act.ndim != 4:
            raise ValueError(
                f"a CAM needs a layer with a spatial map [N, C, H, W]; the chosen layer has "
                f"shape {list(act.shape)}: choose a convolutional layer with layer="
            )
        (g,) = torch.autograd.grad(s.sum(), [act])
        maps.append(cam_map(method, act.detach().float().contiguous(), g.float().contiguous()))
        bar.update(len(rows))
    if method != "scorecam":
        return torch.cat(maps), torch.cat(scores)
    acts = torch.cat(acts_all)
    if acts.ndim != 4:
        raise ValueError(
            f"Score-CAM needs a layer with a spatial map [N, C, H, W]; the chosen layer has "
            f"shape {list(acts.shape)}: choose a convolutional layer with layer="
        )
    plain = Scorer(run, targets, output=output)

    def score_fn(xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        with (
            torch.no_grad(),
            torch.autocast(dev.type, dtype=amp, enabled=amp != torch.float32),
        ):
            return plain(xb, rows).float()

    K = acts.shape[1]
    n = (
        batch_rows(batch, N * K, per_row, dev)
        if batch != "auto"
        else max(16, batch_rows("auto", N * K, per_row, dev))
    )

    def shown(done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.update(done - bar.n)

    weights = scorecam_weights(score_fn, x, acts, batch=n, progress=shown)
    return scorecam_map(weights, acts), torch.cat(scores)


def _occlusion(
    model: Any,
    net: nn.Module,
    bundle: Any,
    x: torch.Tensor,
    targets: Any,
    window: int | tuple[int, int],
    stride: int | tuple[int, int],
    batch: int | str,
    output: OutputKey | None,
    normalize: bool,
    dev: torch.device,
    t0: float,
) -> Attribution:
    """Occlusion through :func:`convlens.sensitivity`, one image at a time."""
    from convlens.analysis.sensitivity import sensitivity

    N = x.shape[0]
    if callable(targets) or (targets is not None and targets[0].kind == "neuron"):
        raise ValueError(
            "occlusion takes class targets and 'layer:channel' targets, not neurons or "
            "callables: use a gradient method for those"
        )
    if targets is None:
        targets = top1_targets(net, x, output)
    maps, scores = [], []
    settings: dict[str, Any] = {}
    for i in range(N):
        r = sensitivity(
            model,
            x[i],
            targets[i].spec,
            window=window,
            stride=stride,
            batch_size=batch if isinstance(batch, int) else "auto",
            output=output,
        )
        maps.append(r.attribution)
        scores.append(r.score)
        settings = {
            **r.settings,
            "window": list(r.window),
            "stride": list(r.stride),
            "fill": r.fill,
        }
    amap = torch.stack(maps)
    settings["normalize"] = normalize
    if normalize:
        amap = _normalized(amap)
    mean, std = bundle.normalize if bundle is not None else (None, None)
    return Attribution(
        map=amap.float(),
        score=torch.tensor(scores, dtype=torch.float32),
        target=tuple(t.spec for t in targets),
        method="occlusion",
        input=x.detach().cpu(),
        labels=_labels(targets, bundle, N),
        model_name=bundle.description if bundle is not None else type(net).__name__,
        mean=None if mean is None else tuple(float(v) for v in mean),
        std=None if std is None else tuple(float(v) for v in std),
        seconds=time.perf_counter() - t0,
        settings=settings,
    )
