"""Lucent as a feature-visualization baseline, for benchmarks only.

Lucent (PyPI ``torch-lucent==0.1.8``) is never a convlens dependency: it lives in the
benchmark environment ``.venv-bench`` that ``bash benchmarks/setup_lucent_env.sh`` builds
(torch 2.14.1, convlens editable, Lucent, kornia 0.4.1). Every ``lucent`` import below
sits inside a function, so this module imports, and ruff checks it, without Lucent.

What Lucent does, and what this wrapper adds or undoes:

- Layer names. Lucent's ``render_vis`` hooks *every* submodule and keys it by its path
  joined with ``"_"`` instead of ``"."`` (``lucent.optvis.render.hook_model``, listed by
  ``lucent.modelzoo.util.get_model_layers``). :func:`lucent_layer_name` maps a convlens
  dotted name to that key: ``blocks.4`` -> ``blocks_4``, ``blocks.4.0.conv_pw`` ->
  ``blocks_4_0_conv_pw``. On a model wrapped by :func:`fold_normalization` a name is
  looked up on the wrapped network too, and gets the wrapper's prefix: ``blocks.4`` ->
  ``model_blocks_4``. Two different dotted paths that join to the same key (``a.b_c``
  and ``a_b.c``) would make Lucent hook the wrong one; that raises ``ValueError``.
- Preprocessing. ``preprocess=False``: the model takes [0, 1] images, with its input
  normalisation folded in by :func:`fold_normalization` (Lucent's own ``preprocess=True``
  assumes ImageNet mean/std, or InceptionV1's [-117, 138]).
- Upsampling. ``render_vis`` upsamples to 224 when the image is smaller than 224 and
  ``fixed_image_size`` is None; ``fixed_image_size=n`` does not switch that off, it
  *always* appends a resize of the transformed image to ``n`` (at 224 the transformed
  image is about 248 px, so it would add a downscale). So the default here is None, which
  at ``size >= 224`` adds no resize at all (the model sees the padded, jittered, scaled,
  rotated image, about 248 px, as in Lucent's default use).
- Hooks. Lucent registers a forward hook on every submodule and never removes them (each
  one keeps its last output alive). :func:`lucent_render` notes the hook ids present on
  each module before ``render_vis`` and deletes the ones added, in a ``finally``, so the
  same model can be rendered again (and used elsewhere) without hooks piling up.
- Device. Lucent creates the image parameters on ``cuda:0`` whenever CUDA is available,
  whatever the model is on (``lucent.optvis.param.spatial.device``); ``device`` must
  agree with that, else ``ValueError``. The model must already be on ``device``.
- Model weights. Lucent leaves ``requires_grad`` on the model's parameters as it finds
  them, so by default every step also computes (and accumulates) weight gradients, as in
  Lucent's documented use. ``freeze_model=True`` turns them off for the call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["FoldedNormalization", "fold_normalization", "lucent_layer_name", "lucent_render"]


class FoldedNormalization(nn.Module):
    """``model((x - mean) / std)``: takes [0, 1] images. Lucent's names for the wrapped
    network's layers start with ``model_`` (the attribute holding it)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        ref = next(iter(model.parameters()), None)
        kw: dict[str, Any] = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.register_buffer("mean", torch.as_tensor(mean, **kw).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, **kw).reshape(1, -1, 1, 1))
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def fold_normalization(
    model: nn.Module, mean: Sequence[float] | float, std: Sequence[float] | float
) -> nn.Module:
    """Wrap ``model`` so that it takes [0, 1] input and normalises it inside.

    ``mean``/``std``: one number or one per channel (convlens: ``bundle.normalize``).
    The wrapper keeps the model's train/eval mode and device; Lucent's names for its layers
    gain the prefix ``model_`` (see :func:`lucent_layer_name`).
    """
    m = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(v) for v in mean]
    s = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
    return FoldedNormalization(model, m, s)


def lucent_layer_name(model: nn.Module, layer: str) -> str:
    """Lucent's hook key for the convlens (dotted) layer name ``layer`` of ``model``.

    Lucent keys each submodule by its path joined with ``"_"``: ``blocks.4`` ->
    ``blocks_4``; through :func:`fold_normalization`'s wrapper, ``model_blocks_4``.
    """
    paths = dict(model.named_modules(remove_duplicate=False))
    path = layer
    if (not layer or layer not in paths) and isinstance(model, FoldedNormalization):
        inner = dict(model.model.named_modules(remove_duplicate=False))
        if layer in inner and layer:
            path = f"model.{layer}"
    if not path or path not in paths:
        names = [n for n in paths if n][:12]
        raise KeyError(f"no layer {layer!r} in {type(model).__name__}; some names: {names}")
    key = path.replace(".", "_")
    clash = sorted(
        n for n, m in paths.items() if n and n.replace(".", "_") == key and m is not paths[path]
    )
    if clash:
        raise ValueError(f"Lucent's key {key!r} names both {path!r} and {clash}")
    return key


def _hook_ids(model: nn.Module) -> list[tuple[nn.Module, set[int]]]:
    return [(m, set(m._forward_hooks)) for m in model.modules()]


def _remove_new_hooks(before: list[tuple[nn.Module, set[int]]]) -> None:
    for m, ids in before:
        for hid in [h for h in m._forward_hooks if h not in ids]:
            del m._forward_hooks[hid]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                getattr(m, extra, {}).pop(hid, None)


