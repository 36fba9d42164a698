"""Stage 3, every render checked against the dataset: each channel's saved PNGs (the
channel render and the diversity set) are read back and fed to the model as the renders are
(upsampled to the model's input size, normalised, in the model's own dtype, BatchNorm not
folded, no autocast: the way the dataset pass feeds a preprocessed image), one forward per
channel. The channel render's unit, reduced like the dataset pass (the max over positions
by default), is set against the unit's top dataset example (``render_vs_dataset``:
``render``, ``top_example``, ``ratio`` = render / top example when the top example scores
above 0, ``below`` = render < top example, ``reduce``); each diversity image's channel mean
against the channel render's (``png_value``, ``relative``).

Inputs: the model, ``ctx.plan`` and ``ctx.render_dirs`` (the renders), ``ctx.mine``.
Outputs: ``<layer>/r-<key>/NNNN-check.json`` beside the renders, with the SHA-256 of the
PNGs they were measured on.
Resume: a check whose PNG hashes match the PNGs on disk (and :data:`_CHECK_VERSION`) is
kept; a rerun measures again only a PNG that changed, so renders reused from disk are
measured from the files on disk; ``force`` measures every channel.

Example:
    >>> checks.run(ctx)
    >>> ctx.counts["render_checks"]
    8
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from convlens import _signals
from convlens._io import write_json
from convlens.microscope._common import Context, _read, _Unit
from convlens.microscope.renders import _render_files, _RenderPlan

# ------------------------------------------------------------------------ the render checks

#: what a channel's check file holds besides the measured numbers (bump to measure again)
_CHECK_VERSION = 1
#: how the renders are checked against the dataset, for the index page and microscope.json
_CHECK_ABOUT = (
    "each saved render PNG read back, fed to the model as the renders are (upsampled to the "
    "model's input size, normalised, the model's own dtype, no autocast, BatchNorm not "
    "folded) and the unit reduced like the dataset pass ({reduce} over positions), against "
    "the unit's top dataset example; the diversity images' channel mean relative to the "
    "channel render's, on the PNGs too"
)


def _check_path(folder: Path, channel: int) -> Path:
    """A channel's check file, beside its renders."""
    return folder / f"{channel:04d}-check.json"


def _read_png(path: Path, channels: int) -> torch.Tensor:
    """A saved render as the float image ``[C, H, W]`` in [0, 1] it stands for: 8-bit
    values / 255, grey for a 1-channel model."""
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255
    x = torch.from_numpy(arr.copy())
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def _png_check_why(channels: int) -> str | None:
    """Why a model's renders cannot be checked from their PNGs, or None when they can."""
    if channels in (1, 3):
        return None
    return (
        f"the model takes {channels}-channel images and a render's PNG keeps "
        f"{'3' if channels > 3 else '1'} of them, so the saved image is not what was optimised"
    )


def _measure(
    net: nn.Module, layer: str, channel: int, images: torch.Tensor, pipe: Any, dev: torch.device
) -> tuple[list[float], list[float]]:
    """The unit's maximum and mean over positions on each of ``images`` ``[N, C, h, w]``
    in [0, 1], fed through ``pipe`` (upsampled, normalised, the model's dtype) to ``net``
    (in eval mode, without gradients): ``(maxima, means)``.

    Example:
        >>> _measure(net, "conv2", 1, torch.rand(2, 3, 16, 16), plan.pipe, torch.device("cpu"))
    """
    from convlens.analysis.featurevis.objectives import Objective
    from convlens.analysis.featurevis.render import _Forward

    fwd = _Forward(net, Objective(lambda acts: acts(layer), [layer], description=layer))
    x = images.to(dev, torch.float32)
    with fwd.hooked(False), torch.no_grad():
        t = fwd(pipe(x), x)(layer).float()
    sel = t[:, channel].reshape(t.shape[0], -1)  # [N, positions] ([N, 1] for an [N, C] output)
    return [float(v) for v in sel.amax(1).cpu()], [float(v) for v in sel.mean(1).cpu()]


