"""``convlens activations``: mean maps by depth and the feature maps of each layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

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
    _out_option,
    _safe_name,
    _versions,
    _wrote,
    main,
)


@main.command("activations")
@click.option(
    "--model",
    "model_spec",
    default="simple_cnn",
    show_default=True,
    help=MODEL_HELP,
)
@click.option("--image", default=None, help="Image path or URL (default: the bundled sample).")
@click.option(
    "--layers",
    "layers",
    default=None,
    help="Comma-separated layer names (default: an early and a deep layer).",
)
@click.option(
    "--relu/--no-relu",
    default=True,
    show_default=True,
    help="Apply ReLU before averaging (as the course does for BatchNorm outputs).",
)
@click.option(
    "--max-maps",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Feature maps shown per layer.",
)
@_out_option(Path("out"))
@_model_options
@_device_option
@_handle_errors
def activations_cmd(
    model_spec: str,
    image: str | None,
    layers: str | None,
    relu: bool,
    max_maps: int,
    out: Path,
    weights: str,
    arch: str | None,
    seed: int,
    device: str,
) -> None:
    """What each layer responds to: mean maps by depth and every feature map of a layer."""
    from convlens.analysis.activations import channel_stats
    from convlens.capture import capture
    from convlens.device import resolve_device
    from convlens.models.zoo import default_layers
    from convlens.plot import channel_stats as plot_stats
    from convlens.plot import feature_maps, mean_maps, save_figure

    dev = resolve_device(device)
    bundle = _load_bundle(model_spec, weights, arch, seed, dev)
    names = _layers_arg(layers) or default_layers(bundle)
    x, source = _load_input(bundle, image)
    acts = capture(bundle.model, x, names)
    spatial = {k: v for k, v in acts.items() if v.ndim == 4}
    if not spatial:
        raise BadInput(
            "none of --layers outputs a feature map [C, H, W]; `convlens layers MODEL` shows shapes"
        )
    written = [save_figure(mean_maps(spatial, relu=relu), out / "mean_maps.png")]
    summary: dict[str, Any] = {}
    for name, act in acts.items():
        if act.ndim != 4:
            summary[name] = {"shape": list(act.shape[1:]), "note": "not a feature map"}
            continue
        stats = channel_stats(act[0])
        written.append(
            save_figure(
                feature_maps(act, title=name, max_maps=max_maps),
                out / f"feature_maps_{_safe_name(name)}.png",
            )
        )
        written.append(
            save_figure(
                plot_stats(stats, title=name), out / f"channel_stats_{_safe_name(name)}.png"
            )
        )
        summary[name] = {
            "shape": list(act.shape[1:]),
            "mean": float(act.mean()),
            "max": float(act.max()),
            "fraction_active": float((act > 0).float().mean()),
            "channels": stats.to_dict(),
        }
        click.echo(
            f"{name:<20} {'x'.join(map(str, act.shape[1:])):<14} mean {float(act.mean()):+.3f}"
            f"  max {float(act.max()):.3f}  active {float((act > 0).float().mean()):.0%}"
        )
    written.append(
        write_json(
            out / "activations.json",
            {
                "model": bundle.description,
                "image": source,
                "relu": relu,
                "layers": summary,
                "versions": _versions(dev),
            },
        )
    )
    _wrote(written)
