"""``convlens layers`` and ``convlens models``: the layers of a model, and the models the
``MODEL`` options accept.
"""

from __future__ import annotations

from pathlib import Path

import click

from convlens._io import versions, write_json
from convlens.cli._group import (
    BadInput,
    _device_option,
    _handle_errors,
    _load_bundle,
    _model_options,
    _out_option,
    _versions,
    _wrote,
    main,
)


@main.command("layers")
@click.argument("model")
@click.option(
    "--input-size",
    type=click.IntRange(min=8),
    default=None,
    help="Input side in pixels (default: the model's).",
)
@_out_option(None, "Also write layers.json into this folder.")
@_model_options
@_device_option
@_handle_errors
def layers_cmd(
    model: str,
    input_size: int | None,
    out: Path | None,
    weights: str,
    arch: str | None,
    seed: int,
    device: str,
) -> None:
    """List every addressable layer of MODEL with its output shape and calls per forward.

    MODEL is simple_cnn, efficientnet_lite0, a torchvision name (resnet18, googlenet, ...),
    timm:<name>, or a checkpoint path.
    """
    from convlens.device import resolve_device
    from convlens.models import list_layers

    dev = resolve_device(device)
    bundle = _load_bundle(model, weights, arch, seed, dev)
    size = input_size if input_size is not None else bundle.input_size
    c = bundle.preprocess.channels
    infos = list_layers(bundle.model, (1, c, size, size))
    w = max([len(i.name) for i in infos] + [5])
    tw = max([len(i.type) for i in infos] + [4])
    click.echo(f"{bundle.description}, input 1x{c}x{size}x{size}")
    click.echo(f"{'layer'.ljust(w)}  {'type'.ljust(tw)}  {'output shape':<20} calls  params")
    for i in infos:
        shape = "x".join(map(str, i.output_shape)) if i.output_shape else "-"
        calls = str(i.calls) if i.measured else "-"
        click.echo(f"{i.name.ljust(w)}  {i.type.ljust(tw)}  {shape:<20} {calls:>5}  {i.params:,}")
    if out is not None:
        path = write_json(
            out / "layers.json",
            {
                "model": bundle.description,
                "input_shape": [1, c, size, size],
                "layers": [i.to_dict() for i in infos],
                "versions": _versions(dev),
            },
        )
        _wrote([path])


@main.command("models")
@click.argument("pattern", required=False)
@click.option(
    "--timm", "with_timm", is_flag=True, help="Also list timm's 1,000-odd pretrained models."
)
@_out_option(None, "Also write models.json into this folder.")
@_handle_errors
def models_cmd(pattern: str | None, with_timm: bool, out: Path | None) -> None:
    """List the models MODEL options accept, and whether their weights are on disk.

    PATTERN filters names with shell wildcards ('resnet*', 'timm:convnext*').
    """
    from convlens.models import list_models

    entries = list_models(pattern, timm=with_timm)
    if not entries:
        raise BadInput(f"no model matches {pattern!r} (try --timm, or a wider pattern)")
    w = max(len(m.name) for m in entries)
    ww = max([len(m.weights or "-") for m in entries] + [7])
    click.echo(f"{'model'.ljust(w)}  {'source'.ljust(11)}  {'weights'.ljust(ww)}  on disk")
    for m in entries:
        source = "pip package" if m.source not in ("convlens", "torchvision", "timm") else m.source
        click.echo(
            f"{m.name.ljust(w)}  {source.ljust(11)}  {(m.weights or '-').ljust(ww)}  "
            f"{'yes' if m.on_disk else 'no' if m.weights else '-'}"
        )
    if out is not None:
        _wrote(
            [
                write_json(
                    out / "models.json",
                    {"models": [m.to_dict() for m in entries], "versions": versions()},
                )
            ]
        )