def _check_units(
    net: nn.Module,
    units: list[_Unit],
    folders: dict[str, Path],
    plan: _RenderPlan,
    dev: torch.device,
    force: bool,
    progress: bool,
) -> tuple[int, int]:
    """Measure every rendered unit of ``units`` (this rank's) from its saved PNGs: the
    channel render and the diversity images, one forward per unit (a fixed batch of
    ``1 + diversity`` images, so the numbers do not depend on the batch or the world size).
    Each unit's numbers go to ``NNNN-check.json`` with the SHA-256 of the PNGs they were
    measured on; a rerun reuses them only while the PNGs on disk are those bytes. Returns
    ``(measured, reused)``."""
    from tqdm.auto import tqdm

    from convlens.models.forms import dtype_support
    from convlens.models.layers import evaluating

    if _png_check_why(plan.channels) is not None:
        return 0, 0
    todo: list[tuple[_Unit, list[tuple[str, Path]], list[str]]] = []
    reused = 0
    for u in units:
        folder = folders[u.layer]
        if _read(folder / f"{u.channel:04d}.json") is None:
            continue  # not rendered: nothing to check
        files = _render_files(folder, u.channel, plan.diversity)
        named = [("channel", files["channel"])]
        named += [(f"diversity-{j}", files[f"diversity-{j}"]) for j in range(plan.diversity)]
        try:
            digests = [hashlib.sha256(f.read_bytes()).hexdigest() for _, f in named]
        except OSError:
            continue
        old = _read(_check_path(folder, u.channel))
        if (
            not force
            and old is not None
            and old.get("v") == _CHECK_VERSION
            and [old.get("images", {}).get(n, {}).get("sha256") for n, _ in named] == digests
        ):
            reused += 1
            continue
        todo.append((u, named, digests))
    if not todo:
        return 0, reused
    done = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(_signals.deferred())  # SIGTERM, Ctrl-C: stop between channels
        stack.enter_context(dtype_support(plan.pipe.dtype, dev))
        stack.enter_context(evaluating(net))
        for u, named, digests in tqdm(
            todo, desc="render checks", unit="channel", disable=not progress
        ):
            images = torch.stack([_read_png(f, plan.channels) for _, f in named])
            maxima, means = _measure(net, u.layer, u.channel, images, plan.pipe, dev)
            record = {
                "channel": u.channel,
                "layer": u.layer,
                "v": _CHECK_VERSION,
                "images": {
                    name: {"image": f.name, "sha256": h, "max": mx, "mean": mn}
                    for (name, f), h, mx, mn in zip(named, digests, maxima, means)
                },
            }
            write_json(_check_path(folders[u.layer], u.channel), record)
            done += 1
            if _signals.requested() is not None:
                _signals.stop(f"{reused + done} of this rank's {len(units)} channels checked")
    return done, reused


def _ratio(value: float, base: float) -> float | None:
    """``value / base`` when ``base`` is a positive finite number, else None (a ratio to
    zero or a negative number says nothing)."""
    if not (math.isfinite(base) and base > 0 and math.isfinite(value)):
        return None
    return value / base


def _render_vs_dataset(
    check: dict[str, Any] | None, top: Sequence[Any], reduce: str, why_not: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """A unit's ``render_vs_dataset`` entry of microscope.json (its channel render's drive
    of the unit against its best dataset example, the same reduction for both) and, without
    one, why not."""
    if why_not is not None:
        return None, why_not
    if check is None or "channel" not in check.get("images", {}):
        return None, "this channel's render check is missing"
    if not top:
        return None, "the unit has no top dataset example"
    render = float(check["images"]["channel"][reduce])
    best = float(top[0].score)
    return (
        {
            "render": render,
            "top_example": best,
            "ratio": _ratio(render, best),
            "below": render < best,
            "reduce": reduce,
            "top_index": top[0].index,
        },
        None,
    )


def run(ctx: Context) -> None:
    """Measure this rank's saved renders as the dataset pass measures an image."""
    plan = ctx.need("plan", "renders")
    t0 = time.perf_counter()
    checked, reused = _check_units(
        ctx.net, ctx.mine, ctx.render_dirs, plan, ctx.dev, ctx.settings.force, ctx.bar
    )
    ctx.counts["render_checks"], ctx.counts["render_checks_reused"] = checked, reused
    ctx.stages["render checks"] = time.perf_counter() - t0
