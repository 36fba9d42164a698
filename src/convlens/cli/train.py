"""``convlens train``: train a model and look at what it learned."""

from __future__ import annotations

from pathlib import Path

import click

from convlens.cli._group import _device_option, _handle_errors, _note, _out_option, _wrote, main


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
    for note in dict.fromkeys([*train_data.notes, *val_data.notes]):
        _note(note)  # what the folder scan skipped or kept (empty classes, other files)
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
