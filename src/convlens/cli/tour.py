"""``convlens tour``: the whole course as one report."""

from __future__ import annotations

import time
from pathlib import Path

import click

from convlens.cli._group import (
    _device_option,
    _handle_errors,
    _note_warnings,
    _out_option,
    _wrote,
    main,
)


@main.command("tour")
@click.option(
    "--quick",
    is_flag=True,
    help="The embedded offline tour: shapes data, the sample photo, efficientnet_lite0, "
    "few epochs and steps (a few minutes on a laptop CPU).",
)
@click.option(
    "--data",
    "data_spec",
    default=None,
    help="shapes, imagenette, or a folder/archive with train/ and val/ "
    "(default: imagenette; shapes with --quick).",
)
@click.option(
    "--model",
    "model_spec",
    default=None,
    help="Pretrained model for the spatial, pretrained and feature-visualization sections "
    "(default: resnet18, and inceptionv1 for feature visualization; efficientnet_lite0 "
    "with --quick).",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    help="Your image; more may follow it (--image a.jpg b.jpg). Default: the bundled sample photo.",
)
@click.argument("more_images", nargs=-1, metavar="[IMG]...")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs.")
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Feature-visualization steps."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Recompute every section instead of reusing DIR.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_out_option(Path("tour"), "report.html, report.json and the figures go here.")
@_device_option
@_handle_errors
def tour_cmd(
    quick: bool,
    data_spec: str | None,
    model_spec: str | None,
    images: tuple[str, ...],
    more_images: tuple[str, ...],
    epochs: int | None,
    steps: int | None,
    seed: int,
    force: bool,
    quiet: bool,
    out: Path,
    device: str,
) -> None:
    """The whole course as one report: every figure, with the numbers behind it."""
    import warnings

    from convlens.errors import ConvlensWarning
    from convlens.tour import tour

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvlensWarning)
        html = tour(
            quick=quick,
            data=data_spec,
            model=model_spec,
            images=[*images, *more_images],
            epochs=epochs,
            steps=steps,
            out=out,
            force=force,
            seed=seed,
            device=device,
            progress=not quiet,
            echo=click.echo,
        )
    for w in caught:  # notes for files and locks; any other warning as Python shows it
        if not issubclass(w.category, ConvlensWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    _note_warnings([w for w in caught if issubclass(w.category, ConvlensWarning)], True)
    click.echo(f"done in {time.perf_counter() - t0:.0f} s")
    _wrote([html, out / "report.json"])
