"""A microscope for your own model: every channel of some layers as a static site.

:func:`microscope` is a pipeline of stages, one module each; each module's docstring says
its inputs, its outputs (files) and its resume rule, and its ``run(ctx)`` takes the shared
:class:`~convlens.microscope._common.Context` (the resolved settings, the output folder,
the distributed context, the device, and what the earlier stages left), so a stage can be
called and tested alone. In order:

1. :mod:`~convlens.microscope.dataset_pass`, **the dataset pass**
   (:func:`convlens.dataset_examples`): the top-k and bottom-k images of every channel, its
   statistics, a histogram of its per-image scores and, with labels, its class
   selectivity. Its result is kept in ``OUT/cache/examples-<key>/``; the pass checkpoints
   as it goes, so an interrupted one continues.
2. :mod:`~convlens.microscope.renders`, **the renders**: for every channel, feature
   visualizations as in the Distill appendix: the channel objective, the neuron objective
   at the centre position, the negative (the channel minimised) and a diversity set
   (``diversity`` images with Lucid's diversity term). Many channels share one
   optimisation batch; each channel's starting images come from its own generator (seeded
   by the settings, the layer and the channel) and every batch draws the same transform
   sequence, so a channel's images depend on the settings and the channel only. Batches
   are padded to exactly ``batch`` channels, so no kernel sees a different shape when
   fewer channels, or more ranks, share the work.
3. :mod:`~convlens.microscope.checks`, **every render checked against the dataset**: each
   channel's saved PNGs (the channel render and the diversity set) are read back and fed
   to the model as the renders are (upsampled to the model's input size, normalised, in
   the model's own dtype, BatchNorm not folded, no autocast: the way the dataset pass
   feeds a preprocessed image), one forward per channel. The channel render's unit,
   reduced like the dataset pass (the max over positions by default), is set against the
   unit's top dataset example (``render_vs_dataset``: ``render``, ``top_example``,
   ``ratio`` = render / top example when the top example scores above 0, ``below`` =
   render < top example, ``reduce``); each diversity image's channel mean against the
   channel render's (``png_value``, ``relative``). The numbers go to ``NNNN-check.json``
   beside the renders, with the SHA-256 of the PNGs they were measured on: a rerun
   measures again only a PNG that changed, so renders reused from disk are measured from
   the files on disk.
4. :mod:`~convlens.microscope.examples`, **the examples**: each channel's top-k examples
   cut out at their receptive field with the activation overlaid, the whole top images
   small, and the bottom-k.
5. :mod:`~convlens.microscope.attributions`, **the attributions** (``attributions=True``):
   for the top examples, the channel's value at the example's arg-max position attributed
   to the input pixels (input x gradient), cut at the receptive-field crop and drawn as a
   signed overlay on one symmetric scale per channel. Its budget is a quarter of the
   dataset pass's time: one (image, channel) pair costs 1.2 (wall) to 2 (CPU time) images
   of the pass, so each channel gets as many of its top examples as 0.125 pairs per
   dataset image afford, at least 3 (all 9 for a large dataset; integrated gradients'
   steps each cost a pair again). Many pairs share one forward, stopped at the layer, and
   one backward; only the winners' images are read again.
6. :mod:`~convlens.microscope.atlas`, **the activation atlas** (``atlas=True``): each
   layer's :func:`convlens.atlas` in ``<layer>/atlas/``, its cells' top channels linked to
   the unit pages.
7. :mod:`~convlens.microscope.pages`, **the pages**, by rank 0: ``microscope.json`` and
   the static site (:mod:`convlens.report.site`), with the connections between the layers
   (:mod:`~convlens.microscope.connections`). A layer's ``"atlas"`` entry in
   ``microscope.json`` (the site path of its activation atlas page), present when a stage
   put one in ``ctx.atlas``, becomes an "Activation atlas" link on the layer's page.

Every channel's images are written atomically as their own files under a folder named by
a hash of the settings that decide them (``<layer>/r-<key>/``, ``<layer>/e-<key>/``,
``<layer>/a-<key>/``); a
channel is finished when its ``NNNN.json`` is there, and a rerun skips finished channels
(after Ctrl-C, a crash or a restarted torchrun job). ``force=True`` recomputes everything.
SIGTERM or Ctrl-C during the pass, the renders, the crops or the attributions stops at the
next batch (or channel) boundary, its work written, and raises :class:`convlens.Preempted`.

Under ``torchrun`` the dataset pass is sharded (``range(rank, N, world)``), the channels
are split ``units[rank::world]`` (each rank on its own GPU), and rank 0 writes
``microscope.json`` and the pages (:mod:`convlens.report.site`) after a barrier. The site is
the same for any ``batch`` and any world size, given the same threads per process (oneDNN
splits a convolution's work by thread count; torchrun gives every rank one thread). Mean,
std and selectivity are float64 merges that agree across world sizes to about 1e-15; the
site shows them to 10 significant digits. ``OUT`` must be a folder every rank sees.

Example:
    >>> site = convlens.microscope(convlens.load_model("efficientnet_lite0"),
    ...                            convlens.data.shapes(), ["blocks.4"], out="site/")
    >>> site / "index.html"
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from convlens import distributed
from convlens._io import folder_lock
from convlens.capture import model_device
from convlens.device import DeviceLike, resolve_device
from convlens.microscope import atlas as atlas_stage  # microscope() has a flag atlas
from convlens.microscope import attributions as attribution  # microscope() has a flag attributions
from convlens.microscope import checks, dataset_pass, examples, pages, renders

# Every name the module had before it became a package, from the module that now defines it
# (tests, benchmarks and other modules import them from convlens.microscope).
from convlens.microscope._common import (  # noqa: F401
    _KINDS,
    _PNG_END,
    _PNG_MAGIC,
    Context,
    Settings,
    _finished,
    _key,
    _layer_dir,
    _outline,
    _overlay,
    _png_problem,
    _read,
    _save_png,
    _thumbnail,
    _Unit,
)
from convlens.microscope.attributions import (  # noqa: F401
    _ATTR_CACHE,
    _ATTR_MAX_ROWS,
    _ATTR_METHOD,
    _ATTR_MIN_TOP,
    _ATTR_PAIRS_PER_IMAGE,
    _ATTR_STEPS,
    _ATTR_VERSION,
    _RDBU_R,
    _attr_files,
    _attr_numbers,
    _attr_plan,
    _attr_rows,
    _attr_scale,
    _attr_top,
    _attribute_layer,
    _attribute_pairs,
    _attribution_units,
    _AttrPlan,
    _diverging,
    _save_rgb,
    _signed_overlay,
    _total_memory,
    _write_attributions,
)
from convlens.microscope.checks import (  # noqa: F401
    _CHECK_ABOUT,
    _CHECK_VERSION,
    _check_path,
    _check_units,
    _measure,
    _png_check_why,
    _ratio,
    _read_png,
    _render_vs_dataset,
)
from convlens.microscope.connections import (  # noqa: F401
    _CHANNELWISE,
    _CHANNELWISE_FUNCS,
    _connections,
    _describe_node,
)
from convlens.microscope.dataset_pass import (  # noqa: F401
    _cached_examples,
    _data_key,
)
from convlens.microscope.examples import (  # noqa: F401
    _THUMB,
    _example_files,
    _example_units,
)
from convlens.microscope.pages import (  # noqa: F401
    _CONNECTED,
    _MOMENT_DIGITS,
    FORMAT,
    _attribution_doc,
    _document,
    _finite,
    _relative,
    _rounded,
    _stats,
)
from convlens.microscope.renders import (  # noqa: F401
    _DIVERSITY_WEIGHT,
    _RENDER_VERSION,
    _auto_batch,
    _check_render_memory,
    _plan,
    _render_batch,
    _render_files,
    _render_units,
    _RenderPlan,
    _row_seed,
    _rows,
    _UnitObjective,
    _write_renders,
)

__all__ = ["FORMAT", "microscope"]


# ------------------------------------------------------------------------ the public function


def microscope(
    model: Any,
    data: Any,
    layers: str | Sequence[str],
    *,
    out: str | os.PathLike[str],
    channels: Any = None,
    k: int = 9,
    steps: int = 160,
    size: int = 128,
    diversity: int = 4,
    batch: int | str = "auto",
    device: DeviceLike | None = None,
    force: bool = False,
    seed: int = 0,
    lr: float | None = None,
    diversity_weight: float = _DIVERSITY_WEIGHT,
    split: str = "val",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    title: str | None = None,
    settings: dict[str, Any] | None = None,
    attributions: bool = True,
    strict: bool = False,
    precision: str = "auto",
    schedule: Any = "cosine",
    atlas: bool = False,
) -> Path:
    """Build a browsable static site of every channel of ``layers``: feature
    visualizations beside dataset examples, statistics and connections; returns ``out``.

    ``model``: a :class:`convlens.ModelBundle` or an ``nn.Module``; ``data``: anything
    :func:`convlens.dataset_examples` reads (``convlens.data.shapes()``, a folder, a
    dataset). ``channels`` (``"0-63"``, a list or ``{layer: ...}``) limits the channels;
    ``k`` examples each way; ``steps``, ``size``, ``lr``, ``seed``, ``schedule``,
    ``precision``: the renders, as :func:`convlens.render` takes them (``size``
    px, upsampled to a bundle's input size as ``render`` does; ``precision="auto"``:
    bfloat16 autocast where the hardware is fast at it; ``schedule="constant"``, Lucid's
    constant 0.05, reproduces renders made before the ``"cosine"`` default); ``diversity`` images in
    the diversity set (0 for none), pushed apart by Lucid's diversity term with
    ``diversity_weight`` (5 against the channel's mean, which keeps the diversity images at
    about 80% of the channel render's objective on efficientnet_lite0; Lucid's is 1e2);
    ``batch`` channels rendered together (``"auto"``: 8
    on a CPU, 32 on a GPU; it changes the speed, not the images). ``force`` recomputes
    what earlier runs left in ``out``. ``settings``: extra entries for the index page.
    ``attributions``: attribute the top examples to their pixels (input x gradient of the
    unit's value at the example's position, over the receptive-field crop: "what in this
    crop drives the unit"; as many examples per channel as a quarter of the dataset pass's
    time affords, at least 3); ``False`` skips it. ``atlas``: each layer's activation atlas
    (:func:`convlens.atlas` at its defaults: a 20 x 20 grid of 80 px icons, 512 steps) in
    ``<layer>/atlas/``, linked from the layer's page (needs ``convlens[atlas]``).

    Every unit's channel render is checked against the dataset: ``render_vs_dataset`` in
    microscope.json and on its page compares the unit's value on the saved render PNG
    (fed as the renders are: upsampled to the model's input size and normalised) with its
    top dataset example's score, under the dataset pass's reduction (max over positions);
    the layer's grid marks the units whose render stays below. Each diversity image's
    ``relative`` is its channel mean over the channel render's, both on the PNGs.

    Resuming: what an earlier run left in ``out`` (the dataset pass's checkpoint and
    result, each channel's files) is reused only when complete; a truncated or corrupt
    file, or a checkpoint of other settings, is named in a
    :class:`~convlens.errors.ConvlensWarning` and computed again. ``strict``: an unreadable
    dataset image, or such a file, raises instead. One live run writes ``out`` at a time
    (:func:`convlens._io.folder_lock`; rank 0's under torchrun): a second one raises
    :class:`~convlens.errors.FolderLockedError` naming the first.

    Example:
        >>> site = microscope(convlens.load_model("efficientnet_lite0"), "photos/",
        ...                   ["blocks.4"], out="site/", steps=128)
        >>> sorted(p.name for p in site.iterdir())[:2]
        ['0-blocks.4', 'cache']
    """
    ctx = _context(
        model,
        data,
        layers,
        out=out,
        channels=channels,
        k=k,
        steps=steps,
        size=size,
        diversity=diversity,
        batch=batch,
        device=device,
        force=force,
        seed=seed,
        lr=lr,
        diversity_weight=diversity_weight,
        split=split,
        preprocess=preprocess,
        progress=progress,
        title=title,
        settings=settings,
        attributions=attributions,
        strict=strict,
        precision=precision,
        schedule=schedule,
        atlas=atlas,
    )
    with folder_lock(ctx.out, "microscope", ctx=ctx.dist):  # one live run writes out
        _prepare(ctx)
        dataset_pass.run(ctx)  # sharded; every rank gets the merged result
        renders.run(ctx)  # each rank its channels, units[rank::world], as in the stages below
        checks.run(ctx)
        examples.run(ctx)
        attribution.run(ctx)
        atlas_stage.run(ctx)  # atlas=True: each layer's activation atlas
        pages.run(ctx)  # rank 0, after every rank's work
    return ctx.out


# ------------------------------------------------------------------------ before the stages


def _context(
    model: Any,
    data: Any,
    layers: str | Sequence[str],
    *,
    out: str | os.PathLike[str],
    channels: Any = None,
    k: int = 9,
    steps: int = 160,
    size: int = 128,
    diversity: int = 4,
    batch: int | str = "auto",
    device: DeviceLike | None = None,
    force: bool = False,
    seed: int = 0,
    lr: float | None = None,
    diversity_weight: float = _DIVERSITY_WEIGHT,
    split: str = "val",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    title: str | None = None,
    settings: dict[str, Any] | None = None,
    attributions: bool = True,
    strict: bool = False,
    precision: str = "auto",
    schedule: Any = "cosine",
    atlas: bool = False,
) -> Context:
    """:func:`microscope`'s arguments (it takes the same) checked and resolved: the model
    and its bundle, the device, the distributed context, ``batch``; and the render batch's
    memory checked. Nothing is written or allocated.

    Example:
        >>> ctx = _context(model, data, "conv1,conv2", out="site/", steps=8)
        >>> ctx.settings.layers
        ['conv1', 'conv2']
    """
    from convlens.models.zoo import model_and_bundle

    for name, v, lo in (
        ("k", k, 1),
        ("steps", steps, 1),
        ("size", size, 8),
        ("diversity", diversity, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer of at least {lo}, got {v!r}")
    if diversity == 1:
        raise ValueError("diversity is 0 (no diversity set) or at least 2 images, got 1")
    if not isinstance(attributions, bool):
        raise TypeError(f"attributions is True or False, got {attributions!r}")
    if not isinstance(atlas, bool):
        raise TypeError(f"atlas is True or False, got {atlas!r}")
    if atlas:
        from convlens.analysis.atlas import require_umap

        require_umap()  # a missing extra is one line before the dataset pass, not after
    if not (isinstance(diversity_weight, (int, float)) and math.isfinite(diversity_weight)):
        raise ValueError(f"diversity_weight must be a finite number, got {diversity_weight!r}")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    from convlens.analysis.featurevis.schedule import get_schedule
    from convlens.device import PRECISIONS

    get_schedule(schedule)  # an unknown name fails before the dataset pass, not after
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if batch != "auto" and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive integer or 'auto', got {batch!r}")
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ValueError("no layers given: name at least one, e.g. ['blocks.4']")
    net, bundle = model_and_bundle(model)
    dev = distributed.local_device(model_device(net) if device is None else resolve_device(device))
    render_batch = _auto_batch(dev) if batch == "auto" else int(batch)
    # before anything is written or allocated
    _check_render_memory(net, bundle, layers, size, render_batch, diversity, dev)
    return Context(
        model=model,
        data=data,
        net=net,
        bundle=bundle,
        settings=Settings(
            layers=layers,
            channels=channels,
            k=k,
            steps=steps,
            size=size,
            diversity=diversity,
            diversity_weight=diversity_weight,
            batch=render_batch,
            seed=seed,
            lr=lr,
            split=split,
            preprocess=preprocess,
            precision=precision,
            schedule=schedule,
            attributions=attributions,
            atlas=atlas,
            force=force,
            strict=strict,
            title=title,
            extra=settings,
        ),
        out=Path(out),
        dist=distributed.context(dev),
        dev=dev,
        progress=progress,
    )


def _prepare(ctx: Context) -> None:
    """Inside the folder lock, before the first stage: the model on its device, the
    images' preprocessing, the fingerprints of the weights and of the data (the folder
    keys hash them) and ``OUT/cache``.

    Example:
        >>> _prepare(ctx)
        >>> len(ctx.weights), ctx.cache.is_dir()
        (16, True)
    """
    from convlens.analysis._sources import make_source
    from convlens.analysis.examples import _fingerprint
    from convlens.models.layers import unwrap

    s = ctx.settings
    if ctx.dev != model_device(ctx.net):
        ctx.net.to(ctx.dev)
    bundle = ctx.bundle
    ctx.prep = s.preprocess if s.preprocess is not None else (bundle.preprocess if bundle else None)
    source = make_source(ctx.data, ctx.prep, split=s.split)
    ctx.weights = _fingerprint(unwrap(ctx.net))
    ctx.data_key = _data_key(source)
    if ctx.dist.is_main:
        ctx.cache.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
