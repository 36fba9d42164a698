"""The documentation: every public name has a docstring with an example, the generated
command-line reference lists every command and option click knows, the API reference
covers every public package, the README keeps what a newcomer needs, and (slow) the site
builds strictly."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest

import convlens
from convlens.cli import main
from convlens.cli._reference import commands, markdown

ROOT = Path(__file__).resolve().parents[1]


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("convlens_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_api_reference_covers_every_package_with_an_all() -> None:
    hooks = _hooks()
    with_all = {
        m.name
        for m in pkgutil.walk_packages(convlens.__path__, "convlens.")
        if m.ispkg and hasattr(importlib.import_module(m.name), "__all__")
    }
    with_all -= {"convlens.cli"}  # its public name is the click group: the CLI reference
    assert with_all <= set(hooks.PUBLIC), sorted(with_all - set(hooks.PUBLIC))
    names = [n for ns in hooks.public_names().values() for n in ns]
    # every function and class of convlens.__all__ is on the page
    for name in convlens.__all__:
        obj = getattr(convlens, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert any(n.endswith(f".{name}") for n in names), name
    assert len(names) == len(set(names)) > 100


def test_every_public_name_has_a_docstring_with_an_example() -> None:
    hooks = _hooks()
    offenders = []
    for public, defined in (o for objs in hooks.public_objects().values() for o in objs):
        mod, name = defined.rsplit(".", 1)
        doc = inspect.getdoc(getattr(importlib.import_module(mod), name)) or ""
        if not re.search(r"^Examples?:\s*$", doc, re.MULTILINE):
            offenders.append(public)
    assert not offenders, f"public names without an 'Example:' section: {offenders}"


def _sections(md: str) -> dict[str, str]:
    parts = re.split(r"^## (convlens[\w -]*)$", md, flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_cli_reference_lists_every_command_and_option() -> None:
    md = markdown()
    sections = _sections(md)
    # the click tree, walked here on its own
    expected: dict[str, click.Command] = {}
    for name, cmd in main.commands.items():
        if isinstance(cmd, click.Group):
            for sub, c in cmd.commands.items():
                expected[f"convlens {name} {sub}"] = c
        else:
            expected[f"convlens {name}"] = cmd
    assert set(sections) == set(expected) == set(commands())
    assert len(expected) >= 14
    for path, cmd in expected.items():
        body = sections[path]
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                for opt in [*p.opts, *p.secondary_opts]:
                    assert f"`{opt}`" in body, (path, opt)
            elif isinstance(p, click.Argument):
                assert p.human_readable_name in body, (path, p.name)


def test_cli_reference_escapes_and_shows_choices_and_defaults() -> None:
    sections = _sections(markdown())
    tour = sections["convlens tour"]
    assert "`--quick`" in tour and "| flag |" in tour
    device = next(line for line in tour.splitlines() if line.startswith("| `--device`"))
    assert "`auto` \\| `cpu` \\| `cuda` \\| `mps`" in device and "| `auto` |" in device
    assert "timm:&lt;name&gt;" in sections["convlens activations"]  # no raw HTML


def test_a_new_option_appears_in_the_reference() -> None:
    @click.group()
    def g() -> None:
        """A group."""

    @g.command("demo")
    @click.option("--alpha", type=int, default=3, help="The <alpha> | value.")
    @click.argument("paths", nargs=-1)
    def demo(alpha: int, paths: tuple[str, ...]) -> None:
        """Demo."""

    md = markdown(g)
    assert "## convlens demo" in md
    assert "| `--alpha` | INTEGER | `3` | The &lt;alpha&gt; \\| value. |" in md
    assert "`[PATHS]...`" in md


def test_readme_keeps_what_a_newcomer_needs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'pip install -e ".[test]" && pytest' in readme
    assert "convlens tour --quick" in readme
    for question in [
        "What does a network see?",
        "What does a filter do?",
        "Which layers are there?",
        "What does each layer respond to?",
        "Does it know *where* things are?",
        "Which pixels does the answer depend on?",
        "Which pixels made it say *dog*, and can I trust that map?",
        "What does a network learn?",
        "What does a big model see?",
        "What input makes a neuron fire?",
        "What does each channel respond to across my data?",
        "Show me every unit",
        "All of it, for my model",
    ]:
        assert f"| {question} |" in readme, question
    assert len(readme.splitlines()) < 120


def test_every_docs_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert pages and all(p in nav for p in pages), [p for p in pages if p not in nav]


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    exe = shutil.which("mkdocs")
    cmd = [exe] if exe else [sys.executable, "-m", "mkdocs"]
    proc = subprocess.run(
        [*cmd, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "convlens microscope" in cli and "--no-attributions" in cli
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "convlens.render" in api and "&gt;&gt;&gt;" in api
