"""The activation atlas: sampling (batch- and rank-independent), the exact covariance,
the layout, the cells and their directions, the icons, resume, the pages, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent / "analysis"))

from _examples_fixtures import tiny_data, tiny_model

from _cli import assert_ok, assert_one_line_error, run
from _html import parse
from _ranks import init_gloo, spawn
from convlens import capture
from convlens.analysis import atlas as A
from convlens.analysis.atlas import (
    AtlasSamples,
    cell_of,
    direction_value,
    directions,
    grid_cells,
    layout,
    neighbour_agreement,
    sample_activations,
    sample_positions,
    whitening,
)
from convlens.atlas import atlas
from convlens.errors import ConvlensError

TIMEOUT_S = 120
FIELDS = ("vectors", "index", "position", "label", "predicted", "attribution", "covariance")


def _samples(batch_size: int = 4, n: int = 40, k: int = 2) -> AtlasSamples:
    return sample_activations(
        tiny_model(),
        tiny_data(n=n),
        "conv2",
        samples_per_image=k,
        batch_size=batch_size,
        progress=False,
    )


def _same(a: AtlasSamples, b: AtlasSamples) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape, f
        assert torch.equal(x.nan_to_num(), y.nan_to_num()), f
    assert a.positions == b.positions and a.images == b.images


# ------------------------------------------------------------------ sampling


def test_positions_are_seeded_by_image_and_avoid_the_border() -> None:
    a = sample_positions(0, 17, 6, 6, 3)
    assert a == sample_positions(0, 17, 6, 6, 3)  # the same draw every time
    assert a != sample_positions(1, 17, 6, 6, 3) or a != sample_positions(0, 18, 6, 6, 3)
    assert len(set(a)) == 3  # without replacement
    for seed in range(5):
        for y, x in sample_positions(seed, 3, 6, 6, 16):  # the whole interior
            assert 1 <= y <= 4 and 1 <= x <= 4
    assert sorted(sample_positions(0, 3, 6, 6, 16)) == [
        (y, x) for y in range(1, 5) for x in range(1, 5)
    ]
    assert sample_positions(0, 3, 2, 2, 4)  # a tiny map keeps its border
    with pytest.raises(ValueError, match="interior"):
        sample_positions(0, 0, 6, 6, 17)


def test_samples_are_the_same_for_batch_sizes_1_7_32() -> None:
    one = _samples(batch_size=1)
    _same(one, _samples(batch_size=7))
    _same(one, _samples(batch_size=32))
    assert len(one) == 80 and one.vectors.shape[1] == 6
    # sorted by image, each image's draws in their order, at the drawn positions
    assert one.index.tolist() == [i for i in range(40) for _ in range(2)]
    for j in (0, 1, 37, 79):
        i = int(one.index[j])
        assert tuple(one.position[j].tolist()) == sample_positions(0, i, 6, 6, 2)[j % 2]


def test_vectors_labels_attribution_and_covariance_match_a_brute_force() -> None:
    data = tiny_data(n=40)
    s = _samples()
    model = tiny_model()
    x = torch.stack([d[0] for d in data])
    maps = capture(model, x, ["conv2"])["conv2"].double()  # [40, 6, 6, 6]
    for j in range(len(s)):
        i, (y, xx) = int(s.index[j]), s.position[j].tolist()
        assert torch.allclose(s.vectors[j].double(), maps[i, :, y, xx], atol=1e-6)
        assert int(s.label[j]) == data[i][1]
    flat = maps.permute(0, 2, 3, 1).reshape(-1, 6)
    want = flat.T @ flat / flat.shape[0]
    assert s.positions == flat.shape[0] == 40 * 36
    assert torch.allclose(s.covariance, want, rtol=1e-9, atol=1e-12)
    # attribution: activation x gradient of the predicted logit, summed over channels
    xi = x[:1].clone()
    act: dict[str, torch.Tensor] = {}

    def keep(_m, _i, out):
        out.retain_grad()
        act["a"] = out

    h = model.conv2.register_forward_hook(keep)
    try:
        logits = model(xi)
    finally:
        h.remove()
    pred = int(logits.argmax(1))
    logits[0, pred].backward()
    y, xx = s.position[0].tolist()
    want_attr = float((act["a"][0, :, y, xx] * act["a"].grad[0, :, y, xx]).sum().detach())
    assert int(s.predicted[0]) == pred
    assert s.attribution[0].item() == pytest.approx(want_attr, rel=1e-5, abs=1e-7)


def test_samples_round_trip_and_a_damaged_file_names_itself(tmp_path: Path) -> None:
    s = _samples(n=12)
    p = s.save(tmp_path / "s.safetensors")
    _same(s, AtlasSamples.load(p))
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ConvlensError, match=r"s\.safetensors.*delete it"):
        AtlasSamples.load(p)


def _rank_worker(rank: int, world: int, init: str, out: str) -> None:
    init_gloo(rank, world, init, TIMEOUT_S)
    try:
        s = sample_activations(
            tiny_model(),
            tiny_data(n=41),
            "conv2",
            samples_per_image=2,
            batch_size=4,
            progress=False,
        )
        if rank == 0:
            s.save(Path(out) / f"world{world}.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_one_process_samples_and_covariance(tmp_path: Path) -> None:
    for world in (1, 2):
        spawn(
            _rank_worker,
            (world, f"file://{tmp_path / f'init{world}'}", str(tmp_path)),
            world,
            TIMEOUT_S,
        )
    one = AtlasSamples.load(tmp_path / "world1.safetensors")
    two = AtlasSamples.load(tmp_path / "world2.safetensors")
    _same(one, two)  # the covariance too, to the bit: an integer merge
    assert len(one) == 82


# ------------------------------------------------------------------ layout and cells


def test_cells_of_a_hand_made_layout() -> None:
    pts = torch.tensor([[0.0, 1.0], [0.1, 0.9], [0.2, 0.95], [1.0, 0.0], [0.99, 0.01], [0.6, 0.4]])
    row, col = cell_of(pts, 2)
    assert row.tolist() == [0, 0, 0, 1, 1, 1] and col.tolist() == [0, 0, 0, 1, 1, 1]
    cells = grid_cells(pts, 2, min_count=1)
    assert [(c.row, c.col, c.members) for c in cells] == [(0, 0, (0, 1, 2)), (1, 1, (3, 4, 5))]
    cells = grid_cells(pts, 4, min_count=2)  # (0, 0) holds 0, 1, 2; (3, 3) holds 3, 4
    assert [(c.row, c.col, c.members) for c in cells] == [(0, 0, (0, 1, 2)), (3, 3, (3, 4))]
    sub = grid_cells(pts, 4, min_count=1, subset=torch.tensor([4, 1]))
    assert [(c.row, c.col, c.members) for c in sub] == [(0, 0, (1,)), (3, 3, (4,))]


def test_neighbour_agreement_by_hand() -> None:
    pts = torch.tensor([[0.0, 0], [0, 0.1], [1, 1], [1, 0.9], [0.5, 0.5]])
    agree, chance = neighbour_agreement(pts, torch.tensor([0, 0, 1, 1, -1]))
    assert (agree, chance) == (1.0, 0.5)
    agree, _ = neighbour_agreement(pts[:4], torch.tensor([0, 1, 0, 1]))
    assert agree == 0.0


def test_each_cells_direction_is_the_mean_of_its_samples_whitened() -> None:
    s = _samples()
    pts = torch.rand(len(s), 2, generator=torch.Generator().manual_seed(0))
    cells = grid_cells(pts, 3, min_count=2)
    assert cells
    means, raw = directions(s, cells, whiten=False)
    _, white = directions(s, cells, whiten=True)
    w = whitening(s.covariance)
    c = s.covariance
    for cell, m, r, wd in zip(cells, means, raw, white):
        want = s.vectors[list(cell.members)].double().mean(0)
        assert torch.allclose(m, want, atol=1e-12) and torch.equal(m, r)
        assert torch.allclose(wd, w @ m, atol=1e-9)
        ridge = A.RIDGE * float(c.diagonal().mean())
        assert torch.allclose((c + ridge * torch.eye(6, dtype=c.dtype)) @ wd, m, atol=1e-8)


def test_layout_is_deterministic_for_a_seed_and_scaled() -> None:
    pytest.importorskip("umap")
    v = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    a, b = layout(v, seed=3), layout(v, seed=3)
    assert torch.equal(a, b) and a.shape == (60, 2)
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0
    assert not torch.equal(a, layout(v, seed=4))
    with pytest.raises(ConvlensError, match="at least 4 samples"):
        layout(v[:3])


def test_a_missing_umap_is_one_line_naming_the_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "umap", None)  # import umap raises ImportError
    with pytest.raises(ConvlensError, match=r'pip install "convlens\[atlas\]"'):
        layout(torch.randn(10, 3))
    with pytest.raises(ConvlensError, match="umap-learn"):
        atlas(tiny_model(), tiny_data(n=8), "conv2", out=tmp_path / "a")
    assert not (tmp_path / "a").exists()  # refused before any work
    r = run("atlas", "--model", "simple_cnn", "--device", "cpu", "--out", str(tmp_path / "b"))
    assert_one_line_error(r, "umap-learn", "pip install")


# ------------------------------------------------------------------ the objective


def test_direction_value_by_hand() -> None:
    h = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    got = direction_value(h, v, power=2.0)
    # row 0: dot 3, cos 3/5 -> 3 * 0.36; row 1: dot 1, cos 1; row 2: dot 0, cos floored 0.1
    assert torch.allclose(got, torch.tensor([3 * 0.36, 1.0, 0.0]))
    assert direction_value(h[:1], v[:1]).item() == pytest.approx(3 * 0.6**4)


def test_direction_neuron_objective_is_public_and_renders() -> None:
    import convlens

    model = tiny_model()
    obj = convlens.objectives.direction_neuron("conv2", torch.tensor([1.0, 0, 0, 0, 0, -1.0]))
    assert str(obj) == "direction_neuron(conv2, 6-d)"
    r = convlens.render(model, obj, steps=12, size=16, device="cpu", progress=False)
    assert r.values is not None


# ------------------------------------------------------------------ the pipeline


def _build(out: Path) -> Path:
    """The tiny atlas the pipeline tests share (built once, then rebuilt to resume)."""
    return atlas(
        tiny_model(),
        tiny_data(n=40),
        "conv2",
        out=out,
        samples_per_image=2,
        grid=4,
        min_count=2,
        size=16,
        steps=24,
        classes="all",
        progress=False,
        device="cpu",
        unit_pages=lambda c: f"../units/{c:04d}.html",
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("umap")
    out = tmp_path_factory.mktemp("atlas") / "out"
    _build(out)
    return out


def test_atlas_writes_json_icons_and_pages(built: Path) -> None:
    doc = json.loads((built / "atlas.json").read_text())
    assert doc["layer"] == "conv2" and doc["channels"] == 6
    assert doc["samples"]["count"] == 80 and doc["samples"]["images"] == 40
    assert [lv["grid"] for lv in doc["levels"]] == [2, 4]
    assert {lv["page"] for lv in doc["levels"]} == {"index.html", "level-2.html"}
    assert set(doc["timing"]) >= {"pass", "layout", "icons", "pages"}
    # "auto" precision is the render engine's choice for this CPU, icons included
    from convlens.analysis.featurevis._amp import MixedPrecision

    auto = MixedPrecision("auto", torch.device("cpu"), torch.float32).name
    assert doc["settings"]["precision"] == auto
    assert doc["class_atlases"], "every predicted class with positive attribution"
    s = AtlasSamples.load(built / doc["samples"]["file"])
    for lv in doc["levels"]:
        assert sum(c["count"] for c in lv["cells"]) <= 80
        for c in lv["cells"]:
            assert c["count"] >= 2
            assert (built / c["icon"]).is_file() and (built / c["page"]).is_file()
            assert all((built / cr["image"]).is_file() for cr in c["crops"])
            key = doc["samples"]["file"].removeprefix("cache/samples-").removesuffix(".safetensors")
            assert all(cr["image"].startswith(f"crops/{key}/") for cr in c["crops"])
            assert (
                c["top_channels"][0]["unit"]
                == f"../units/{c['top_channels'][0]['channel']:04d}.html"
            )
    for ca in doc["class_atlases"]:
        chosen = int(((s.predicted == ca["label"]) & (s.attribution > 0)).sum())
        assert ca["samples"] == chosen
        assert sum(c["count"] for c in ca["cells"]) <= chosen
    # every page's images and links resolve on disk
    pages = list(built.rglob("*.html"))
    assert len(pages) >= 1 + sum(len(lv["cells"]) for lv in doc["levels"])
    for page in pages:
        for tag, attrs in parse(page):
            ref = attrs.get("src") if tag == "img" else attrs.get("href") if tag == "a" else None
            if ref and not ref.startswith("../units/") and "units/" not in ref:
                from urllib.parse import unquote

                assert (page.parent / unquote(ref)).resolve().exists(), (page, ref)


def test_icons_raise_their_objective(built: Path) -> None:
    doc = json.loads((built / "atlas.json").read_text())
    cells = [c for lv in doc["levels"] for c in lv["cells"]]
    assert cells and all(c["objective"] > c["objective_start"] for c in cells)


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def test_icons_of_a_model_in_train_mode_are_its_eval_modes_and_leave_it_untouched(
    tmp_path: Path,
) -> None:
    pytest.importorskip("umap")
    kw = dict(samples_per_image=2, grid=4, min_count=2, size=16, steps=8, progress=False)
    trained, evaluated = _bn_net().train(), _bn_net().eval()
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    atlas(trained, tiny_data(n=40), "3", out=tmp_path / "train", device="cpu", **kw)
    atlas(evaluated, tiny_data(n=40), "3", out=tmp_path / "eval", device="cpu", **kw)
    # no batch statistics: the BatchNorms' running statistics and counters are as they were
    after = trained.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert trained.training and not evaluated.training
    assert all(p.grad is None and p.requires_grad for p in trained.parameters())
    icons = sorted((tmp_path / "train").rglob("icons/**/*.png"))
    assert icons
    for p in icons:
        assert (
            p.read_bytes() == (tmp_path / "eval" / p.relative_to(tmp_path / "train")).read_bytes()
        )


def test_a_rerun_renders_and_samples_nothing_new(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    M = sys.modules["convlens.atlas"]  # convlens.atlas is the function

    def refuse(*a, **k):
        raise AssertionError("a finished atlas was computed again")

    icons = {p: p.read_bytes() for p in built.rglob("icons/**/*.png")}
    monkeypatch.setattr(M, "_render_icons", refuse)
    monkeypatch.setattr(M, "sample_activations", refuse)
    monkeypatch.setattr(M, "layout", refuse)
    _build(built)
    assert {p: p.read_bytes() for p in built.rglob("icons/**/*.png")} == icons


def test_a_changed_setting_renders_again_and_a_damaged_icon_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("umap")
    M = sys.modules["convlens.atlas"]  # convlens.atlas is the function

    kw = dict(grid=2, levels=[2], min_count=1, size=16, steps=3, progress=False, device="cpu")
    out = tmp_path / "a"
    atlas(tiny_model(), tiny_data(n=12), "conv2", out=out, **kw)
    pngs = sorted(out.rglob("icons/**/*.png"))
    pngs[0].write_bytes(pngs[0].read_bytes()[:30])  # truncated
    calls = []
    real = M._render_icons
    monkeypatch.setattr(
        M, "_render_icons", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k)
    )
    atlas(tiny_model(), tiny_data(n=12), "conv2", out=out, **kw)
    assert calls == [1]  # only the damaged one
    calls.clear()
    atlas(tiny_model(), tiny_data(n=12), "conv2", out=out, **{**kw, "steps": 4})
    assert sum(calls) == len(pngs)  # another setting: every icon again


def test_unknown_class_lists_close_matches(tmp_path: Path) -> None:
    pytest.importorskip("umap")
    from convlens.atlas import _resolve_classes

    names = ["tench", "church", "chainsaw"]
    assert _resolve_classes("church, 0", names, torch.tensor([0])) == [(1, "church"), (0, "tench")]
    with pytest.raises(ConvlensError, match="did you mean 'church'"):
        _resolve_classes("churh", names, torch.tensor([0]))
    with pytest.raises(ConvlensError, match="out of range"):
        _resolve_classes("7", names, torch.tensor([0]))


# ------------------------------------------------------------------ the command line


def _folder(root: Path, n: int = 12) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        sub = root / ("<b>odd</b>" if i % 2 else "plain")
        sub.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(40, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(sub / f"{i}.png")
    return root


CLI = ["--model", "simple_cnn", "--device", "cpu", "--quiet", "--layer", "conv3"]
CLI_SMALL = ["--grid", "3", "--min-count", "1", "--steps", "3", "--size", "24"]


def test_cli_writes_the_atlas_and_says_what_it_found(tmp_path: Path) -> None:
    pytest.importorskip("umap")
    data = _folder(tmp_path / "photos")
    out = tmp_path / "atlas"
    r = run("atlas", *CLI, *CLI_SMALL, "--data", str(data), "--out", str(out), "--classes", "all")
    assert_ok(r)
    assert f"wrote {out / 'index.html'}" in r.stdout
    assert "12 samples from 12 images" in r.stdout
    assert "chance" in r.stdout
    html = (out / "index.html").read_text()
    assert "<b>odd</b>" not in html and "<script" not in html


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--layer", "conv9"], "conv9"),
        (["--levels", "ten"], "--levels"),
        (["--batch", "zero"], "--batch"),
        (["--classes", "zebra"], "zebra"),
        (["--samples-per-image", "100000"], "samples_per_image"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path: Path, extra: list[str], needle: str) -> None:
    pytest.importorskip("umap")
    data = _folder(tmp_path / "photos", n=6)
    r = run("atlas", *CLI, *CLI_SMALL, "--data", str(data), "--out", str(tmp_path / "a"), *extra)
    assert_one_line_error(r, needle)


def test_quick_sets_what_was_not_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    M = sys.modules["convlens.atlas"]  # convlens.atlas is the function

    seen: dict = {}

    def fake(model, data, layer, **kw):
        seen.update(layer=layer, **kw)
        raise SystemExit(0)

    monkeypatch.setattr(M, "atlas", fake)
    run("atlas", "--quick", "--device", "cpu", "--out", str(tmp_path), "--steps", "5")
    assert seen["layer"] == "blocks.4"  # efficientnet_lite0's middle layer
    assert (seen["grid"], seen["size"], seen["steps"]) == (10, 64, 5)


@pytest.mark.slow  # 40 s: the 2-process samples test above is in the default run
def test_torchrun_two_processes_write_the_same_atlas(tmp_path: Path) -> None:
    """2 ranks under torchrun against 1 process, one thread each: the samples, the
    layout, every icon and every page are the same bytes."""
    pytest.importorskip("umap")
    data = _folder(tmp_path / "photos", n=10)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    common = ["-m", "convlens", "atlas", *CLI, *CLI_SMALL, "--data", str(data), "--classes", "all"]
    one, two = tmp_path / "one", tmp_path / "two"
    p = subprocess.run(
        [sys.executable, *common, "--out", str(one)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    p = subprocess.run(
        [*cmd, *common, "--out", str(two)], env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("wrote ") == 2  # rank 0 alone reports

    def files(root: Path) -> dict[str, bytes]:
        return {
            q.relative_to(root).as_posix(): q.read_bytes()
            for q in sorted(root.rglob("*"))
            if q.is_file() and q.name not in ("atlas.json", "index.html", ".convlens.lock")
        }

    a, b = files(one), files(two)
    assert len(a) > 10 and a == b
    da, db = (json.loads((d / "atlas.json").read_text()) for d in (one, two))
    da.pop("timing"), db.pop("timing")
    assert da == db


@pytest.mark.slow  # about a minute: trains a SimpleCNN
def test_on_trained_shapes_the_map_groups_classes_and_class_atlases_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It means something: the layout's nearest neighbours share their class far more
    often than chance, and the class atlases of two shapes sit in different places."""
    pytest.importorskip("umap")
    from convlens.data import shapes
    from convlens.models import build_architecture
    from convlens.train import train

    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path / "home"))
    tr, va = shapes(train_per_class=100, val_per_class=30, progress=False)
    model = build_architecture("simple_cnn", 10, seed=0)
    r = train(model, tr, va, epochs=6, lr=5e-3, device="cpu", progress=False, recipe="fast")
    assert r.val_accuracy > 0.5
    out = atlas(
        model,
        va,
        "bn3",
        out=tmp_path / "atlas",
        samples_per_image=4,
        grid=8,
        min_count=2,
        size=32,
        steps=8,
        classes="all",
        progress=False,
        device="cpu",
    )
    doc = json.loads((out / "atlas.json").read_text())
    agree, chance = doc["layout"]["neighbour_agreement"], doc["layout"]["chance"]
    assert agree > 2 * chance, (agree, chance)
    by_name = {c["name"]: c for c in doc["class_atlases"] if c["samples"] >= 20}

    def overlap(x: str, y: str) -> float:
        """The share of the smaller class atlas's samples in cells the other also uses."""
        a, b = ({(c["row"], c["col"]): c["count"] for c in by_name[n]["cells"]} for n in (x, y))
        shared = sum(min(a.get(k, 0), b.get(k, 0)) for k in set(a) | set(b))
        return shared / min(sum(a.values()), sum(b.values()))

    # measured (2-core CPU): circle vs horizontal stripes 0.21, vertical stripes vs
    # diagonal bars 0.04, the median of the 45 pairs 0.45 (compact shapes share cells)
    assert overlap("circle", "horizontal stripes") < 0.35
    assert overlap("vertical stripes", "diagonal bars") < 0.2
    pairs = [overlap(x, y) for i, x in enumerate(by_name) for y in list(by_name)[i + 1 :]]
    assert sorted(pairs)[len(pairs) // 2] < 0.6


@pytest.mark.browser
def test_a_built_atlas_in_chromium_offline(chromium: str, built: Path) -> None:
    """The pages the pipeline wrote, opened from disk: every image loads, nothing is
    fetched outside the folder, no script runs."""
    from urllib.parse import unquote, urlsplit

    from _browser import artifact_dir, check_report

    doc = json.loads((built / "atlas.json").read_text())
    cell = doc["levels"][-1]["cells"][0]["page"]
    klass = doc["class_atlases"][0]["page"]
    for name, page in [("index", "index.html"), ("cell", cell), ("class", klass)]:
        seen = check_report(
            built / page,
            artifact_dir() / f"built_atlas_{name}.png",
            chromium=chromium,
            offline=True,
        )
        assert seen["images"], name
        for img in seen["images"]:
            assert img["complete"] and img["naturalWidth"] > 0, (name, img)
        assert seen["scripts"] == 0 and seen["console_errors"] == [] and seen["failed"] == []
        for url in seen["requests"]:
            path = Path(unquote(urlsplit(url).path)).resolve()
            assert url.startswith("file://") and path.is_relative_to(built.resolve()), url


def test_icon_batches_are_as_even_as_they_can_be() -> None:
    from convlens.atlas import ICON_BATCH, _icon_rows

    for n in (1, 20, 31, 32, 33, 64, 65, 214, 1000):
        rows = _icon_rows(n)
        batches = -(-n // rows)
        assert rows <= ICON_BATCH and batches == -(-n // ICON_BATCH)  # no extra batch
        assert batches * rows - n < batches  # less than one padded row per batch
