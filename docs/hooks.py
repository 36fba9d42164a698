"""MkDocs hooks: the generated pages (the command-line reference from the click commands,
the API reference from every public ``__all__``) and the benchmark figures.

Nothing here is written twice: ``cli.md`` and ``api.md`` hold a marker that is replaced
at build time, so a new option or a new public name appears on the site by itself.
"""

from __future__ import annotations

import importlib
import inspect
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The packages whose ``__all__`` is the public API, in the order the reference shows them.
PUBLIC = [
    "convlens",
    "convlens.objectives",
    "convlens.plot",
    "convlens.data",
    "convlens.models",
    "convlens.analysis",
    "convlens.analysis.attribution",
    "convlens.analysis.featurevis",
    "convlens.report",
    "convlens.microscope",  # a package of stages; microscope() shows under convlens already
]


def public_objects() -> dict[str, list[tuple[str, str]]]:
    """``{package: [(public dotted name, defining dotted name), ...]}`` for each public
    function and class, each object once (under the first package that exports it). The
    defining name (``convlens.capture.capture``) is what the reference resolves, since a
    public name can also be a module's (``convlens.capture``)."""
    out: dict[str, list[tuple[str, str]]] = {}
    seen: set[int] = set()
    for pkg in PUBLIC:
        mod = (
            importlib.import_module("convlens.analysis.featurevis.objectives")
            if pkg == "convlens.objectives"
            else importlib.import_module(pkg)
        )
        names = []
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if name.startswith("__") or isinstance(obj, types.ModuleType):
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            names.append((f"{pkg}.{name}", f"{obj.__module__}.{obj.__qualname__}"))
        out[pkg] = names
    return out


def public_names() -> dict[str, list[str]]:
    """``{package: [public dotted name, ...]}`` (see :func:`public_objects`)."""
    return {pkg: [public for public, _ in objs] for pkg, objs in public_objects().items()}


def api_markdown() -> str:
    lines = []
    for pkg, objs in public_objects().items():
        if not objs:
            continue
        lines += [f"## `{pkg}`", ""]
        for public, defined in objs:
            lines += [
                f"::: {defined}",
                "    options:",
                f'      heading: "{public}"',
                f'      toc_label: "{public.rsplit(".", 1)[-1]}"',
                "",
            ]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if "<!-- convlens:cli -->" in markdown:
        from convlens.cli._reference import markdown as cli_markdown

        markdown = markdown.replace("<!-- convlens:cli -->", cli_markdown())
    if "<!-- convlens:api -->" in markdown:
        markdown = markdown.replace("<!-- convlens:api -->", api_markdown())
    return markdown


def on_files(files: Any, config: Any) -> Any:
    """The benchmark figures, at the paths ``benchmarks/README.md`` links them by (it is
    included into ``benchmarks.md``)."""
    from mkdocs.structure.files import File

    for png in sorted((ROOT / "benchmarks" / "figures").glob("*.png")):
        files.append(
            File(
                f"figures/{png.name}",
                src_dir=str(ROOT / "benchmarks"),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files
