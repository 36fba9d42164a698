"""Stage 1, the dataset pass (:func:`convlens.dataset_examples`): every channel's top-k and
bottom-k images, its statistics, a histogram of its per-image scores and, with labels, its
class selectivity; sharded ``range(rank, N, world)`` under torchrun, every rank getting the
merged result.

Inputs: the model, the data and its preprocessing, ``layers``, ``channels``, ``k``, ``split``.
Outputs: ``OUT/cache/examples-<key>/`` (the saved result; ``<key>`` hashes the weights'
and the data's fingerprints, the split, the layers, the channels, ``k``, the device type
and the format), ``OUT/cache/examples-<key>.ckpt*`` while the pass runs; in the context:
``result``, ``ex_key``, ``keys`` (the layers as the result names them), ``dirs`` (each
layer's folder, ``<i>-<layer>``), ``example_dirs`` (``<layer>/e-<key>/``), ``units`` and
``mine`` (this rank's, ``units[rank::world]``).
Resume: a saved result under the same key is read, not computed (an unreadable one is named
and the pass runs again; ``strict``: an error); an interrupted pass continues from its
checkpoint; ``force`` deletes the checkpoint and runs the pass again.

Example:
    >>> dataset_pass.run(ctx)
    >>> ctx.counts["dataset_pass"]  # 1: the pass ran; 0: its saved result was read
    1
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import warnings
from pathlib import Path
from typing import Any

from convlens import distributed
from convlens.errors import CheckpointError, ConvlensError, ConvlensWarning
from convlens.microscope._common import Context, _key, _layer_dir, _Unit

# ------------------------------------------------------------------------ data


def _data_key(source: Any) -> str:
    """The dataset's fingerprint, with the content of a few items for in-memory data (whose
    fingerprint has no file names)."""
    fp = source.fingerprint()
    if source.length and source.path(0) is None:
        h = hashlib.sha256(fp.encode())
        picks = sorted({round(i * (source.length - 1) / 15) for i in range(16)})
        for i in picks:
            try:
                x = source.load(i)[0]
            except Exception:  # an unreadable item: the pass will say so
                continue
            h.update(x.detach().float().cpu().contiguous().numpy().tobytes())
        fp = h.hexdigest()[:16]
    return fp


def _cached_examples(path: Path, strict: bool) -> Any:
    """The dataset pass's saved result, or None (with a note, ``strict``: an error) when
    it cannot be read: the pass runs again."""
    from convlens.analysis.examples import DatasetExamples

    try:
        return DatasetExamples.load(path)
    except ConvlensError as e:
        why = str(e).splitlines()[0]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        why = f"malformed ({type(e).__name__})"
    if strict:
        raise CheckpointError(
            f"the saved dataset pass {str(path)!r} cannot be used: {why}; --strict refuses to "
            "redo it: delete it, or rerun without --strict, to run the pass again"
        )
    warnings.warn(
        f"ignoring the saved dataset pass {str(path)!r}: {why}; the pass runs again",
        ConvlensWarning,
        stacklevel=3,
    )
    return None


def run(ctx: Context) -> None:
    """The dataset pass, or its saved result; fills ``ctx.result`` and the layers' folders
    and units (see the module's docstring)."""
    from convlens.analysis.examples import dataset_examples

    s = ctx.settings
    t0 = time.perf_counter()
    ex_settings = {
        "weights": ctx.weights,
        "data": ctx.data_key,
        "split": s.split,
        "layers": s.layers,
        "channels": s.channels if not isinstance(s.channels, range) else list(s.channels),
        "k": s.k,
        "device": ctx.dev.type,
        "format": 2,
    }
    ex_key = _key(ex_settings)
    cache = ctx.cache
    ex_dir = cache / f"examples-{ex_key}"
    result: Any = None
    if not s.force and (ex_dir / "examples.json").is_file():
        result = _cached_examples(ex_dir / "examples.json", s.strict)
    if result is None:
        ckpt = cache / f"examples-{ex_key}.ckpt"
        if s.force and ctx.dist.is_main:
            for p in cache.glob(f"examples-{ex_key}.ckpt*"):
                p.unlink()
        distributed.barrier()
        # A checkpoint of other settings (a batch size, a format) is named and not used.
        result = dataset_examples(
            ctx.model,
            ctx.data,
            s.layers,
            k=s.k,
            channels=s.channels,
            device=ctx.dev,
            progress=ctx.progress,
            checkpoint=ckpt,
            preprocess=s.preprocess,
            split=s.split,
            strict=s.strict,
        )
        distributed.barrier()
        if ctx.dist.is_main:
            result.save(ex_dir)
            for p in cache.glob(f"examples-{ex_key}.ckpt*"):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        distributed.barrier()
        ctx.counts["dataset_pass"] = 1
    else:
        ctx.counts["dataset_pass"] = 0
    ctx.stages["dataset pass"] = time.perf_counter() - t0
    keys = list(result.layers)
    ctx.result, ctx.ex_key, ctx.keys = result, ex_key, keys
    ctx.dirs = {key: _layer_dir(i, key) for i, key in enumerate(keys)}
    ctx.example_dirs = {key: ctx.out / ctx.dirs[key] / f"e-{ex_key}" for key in keys}
    ctx.units = [_Unit(key, i, c) for i, key in enumerate(keys) for c in result.channels(key)]
    ctx.mine = ctx.units[ctx.dist.rank :: ctx.dist.world]
