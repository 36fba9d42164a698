"""The microscope's attributions: each top example's map equals a direct
``convlens.attribute`` of the unit's value at the example's position, cut at the box; the
overlay PNG is that map drawn on the page's one symmetric scale; the numbers in
microscope.json; resuming, ``force``, skipping; the model left clean."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "analysis"))

from _examples_fixtures import Tiny, tiny_data, tiny_model

import convlens
from convlens.analysis._sources import make_source
from convlens.microscope import (
    _ATTR_METHOD,
    _attr_scale,
    _attr_top,
    _AttrPlan,
    _diverging,
    _signed_overlay,
    microscope,
)

M = sys.modules["convlens.microscope"]  # convlens.microscope is the function
A = sys.modules["convlens.microscope.attributions"]  # the stage: patch what it calls here


class TinyBN(nn.Module):
    """conv -> BatchNorm -> ReLU -> conv (stride 2) -> BatchNorm: folded BatchNorms on the
    attribution's path, as in the zoo's models."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def tiny_bn() -> TinyBN:
    torch.manual_seed(3)
    net = TinyBN()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _run(out: Path, layers: list[str] | None = None, **kw: Any) -> Path:
    args: dict[str, Any] = dict(
        k=3, steps=2, size=16, diversity=0, batch=2, progress=False, channels="0-2"
    )
    args.update(kw)
    data = args.pop("data", None) or tiny_data(n=21)
    model = args.pop("model", None) or tiny_model()
    return microscope(model, data, layers or ["conv1", "conv2"], out=out, **args)


def _doc(out: Path) -> dict[str, Any]:
    return json.loads((out / "microscope.json").read_text())


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------------ the values


@pytest.mark.parametrize(
    ("make", "layers"),
    [(tiny_model, ["conv1", "conv2"]), (tiny_bn, ["bn1", "conv2"]), (tiny_model, ["fc"])],
    ids=["plain", "batchnorm", "no-spatial-map"],
)
def test_each_map_is_a_direct_attribute_cut_at_the_box(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Any, layers: list[str]
) -> None:
    """The maps the overlays are drawn from equal ``convlens.attribute`` of the unit's
    value at the example's arg-max (``layer:ch@y,x``; ``layer:ch`` for a layer without a
    map), one image at a time; the PNG is that map cut at the box and drawn on the unit's
    scale; the numbers in microscope.json are the cut map's."""
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    real = A._write_attributions

    def spy(folder: Path, layer: str, channel: int, items: list[Any], plan: Any) -> None:
        seen[(layer, channel)] = [amap.clone() for _, amap, _, _ in items]
        real(folder, layer, channel, items, plan)

    monkeypatch.setattr(A, "_write_attributions", spy)
    data = tiny_data(n=21)
    out = _run(tmp_path / "s", layers, model=make(), data=data)
    doc = _doc(out)
    assert doc["settings"]["attribution"] == _ATTR_METHOD == "input_x_gradient"
    source = make_source(data, None)
    net = make()
    checked = 0
    for layer in doc["layers"]:
        name = layer["name"]
        spatial = layer["shape"][1:] != [1, 1]
        for u in layer["units"]:
            c, a = u["channel"], u["attribution"]
            assert a["method"] == "input_x_gradient"
            assert len(a["top"]) == len(u["top"]) == 3
            crops = []
            for e, got, full in zip(u["top"], a["top"], seen[(name, c)]):
                x = data[e["index"]][0]
                target = f"{name}:{c}@{e['y']},{e['x']}" if spatial else f"{name}:{c}"
                direct = convlens.attribute(net, x, target, method="input_x_gradient")
                # the value attributed is the example's score: the right unit, position
                assert float(direct.score[0]) == pytest.approx(e["score"], rel=1e-4, abs=1e-5)
                want = direct.map[0]
                tol = 1e-5 * float(want.abs().max()) + 1e-7
                assert torch.allclose(full, want, rtol=1e-4, atol=tol), (name, c)
                t, b, left, r = e["box"]
                assert got["box"] == e["box"] and got["index"] == e["index"]
                crop = want[t:b, left:r]
                crops.append(crop)
                assert got["sum"] == pytest.approx(float(crop.double().sum()), abs=10 * tol)
                pos = float(want.double().clamp(min=0).sum())
                inside = float(crop.double().clamp(min=0).sum()) / pos
                assert got["inside"] == pytest.approx(inside, abs=1e-5)
                assert got["positive"] >= 0 >= got["negative"]
                assert got["positive"] + got["negative"] == pytest.approx(got["sum"], abs=1e-9)
                checked += 1
            scale = _attr_scale([m.numpy() for m in crops])
            assert a["scale"] == pytest.approx(scale, rel=1e-4)
            for e, got, crop in zip(u["top"], a["top"], crops):
                t, b, left, r = e["box"]
                shown = source.display(data[e["index"]][0])[:, t:b, left:r]
                want_png = np.round(_signed_overlay(shown, crop, scale) * 255)
                diff = np.abs(_png(out / got["image"]) - want_png.astype(np.int16))
                assert diff.max() <= 1, (name, c, got["image"])
    assert checked == 3 * 3 * len(layers)


