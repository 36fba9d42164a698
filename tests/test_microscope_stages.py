"""convlens.microscope as a pipeline of stages: each stage run alone on a tiny setup, its
files and its resume rule; the stage list of microscope() against its docstring; the
layer page's optional link to an activation atlas."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "analysis"))

from _examples_fixtures import tiny_data, tiny_model

from _html import parse
from convlens.errors import ConvlensError, ReportError
from convlens.report.site import write_site

M = sys.modules["convlens.microscope"]  # convlens.microscope is the function
LAYERS = ["conv1", "conv2"]
STAGE_MODULES = (
    "dataset_pass",
    "renders",
    "checks",
    "examples",
    "attributions",
    "atlas",
    "pages",
)


def _ctx(out: Path, **kw: Any) -> Any:
    """A prepared context of a tiny model on 21 images: 2 layers x 2 channels."""
    args: dict[str, Any] = dict(
        k=3, steps=2, size=16, diversity=0, batch=2, progress=False, channels="0-1"
    )
    args.update(kw)
    ctx = M._context(tiny_model(), tiny_data(n=21), LAYERS, out=out, **args)
    M._prepare(ctx)
    return ctx


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (mtime in ns, size)."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _stage(name: str) -> Any:
    return importlib.import_module(f"convlens.microscope.{name}")


# ------------------------------------------------------------------------ stages alone


def test_the_dataset_pass_and_the_examples_alone_write_their_files_once(tmp_path: Path) -> None:
    dataset_pass, examples = _stage("dataset_pass"), _stage("examples")
    out = tmp_path / "site"
    ctx = _ctx(out)
    dataset_pass.run(ctx)
    assert ctx.counts == {"dataset_pass": 1}
    (saved,) = (out / "cache").glob("examples-*/examples.json")
    assert saved.parent.name == f"examples-{ctx.ex_key}"
    assert not list((out / "cache").glob("*.ckpt*"))  # the checkpoint goes with the result
    assert ctx.keys == LAYERS and ctx.dirs == {"conv1": "0-conv1", "conv2": "1-conv2"}
    assert [(u.layer, u.channel) for u in ctx.units] == [
        (layer, c) for layer in LAYERS for c in (0, 1)
    ]
    assert ctx.mine == ctx.units  # one process: every unit is this rank's
    assert set(ctx.stages) == {"dataset pass"}

    examples.run(ctx)
    assert ctx.counts["examples_written"] == 4 and ctx.counts["examples_reused"] == 0
    for layer in LAYERS:
        folder = ctx.example_dirs[layer]
        assert folder == out / ctx.dirs[layer] / f"e-{ctx.ex_key}"
        for c in (0, 1):
            marker = json.loads((folder / f"{c:04d}.json").read_text())
            assert len(marker["top"]) == len(marker["bottom"]) == 3
            for f in [*marker["top"], *marker["bottom"]]:
                assert M._png_problem(folder / f["crop"]) is None
    assert not list(out.glob("*/r-*"))  # alone: no renders, no pages
    assert not (out / "microscope.json").exists()

    # resume: a new run of the same settings reads both stages' files and writes nothing
    before = _files(out)
    again = _ctx(out)
    dataset_pass.run(again)
    examples.run(again)
    assert again.counts == {"dataset_pass": 0, "examples_written": 0, "examples_reused": 4}
    assert again.ex_key == ctx.ex_key
    assert _files(out) == before

    # a damaged channel is the only one written again
    victim = ctx.example_dirs["conv2"] / "0001-top-0.png"
    victim.write_bytes(victim.read_bytes()[:40])
    third = _ctx(out)
    dataset_pass.run(third)
    with pytest.warns(UserWarning, match="truncated"):
        examples.run(third)
    assert third.counts["examples_written"] == 1 and third.counts["examples_reused"] == 3
    changed = {f for f, v in _files(out).items() if before.get(f) != v}
    assert changed and all(f.startswith(f"1-conv2/e-{ctx.ex_key}/0001") for f in changed)


def test_the_renders_and_their_checks_alone_and_resumed(tmp_path: Path) -> None:
    dataset_pass, renders, checks = _stage("dataset_pass"), _stage("renders"), _stage("checks")
    out = tmp_path / "site"
    ctx = _ctx(out)
    with pytest.raises(ConvlensError, match=r"dataset_pass\.run\(ctx\)"):
        renders.run(ctx)  # a stage before the one it reads: one line naming that one
    dataset_pass.run(ctx)
    with pytest.raises(ConvlensError, match=r"renders\.run\(ctx\)"):
        checks.run(ctx)
    renders.run(ctx)
    checks.run(ctx)
    assert (ctx.counts["rendered"], ctx.counts["renders_reused"]) == (4, 0)
    assert (ctx.counts["render_checks"], ctx.counts["render_checks_reused"]) == (4, 0)
    for layer in LAYERS:
        folder = ctx.render_dirs[layer]
        assert folder.parent == out / ctx.dirs[layer] and folder.name.startswith("r-")
        for c in (0, 1):
            record = json.loads((folder / f"{c:04d}.json").read_text())
            assert record["layer"] == layer  # ("channel" holds the channel render's record)
            for kind in ("channel", "neuron", "negative"):
                assert M._png_problem(folder / record[kind]["image"]) is None
            assert (folder / f"{c:04d}-check.json").is_file()

    before = _files(out)
    again = _ctx(out)
    dataset_pass.run(again)
    renders.run(again)
    checks.run(again)
    assert (again.counts["rendered"], again.counts["renders_reused"]) == (0, 4)
    assert (again.counts["render_checks"], again.counts["render_checks_reused"]) == (0, 4)
    assert again.render_dirs == ctx.render_dirs
    assert _files(out) == before

    forced = _ctx(out, force=True)  # force: every stage computes again
    dataset_pass.run(forced)
    renders.run(forced)
    assert forced.counts["dataset_pass"] == 1 and forced.counts["rendered"] == 4


def test_attributions_off_is_a_stage_that_does_nothing(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path / "site", attributions=False)
    _stage("dataset_pass").run(ctx)
    _stage("attributions").run(ctx)
    assert ctx.attr_plan is None and ctx.attr_dirs == {}
    assert ctx.counts["attributions_written"] == ctx.counts["attributions_reused"] == 0
    assert "attributions" not in ctx.stages
    assert not list((tmp_path / "site").glob("*/a-*"))


# ------------------------------------------------------------------------ the stage list


def _stage_calls() -> list[str]:
    """The modules whose ``run(ctx)`` microscope() calls, in order (aliases resolved)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(M.microscope)))
    calls = [
        node.func.value.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "run"
        and isinstance(node.func.value, ast.Name)
    ]
    calls_in_order = sorted(
        calls, key=lambda name: inspect.getsource(M.microscope).index(f"{name}.run(")
    )
    return [getattr(M, name).__name__.rpartition(".")[2] for name in calls_in_order]


