"""The tour on a tiny configuration: every section, cached resume, missing sections,
escaping of user strings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from convlens.errors import DatasetError
from convlens.tour import SECTIONS, TourConfig, tour

tour_mod = sys.modules["convlens.tour"]  # convlens.tour is the function


def tiny(**over) -> TourConfig:
    cfg = TourConfig.make(quick=True, epochs=1, steps=2)
    cfg.train_per_class = 12
    cfg.vis_size = 48
    cfg.vis_channels = 3
    cfg.attr_steps = 4
    cfg.faith_steps = 5
    cfg.sanity_methods = ("saliency", "gradcam")
    cfg.sanity_steps = 2
    cfg.atlas_grid = 4
    cfg.atlas_size = 32
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def statuses(out: Path) -> dict[str, str]:
    doc = json.loads((out / "report.json").read_text())
    return {s["id"]: s["status"] for s in doc["sections"]}


@pytest.fixture(scope="module")
def tiny_tour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny --quick tour, shared by the checks below."""
    root = tmp_path_factory.mktemp("tiny_tour")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVLENS_HOME", str(root / "home"))
        tour(config=tiny(), out=root / "tour", progress=False, device="cpu")
    return root / "tour"


def test_tiny_quick_tour_runs_every_section(tiny_tour: Path):
    out = tiny_tour
    html = out / "report.html"
    assert html.is_file()
    assert statuses(out) == {sid: "done" for sid, _ in SECTIONS}
    doc = json.loads((out / "report.json").read_text())
    assert doc["seed"] == 0 and doc["settings"]["quick"] is True and "torch" in doc["versions"]
    for section in doc["sections"]:
        for fig in section.get("figures", []):
            assert (out / fig["file"]).read_bytes()[:4] == b"\x89PNG"
    text = html.read_text()
    for _, title in SECTIONS:
        assert title in text
    by_id = {s["id"]: s for s in doc["sections"]}
    acc = by_id["training"]["numbers"]["val accuracy"]
    assert 0.0 <= acc <= 1.0
    assert len(by_id["featurevis"]["tables"][0]["rows"]) == 3
    assert by_id["spatial"]["tables"][0]["columns"][1] == "inside_fraction"
    # the activation atlas of the trained bn3: its grid, its class atlases, its pages
    at = by_id["atlas"]
    assert at["numbers"]["layer"] == "bn3" and at["numbers"]["icons"] > 0
    assert 0 <= at["numbers"]["neighbour agreement"] <= 1
    assert (out / at["links"][0]["href"]).is_file()
    assert {f["file"] for f in at["figures"]} == {"atlas_grid.png"}
    # the "where" section three ways: occlusion, integrated gradients, Grad-CAM, and the
    # sanity check, each with its numbers
    where = by_id["spatial"]
    files = {f["file"] for f in where["figures"]}
    assert {"spatial_attribution.png", "spatial_sanity.png"} <= files
    auc = where["numbers"]["deletion AUC"]
    assert set(auc) == {"occlusion", "integrated_gradients", "gradcam"}
    assert all(0.0 <= v <= 1.0 for v in auc.values())
    assert [r[0] for r in where["tables"][2]["rows"]] == ["saliency", "gradcam"]
    assert where["numbers"]["grad-cam layer"] == "bn2"  # efficientnet_lite0's last block


@pytest.mark.browser
def test_tour_report_in_a_real_browser(tiny_tour: Path, chromium: str):
    from _browser import artifact_dir, check_report

    doc = json.loads((tiny_tour / "report.json").read_text())
    r = check_report(
        tiny_tour / "report.html", artifact_dir() / "tour_quick.png", chromium=chromium
    )
    assert r["headings"] == [s["title"] for s in doc["sections"]]
    assert len(r["images"]) == sum(len(s.get("figures", [])) for s in doc["sections"]) > 10
    assert all(i["naturalWidth"] > 0 for i in r["images"]), r["images"]
    assert r["console_errors"] == [] and r["requests"] == [] and r["broken_links"] == []
    assert Path(r["screenshot"]).stat().st_size > 10_000


