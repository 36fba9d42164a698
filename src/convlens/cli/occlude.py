"""``convlens occlude`` and ``convlens sensitivity``: black out part of the image, once (where
each layer changes) or by a sliding window (how much the target drops).
"""

from __future__ import annotations

from pathlib import Path

import click
import torch

from convlens._io import write_json
from convlens.cli._group import (
    MODEL_HELP,
    BadInput,
    _device_option,
    _handle_errors,
    _layers_arg,
    _load_bundle,
    _load_input,
    _model_options,
    _note,
    _out_option,
    _output_option,
    _versions,
    _wrote,
    main,
)


def _parse_box(value: str) -> tuple[int, int, int, int]:
    try:
        parts = tuple(int(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        raise BadInput(f"--box {value!r}: expected four integers top,bottom,left,right") from None
    if len(parts) != 4:
        raise BadInput(f"--box {value!r}: expected four integers top,bottom,left,right")
    return parts[0], parts[1], parts[2], parts[3]


@main.command("occlude")
@click.option(
    "--model",
    "model_spec",
    default="simple_cnn",
    show_default=True,
    help=MODEL_HELP,
)
@click.option("--image", default=None, help="Image path or URL (default: the bundled sample).")
@click.option(
    "--box",
    default="30,90,40,110",
    show_default=True,
    help="top,bottom,left,right in input pixels (after preprocessing).",
)
@click.option(
    "--layers",
    "layers",
    default=None,
    help="Comma-separated layer names (default: an early and a deep layer).",
)
@click.option(
    "--fill",
    type=click.Choice(["zero", "black", "mean", "blur"]),
    default="zero",
    show_default=True,
    help="zero = 0 after normalisation (the dataset mean colour).",
)
@_out_option(Path("out"))
@_model_options
@_device_option
@_handle_errors
def occlude_cmd(
    model_spec: str,
    image: str | None,
    box: str,
    layers: str | None,
    fill: str,
    out: Path,
    weights: str,
    arch: str | None,
    seed: int,
    device: str,
) -> None:
    """The spatial experiment: black out a box and measure where each layer changes."""
    from convlens.analysis.occlusion import occlude
    from convlens.device import resolve_device
    from convlens.models.zoo import default_layers
    from convlens.plot import occlusion, save_figure

    dev = resolve_device(device)
    bundle = _load_bundle(model_spec, weights, arch, seed, dev)
    names = _layers_arg(layers) or default_layers(bundle)
    x, source = _load_input(bundle, image)
    mean, std = bundle.normalize
    result = occlude(
        bundle.model,
        x,
        _parse_box(box),
        names,
        fill,  # type: ignore[arg-type]
        mean=mean,
        std=std,
        model_name=bundle.description,
    )
    click.echo(f"{'layer':<20} {'inside_fraction':>15} {'area_fraction':>13}")
    for name, ch in result.layers.items():
        inside = "n/a" if ch.inside_fraction != ch.inside_fraction else f"{ch.inside_fraction:.3f}"
        click.echo(f"{name:<20} {inside:>15} {ch.area_fraction:>13.3f}")
    data = result.to_dict()
    data["image"] = source
    data["versions"] = _versions(dev)
    _wrote(
        [
            save_figure(occlusion(result), out / "occlusion.png"),
            write_json(out / "occlusion.json", data),
        ]
    )


@main.command("sensitivity")
@click.option("--model", "model_spec", default="simple_cnn", show_default=True, help=MODEL_HELP)
@click.option("--image", default=None, help="Image path or URL (default: the bundled sample).")
@click.option(
    "--target",
    default=None,
    help="A class index (258) or layer:channel (layer2:0, the mean of that channel). "
    "Default: the model's top class for the image.",
)
@click.option("--window", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--stride", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--fill",
    type=click.Choice(["zero", "black", "mean", "blur"]),
    default="zero",
    show_default=True,
    help="zero = 0 after normalisation (the dataset mean colour); mean = the image's mean.",
)
@click.option(
    "--method",
    type=click.Choice(["incremental", "naive"]),
    default="incremental",
    show_default=True,
    help="incremental: recompute only what each window changes (exact); naive: a full "
    "forward per window.",
)
@click.option(
    "--approximate",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=None,
    help="Cap each layer's recomputed region at this fraction of its size: faster, NOT exact.",
)
@click.option(
    "--batch-size", default="auto", show_default=True, help="Windows per forward, or auto."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_output_option
@_out_option(Path("out"), "Folder for sensitivity.png and sensitivity.json.")
@_model_options
@_device_option
@_handle_errors
def sensitivity_cmd(
    model_spec: str,
    image: str | None,
    target: str | None,
    window: int,
    stride: int,
    fill: str,
    method: str,
    approximate: float | None,
    batch_size: str,
    quiet: bool,
    output: str | None,
    out: Path,
    weights: str,
    arch: str | None,
    seed: int,
    device: str,
) -> None:
    """Occlusion sensitivity map: slide a window over the image, record how much the target
    drops (Zeiler and Fergus; Captum's Occlusion, number for number)."""
    import warnings

    from convlens.analysis.sensitivity import parse_target, sensitivity
    from convlens.device import resolve_device
    from convlens.plot import save_figure
    from convlens.plot import sensitivity as plot_sensitivity

    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        raise BadInput(f"--batch-size {batch_size!r}: a positive integer or auto")
    if target is not None:
        parse_target(target)  # a bad spec fails before any model is loaded
    dev = resolve_device(device)
    bundle = _load_bundle(model_spec, weights, arch, seed, dev)
    x, source = _load_input(bundle, image)
    if target is None:
        from convlens.models.forms import model_dtype, select_output
        from convlens.models.layers import evaluating, unwrap

        net = unwrap(bundle.model)
        with evaluating(net), torch.no_grad():
            out_value = net(x.unsqueeze(0).to(dev, model_dtype(net)))
        logits, _ = select_output(out_value, output, what="the default --target")
        if logits.ndim != 2:
            raise BadInput("the model does not output class scores: give --target layer:channel")
        target = str(int(logits.argmax(dim=1)[0]))
        _note(f"--target {target}: the model's top class for this image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sensitivity(
            bundle,
            x,
            target,
            window=window,
            stride=stride,
            fill=fill,  # type: ignore[arg-type]
            batch_size=int(batch_size) if batch_size != "auto" else "auto",
            method=method,  # type: ignore[arg-type]
            approximate=approximate,
            progress=False if quiet else None,
            output=output,
        )
    for w in caught:
        _note(str(w.message).removeprefix("convlens.sensitivity: "))
    label = f" ({result.target_label})" if result.target_label else ""
    click.echo(f"{bundle.description}\ntarget {result.target}{label}, score {result.score:.6g}")
    rows, cols = result.map.shape
    i, j = divmod(int(result.map.argmax()), cols)
    click.echo(
        f"{rows}x{cols} windows of {window}x{window} px, stride {stride}, fill {fill}, "
        f"{result.method}{'' if result.exact else ' (APPROXIMATE)'}, {result.seconds:.2f} s"
    )
    click.echo(
        f"largest drop {float(result.map[i, j]):.4g} at rows {result.ys[i]}-"
        f"{min(result.ys[i] + window, x.shape[-2])}, columns {result.xs[j]}-"
        f"{min(result.xs[j] + window, x.shape[-1])}; smallest {float(result.map.min()):.4g}"
    )
    data = result.to_dict()
    data["model"] = bundle.description
    data["image"] = source
    data["versions"] = _versions(dev)
    _wrote(
        [
            save_figure(plot_sensitivity(result), out / "sensitivity.png"),
            write_json(out / "sensitivity.json", data),
        ]
    )
