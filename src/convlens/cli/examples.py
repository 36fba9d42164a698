"""``convlens examples``: the top-k and bottom-k dataset images of every channel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from convlens.cli._group import (
    MODEL_HELP,
    BadInput,
    F,
    _device_option,
    _handle_errors,
    _layers_arg,
    _load_bundle,
    _model_options,
    _note,
    _note_warnings,
    _out_option,
    _preemptible,
    _safe_name,
    _wrote,
    main,
)


def _examples_data(spec: str, split: str, progress: bool) -> Any:
    """``--data`` for examples: a dataset pair's ``split``, or a folder of images as it is
    (labelled sub-folders or a flat folder)."""
    from convlens.data import load_data

    path = Path(spec).expanduser()
    plain_folder = (
        spec not in ("shapes", "imagenette")
        and path.is_dir()
        and not (path / "train").is_dir()
        and not (path / "shapes.json").is_file()
    )
    if plain_folder:
        return path
    train, val = load_data(spec, progress=progress)
    return train if split == "train" else val


def _dataset_options(fn: F) -> F:
    """``--model``, ``--data`` and ``--split`` of the dataset-scale commands (examples,
    microscope): efficientnet_lite0 on the drawn shapes by default, both offline."""
    fn = click.option(
        "--split",
        type=click.Choice(["train", "val"]),
        default="val",
        show_default=True,
        help="The split of shapes, imagenette or a train/ + val/ folder.",
    )(fn)
    fn = click.option(
        "--data",
        "data_spec",
        default="shapes",
        show_default=True,
        help="shapes (offline), imagenette (downloaded once), a folder (class sub-folders, a "
        "flat folder of images, or train/ and val/), or an Imagenette .tgz/.tar.",
    )(fn)
    fn = click.option(
        "--model", "model_spec", default="efficientnet_lite0", show_default=True, help=MODEL_HELP
    )(fn)
    return fn


@main.command("examples")
@_dataset_options
@click.option(
    "--layers",
    default=None,
    help="Comma-separated layer names (default: the model's early and deep layer).",
)
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=9,
    show_default=True,
    help="Top and bottom images kept per channel.",
)
@click.option(
    "--reduce",
    type=click.Choice(["max", "mean"]),
    default="max",
    show_default=True,
    help="An image's score: its maximum over positions, or its mean.",
)
@click.option(
    "--channels",
    default=None,
    help="Channels to collect and draw, e.g. 0-15 (default: collect all, draw the first 16).",
)
@click.option(
    "--batch-size",
    default="auto",
    show_default=True,
    help="Images per forward (auto: 32 on a CPU, 128 on a GPU).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Threads decoding images (default: the CPU count, at most 8).",
)
@_out_option(Path("out/examples"), "examples.json and examples_<layer>.png go here.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option(
    "--strict",
    is_flag=True,
    help="Fail on an unreadable image instead of skipping it, and on a --resume checkpoint "
    "that cannot be used (truncated, corrupt, another format, other settings) instead of "
    "starting over with a note.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_model_options
@_device_option
@_preemptible(add=("--resume",))
@_handle_errors
def examples_cmd(
    model_spec: str,
    data_spec: str,
    split: str,
    layers: str | None,
    k: int,
    reduce: str,
    channels: str | None,
    batch_size: str,
    workers: int | None,
    out: Path,
    resume: bool,
    strict: bool,
    quiet: bool,
    weights: str,
    arch: str | None,
    seed: int,
    device: str,
) -> None:
    """Dataset examples: the top-k and bottom-k images of every channel across a dataset,
    cut at each unit's receptive field, with running statistics, in one pass.

    Runs unchanged under torchrun (one process per GPU, one machine or many): each rank
    reads its own shard, rank 0 writes the outputs.
    """
    import warnings

    import torch.distributed as dist

    from convlens import distributed
    from convlens._io import folder_lock
    from convlens.analysis.examples import checkpoint_path, dataset_examples, parse_channels
    from convlens.device import resolve_device
    from convlens.models.zoo import default_layers
    from convlens.plot import examples as plot_examples
    from convlens.plot import save_figure

    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        raise BadInput(f"--batch-size {batch_size!r}: a positive integer or auto")
    chans = parse_channels(channels) if channels is not None else None
    names = _layers_arg(layers)
    dev = distributed.local_device(resolve_device(device))
    owned = not (dist.is_available() and dist.is_initialized())
    ctx = distributed.context(dev)
    try:
        with folder_lock(out, "examples", ctx=ctx, note=_note):  # one live run writes --out
            ckpt = out / "examples.ckpt"
            with distributed.main_first(ctx):  # downloads, drawn datasets, stale checkpoints
                bundle = _load_bundle(model_spec, weights, arch, seed, dev)
                data = _examples_data(data_spec, split, progress=not quiet and ctx.is_main)
                if ctx.is_main and not resume:
                    for stale in [ckpt, *out.glob("examples.ckpt.rank*")]:
                        stale.unlink(missing_ok=True)
            if resume and not checkpoint_path(ckpt, ctx).is_file() and ctx.is_main:
                _note(f"--resume: no checkpoint in {out}, starting from the beginning")
            names = names or default_layers(bundle)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = dataset_examples(
                    bundle,
                    data,
                    names,
                    k=k,
                    reduce=reduce,  # type: ignore[arg-type]
                    batch_size=int(batch_size) if batch_size != "auto" else "auto",
                    device=dev,
                    progress=not quiet,
                    checkpoint=ckpt,
                    channels=chans,
                    split=split,
                    strict=strict,
                    workers=workers,
                )
            _note_warnings(caught, ctx.is_main)
            if not ctx.is_main:
                return
            if result.skipped:
                _note(
                    f"{len(result.skipped)} unreadable image(s) skipped, listed in examples.json "
                    f"(first: {result.skipped[0].path or result.skipped[0].index}: "
                    f"{result.skipped[0].reason})"
                )
            s = result.settings
            click.echo(
                f"{bundle.description} on {result.dataset} ({result.length} images"
                + (f", {len(result.skipped)} skipped" if result.skipped else "")
                + f"), {s['seconds']:.1f} s ({s['images_per_second']:.0f} images/s), "
                f"{ctx.world} process(es), {s['device']}"
            )
            written = [result.save(out)]
            for key, le in result.layers.items():
                rf = le.receptive
                field = (
                    f"receptive field {rf.size[0]}x{rf.size[1]} px, stride {rf.stride[0]}"
                    if rf is not None and rf.bounded
                    else "receptive field: the whole image"
                )
                top = result.top(key, le.channels[0])
                best = f"; channel {le.channels[0]}'s top image #{top[0].index}" if top else ""
                click.echo(f"{key}: {len(le.channels)} channels, {field}{best}")
                drawn = le.channels if chans is not None else le.channels[:16]
                fig = plot_examples(result, data, key, list(drawn))
                written.append(save_figure(fig, out / f"examples_{_safe_name(key)}.png"))
            _wrote(written)
    finally:
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