def test_interrupted_tour_resumes_without_recomputing(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "tour"
    calls: list[str] = []
    real = dict(tour_mod._COMPUTE)

    def counting(sid: str):
        def run(ctx):
            calls.append(sid)
            return real[sid](ctx)

        return run

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(tour_mod, "_COMPUTE", {sid: counting(sid) for sid in real})
    tour_mod._COMPUTE["depth"] = interrupted
    with pytest.raises(KeyboardInterrupt):
        tour(config=tiny(), out=out, progress=False, device="cpu")
    assert calls == ["tensor", "filters", "data", "training", "conv1"]
    assert not (out / "report.html").exists()

    calls.clear()
    tour_mod._COMPUTE["depth"] = counting("depth")
    tour(config=tiny(), out=out, progress=False, device="cpu")
    assert calls == [
        "depth",
        "spatial",
        "pretrained",
        "featurevis",
        "microscope",
        "atlas",
        "summary",
    ]
    assert statuses(out) == {sid: "done" for sid, _ in SECTIONS}

    calls.clear()  # a finished tour: only the summary is rebuilt
    tour(config=tiny(), out=out, progress=False, device="cpu")
    assert calls == ["summary"]
    calls.clear()  # another setting recomputes what depends on it, only that
    tour(config=tiny(vis_channels=2), out=out, progress=False, device="cpu")
    assert calls == ["featurevis", "summary"]
    calls.clear()
    tour(config=tiny(vis_channels=2), out=out, progress=False, device="cpu", force=True)
    assert calls == [sid for sid, _ in SECTIONS]


def test_unavailable_data_becomes_a_section_that_says_the_fix(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
):
    import convlens.data

    def offline(*args, **kwargs):
        raise DatasetError("cannot download imagenette2-160.tgz: no network")

    monkeypatch.setattr(convlens.data, "load_data", offline)
    out = tmp_path / "tour"
    only = ["tensor", "data", "training", "conv1", "depth"]
    tour(config=tiny(data="imagenette"), out=out, progress=False, device="cpu", only=only)
    doc = json.loads((out / "report.json").read_text())
    by_id = {s["id"]: s for s in doc["sections"]}
    assert by_id["tensor"]["status"] == "done"
    for sid in ("data", "training"):
        assert by_id[sid]["status"] == "missing"
        assert "--data shapes" in by_id[sid]["missing"]["fix"]
    assert by_id["conv1"]["status"] == "missing"
    assert "trained model" in by_id["conv1"]["missing"]["reason"]
    html = (out / "report.html").read_text()
    assert "convlens tour --data shapes" in html


def test_user_strings_are_escaped(tmp_path: Path, home: Path):
    name = "<img src=x onerror=alert(1)>.png"
    img = tmp_path / name
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(img)
    out = tmp_path / "tour"
    tour(config=tiny(images=[str(img)]), out=out, progress=False, device="cpu", only=["tensor"])
    html = (out / "report.html").read_text()
    assert "<img src=x onerror" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_cli_passes_its_options_and_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from click.testing import CliRunner

    from convlens.cli import main

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return kwargs["out"] / "report.html"

    monkeypatch.setattr(tour_mod, "tour", fake)
    args = ["tour", "--quick", "--image", "a.jpg", "b.jpg", "--epochs", "2", "--steps", "5"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path), "--force", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert seen["quick"] and seen["images"] == ["a.jpg", "b.jpg"] and seen["force"]
    assert (seen["epochs"], seen["steps"], seen["device"]) == (2, 5, "cpu")
    assert f"wrote {tmp_path / 'report.html'}" in r.stdout
    monkeypatch.undo()
    r = CliRunner().invoke(
        main, ["tour", "--image", str(tmp_path / "nope.jpg"), "--out", str(tmp_path)]
    )
    assert r.exit_code == 2 and "cannot load image" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
