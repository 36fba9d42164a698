"""``convlens classify``: the top-k classes of one or more images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from convlens._io import write_json
from convlens.cli._group import (
    MODEL_HELP,
    _device_option,
    _handle_errors,
    _load_bundle,
    _note,
    _out_option,
    _output_option,
    _versions,
    _wrote,
    main,
)


@main.command("classify")
@click.option(
    "--model", "model_spec", default="efficientnet_lite0", show_default=True, help=MODEL_HELP
)
@click.option(
    "--image",
    "images",
    multiple=True,
    help="Image path or URL; more may follow it (--image a.jpg b.jpg). "
    "Default: the bundled sample photo.",
)
@click.argument("more_images", nargs=-1, metavar="[IMG]...")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True)
@click.option(
    "--weights",
    default="default",
    show_default=True,
    help="default: pretrained, downloaded if needed; none: random init (meaningless "
    "predictions, said in every output); or a named set (IMAGENET1K_V2, a timm tag).",
)
@click.option("--arch", default=None, help="Architecture of a .pt/.pth state dict.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a random init.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@_output_option
@_out_option(Path("out"), "Folder for classify.json.")
@_device_option
@_handle_errors
def classify_cmd(
    model_spec: str,
    images: tuple[str, ...],
    more_images: tuple[str, ...],
    top: int,
    weights: str,
    arch: str | None,
    seed: int,
    batch_size: int,
    output: str | None,
    out: Path,
    device: str,
) -> None:
    """Top-k classes with readable labels for one or more images: a table and classify.json."""
    import warnings

    from convlens.classify import classify
    from convlens.device import resolve_device
    from convlens.images import sample_image, sample_image_path

    dev = resolve_device(device)
    bundle = _load_bundle(model_spec, weights, arch, seed, dev)
    sources = [*images, *more_images]
    if sources:
        inputs: list[Any] = list(sources)
        names = list(sources)
    else:
        inputs, names = [sample_image()], [sample_image_path().name]
    if not bundle.pretrained:
        _note(f"{bundle.description}: its predictions mean nothing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the note above says it once
        results = classify(
            bundle,
            inputs,
            k=top,
            batch_size=batch_size,
            progress=len(inputs) > batch_size,
            output=output,
        )
    click.echo(bundle.description)
    for name, preds in zip(names, results):
        click.echo(f"\n{name}")
        click.echo(f"{'rank':>4}  {'probability':>11}  {'index':>5}  label")
        for rank, p in enumerate(preds, 1):
            click.echo(f"{rank:>4}  {p.probability:>11.2%}  {p.index:>5}  {p.label}")
    path = write_json(
        out / "classify.json",
        {
            "model": bundle.description,
            "pretrained": bundle.pretrained,
            "weights": bundle.weights,
            "top": top,
            "images": [
                {"image": name, "predictions": [p.to_dict() for p in preds]}
                for name, preds in zip(names, results)
            ],
            "versions": _versions(dev),
        },
    )
    click.echo("")
    _wrote([path])