def lucent_render(
    model: nn.Module,
    layer: str,
    channels: list[int],
    size: int,
    thresholds: tuple[int, ...],
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    fixed_image_size: int | None = None,
    freeze_model: bool = False,
) -> dict[str, Any]:
    """Render ``channels`` of ``layer`` with Lucent's ``render_vis``, one per batch image.

    ``model`` takes [0, 1] images (:func:`fold_normalization`), is in eval mode and on
    ``device``. Objective: ``sum_i channel(lucent_layer_name(model, layer), channels[i],
    batch=i)``; parameterisation ``param.image(size, batch=len(channels))`` (Lucent's
    default: 1/f Fourier, decorrelated colour, sigmoid); ``transform.standard_transforms``;
    Adam, lr 0.05 (Lucent's default optimizer); ``preprocess=False``; no progress bar and
    no image shown. Seeds ``torch.manual_seed(seed)`` and ``numpy.random.seed(seed)``
    (Lucent draws its transforms from numpy's global generator).

    Returns ``{"images": [T, N, 3, size, size] float tensor in [0, 1] (Lucent's image at
    each threshold), "times": seconds from the call of render_vis to the end of the
    optimizer step of each threshold (time.perf_counter, nothing subtracted; CUDA is
    synchronised first), "thresholds": list}``.
    """
    from lucent.optvis import objectives, param, render, transform
    from lucent.optvis.param import spatial

    ths = [int(t) for t in thresholds]
    if not ths or any(t < 1 for t in ths) or ths != sorted(set(ths)):
        raise ValueError(f"thresholds must be increasing positive steps, got {thresholds!r}")
    if not channels:
        raise ValueError("channels is empty")
    dev = torch.device(device)
    lucent_dev = torch.device(spatial.device)
    if dev.type != lucent_dev.type:
        raise ValueError(f"Lucent puts its image on {lucent_dev} here; device={dev} cannot work")
    key = lucent_layer_name(model, layer)
    objective = objectives.Objective.sum(
        [objectives.channel(key, int(c), batch=i) for i, c in enumerate(channels)]
    )

    step_end: list[float] = []

    def record(*_: object) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        step_end.append(time.perf_counter())

    def optimizer(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        opt = torch.optim.Adam(params, lr=5e-2)
        opt.register_step_post_hook(record)
        return opt

    frozen = [p for p in model.parameters() if p.requires_grad] if freeze_model else []
    for p in frozen:
        p.requires_grad_(False)
    hooks = _hook_ids(model)
    torch.manual_seed(seed)
    np.random.seed(seed)
    try:
        t0 = time.perf_counter()
        out = render.render_vis(
            model,
            objective,
            param_f=lambda: param.image(size, batch=len(channels)),
            optimizer=optimizer,
            transforms=transform.standard_transforms,
            thresholds=tuple(ths),
            preprocess=False,
            progress=False,
            show_image=False,
            fixed_image_size=fixed_image_size,
        )
    finally:
        _remove_new_hooks(hooks)
        for p in frozen:
            p.requires_grad_(True)
    if len(out) != len(ths) or len(step_end) != ths[-1]:
        raise RuntimeError(
            f"Lucent returned {len(out)} images in {len(step_end)} steps "
            f"for thresholds {ths} (interrupted?)"
        )
    images = torch.from_numpy(np.stack(out)).permute(0, 1, 4, 2, 3).contiguous()
    return {
        "images": images,
        "times": [step_end[t - 1] - t0 for t in ths],
        "thresholds": ths,
    }


def _main() -> None:
    """Smoke check: ``.venv-bench/bin/python benchmarks/_lucent.py``."""
    import argparse

    import convlens

    ap = argparse.ArgumentParser(description="render with Lucent twice, same seed")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--layer", default="blocks.4")
    ap.add_argument("--channels", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--thresholds", default="2,4")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--freeze-model", action="store_true")
    args = ap.parse_args()

    b = convlens.load_model(args.model)
    mean, std = b.normalize
    wrapped = fold_normalization(b.model.eval(), mean, std)
    ths = tuple(int(t) for t in args.thresholds.split(","))
    print(
        f"{b.description}; Lucent key for {args.layer!r}: {lucent_layer_name(wrapped, args.layer)}"
    )
    runs = []
    for r in range(args.repeat):
        res = lucent_render(
            wrapped,
            args.layer,
            list(range(args.channels)),
            args.size,
            ths,
            seed=0,
            freeze_model=args.freeze_model,
        )
        t = res["times"]
        per_step = (t[-1] - t[0]) / (ths[-1] - ths[0]) if len(ths) > 1 else t[0] / ths[0]
        print(
            f"run {r}: times {[round(x, 3) for x in t]} s; {per_step:.3f} s/step after step {ths[0]}"
        )
        runs.append(res["images"])
        leftover = sum(len(m._forward_hooks) for m in wrapped.modules())
        print(f"  images {tuple(res['images'].shape)}; forward hooks left on the model: {leftover}")
    for r in range(1, len(runs)):
        d = (runs[r] - runs[0]).abs().max().item()
        print(f"run {r} vs run 0: identical={torch.equal(runs[r], runs[0])}, max abs diff {d:.3g}")


if __name__ == "__main__":
    _main()
