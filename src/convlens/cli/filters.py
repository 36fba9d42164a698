"""``convlens filters``: hand-made 3x3 kernels on synthetic images."""

from __future__ import annotations

from pathlib import Path

import click

from convlens._io import write_json
from convlens.cli._group import _device_option, _handle_errors, _out_option, _versions, _wrote, main


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