def test_the_atlas_stage_builds_each_layers_atlas_and_the_layer_links_it(tmp_path: Path) -> None:
    pytest.importorskip("umap")
    ctx = _ctx(tmp_path / "site", atlas=True)
    _stage("dataset_pass").run(ctx)
    _stage("atlas").run(ctx)
    assert set(ctx.atlas) == set(ctx.keys)
    for key, href in ctx.atlas.items():
        doc = json.loads((ctx.out / href).with_name("atlas.json").read_text())
        assert doc["layer"] == key and doc["parent"]["href"] == "../index.html"
        have = {u.channel for u in ctx.units if u.layer == key}
        for cell in doc["levels"][-1]["cells"]:
            for t in cell["top_channels"]:
                assert t["unit"] == (
                    f"../{t['channel']:04d}.html" if t["channel"] in have else None
                )
    _stage("renders").run(ctx)
    _stage("checks").run(ctx)
    _stage("examples").run(ctx)
    _stage("attributions").run(ctx)
    _stage("pages").run(ctx)
    for key, href in ctx.atlas.items():
        layer_page = (ctx.out / ctx.dirs[key] / "index.html").read_text()
        assert 'href="atlas/index.html"' in layer_page
        assert (ctx.out / href).is_file()


def test_without_atlas_the_stage_does_nothing(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path / "site")
    _stage("dataset_pass").run(ctx)
    _stage("atlas").run(ctx)
    assert ctx.atlas == {} and "atlas" not in ctx.stages
    assert not list((tmp_path / "site").glob("*/atlas"))


def test_microscope_runs_the_stages_its_docstring_lists() -> None:
    listed = re.findall(r"^\d+\. :mod:`~convlens\.microscope\.(\w+)`", M.__doc__, re.M)
    assert listed == list(STAGE_MODULES)
    assert _stage_calls() == list(STAGE_MODULES)


@pytest.mark.parametrize("name", STAGE_MODULES)
def test_every_stage_module_says_its_inputs_outputs_and_resume_rule(name: str) -> None:
    mod = _stage(name)
    doc = mod.__doc__ or ""
    for section in ("Inputs:", "Outputs:", "Resume:", "Example:"):
        assert re.search(rf"^{section}", doc, re.M), f"{name}: no {section!r} in its docstring"
    params = list(inspect.signature(mod.run).parameters.values())
    assert [p.name for p in params] == ["ctx"] and params[0].annotation in ("Context", M.Context)
    assert mod.run.__doc__


def test_the_context_takes_what_microscope_takes() -> None:
    def defaults(f: Any) -> dict[str, Any]:
        return {
            n: (p.kind, p.default, p.annotation) for n, p in inspect.signature(f).parameters.items()
        }

    assert defaults(M._context) == defaults(M.microscope)


# ------------------------------------------------------------------------ the atlas link


def test_a_layers_atlas_is_linked_from_its_pages_only_when_present(tmp_path: Path) -> None:
    out = tmp_path / "site"
    ctx = _ctx(out, attributions=False)
    for name in STAGE_MODULES:
        _stage(name).run(ctx)
    plain = {p: out.joinpath(p).read_bytes() for p in _files(out) if p.endswith(".html")}
    doc = json.loads((out / "microscope.json").read_text())
    assert all("atlas" not in layer for layer in doc["layers"])
    assert not any(b"Activation atlas" in page for page in plain.values())

    ctx.atlas = {"conv1": "atlas/0-conv1/index.html"}
    _stage("pages").run(ctx)
    doc = json.loads((out / "microscope.json").read_text())
    assert [layer.get("atlas") for layer in doc["layers"]] == ["atlas/0-conv1/index.html", None]
    for page, old in plain.items():
        new = out.joinpath(page).read_bytes()
        linked = page.startswith("0-conv1/") and not page[8:].startswith("0")
        if page == "index.html":
            continue  # its creation time and seconds change between runs
        if linked:  # the three grids of conv1
            hrefs = [a["href"] for tag, a in parse(out / page) if tag == "a"]
            assert "../atlas/0-conv1/index.html" in hrefs and b"Activation atlas" in new
            assert (
                new.replace(
                    b'<p class="lede"><a href="../atlas/0-conv1/index.html">Activation atlas</a> of '
                    b"<code>conv1</code>: everything the layer represents on one map.</p>\n",
                    b"",
                )
                == old
            )
        else:
            assert new == old, page

    doc["layers"][1]["atlas"] = "../elsewhere.html"
    with pytest.raises(ReportError, match=r"layers\[1\]\.atlas must be an \.html path inside"):
        write_site(doc, out)
