"""``convlens microscope``: a browsable static site of every channel of some layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from convlens.cli._group import (
    BadInput,
    _device_option,
    _handle_errors,
    _layers_arg,
    _load_bundle,
    _model_options,
    _note,
    _note_warnings,
    _out_option,
    _preemptible,
    _render_options,
    _wrote,
    main,
)
from convlens.cli.examples import _dataset_options, _examples_data

#: What ``--quick`` sets, for every option not given: one middle layer, 16 channels, few
#: steps; efficientnet_lite0 on the drawn shapes, both offline (the defaults anyway).
QUICK = {"channels": "0-15", "steps": 32, "k": 6, "diversity": 2}


@main.command("microscope")
@_dataset_options
@click.option(
    "--layers",
    default=None,
    help="Comma-separated layer names (default: the model's middle layer, blocks.4 for "
    "efficientnet_lite0).",
)
@click.option("--channels", default=None, help="Channels of every layer, e.g. 0-63 (default: all).")
@click.option(
    "--k", type=click.IntRange(min=1), default=9, show_default=True, help="Examples each way."
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=160,
    show_default=True,
    help="Render steps (with the cosine schedule, 160 pass what Lucid's constant 0.05 "
    "reaches in 256 on 30 of 32 channels measured).",
)
@click.option(
    "--size", type=click.IntRange(min=8), default=128, show_default=True, help="Render size, px."
)
@click.option(
    "--diversity",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="Images in each channel's diversity set (0: none).",
)
@click.option(
    "--diversity-weight",
    type=float,
    default=5.0,  # convlens.microscope._DIVERSITY_WEIGHT
    show_default=True,
    help="How hard the diversity images are pushed apart (Lucid's is 100; the default keeps "
    "them near 80% of the channel render's objective).",
)
@click.option(
    "--batch",
    default="auto",
    show_default=True,
    help="Channels rendered together (auto: 8 on a CPU, 32 on a GPU); the images do not "
    "depend on it.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Peak learning rate of the renders (default: the schedule's: cosine 0.3, constant 0.05).",
)
@_render_options
@click.option(
    "--attributions/--no-attributions",
    default=True,
    show_default=True,
    help="Attribute the top examples to their pixels (input x gradient of the channel at "
    "the example's position, over its receptive-field crop): what in the crop drives the "
    "unit. As many per channel as a quarter of the dataset pass's time affords, at least 3.",
)
@click.option(
    "--atlas",
    is_flag=True,
    help="Add each layer's activation atlas (a 20 x 20 grid of 80 px icons, class-free) "
    "in <layer>/atlas/, linked from the layer's page. Needs pip install "
    '"convlens[atlas]".',
)
@_out_option(Path("site"), "The site: index.html, microscope.json, a folder per layer.")
@click.option("--force", is_flag=True, help="Recompute what an earlier run left in --out.")
@click.option(
    "--quick",
    is_flag=True,
    help="A first look in minutes on a laptop CPU: one middle layer, channels 0-15, 32 "
    "steps, k 6, 2 diversity images (options you give win).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Fail on an unreadable image instead of skipping it, and on a file an earlier run "
    "left in --out that cannot be used (a truncated or corrupt checkpoint, saved pass, PNG "
    "or JSON; a checkpoint of other settings) instead of computing it again with a note.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_model_options
@_device_option
@_preemptible(drop=("--force",))
@_handle_errors
def microscope_cmd(
    model_spec: str,
    data_spec: str,
    split: str,
    layers: str | None,
    channels: str | None,
    k: int,
    steps: int,
    size: int,
    diversity: int,
    diversity_weight: float,
    batch: str,
    lr: float | None,
    precision: str,
    schedule: str,
    attributions: bool,
    atlas: bool,
    out: Path,
    force: bool,
    quick: bool,
    strict: bool,
    quiet: bool,
    weights: str,
    arch: str | None,
    seed: int,
    device: str,
) -> None:
    """A microscope for your own model: every channel of the layers as a static site,
    feature visualizations (channel, neuron, negative, a diversity set) beside the top and
    bottom dataset examples, what in each top crop drives the channel (a signed
    attribution), statistics, a histogram and connections. Open
    OUT/index.html from disk; no network, no JavaScript.

    Resumable: a rerun skips finished channels (--force recomputes); what is truncated or
    corrupt is named and computed again (--strict: refused). One run writes --out at a
    time: a second one is refused, naming the first. Runs unchanged under
    torchrun: the dataset pass is sharded, the channels are split over the ranks, rank 0
    writes the pages. --seed seeds the renders (and a random init).
    """
    import warnings

    import torch.distributed as dist

    from convlens import distributed
    from convlens.analysis.examples import parse_channels
    from convlens.analysis.featurevis import featurevis_layer
    from convlens.device import resolve_device
    from convlens.microscope import microscope

    ctx_click = click.get_current_context()

    def given(name: str) -> bool:
        src = ctx_click.get_parameter_source(name)
        return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")

    if quick:
        values: dict[str, Any] = {
            "channels": channels,
            "steps": steps,
            "k": k,
            "diversity": diversity,
        }
        for name, v in QUICK.items():
            if not given(name):
                values[name] = v
        channels = values["channels"]
        steps, k, diversity = int(values["steps"]), int(values["k"]), int(values["diversity"])
    if batch != "auto" and not (batch.isdigit() and int(batch) > 0):
        raise BadInput(f"--batch {batch!r}: a positive integer or auto")
    if diversity == 1:
        raise BadInput("--diversity 1: use 0 (no diversity set) or at least 2 images")
    chans = parse_channels(channels) if channels is not None else None
    names = _layers_arg(layers)
    dev = distributed.local_device(resolve_device(device))
    owned = not (dist.is_available() and dist.is_initialized())
    ctx = distributed.context(dev)
    try:
        with distributed.main_first(ctx):  # downloads and drawn datasets, once
            bundle = _load_bundle(model_spec, weights, arch, seed, dev)
            data = _examples_data(data_spec, split, progress=not quiet and ctx.is_main)
        names = names or [featurevis_layer(bundle)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            site = microscope(
                bundle,
                data,
                names,
                out=out,
                channels=chans,
                k=k,
                steps=steps,
                size=size,
                diversity=diversity,
                diversity_weight=diversity_weight,
                batch=int(batch) if batch != "auto" else "auto",
                device=dev,
                force=force,
                seed=seed,
                lr=lr,
                precision=precision,
                schedule=schedule,
                split=split,
                progress=not quiet,
                settings={"quick": quick, "model_spec": model_spec, "data_spec": data_spec},
                attributions=attributions,
                strict=strict,
                atlas=atlas,
            )
        if not ctx.is_main:
            _note_warnings(caught, False)
            return
        doc_notes = _summary(site)
        _note_warnings(caught, True, skip=doc_notes)
        _wrote([site / "index.html", site / "microscope.json"])
    finally:
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _summary(site: Path) -> set[str]:
    """Print the site's summary and notes; returns the notes."""
    import json

    doc: dict[str, Any] = json.loads((site / "microscope.json").read_text())
    work, stages = doc["work"], doc["stages"]
    layers = ", ".join(f"{layer['name']} ({len(layer['units'])})" for layer in doc["layers"])
    click.echo(
        f"{doc['model']['description']} on {doc['dataset']['name']} "
        f"({doc['dataset']['size']} images): {layers}; "
        f"{doc['settings']['world_size']} process(es), {doc['settings']['device']}"
    )
    timing = ", ".join(f"{name} {sec:.1f} s" for name, sec in stages.items())
    click.echo(f"{timing}; rendered {work['rendered']} channel(s), reused {work['renders_reused']}")
    for note in doc.get("notes", []):
        _note(note)
    return set(doc.get("notes", []))
