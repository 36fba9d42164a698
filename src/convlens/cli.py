"""The ``convlens`` command line. It only parses arguments, calls the API and writes files.

Every command takes ``--out DIR`` and ``--device auto|cpu|cuda|mps``, prints what it wrote,
and exits with status 2 and a one-line reason on bad input.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import torch

from convlens import __version__
from convlens._io import versions, write_json
from convlens.errors import ConvlensError

F = TypeVar("F", bound=Callable[..., Any])

DEVICE_CHOICES = click.Choice(["auto", "cpu", "cuda", "mps"], case_sensitive=False)


class BadInput(click.ClickException):
    """A one-line error, exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"convlens: error: {self.format_message()}", err=True)


def _handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            _show_notes()
            return result
        except (ConvlensError, ValueError, TypeError, KeyError, FileNotFoundError) as e:
            msg = (
                str(e)
                if not isinstance(e, KeyError) or isinstance(e, ConvlensError)
                else str(e.args[0])
            )
            raise BadInput(msg.splitlines()[0] if msg else type(e).__name__) from None

    return wrapper  # type: ignore[return-value]


def _note(message: str) -> None:
    """A note for stderr, shown once the command has succeeded (an error stays one line)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        click.echo(f"convlens: note: {message}", err=True)
    else:
        ctx.meta.setdefault("convlens.notes", []).append(message)


def _show_notes() -> None:
    ctx = click.get_current_context(silent=True)
    for message in ctx.meta.pop("convlens.notes", []) if ctx is not None else []:
        click.echo(f"convlens: note: {message}", err=True)


def _versions(device: torch.device) -> dict[str, Any]:
    return {**versions(), "device": str(device)}


def _wrote(paths: list[Path]) -> None:
    for p in paths:
        click.echo(f"wrote {p}")


def _layers_arg(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [s.strip() for s in value.split(",") if s.strip()]
    if not names:
        raise BadInput("--layers is empty: give comma-separated layer names, e.g. bn1,layer4")
    return names


def _out_option(default: Path | None, help: str = "Folder for the figures and JSON.") -> Any:
    """The ``--out DIR`` option every command takes."""
    return click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=default,
        show_default=default is not None,
        help=help,
    )


def _device_option(fn: F) -> F:
    return click.option(
        "--device",
        type=DEVICE_CHOICES,
        default="auto",
        show_default=True,
        help="Where to compute; auto picks CUDA when it is there.",
    )(fn)


def _model_options(fn: F) -> F:
    fn = click.option(
        "--seed", type=int, default=0, show_default=True, help="Seed of a random init."
    )(fn)
    fn = click.option("--arch", default=None, help="Architecture of a .pt/.pth state dict.")(fn)
    fn = click.option(
        "--weights",
        default="auto",
        show_default=True,
        help="auto: pretrained when the weights are on disk (efficientnet_lite0 always), "
        "else random init, said in every output; default: pretrained, downloaded if "
        "needed; none: random init; or a named set (IMAGENET1K_V2, a timm tag).",
    )(fn)
    return fn


MODEL_HELP = (
    "simple_cnn, efficientnet_lite0 (pretrained, offline), a torchvision name (resnet18, "
    "googlenet, ...), timm:<name>, or a checkpoint path."
)


def _output_option(fn: F) -> F:
    return click.option(
        "--output",
        "output",
        default=None,
        metavar="KEY",
        help="For a model that returns a dict, tuple or dataclass: the entry holding the "
        "class scores (a key such as logits, an index, or an attribute name). Default: "
        "the only 2-d tensor.",
    )(fn)


def _load_bundle(spec: str, weights: str, arch: str | None, seed: int, device: Any) -> Any:
    """load_model for a command; a fallback to random init is noted on stderr at the end."""
    from convlens.models import load_model

    bundle = load_model(spec, weights=weights, arch=arch, seed=seed, device=device)
    if bundle.info.get("note"):
        _note(bundle.info["note"])
    return bundle


class _Group(click.Group):
    """Turns click's own usage errors into the same one-line message, exit status 2."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"convlens: error: {e.format_message()}{where}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("convlens: aborted", err=True)
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="convlens")
def main() -> None:
    """Look inside convolutional networks: filters, activations, spatial information."""


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


