"""Stage 4, the examples: each channel's top-k examples cut out at their receptive field
with the activation overlaid, the whole top images small (the box drawn), and the bottom-k.

Inputs: ``ctx.result`` (the dataset pass: which images, where, their activations are
computed again from the images), the data and its preprocessing, ``ctx.mine``.
Outputs: per layer ``<layer>/e-<key>/`` (the dataset pass's key), per channel
``NNNN-top-I.png``, ``NNNN-top-I-full.png``, ``NNNN-bottom-I.png`` and last ``NNNN.json``.
Resume: a channel whose ``NNNN.json`` and PNGs are whole is not written again; ``force``
writes every channel. SIGTERM or Ctrl-C stops at the next channel, its files written.

Example:
    >>> examples.run(ctx)
    >>> ctx.counts["examples_written"], ctx.counts["examples_reused"]
    (8, 0)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

from convlens import _signals
from convlens._io import write_json
from convlens.microscope._common import (
    Context,
    _finished,
    _outline,
    _overlay,
    _save_png,
    _thumbnail,
    _Unit,
)

#: the longest side of the whole top images on a channel page
_THUMB = 96


# ------------------------------------------------------------------------ the examples


def _example_units(
    result: Any,
    source_data: Any,
    net: nn.Module,
    units: list[_Unit],
    folders: dict[str, Path],
    force: bool,
    split: str,
    preprocess: Any,
    progress: bool,
    strict: bool = False,
) -> tuple[int, int]:
    """Write each unit's example crops (top with the activation overlaid, the whole top
    images small with the box drawn, bottom); returns ``(written, reused)``."""
    from convlens._progress import tqdm
    from convlens.analysis.examples import crops

    written = reused = 0
    pending = []
    for u in units:
        folder = folders[u.layer]
        k_top = len(result.top(u.layer, u.channel))
        k_bot = len(result.bottom(u.layer, u.channel))
        files = _example_files(folder, u.channel, k_top, k_bot)
        if not force and _finished(folder / f"{u.channel:04d}.json", files, strict) is not None:
            reused += 1
            continue
        pending.append(u)
    with _signals.deferred():  # SIGTERM, Ctrl-C: stop between channels
        for u in tqdm(pending, desc="examples", unit="channel", disable=not progress):
            folder = folders[u.layer]
            folder.mkdir(parents=True, exist_ok=True)
            record: dict[str, Any] = {"channel": u.channel, "layer": u.layer}
            for which in ("top", "bottom"):
                cs = crops(
                    result,
                    source_data,
                    u.layer,
                    u.channel,
                    which=which,
                    model=net,
                    preprocess=preprocess,
                    split=split,
                )
                entries = []
                for rank, c in enumerate(cs):
                    full_peak = float(c.full_activation.max())
                    crop_path = folder / f"{u.channel:04d}-{which}-{rank}.png"
                    _save_png(_overlay(c.image, c.activation, full_peak), crop_path)
                    entry = {"rank": rank, "crop": crop_path.name, "box": list(c.box)}
                    if which == "top":
                        full_path = folder / f"{u.channel:04d}-top-{rank}-full.png"
                        _save_png(_thumbnail(_outline(c.full, c.box), _THUMB), full_path)
                        entry["full"] = full_path.name
                    entries.append(entry)
                record[which] = entries
            write_json(folder / f"{u.channel:04d}.json", record)
            written += 1
            if _signals.requested() is not None:
                _signals.stop(
                    f"{reused + written} of this rank's {len(units)} channels' crops written"
                )
    return written, reused


def _example_files(folder: Path, channel: int, k_top: int, k_bot: int) -> list[Path]:
    b = f"{channel:04d}"
    files = [folder / f"{b}-top-{i}.png" for i in range(k_top)]
    files += [folder / f"{b}-top-{i}-full.png" for i in range(k_top)]
    files += [folder / f"{b}-bottom-{i}.png" for i in range(k_bot)]
    return files


def run(ctx: Context) -> None:
    """Write this rank's unfinished channels' example crops."""
    s = ctx.settings
    result = ctx.need("result", "dataset_pass")
    t0 = time.perf_counter()
    written, reused = _example_units(
        result,
        ctx.data,
        ctx.net,
        ctx.mine,
        ctx.example_dirs,
        s.force,
        s.split,
        ctx.prep,  # also for a pass read from the cache, which has no preprocessing
        ctx.bar,
        s.strict,
    )
    ctx.counts["examples_written"], ctx.counts["examples_reused"] = written, reused
    ctx.stages["examples"] = time.perf_counter() - t0
