"""convlens.microscope: the renders, their reproducibility for any batch and world size,
resuming, connections, the document behind the pages, and errors."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent / "analysis"))

from _examples_fixtures import Tiny, tiny_data, tiny_model

from _ranks import init_gloo, spawn
from convlens import capture
from convlens.microscope import _DIVERSITY_WEIGHT, _row_seed, _UnitObjective, microscope

LAYERS = ["conv1", "conv2"]
TIMEOUT_S = 180


def _run(out: Path, **kw: Any) -> Path:
    args: dict[str, Any] = dict(
        k=3, steps=6, size=16, diversity=2, batch=2, progress=False, channels="0-2"
    )
    args.update(kw)
    data = args.pop("data", None) or tiny_data(n=21)
    model = args.pop("model", None) or tiny_model()
    return microscope(model, data, LAYERS, out=out, **args)


def _files(root: Path, pattern: str = "*.png") -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob(pattern))}


def _doc(root: Path) -> dict[str, Any]:
    """microscope.json without what may differ between equal runs: timings, the work
    done, the creation time, the batch and the world size."""
    d = json.loads((root / "microscope.json").read_text())
    for key in ("stages", "created", "work"):
        d.pop(key)
    for key in ("batch", "world_size"):
        d["settings"].pop(key)
    return d


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("site") / "out")


def test_the_site_has_every_unit_with_renders_examples_and_statistics(site: Path) -> None:
    doc = json.loads((site / "microscope.json").read_text())
    assert [layer["name"] for layer in doc["layers"]] == LAYERS
    assert doc["dataset"]["size"] == 21
    for layer in doc["layers"]:
        assert [u["channel"] for u in layer["units"]] == [0, 1, 2]
        for u in layer["units"]:
            r = u["renders"]
            assert set(r) == {"channel", "neuron", "negative", "diversity"}
            assert len(r["diversity"]) == 2
            for img in [r["channel"], r["neuron"], r["negative"], *r["diversity"]]:
                assert (site / img["image"]).is_file()
            assert len(u["top"]) == len(u["bottom"]) == 3
            assert all((site / e["crop"]).is_file() for e in u["top"] + u["bottom"])
            assert all((site / e["full"]).is_file() for e in u["top"])
            assert sum(u["histogram"]["counts"]) == u["stats"]["count"] == 21
            assert (site / u["page"]).is_file()
    assert (site / "index.html").is_file()
    assert set(doc["stages"]) >= {"dataset pass", "renders", "examples", "attributions", "pages"}


def test_render_values_are_what_the_images_score(site: Path) -> None:
    """The stored value of each image is the channel's mean (or the centre unit, for the
    neuron) on the saved image, re-measured here from the PNG."""
    import numpy as np
    from PIL import Image

    from convlens.analysis.featurevis.render import _normalizer

    doc = json.loads((site / "microscope.json").read_text())
    net = tiny_model()
    normalize, _ = _normalizer("auto", None, 3)
    unit = doc["layers"][1]["units"][1]
    r = unit["renders"]
    for kind in ("channel", "negative", "neuron"):
        arr = np.asarray(Image.open(site / r[kind]["image"]), dtype=np.float32) / 255
        x = torch.from_numpy(arr).permute(2, 0, 1)[None]
        a = capture(net, normalize(x), ["conv2"])["conv2"][0, 1]
        got = a[a.shape[0] // 2, a.shape[1] // 2] if kind == "neuron" else a.mean()
        # the PNG is the image rounded to 8 bits: close, not equal
        assert float(got) == pytest.approx(r[kind]["value"], abs=0.02)
    assert r["negative"]["value"] < r["channel"]["value"]


def test_unit_objective_rows_are_independent_and_match_the_objectives() -> None:
    from convlens.analysis.featurevis import objectives as O

    obj = _UnitObjective("conv2", [4, 1], diversity=3)
    t = torch.randn(12, 6, 5, 7, dtype=torch.float64)
    got = obj(lambda name: t)
    mean = O.channel("conv2", 4)(lambda name: t[:1])
    unit = O.neuron("conv2", 4)(lambda name: t[1:2])
    assert float(got[0]) == pytest.approx(float(mean[0]))
    assert float(got[1]) == pytest.approx(float(unit[0]))
    assert float(got[2]) == pytest.approx(-float(t[2, 4].mean()))
    assert obj.centre == (2, 3)
    # a channel's diversity rows: its mean plus the weight * Lucid's term within its own set
    div = O.diversity("conv2")(lambda name: t[3:6])
    for j in range(3):
        want = float(t[3 + j, 4].mean()) + _DIVERSITY_WEIGHT * float(div[j]) * 3
        assert float(got[3 + j]) == pytest.approx(want)
    # changing the other channel's rows leaves this channel's values as they were
    t2 = t.clone()
    t2[6:] = torch.randn(6, 6, 5, 7, dtype=torch.float64)
    assert torch.equal(obj(lambda name: t2)[:6], got[:6])


def test_every_image_has_its_own_seed() -> None:
    seeds = {
        _row_seed(0, "conv2", c, kind, j)
        for c in range(4)
        for kind, j in [("channel", 0), ("neuron", 0), ("diversity", 0), ("diversity", 1)]
    }
    assert len(seeds) == 16
    assert _row_seed(0, "conv2", 1, "channel", 0) != _row_seed(1, "conv2", 1, "channel", 0)


def test_the_images_do_not_depend_on_the_batch(site: Path, tmp_path: Path) -> None:
    one = _run(tmp_path / "b1", batch=1)
    three = _run(tmp_path / "b3", batch=3)
    want = _files(site)
    assert want and _files(one) == want and _files(three) == want
    assert _doc(one) == _doc(site) == _doc(three)


def test_a_rerun_renders_nothing_and_force_renders_again(tmp_path: Path) -> None:
    out = _run(tmp_path / "s")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    time.sleep(0.01)
    _run(out)
    work = json.loads((out / "microscope.json").read_text())["work"]
    assert work == {
        "dataset_pass": 0,
        "rendered": 0,
        "renders_reused": 6,
        "examples_written": 0,
        "examples_reused": 6,
        "attributions_written": 0,
        "attributions_reused": 6,
        "render_checks": 0,  # the PNGs on disk are those measured
        "render_checks_reused": 6,
    }
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    _run(out, force=True)
    work = json.loads((out / "microscope.json").read_text())["work"]
    assert work["dataset_pass"] == 1 and work["rendered"] == 6 and work["examples_written"] == 6
    assert work["attributions_written"] == 6 and work["attributions_reused"] == 0
    assert work["render_checks"] == 6 and work["render_checks_reused"] == 0
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert all(after[p] > before[p] for p in before)


def test_other_settings_render_into_other_files(tmp_path: Path) -> None:
    out = _run(tmp_path / "s")
    _run(out, steps=7)
    doc = json.loads((out / "microscope.json").read_text())
    assert doc["work"]["rendered"] == 6 and doc["work"]["dataset_pass"] == 0
    dirs = {p.name for p in (out / "1-conv2").iterdir() if p.name.startswith("r-")}
    assert len(dirs) == 2  # the old renders stay; the pages use the new ones
    assert all(
        u["renders"]["channel"]["image"].split("/")[1] in dirs for u in doc["layers"][1]["units"]
    )


def test_an_interrupted_run_continues_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    M = sys.modules["convlens.microscope.renders"]  # the stage that writes the renders

    real = M._write_renders
    calls = {"n": 0}

    def flaky(*a: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(*a, **kw)

    monkeypatch.setattr(M, "_write_renders", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "s")
    monkeypatch.setattr(M, "_write_renders", real)
    out = _run(tmp_path / "s")
    work = json.loads((out / "microscope.json").read_text())["work"]
    assert work["renders_reused"] == 2 and work["rendered"] == 4  # batch 2: one batch kept
    assert _files(out, "r-*/*.png") == _files(_run(tmp_path / "clean"), "r-*/*.png")
    assert _doc(out) == _doc(tmp_path / "clean")


def test_connections_are_weight_norms_of_the_layer_before(site: Path) -> None:
    doc = json.loads((site / "microscope.json").read_text())
    first, second = doc["layers"]
    assert first["connections"]["from"] is None
    assert "not the output of another requested layer" in first["connections"]["why"]
    assert all(u["connected"] is None and u["connected_why"] for u in first["units"])
    assert second["connections"]["from"] == "conv1"  # conv2 reads conv1 through ReLU, pool
    w = tiny_model().conv2.weight.detach()
    for u in second["units"]:
        norms = w[u["channel"]].flatten(1).norm(dim=1)
        order = sorted(range(4), key=lambda i: (-float(norms[i]), i))
        assert [c["channel"] for c in u["connected"]] == order
        for c in u["connected"]:
            assert c["strength"] == pytest.approx(float(norms[c["channel"]]), rel=1e-6)
            # only channels 0-2 of conv1 have pages
            assert (c["page"] is not None) == (c["channel"] <= 2)


def test_a_depthwise_convolution_reads_one_channel(tmp_path: Path) -> None:
    from torch import nn

    class DW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.b = nn.Conv2d(4, 4, 3, padding=1, groups=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.bn(self.a(x))))

    torch.manual_seed(0)
    out = microscope(
        DW().eval(),
        tiny_data(n=9),
        ["a", "b"],
        out=tmp_path / "s",
        k=2,
        steps=2,
        size=16,
        diversity=0,
        progress=False,
    )
    doc = json.loads((out / "microscope.json").read_text())
    for u in doc["layers"][1]["units"]:
        assert [c["channel"] for c in u["connected"]] == [u["channel"]]
        assert u["renders"]["diversity"] == []


def _worker(rank: int, world: int, init: str, out: str) -> None:
    init_gloo(rank, world, init, TIMEOUT_S)
    try:
        _run(Path(out), channels="0-3")  # 8 units over 2 ranks, 4 (two batches) each
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_the_same_site_as_one(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'init'}"
    dist_out = tmp_path / "dist"
    spawn(_worker, (2, init, str(dist_out)), 2, TIMEOUT_S)
    one = _run(tmp_path / "one", channels="0-3")
    assert json.loads((dist_out / "microscope.json").read_text())["settings"]["world_size"] == 2
    assert _files(dist_out) == _files(one)
    assert len([k for k in _files(one) if "/a-" in k]) == 2 * 4 * 3  # attributions too
    pages = {k: v for k, v in _files(one, "*.html").items() if k != "index.html"}
    assert pages == {k: v for k, v in _files(dist_out, "*.html").items() if k != "index.html"}
    assert _doc(dist_out) == _doc(one)
    assert not list((dist_out / "cache").glob("*.ckpt*"))  # the pass's checkpoints are gone


def test_bad_input_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="diversity"):
        _run(tmp_path / "a", diversity=1)
    with pytest.raises(ValueError, match="steps"):
        _run(tmp_path / "a", steps=0)
    with pytest.raises(ValueError, match="batch"):
        _run(tmp_path / "a", batch=0)
    with pytest.raises(KeyError, match="conv2"):
        microscope(tiny_model(), tiny_data(n=8), ["conv22"], out=tmp_path / "b", progress=False)


def test_modes_and_hooks_are_restored(tmp_path: Path) -> None:
    net = Tiny()
    net.train()
    seen: list[Any] = []
    h = net.conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        _run(tmp_path / "s", model=net, channels="0")
    finally:
        h.remove()
    assert seen  # the user's hook ran whenever the model itself ran, and stays theirs
    assert net.training and all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    assert not net.conv2._forward_hooks and not net.conv1._forward_hooks


def test_precision_and_schedule_are_settings_and_render_into_their_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convlens.device

    monkeypatch.setattr(convlens.device, "cpu_has_fast_bfloat16", lambda: True)
    out = _run(tmp_path / "s", channels="0-1")
    doc = json.loads((out / "microscope.json").read_text())
    assert doc["settings"]["precision"] == "bfloat16" and doc["settings"]["schedule"] == "cosine"
    index = (out / "index.html").read_text()
    assert "bfloat16" in index and "cosine" in index
    _run(out, channels="0-1", precision="float32", schedule="constant")
    doc = json.loads((out / "microscope.json").read_text())
    assert doc["settings"]["precision"] == "float32" and doc["settings"]["lr"] == 0.05
    assert doc["work"]["rendered"] == 4  # other settings: other render folders
    with pytest.raises(ValueError, match="unknown schedule"):
        _run(tmp_path / "bad", schedule="fast")
    assert not (tmp_path / "bad").exists()  # refused before the dataset pass