@main.command("filters")
@_out_option(Path("out"), "Folder for the figures and selectivity.json.")
@_device_option
@_handle_errors
def filters_cmd(out: Path, device: str) -> None:
    """Hand-made 3x3 kernels on synthetic images: the course's grid and a selectivity table."""
    from convlens.analysis.filters import KERNELS, selectivity, test_images
    from convlens.device import resolve_device
    from convlens.plot import filter_grid, kernels, save_figure

    dev = resolve_device(device)
    table = selectivity(device=dev)
    click.echo("peak response of each kernel (columns) on each image (rows), border excluded:")
    click.echo(str(table))
    written = [
        save_figure(filter_grid(), out / "filters.png"),
        save_figure(filter_grid(test_images(), KERNELS), out / "filters_all.png"),
        save_figure(kernels(), out / "kernels.png"),
        write_json(
            out / "filters.json",
            {
                "selectivity": table.to_dict(),
                "kernels": {k: v.tolist() for k, v in KERNELS.items()},
                "images": {k: v.tolist() for k, v in test_images().items()},
                "padding": 1,
                "versions": _versions(dev),
            },
        ),
    ]
    _wrote(written)


def _load_input(bundle: Any, image: str | None) -> tuple[torch.Tensor, str]:
    from convlens.images import load_image, sample_image, sample_image_path

    if image is None:
        return bundle.preprocess(sample_image()), str(sample_image_path().name)
    return bundle.preprocess(load_image(image)), image


def _safe_name(layer: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in layer)


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


@main.command("train")
@click.option(
    "--data",
    "data_spec",
    default="shapes",
    show_default=True,
    help="shapes (offline, drawn), imagenette (downloads 99 MB once), or a folder "
    "with train/ and val/ or a .tgz/.tar archive.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Epochs (default: the recipe's, 8 for course).",
)
@_out_option(Path("out/train"), "Checkpoint, metrics.json and figures go here.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option(
    "--recipe",
    type=click.Choice(["course", "fast"]),
    default="course",
    show_default=True,
    help="course: Adam 1e-3 constant; fast: one-cycle to 1e-2, progressive resizing, "
    "label smoothing.",
)
@click.option(
    "--model",
    "arch",
    default="simple_cnn",
    show_default=True,
    help="simple_cnn or a torchvision architecture (trained from scratch).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--lr", type=float, default=None, help="Learning rate (peak for fast).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--pipeline",
    type=click.Choice(["fast", "course"]),
    default="fast",
    show_default=True,
    help="fast: decoded cache + batch augmentation; course: PIL in DataLoader workers.",
)
@click.option(
    "--size", default="160", show_default=True, help="Imagenette download size: 160, 320 or full."
)
@click.option("--strict", is_flag=True, help="Fail on an unreadable image instead of skipping it.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_device_option
@_handle_errors
def train_cmd(
    data_spec: str,
    epochs: int | None,
    out: Path,
    resume: bool,
    recipe: str,
    arch: str,
    batch_size: int | None,
    lr: float | None,
    seed: int,
    pipeline: str,
    size: str,
    strict: bool,
    quiet: bool,
    device: str,
) -> None:
    """Train a model (the course's SimpleCNN by default) and look at what it learned."""
    from convlens.data import load_data
    from convlens.device import resolve_device
    from convlens.models.zoo import build_architecture
    from convlens.plot import confusion, curves, filters_before_after, predictions, save_figure
    from convlens.train import sample_predictions, train

    dev = resolve_device(device)
    size_arg: int | str = int(size) if size.isdigit() else size
    train_data, val_data = load_data(data_spec, size=size_arg, progress=not quiet)
    model = build_architecture(arch, len(train_data.classes), seed=seed)
    click.echo(
        f"training {arch} on {train_data.name}: {len(train_data)} train / {len(val_data)} "
        f"val images, {len(train_data.classes)} classes, recipe {recipe}, {dev}"
    )
    result = train(
        model,
        train_data,
        val_data,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        out=out,
        resume=resume,
        recipe=recipe,
        device=dev,
        pipeline=pipeline,
        arch=arch,
        progress=not quiet,
        strict=strict,
    )
    written = [out / "model.safetensors", out / "model.json", out / "metrics.json"]
    written.append(
        save_figure(
            curves(result.history, title=f"{arch} on {train_data.name}"), out / "curves.png"
        )
    )
    if (
        result.conv1_before is not None
        and result.conv1_after is not None
        and result.conv1_before.shape[1] == 3
    ):
        written.append(
            save_figure(
                filters_before_after(result.conv1_before, result.conv1_after),
                out / "filters_before_after.png",
            )
        )
    if result.final is not None:
        written.append(
            save_figure(confusion(result.final.confusion, result.classes), out / "confusion.png")
        )
        imgs, true, pred = sample_predictions(result.model, val_data, n=12, device=dev)
        written.append(
            save_figure(predictions(imgs, true, pred, result.classes), out / "predictions.png")
        )
        click.echo(
            f"val accuracy {result.final.accuracy:.1%} after {len(result.history)} "
            f"epochs, {result.train_seconds:.0f} s of training "
            f"({result.images_per_s:.0f} images/s)"
        )
    _wrote(written)


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
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True)
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
    lr: float,
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
    )
    click.echo(f"{bundle.description}\n{result.objective}, {steps} steps")
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