def test_how_many_examples_the_budget_affords() -> None:
    """A pair costs about 2 images of the dataset pass; the stage gets a quarter of it:
    0.125 pairs per image, shared by every unit, at least 3 per unit, at most k."""
    assert _attr_top(3925, 112, 9) == 4  # the full efficientnet_lite0 blocks.4 microscope
    assert _attr_top(1000, 16, 6) == 6  # --quick: all of them
    assert _attr_top(50_000, 512, 9) == 9
    assert _attr_top(21, 6, 9) == 3  # a small dataset: the floor
    assert _attr_top(21, 6, 2) == 2  # never more than there are


def test_only_the_affordable_top_examples_are_attributed(tmp_path: Path) -> None:
    out = _run(tmp_path / "s", k=5)  # 21 images, 6 units: the floor, 3 of 5
    doc = _doc(out)
    assert doc["settings"]["attribution_top"] == 3
    for layer in doc["layers"]:
        for u in layer["units"]:
            assert len(u["top"]) == 5
            got = u["attribution"]["top"]
            assert [a["index"] for a in got] == [e["index"] for e in u["top"][:3]]
            assert [a["box"] for a in got] == [e["box"] for e in u["top"][:3]]
    assert len(list(out.glob("*/a-*/*.png"))) == 6 * 3
    page = (out / doc["layers"][0]["units"][0]["page"]).read_text()
    assert "each of the top 3 examples" in page


def test_the_overlay_is_signed_and_centred_at_zero() -> None:
    """Zero shows the faded grey image; +scale is RdBu_r's dark red, -scale its dark blue,
    both opaque; the colour map is symmetric about its near-white middle."""
    image = torch.full((3, 1, 3), 0.5)
    amap = torch.tensor([[-2.0, 0.0, 2.0]])
    out = _signed_overlay(image, amap, 2.0)  # [h, w, 3]
    assert np.allclose(out[0, 1], 0.5)  # 0.25 + 0.5 * grey
    assert np.allclose(out[0, 0], np.array([5, 48, 97]) / 255)
    assert np.allclose(out[0, 2], np.array([103, 0, 31]) / 255)
    assert np.allclose(_diverging(np.zeros((1, 1)))[0, 0], np.array([247.0] * 3) / 255)
    # beyond the scale saturates; half the scale is half opaque, on the right side
    assert np.array_equal(_signed_overlay(image, amap * 10, 2.0), out)
    half = _signed_overlay(image, torch.tensor([[1.0]]), 2.0)[0, 0]
    red_side = _diverging(np.array([[0.5]]))[0, 0]
    assert np.allclose(half, 0.5 * 0.5 + 0.5 * red_side)
    assert half[0] > half[2]  # reddish
    # the colours between the stops: linear, and the map is antisymmetric about white
    v = np.linspace(-1, 1, 21).reshape(1, -1)
    c = _diverging(v)[0]
    assert np.allclose(c[10], np.array([247.0] * 3) / 255)
    assert np.allclose(c[1], (np.array([5, 48, 97]) + np.array([33, 102, 172])) / 2 / 255)


