"""``convlens report``: rebuild a tour's report.html from the files it left."""

from __future__ import annotations

from pathlib import Path

import click

from convlens.cli._group import _handle_errors, _out_option, _wrote, main


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
