"""``convlens visualize``: feature visualization, the images that make a unit fire hardest."""

from __future__ import annotations

from pathlib import Path

import click

from convlens._io import write_json
from convlens.cli._group import (
    MODEL_HELP,
    BadInput,
    _device_option,
    _handle_errors,
    _load_bundle,
    _note,
    _out_option,
    _output_option,
    _render_options,
    _safe_name,
    _save_png,
    _versions,
    _wrote,
    main,
)


@main.command("visualize")
@click.option(
    "--model",
    "model_spec",
    default="efficientnet_lite0",
    show_default=True,
    help=MODEL_HELP + " The course uses inceptionv1.",
)
@click.option(
    "--objective",
    default=None,
    help="layer:3 (a channel), layer:0-9 or layer:1,5,7 (one channel per image), "
    "layer:3@7,7 (a neuron), output:208 (a class logit). Default: the first 10 channels "
    "of mixed4a (inceptionv1) or the same depth of the model (blocks.4, layer3, ...).",
)
@click.option("--steps", type=click.IntRange(min=1), default=512, show_default=True)
@click.option(
    "--size",
    type=click.IntRange(min=8),
    default=None,
    help="Image side in pixels. Default: the model's input size when below 128 (a 32 px "
    "network renders at 32), else 128.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Peak learning rate (default: the schedule's: cosine 0.3, constant 0.05).",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=None,
    help="Images to render (default: one per channel of the objective).",
)
@click.option(
    "--transforms",
    type=click.Choice(["standard", "none"]),
    default="standard",
    show_default=True,
    help="standard: Lucid's pad, jitter, scale, rotate.",
)
@click.option(
    "--thresholds",
    default=None,
    help="Step counts at which to also save the images, e.g. 64,256.",
)
@click.option(
    "--redirect-relu",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Redirect ReLU gradients for this many first steps (Lucid's trick for dead units).",
)
@click.option(
    "--weights",
    default="default",
    show_default=True,
    help="default: pretrained, downloaded if needed; none: random init (the images then "
    "show nothing learned, said in every output); or a named set.",
)
@click.option("--arch", default=None, help="Architecture of a .pt/.pth state dict.")
@_render_options
@_output_option
@_out_option(Path("out/visualize"), "PNGs, grid.png and render.json go here.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_device_option
@_handle_errors
def visualize_cmd(
    model_spec: str,
    objective: str | None,
    steps: int,
    size: int | None,
    seed: int,
    lr: float | None,
    batch: int | None,
    transforms: str,
    thresholds: str | None,
    redirect_relu: int,
    weights: str,
    arch: str | None,
    output: str | None,
    out: Path,
    quiet: bool,
    device: str,
    precision: str,
    schedule: str,
) -> None:
    """Feature visualization: render the images that make a unit fire hardest."""
    from convlens.analysis.featurevis import default_objective, render
    from convlens.analysis.featurevis.objectives import parse
    from convlens.device import resolve_device
    from convlens.plot import feature_vis, save_figure

    dev = resolve_device(device)
    ts: list[int] | None = None
    if thresholds:
        try:
            ts = [int(t) for t in thresholds.replace(" ", "").split(",") if t]
        except ValueError:
            raise BadInput(
                f"--thresholds {thresholds!r}: expected step counts like 64,256"
            ) from None
    spec = objective or None
    if spec is not None:
        parse(spec)  # a bad objective fails before any model is loaded
    bundle = _load_bundle(model_spec, weights, arch, 0, dev)
    if not bundle.pretrained:
        _note(f"{bundle.description}: a random network's renders show nothing learned")
    spec = spec or default_objective(bundle)
    result = render(
        bundle,
        spec,
        size=size,
        steps=steps,
        lr=lr,
        batch=batch,
        seed=seed,
        transforms=transforms,
        thresholds=ts,
        redirect_relu=redirect_relu,
        progress=False if quiet else None,
        output=output,
        precision=precision,
        schedule=schedule,
    )
    click.echo(
        f"{bundle.description}\n{result.objective}, {steps} steps "
        f"({schedule} schedule, {result.settings['precision']})"
    )
    click.echo(f"{'image':>5}  {'objective':>10}  target")
    for i, (label, value) in enumerate(zip(result.labels, result.final_values)):
        click.echo(f"{i:>5}  {float(value):>10.4g}  {label}")
    written = []
    for t_index, t in enumerate(result.thresholds):
        last = t_index == len(result.thresholds) - 1
        folder = out if last else out / f"step{t:04d}"
        for i, label in enumerate(result.labels):
            name = f"{i:02d}_{_safe_name(label)}.png"
            written.append(_save_png(result.snapshots[t_index, i], folder / name))
    written.append(save_figure(feature_vis(result), out / "grid.png"))
    data = result.to_dict()
    data["model"] = bundle.description
    data["pretrained"] = bundle.pretrained
    data["images"] = [f"{i:02d}_{_safe_name(label)}.png" for i, label in enumerate(result.labels)]
    data["versions"] = _versions(dev)
    written.append(write_json(out / "render.json", data))
    shown = written if len(written) <= 6 else [*written[:2], *written[-2:]]
    if len(shown) < len(written):
        click.echo(f"wrote {len(written) - len(shown)} more PNGs in {out}")
    _wrote(shown)