def test_the_scale_is_a_robust_symmetric_maximum() -> None:
    maps = [np.linspace(-1, 1, 1001).reshape(7, 143), np.zeros((3, 3))]
    vals = np.concatenate([np.abs(m).ravel() for m in maps])
    assert _attr_scale(maps) == pytest.approx(float(np.percentile(vals, 99.5)))
    assert _attr_scale([np.zeros((4, 4))]) == 1.0
    spike = np.zeros((40, 40))
    spike[0, 0] = -5.0
    assert _attr_scale([spike]) == 5.0  # the percentile is 0: the largest |value|


def test_integrated_gradients_plan_matches_attribute(tmp_path: Path) -> None:
    """The engine's other method (measured against the budget): its maps and completeness
    error equal ``convlens.attribute(..., method="integrated_gradients", steps=4)``."""
    from convlens.analysis.examples import dataset_examples
    from convlens.microscope import _attribution_units, _Unit

    data = tiny_data(n=21)
    net = tiny_model()
    result = dataset_examples(net, data, ["conv2"], k=2, channels=[1, 4], progress=False)
    plan = _AttrPlan("integrated_gradients", 4, rows=6)  # 1 pair per batch, padded
    units = [_Unit("conv2", 0, 1), _Unit("conv2", 0, 4)]
    folder = tmp_path / "a"
    done = _attribution_units(
        result,
        make_source(data, None),
        net,
        units,
        {"conv2": folder},
        plan,
        torch.device("cpu"),
        False,
        False,
    )
    assert done == (2, 0)
    for u in units:
        mark = json.loads((folder / f"{u.channel:04d}.json").read_text())
        assert (mark["method"], mark["steps"], mark["baseline"]) == (
            "integrated_gradients",
            4,
            "zero",
        )
        for e, got in zip(result.top("conv2", u.channel), mark["top"]):
            a = convlens.attribute(
                net,
                data[e.index][0],
                f"conv2:{u.channel}@{e.y},{e.x}",
                method="integrated_gradients",
                steps=4,
            )
            t, b, left, r = got["box"]
            assert got["sum"] == pytest.approx(
                float(a.map[0, t:b, left:r].double().sum()), abs=1e-5
            )
            assert got["delta"] == pytest.approx(float(a.delta[0]), abs=1e-4)


# ------------------------------------------------------------------------ the stage


def test_a_rerun_computes_nothing_and_force_recomputes(tmp_path: Path) -> None:
    out = _run(tmp_path / "s")
    files = sorted(out.glob("*/a-*/*"))
    assert len(files) == 2 * 3 * (3 + 1)  # 2 layers x 3 channels x (3 overlays + marker)
    before = {p: p.stat().st_mtime_ns for p in files}
    time.sleep(0.01)
    _run(out)
    doc = _doc(out)
    assert doc["work"]["attributions_written"] == 0
    assert doc["work"]["attributions_reused"] == 6
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert "attributions" in doc["stages"]
    _run(out, force=True)
    doc = _doc(out)
    assert (doc["work"]["attributions_written"], doc["work"]["attributions_reused"]) == (6, 0)
    assert all(p.stat().st_mtime_ns > before[p] for p in files)


def test_an_interrupted_stage_continues_where_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = A._write_attributions
    calls = {"n": 0}

    def flaky(*a: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(*a, **kw)

    monkeypatch.setattr(A, "_write_attributions", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "s")
    monkeypatch.setattr(A, "_write_attributions", real)
    out = _run(tmp_path / "s")
    work = _doc(out)["work"]
    assert (work["attributions_reused"], work["attributions_written"]) == (2, 4)
    clean = _run(tmp_path / "clean")

    def attr_files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.glob("*/a-*/*")}

    assert attr_files(out) == attr_files(clean)
    units = [u["attribution"] for la in _doc(out)["layers"] for u in la["units"]]
    assert units == [u["attribution"] for la in _doc(clean)["layers"] for u in la["units"]]


