"""``convlens microscope``: the site in headless Chromium from disk with the network off
(every page loads, every image resolves, no request fails, the numbers are
microscope.json's), names from folders and files stay text, a rerun renders nothing,
--force renders again, --quick's settings, one-line errors, torchrun with 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from _cli import assert_ok, assert_one_line_error, run

EVIL_FOLDER = "<script>alert(1)</script>"  # a '/' inside: two folders, one path
EVIL_CLASS = "<img src=x onerror=alert(1)>"
QUOTED_FILE = "a\"b'c.png"
ARGS = ["--model", "simple_cnn", "--device", "cpu", "--quiet"]
SMALL = ["--layers", "conv2,conv3", "--channels", "0-2", "--k", "3", "--steps", "3"]
SMALL += ["--diversity", "2", "--size", "32"]


def _folder(root: Path, n: int = 14) -> Path:
    """Two class folders, one named like an HTML tag, under a folder path that reads
    ``<script>alert(1)</script>``; one file with both quotes."""
    root = root / EVIL_FOLDER
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        sub = root / (EVIL_CLASS if i % 2 else "plain")
        sub.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        name = QUOTED_FILE if i == 1 else f"{i:02d}.png"
        Image.fromarray(arr).save(sub / name)
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("micro")
    data = _folder(root / "photos")
    out = root / "site"
    r = run("microscope", *ARGS, *SMALL, "--data", str(data), "--out", str(out))
    assert_ok(r)
    assert f"wrote {out / 'index.html'}" in r.output
    return out


def _pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


# Every element with data-key, as {key: value}, from the page itself.
_COLLECT = """(() => {
  const out = {};
  for (const e of document.querySelectorAll('[data-key]')) out[e.dataset.key] = e.dataset.value;
  return out;
})()"""


def _expected(unit: dict[str, Any]) -> dict[str, Any]:
    want: dict[str, Any] = {f"stats.{k}": v for k, v in unit["stats"].items()}
    if unit["selectivity"] is not None:
        want["selectivity.index"] = unit["selectivity"]["index"]
    for kind in ("channel", "neuron", "negative"):
        want[f"renders.{kind}.value"] = unit["renders"][kind]["value"]
    for which in ("top", "bottom"):
        for i, e in enumerate(unit[which]):
            want[f"{which}.{i}.score"] = e["score"]
    if unit.get("render_vs_dataset"):
        for key in ("render", "top_example", "ratio"):
            want[f"render_vs_dataset.{key}"] = unit["render_vs_dataset"][key]
    for i, d in enumerate(unit["renders"]["diversity"]):
        want[f"renders.diversity.{i}.relative"] = d["relative"]
    return want


@pytest.mark.browser
def test_the_site_in_chromium_from_disk_offline(site: Path, chromium: str) -> None:
    from _browser import artifact_dir, check_report

    doc = json.loads((site / "microscope.json").read_text())
    units = {u["page"]: u for layer in doc["layers"] for u in layer["units"]}
    pages = _pages(site)
    assert len(pages) == 1 + 2 * 3 + len(units)  # index, 3 views per layer, each channel
    for page in pages:
        rel = page.relative_to(site).as_posix()
        shot = artifact_dir() / f"microscope_{rel.replace('/', '_')}.png"
        seen = check_report(
            page,
            shot if rel in ("index.html", "1-conv3/0001.html") else None,
            chromium=chromium,
            offline=True,
            collect=_COLLECT,
            height=20000,
        )
        assert seen["console_errors"] == [], (rel, seen["console_errors"])
        assert seen["failed"] == [], (rel, seen["failed"])
        assert seen["scripts"] == 0
        assert bool(seen["images"]) == (rel != "index.html"), rel
        for img in seen["images"]:
            assert img["complete"] and img["naturalWidth"] > 0, (rel, img)
        for url in seen["requests"]:
            assert url.startswith(site.resolve().as_uri()), (rel, url)
        if rel in units:
            got = seen["collected"]
            for key, value in _expected(units[rel]).items():
                shown = got.get(key)
                assert shown is not None, (rel, key)
                assert (None if shown == "null" else float(shown)) == value, (rel, key)


def test_names_from_folders_and_files_stay_text(site: Path) -> None:
    doc = json.loads((site / "microscope.json").read_text())
    assert EVIL_CLASS in doc["dataset"]["classes"]
    assert EVIL_FOLDER in doc["dataset"]["name"] or any(
        EVIL_FOLDER in (p or "")
        for p in [e["path"] for layer in doc["layers"] for u in layer["units"] for e in u["top"]]
    )
    paths = [e["path"] for layer in doc["layers"] for u in layer["units"] for e in u["top"]]
    paths += [e["path"] for layer in doc["layers"] for u in layer["units"] for e in u["bottom"]]
    for page in _pages(site):
        text = page.read_text()
        assert "<script" not in text and "<img src=x" not in text, page
    unit_pages = [site / u["page"] for layer in doc["layers"] for u in layer["units"]]
    texts = "".join(p.read_text() for p in unit_pages)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in texts  # the folder, in the paths
    assert "&lt;img src=x onerror=alert(1)&gt;" in texts  # the class
    if any(p and p.endswith(QUOTED_FILE) for p in paths):
        assert "a&#34;b&#39;c.png" in texts or "a&quot;b&#x27;c.png" in texts


def test_a_rerun_renders_nothing_and_force_renders_again(tmp_path: Path) -> None:
    data = _folder(tmp_path / "photos", n=8)
    out = tmp_path / "site"
    common = [*ARGS, "--layers", "conv3", "--channels", "0-1", "--k", "2", "--steps", "2"]
    common += ["--diversity", "0", "--size", "32", "--data", str(data), "--out", str(out)]
    assert_ok(run("microscope", *common))
    images = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    r = run("microscope", *common)
    assert_ok(r)
    assert "rendered 0 channel(s), reused 2" in r.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == images
    r = run("microscope", *common, "--force")
    assert_ok(r)
    assert "rendered 2 channel(s), reused 0" in r.output
    assert all(p.stat().st_mtime_ns > t for p, t in images.items())


def test_quick_sets_few_steps_and_channels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    M = sys.modules["convlens.microscope"]  # convlens.microscope is the function

    seen: dict[str, Any] = {}

    def fake(model: Any, data: Any, layers: Any, **kw: Any) -> Path:
        seen.update(layers=layers, **kw)
        raise SystemExit(0)

    monkeypatch.setattr(M, "microscope", fake)
    run("microscope", "--quick", "--device", "cpu", "--out", str(tmp_path), "--steps", "5")
    assert seen["layers"] == ["blocks.4"]  # efficientnet_lite0's middle layer
    assert seen["channels"] == list(range(16))
    assert seen["steps"] == 5  # given: kept
    assert (seen["k"], seen["diversity"]) == (6, 2)
    assert seen["diversity_weight"] == M._DIVERSITY_WEIGHT  # the function's default
    assert seen["atlas"] is False  # the atlas is opt-in
    seen.clear()
    run("microscope", "--quick", "--atlas", "--device", "cpu", "--out", str(tmp_path))
    assert seen["atlas"] is True


def test_atlas_builds_each_layers_atlas_linked_from_its_page(tmp_path: Path) -> None:
    pytest.importorskip("umap")
    data = _folder(tmp_path / "photos", n=6)
    out = tmp_path / "site"
    small = ["--layers", "conv3", "--channels", "0-1", "--k", "2", "--steps", "2"]
    small += ["--diversity", "0", "--size", "24", "--no-attributions"]
    r = run("microscope", *ARGS, *small, "--data", str(data), "--out", str(out), "--atlas")
    assert_ok(r)
    doc = json.loads((out / "microscope.json").read_text())
    (layer,) = doc["layers"]
    assert layer["atlas"] == "0-conv3/atlas/index.html"
    assert (out / layer["atlas"]).is_file()
    assert 'href="atlas/index.html"' in (out / "0-conv3" / "index.html").read_text()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--layers", "conv9"], "conv9"),
        (["--channels", "5-2"], "channels"),
        (["--batch", "zero"], "--batch"),
        (["--diversity", "1"], "--diversity 1"),
        (["--channels", "0-200"], "channel"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, extra: list[str], needle: str) -> None:
    data = _folder(tmp_path / "photos", n=4)
    r = run("microscope", *ARGS, "--data", str(data), "--out", str(tmp_path / "s"), *extra)
    assert_one_line_error(r, needle)


def test_torchrun_two_processes_write_the_same_site(tmp_path: Path, site: Path) -> None:
    """2 ranks under torchrun against 1 process, each with one thread (torchrun's
    OMP_NUM_THREADS=1): oneDNN splits a convolution's work by thread count, so the same
    thread count per process is what makes the images byte-identical."""
    data = site.parent / "photos" / EVIL_FOLDER
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    common = ["-m", "convlens", "microscope", *ARGS, *SMALL, "--data", str(data)]
    one, out = tmp_path / "one", tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, *common, "--out", str(one)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, *common, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("wrote ") == 2  # rank 0 alone reports

    def files(root: Path) -> dict[str, bytes]:
        got = {}
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            skip = rel in ("index.html", "microscope.json") or rel.startswith("cache/")
            if p.is_file() and not skip:
                got[rel] = p.read_bytes()
        return got

    assert len(files(one)) > 50
    assert files(out) == files(one)
    a, b = (json.loads((d / "microscope.json").read_text()) for d in (out, one))
    assert (a["settings"]["world_size"], b["settings"]["world_size"]) == (2, 1)
    for d in (a, b):
        for key in ("stages", "created", "work"):
            d.pop(key)
        d["settings"].pop("world_size")
    assert a == b


@pytest.mark.slow
def test_quick_builds_the_whole_offline_site(tmp_path: Path) -> None:
    """The real --quick: efficientnet_lite0 on the drawn shapes, no download."""
    out = tmp_path / "site"
    r = run("microscope", "--quick", "--device", "cpu", "--quiet", "--out", str(out))
    assert_ok(r)
    doc = json.loads((out / "microscope.json").read_text())
    (layer,) = doc["layers"]
    assert layer["name"] == "blocks.4" and layer["channels"] == 112
    assert [u["channel"] for u in layer["units"]] == list(range(16))
    assert doc["settings"]["steps"] == 32 and doc["settings"]["quick"] is True
    for u in layer["units"]:
        assert len(u["renders"]["diversity"]) == 2 and len(u["top"]) == 6
        assert u["selectivity"] is not None  # the shapes are labelled
        assert (out / u["renders"]["channel"]["image"]).is_file()