def _save_png(image: torch.Tensor, path: Path) -> Path:
    """``[C, H, W]`` in [0, 1] as an 8-bit PNG, written atomically: greyscale for one
    channel, RGB of the first 3 otherwise."""
    from PIL import Image

    from convlens._io import atomic_open

    shown = image[:3] if image.shape[0] >= 3 else image[:1]
    arr = (shown.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_open(path, "wb") as fh:
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(fh, format="PNG")
    return path


@main.command("report")
@click.argument("folder", metavar="DIR", type=click.Path(path_type=Path))
@_out_option(None, "Write report.html into this folder instead of DIR.")
@_handle_errors
def report_cmd(folder: Path, out: Path | None) -> None:
    """Rebuild DIR/report.html from the report.json and PNGs of an earlier `convlens tour`.

    Nothing is recomputed: the page is rendered again from the files in DIR, with every
    figure embedded, so the one HTML file can be shared on its own.
    """
    from convlens.report import write_report

    _wrote([write_report(folder, out)])


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
    from convlens.tour import tour

    t0 = time.perf_counter()
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
    click.echo(f"done in {time.perf_counter() - t0:.0f} s")
    _wrote([html, out / "report.json"])


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


@main.command("examples")
@click.option(
    "--model", "model_spec", default="efficientnet_lite0", show_default=True, help=MODEL_HELP
)
@click.option(
    "--data",
    "data_spec",
    default="shapes",
    show_default=True,
    help="shapes (offline), imagenette (downloaded once), a folder (class sub-folders, a "
    "flat folder of images, or train/ and val/), or an Imagenette .tgz/.tar.",
)
@click.option(
    "--split",
    type=click.Choice(["train", "val"]),
    default="val",
    show_default=True,
    help="The split of shapes, imagenette or a train/ + val/ folder.",
)
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
@click.option("--strict", is_flag=True, help="Fail on an unreadable image instead of skipping it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@_model_options
@_device_option
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
        if not ctx.is_main:
            return
        for w in caught:
            if not str(w.message).startswith("skipped "):
                _note(str(w.message))
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