def test_rows_per_batch_do_not_change_the_maps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 rows (every pair of a layer in one padded batch) against 2 (pairs split over
    five batches, the last padded): the same files, the same numbers."""
    a = _run(tmp_path / "a")
    monkeypatch.setattr(A, "_attr_plan", lambda *a: _AttrPlan("input_x_gradient", 1, 2, 3))
    b = _run(tmp_path / "b")

    def attr(root: Path) -> tuple[dict[str, bytes], list[Any]]:
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.glob("*/a-*/*")}
        return files, [u["attribution"] for la in _doc(root)["layers"] for u in la["units"]]

    assert attr(a) == attr(b)


def test_attributions_off_skips_the_stage_and_says_so(tmp_path: Path) -> None:
    out = _run(tmp_path / "s", attributions=False)
    doc = _doc(out)
    assert not list(out.glob("*/a-*"))
    assert "attributions" not in doc["stages"]
    assert doc["settings"]["attribution"] == "off"
    assert doc["work"]["attributions_written"] == doc["work"]["attributions_reused"] == 0
    for layer in doc["layers"]:
        for u in layer["units"]:
            assert u["attribution"] is None and "attributions=False" in u["attribution_why"]
    page = (out / doc["layers"][1]["units"][0]["page"]).read_text()
    assert "No attributions for this channel" in page and "attribution.scale" not in page
    with pytest.raises(TypeError, match="attributions"):
        _run(tmp_path / "t", attributions="yes")


def test_the_page_shows_the_overlays_on_one_scale(tmp_path: Path) -> None:
    from html.parser import HTMLParser

    out = _run(tmp_path / "s")
    doc = _doc(out)
    u = doc["layers"][1]["units"][2]
    page = out / u["page"]
    text = page.read_text()
    assert "What in this crop drives the unit" in text
    assert "input × gradient" in text and "<script" not in text

    class P(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: list[tuple[str, dict[str, str]]] = []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.tags.append((tag, {k: v or "" for k, v in attrs}))

    p = P()
    p.feed(text)
    values = {a["data-key"]: a["data-value"] for _, a in p.tags if "data-key" in a}
    assert values["attribution.scale"] == repr(u["attribution"]["scale"])
    for i, e in enumerate(u["attribution"]["top"]):
        assert values[f"attribution.top.{i}.sum"] == repr(e["sum"])
        assert values[f"attribution.top.{i}.inside"] == repr(e["inside"])
    srcs = [a["src"] for t, a in p.tags if t == "img" and a["src"].startswith("a-")]
    want = [e["image"].split("/", 1)[1] for e in u["attribution"]["top"]]
    assert srcs == want


def test_the_model_is_left_clean(tmp_path: Path) -> None:
    net = Tiny()
    net.train()
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    net.conv1.weight.requires_grad_(False)  # a frozen layer stays frozen
    flags["conv1.weight"] = False
    seen: list[Any] = []
    h = net.conv2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        out = _run(tmp_path / "s", model=net, channels="0-1")
    finally:
        h.remove()
    assert _doc(out)["work"]["attributions_written"] == 4
    assert seen  # the user's hook ran with the model, and stays theirs
    assert net.training and all(m.training for m in net.modules())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    assert not any(m._backward_hooks for m in net.modules())


def test_the_command_can_skip_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from _cli import run

    seen: dict[str, Any] = {}

    def fake(model: Any, data: Any, layers: Any, **kw: Any) -> Path:
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(M, "microscope", fake)
    args = ["--model", "simple_cnn", "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    run("microscope", *args, "--no-attributions")
    assert seen["attributions"] is False
    seen.clear()
    run("microscope", *args)
    assert seen["attributions"] is True
