"""``convlens atlas``: the activation atlas of one layer as static pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from convlens.cli._group import (
    BadInput,
    _device_option,
    _handle_errors,
    _load_bundle,
    _model_options,
    _note_warnings,
    _out_option,
    _preemptible,
    _render_options_for,
    _wrote,
    main,
)
from convlens.cli.examples import _dataset_options, _examples_data

#: What ``--quick`` sets, for every option not given: a 10 x 10 atlas of 64 px icons after
#: 64 steps; efficientnet_lite0 on the drawn shapes, both offline (the defaults anyway).
QUICK = {"grid": 10, "steps": 64, "size": 64}


def _levels(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--levels {value!r}: comma-separated grid sizes, e.g. 10,20,40") from None
    if not out or any(v < 1 for v in out):
        raise BadInput(f"--levels {value!r}: comma-separated positive grid sizes, e.g. 10,20,40")
    return out


@main.command("atlas")
@_dataset_options
@click.option(
    "--layer",
    default=None,
    help="The layer (default: the model's middle layer, blocks.4 for efficientnet_lite0).",
)
@click.option(
    "--grid",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Cells across the atlas (Lucid's notebook: 20).",
)
@click.option(
    "--levels",
    default=None,
    help="Zoom levels as grid sizes, e.g. 10,20,40; each is its own page (default: "
    "grid/2 and grid).",
)
@click.option(
    "--samples-per-image",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Activation vectors sampled per image, at positions away from the border.",
)
@click.option(
    "--min-count",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Samples a cell needs to get an icon.",
)
@click.option(
    "--classes",
    default=None,
    help='Class atlases: "tench,church" (names or indices of the model\'s classes) or all.',
)
@click.option(
    "--size", type=click.IntRange(min=8), default=80, show_default=True, help="Icon size, px."
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=512, show_default=True, help="Icon steps."
)
@click.option(
    "--whiten/--no-whiten",
    default=True,
    show_default=True,
    help="Render each cell's mean times the inverse covariance (Lucid's whitening).",
)
@click.option(
    "--batch",
    default="auto",
    show_default=True,
    help="Icons rendered together (auto: at most 32, as even as the batches allow); every "
    "batch is padded to it, so the icons "
    "are the same for any number of ranks.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Peak learning rate of the icons (default: the schedule's).",
)
@_render_options_for(
    "constant",
    "The atlas's icons default to constant: on Lite0 blocks.5 cells cosine reached "
    "0.78 of its direction objective at 512 steps (benchmarks/README.md, atlas.py).",
)
@_out_option(Path("atlas"), "The atlas: index.html, atlas.json, icons/, cells/, crops/.")
@click.option("--force", is_flag=True, help="Recompute what an earlier run left in --out.")
@click.option(
    "--quick",
    is_flag=True,
    help="A first look in minutes on a laptop CPU: a 10 x 10 grid of 64 px icons after 64 "
    "steps (options you give win).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_model_options
@_device_option
@_preemptible(drop=("--force",))
@_handle_errors
def atlas_cmd(
    model_spec: str,
    data_spec: str,
    split: str,
    layer: str | None,
    grid: int,
    levels: str | None,
    samples_per_image: int,
    min_count: int,
    classes: str | None,
    size: int,
    steps: int,
    whiten: bool,
    batch: str,
    lr: float | None,
    precision: str,
    schedule: str,
    out: Path,
    force: bool,
    quick: bool,
    quiet: bool,
    weights: str,
    arch: str | None,
    seed: int,
    device: str,
) -> None:
    """The activation atlas of one layer (Carter et al. 2019): activation vectors sampled
    over the data, laid out by UMAP, each grid cell's mean rendered as an icon; class
    atlases with --classes. Open OUT/index.html from disk; no network, no JavaScript.

    Resumable: the samples and the layout are kept in OUT/cache, an icon already rendered
    with the same settings is not rendered again (--force recomputes). Runs unchanged
    under torchrun: the pass is sharded, the icons split over the ranks, rank 0 writes the
    pages. Needs umap-learn: pip install "convlens[atlas]".
    """
    import json
    import warnings

    import torch.distributed as dist

    from convlens import distributed
    from convlens.analysis.featurevis import featurevis_layer
    from convlens.atlas import atlas
    from convlens.device import resolve_device

    ctx_click = click.get_current_context()

    def given(name: str) -> bool:
        src = ctx_click.get_parameter_source(name)
        return src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")

    if quick:
        values: dict[str, Any] = {"grid": grid, "steps": steps, "size": size}
        for name, v in QUICK.items():
            if not given(name):
                values[name] = v
        grid, steps, size = int(values["grid"]), int(values["steps"]), int(values["size"])
    if batch != "auto" and not (batch.isdigit() and int(batch) > 0):
        raise BadInput(f"--batch {batch!r}: a positive integer or auto")
    lv = _levels(levels)
    dev = distributed.local_device(resolve_device(device))
    owned = not (dist.is_available() and dist.is_initialized())
    ctx = distributed.context(dev)
    try:
        with distributed.main_first(ctx):  # downloads and drawn datasets, once
            bundle = _load_bundle(model_spec, weights, arch, seed, dev)
            data = _examples_data(data_spec, split, progress=not quiet and ctx.is_main)
        name = layer or featurevis_layer(bundle)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            site = atlas(
                bundle,
                data,
                name,
                out=out,
                samples_per_image=samples_per_image,
                grid=grid,
                levels=lv,
                min_count=min_count,
                size=size,
                steps=steps,
                whiten=whiten,
                classes=classes,
                seed=seed,
                device=dev,
                batch=int(batch) if batch != "auto" else "auto",
                precision=precision,
                schedule=schedule,
                lr=lr,
                split=split,
                progress=not quiet,
                force=force,
            )
        _note_warnings(caught, ctx.is_main)
        if not ctx.is_main:
            return
        doc = json.loads((site / "atlas.json").read_text())
        cells = ", ".join(
            f"{lvl['grid']}x{lvl['grid']}: {len(lvl['cells'])}" for lvl in doc["levels"]
        )
        lay = doc["layout"]
        agree = (
            f"; nearest 2-D neighbour shares the {lay['agreement_of'].rstrip('s')} "
            f"{lay['neighbour_agreement']:.1%} (chance {lay['chance']:.1%})"
            if lay.get("neighbour_agreement") is not None and lay.get("chance") is not None
            else ""
        )
        click.echo(
            f"{doc['model']} {doc['layer']}: {doc['samples']['count']} samples from "
            f"{doc['samples']['images']} images; icons {cells}"
            + (f"; {len(doc['class_atlases'])} class atlas(es)" if doc["class_atlases"] else "")
            + agree
        )
        click.echo(", ".join(f"{k} {v:.1f} s" for k, v in doc["timing"].items()))
        _wrote([site / "index.html", site / "atlas.json"])
    finally:
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
