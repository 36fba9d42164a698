"""dataset_examples: exact against a brute force, receptive-field crops, checkpoints and
resuming, bad input, and a clean model afterwards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _examples_fixtures import Tiny, brute_force, tiny_data, tiny_model
from PIL import Image
from torch import nn

import convlens
from convlens.analysis.examples import (
    DatasetExamples,
    RunningChannels,
    crops,
    dataset_examples,
    parse_channels,
)
from convlens.errors import ConvlensError, ConvlensWarning, DatasetError, LayerNotFoundError


def _same_json(a: DatasetExamples, b: DatasetExamples) -> bool:
    from convlens._io import to_jsonable

    da, db = to_jsonable(a.to_dict()), to_jsonable(b.to_dict())
    for d in (da, db):
        d["settings"].pop("seconds", None)
        d["settings"].pop("images_per_second", None)
    return json.dumps(da, sort_keys=True) == json.dumps(db, sort_keys=True)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_equals_brute_force_with_ties(reduce: str) -> None:
    model, data = tiny_model(), tiny_data()
    layers = ["conv1", "relu", "conv2", "fc"]
    r = dataset_examples(model, data, layers, k=5, reduce=reduce, batch_size=8, progress=False)
    for layer in layers:
        want = brute_force(model, data, layer, 5, reduce)
        assert r.channels(layer) == list(range(len(want["top"])))
        for ch in r.channels(layer):
            got_top = [(e.score, e.index, e.y, e.x, e.label) for e in r.top(layer, ch)]
            got_bottom = [(e.score, e.index, e.y, e.x, e.label) for e in r.bottom(layer, ch)]
            assert got_top == want["top"][ch], (layer, ch)
            assert got_bottom == want["bottom"][ch], (layer, ch)
            st = r.stats(layer, ch)
            n, mean, std, lo, hi, active = want["stats"][ch]
            assert st.count == n == 37
            assert st.min == lo and st.max == hi
            assert st.mean == pytest.approx(mean, rel=1e-12, abs=1e-12)
            assert st.std == pytest.approx(std, rel=1e-10, abs=1e-12)
            assert st.active == active
            sel = r.selectivity(layer, ch)
            assert sel.class_means == pytest.approx(want["class_means"][ch], rel=1e-12)
    # The duplicates tie exactly: wherever one of images 5, 20, 30 is in a top-k, the
    # lower index comes first and the three are adjacent.
    seen_tie = False
    for layer in layers:
        for ch in r.channels(layer):
            idx = [e.index for e in r.top(layer, ch)]
            dups = [i for i in idx if i in (5, 20, 30)]
            if len(dups) > 1:
                seen_tie = True
                assert dups == sorted(dups)
    assert seen_tie, "the test data should put the tied copies in some top-k"
    # Post-ReLU maps: many images score 0 at the bottom; ties go to the lowest index.
    zeros = [e.index for e in r.bottom("relu", 0) if e.score == 0.0]
    assert zeros == sorted(zeros)


def test_histogram_counts_every_score_in_its_published_bin() -> None:
    import bisect

    from convlens.analysis.examples import HIST_EDGES

    model, data = tiny_model(), tiny_data()
    r = dataset_examples(model, data, ["conv1", "relu"], k=2, batch_size=8, progress=False)
    for layer in ("conv1", "relu"):
        out = convlens.capture(model, torch.stack([d[0] for d in data]), [layer])[layer]
        scores = out.flatten(2).amax(2).double()  # [N, C], the max reduce
        for ch in r.channels(layer):
            h = r.histogram(layer, ch)
            assert sum(h.counts) == 37 and len(h.edges) == len(h.counts) + 1
            assert list(h.edges) == sorted(h.edges)
            # by hand: bin i of the fixed edges holds edges[i-1] <= v < edges[i]
            want: dict[int, int] = {}
            for v in scores[:, ch].tolist():
                b = bisect.bisect_right(HIST_EDGES, v)
                want[b] = want.get(b, 0) + 1
            lo, hi = min(want), max(want)
            assert list(h.counts) == [want.get(b, 0) for b in range(lo, hi + 1)]
            assert h.edges[0] <= min(scores[:, ch].tolist())
            assert h.edges[-1] >= max(scores[:, ch].tolist())
    # post-ReLU: a dead channel's zeros sit in the bin around zero
    zero_bin = bisect.bisect_right(HIST_EDGES, 0.0)
    assert HIST_EDGES[zero_bin - 1] < 0 < HIST_EDGES[zero_bin]


def test_histograms_merge_by_addition_and_survive_a_save(tmp_path: Path) -> None:
    model, data = tiny_model(), tiny_data()
    r = dataset_examples(model, data, ["conv2"], k=2, batch_size=4, progress=False)
    r.save(tmp_path)
    back = DatasetExamples.load(tmp_path)
    assert all(back.histogram("conv2", c) == r.histogram("conv2", c) for c in r.channels("conv2"))
    a = RunningChannels(3, 2, torch.device("cpu"))
    b = RunningChannels(3, 2, torch.device("cpu"))
    both = RunningChannels(3, 2, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.randn(5, 3, generator=g) * 10, torch.randn(4, 3, generator=g)
    for st, s, i in ((a, s1, torch.arange(5)), (b, s2, torch.arange(5, 9))):
        st.add(s, torch.zeros_like(s, dtype=torch.long), i, torch.zeros(3, dtype=torch.long), 1)
    both.add(
        torch.cat([s1, s2]),
        torch.zeros(9, 3, dtype=torch.long),
        torch.arange(9),
        torch.zeros(3, dtype=torch.long),
        1,
    )
    merged = RunningChannels.merge([a.state_dict(), b.state_dict()], k=2)
    assert torch.equal(merged["hist"], both.state_dict()["hist"])
    assert int(merged["hist"].sum()) == 27


def test_fc_is_one_position_and_selectivity_by_hand() -> None:
    model, data = tiny_model(), tiny_data()
    r = dataset_examples(model, data, "fc", k=3, batch_size=5, progress=False)
    assert r.layers["fc"].shape == (3, 1, 1)
    assert all(e.y == 0 and e.x == 0 for e in r.top("fc", 1))
    assert r.receptive_field("fc", 0, 0) == (0, 12, 0, 12)
    # Morcos et al.: (mu_max - mu_rest) / (mu_max + mu_rest) from the class means.
    sel = r.selectivity("fc", 2)
    means = sel.class_means
    best = max(range(len(means)), key=lambda c: means[c])
    rest = sum(means[c] for c in range(len(means)) if c != best) / (len(means) - 1)
    assert sel.top_class == best
    want = (means[best] - rest) / (means[best] + rest)
    assert sel.index == pytest.approx(want, rel=1e-12)


def test_simple_cnn_bn3_receptive_field_and_crops() -> None:
    torch.manual_seed(0)
    model = convlens.SimpleCNN(10).eval()
    g = torch.Generator().manual_seed(3)
    data = [(torch.rand(3, 64, 64, generator=g), i % 10) for i in range(12)]
    r = dataset_examples(model, data, ["bn3"], k=4, batch_size=5, progress=False)
    rf = r.layers["bn3"].receptive
    assert rf is not None and rf.bounded
    assert rf.size == (18, 18) and rf.stride == (4, 4)
    assert r.receptive_field("bn3", 0, 0) == (0, 11, 0, 11)  # clipped at the top-left
    assert r.receptive_field("bn3", 5, 3) == (13, 31, 5, 23)  # 18 x 18 inside
    assert r.receptive_field("bn3", 15, 15) == (53, 64, 53, 64)  # clipped at 64
    cs = crops(r, data, "bn3", 7)
    assert [c.example for c in cs] == r.top("bn3", 7)
    maps = convlens.capture(model, torch.stack([d[0] for d in data]), ["bn3"])["bn3"]
    for c in cs:
        t, b, left, rr = c.box
        assert c.box == r.receptive_field("bn3", c.example.y, c.example.x)
        # The right pixels: the image the model saw (already in [0, 1] here), at the box.
        assert torch.equal(c.image, data[c.example.index][0][:, t:b, left:rr])
        assert c.activation.shape == (b - t, rr - left)
        # The map is upsampled over the whole input: its maximum is the example's score.
        m = maps[c.example.index, 7]
        assert float(m.max()) == pytest.approx(c.example.score)
        assert c.full_activation.shape == (64, 64)
    bottom = crops(r, data, "bn3", 7, which="bottom")
    assert [c.example for c in bottom] == r.bottom("bn3", 7)
    # images of another size than the pass's: the boxes would be cut in the wrong grid
    half = [(x[:, :32, :32], y) for x, y in data]
    with pytest.raises(ValueError, match="load at 32x32 px but the result was computed on 64x64"):
        crops(r, half, "bn3", 7)


def test_crops_after_load_need_the_model(tmp_path: Path) -> None:
    model, data = tiny_model(), tiny_data(n=10)
    r = dataset_examples(model, data, ["conv2"], k=2, progress=False)
    r.save(tmp_path)
    back = DatasetExamples.load(tmp_path)
    with pytest.raises(ValueError, match="pass model="):
        crops(back, data, "conv2", 0)
    cs = crops(back, data, "conv2", 0, model=model)
    assert [c.example.index for c in cs] == [e.index for e in r.top("conv2", 0)]
    with pytest.raises(ValueError, match="same dataset"):
        crops(back, data[:5], "conv2", 0, model=model)


def test_save_load_round_trip(tmp_path: Path) -> None:
    model, data = tiny_model(), tiny_data()
    r = dataset_examples(model, data, ["relu", "fc"], k=4, batch_size=8, progress=False)
    path = r.save(tmp_path)
    assert path == tmp_path / "examples.json"
    back = DatasetExamples.load(tmp_path)
    assert _same_json(r, back)
    for layer in ("relu", "fc"):
        for ch in r.channels(layer):
            assert back.top(layer, ch) == r.top(layer, ch)
            assert back.bottom(layer, ch) == r.bottom(layer, ch)
            assert back.stats(layer, ch) == r.stats(layer, ch)
    d = json.loads(path.read_text())
    top0 = d["layers"]["relu"]["channels"][0]["top"][0]
    assert set(top0) >= {"index", "path", "score", "y", "x", "label", "box"}
    with pytest.raises(ConvlensError, match=r"no examples\.json"):
        DatasetExamples.load(tmp_path / "nothing")


def test_channels_subset_and_parse() -> None:
    assert parse_channels("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="0-15"):
        parse_channels("a-b")
    model, data = tiny_model(), tiny_data(n=9)
    r = dataset_examples(model, data, ["conv2"], channels="1,3-4", k=2, progress=False)
    assert r.channels("conv2") == [1, 3, 4]
    full = dataset_examples(model, data, ["conv2"], k=2, progress=False)
    assert r.top("conv2", 3) == full.top("conv2", 3)
    with pytest.raises(ValueError, match="not collected"):
        r.top("conv2", 0)
    with pytest.raises(ValueError, match="out of range"):
        dataset_examples(model, data, ["conv2"], channels=[6], progress=False)


def test_repeated_module_calls_are_separate_layers() -> None:
    torch.manual_seed(0)
    model = convlens.SimpleCNN(10).eval()
    data = [(torch.rand(3, 32, 32), 0) for _ in range(4)]
    r = dataset_examples(model, data, ["pool#1", "pool"], k=2, progress=False)
    assert list(r.layers) == ["pool#1", "pool#0", "pool#2"]  # asked twice, collected once
    maps = convlens.capture(model, torch.stack([d[0] for d in data]), ["pool#1"])["pool#1"]
    best = int(maps[:, 5].flatten(1).amax(1).argmax())
    assert r.top("pool#1", 5)[0].index == best
    assert r.layers["pool#1"].shape == (32, 8, 8) and r.layers["pool#2"].shape == (64, 4, 4)


# ------------------------------------------------------------------ checkpoints


class _Interrupting(torch.utils.data.Dataset):
    """A dataset that raises KeyboardInterrupt at item ``stop`` (once)."""

    def __init__(self, items: list, stop: int | None) -> None:
        self.items, self.stop = items, stop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        if self.stop is not None and i == self.stop:
            self.stop = None
            raise KeyboardInterrupt
        return self.items[i]


def test_interrupted_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    model, items = tiny_model(), tiny_data(n=53)
    ckpt = tmp_path / "state.pt"
    want = dataset_examples(
        model, _Interrupting(items, None), ["relu", "fc"], k=4, batch_size=4, progress=False
    )
    data = _Interrupting(items, stop=37)

    def run(**kw: object) -> DatasetExamples:
        return dataset_examples(
            model,
            data,
            ["relu", "fc"],
            k=4,
            batch_size=4,
            progress=False,
            checkpoint=ckpt,
            checkpoint_every=8,
            **kw,  # type: ignore[arg-type]
        )

    with pytest.raises(KeyboardInterrupt):
        run(workers=1)
    saved = torch.load(ckpt, weights_only=True)
    assert 0 < saved["next_batch"] < 14 and not saved["done"]
    got = run()
    assert _same_json(got, want)
    assert torch.load(ckpt, weights_only=True)["done"]


def test_state_does_not_grow_with_the_dataset(tmp_path: Path) -> None:
    model = tiny_model()
    sizes = []
    for n in (20, 200):
        ckpt = tmp_path / f"s{n}.pt"
        dataset_examples(
            model,
            tiny_data(n=n),
            ["relu", "conv2"],
            k=3,
            batch_size=10,
            progress=False,
            checkpoint=ckpt,
        )
        st = torch.load(ckpt, weights_only=True)["states"]
        sizes.append({k: {n: tuple(t.shape) for n, t in v.items()} for k, v in st.items()})
    assert sizes[0] == sizes[1]


def test_resume_with_other_settings_starts_over_or_strict_refuses(tmp_path: Path) -> None:
    model, data = tiny_model(), tiny_data(n=10)
    ckpt = tmp_path / "state.pt"
    dataset_examples(model, data, ["conv2"], k=3, progress=False, checkpoint=ckpt)
    with pytest.raises(ConvlensError, match=r"k 3 \(checkpoint\) vs 2 \(now\)"):
        dataset_examples(model, data, ["conv2"], k=2, progress=False, checkpoint=ckpt, strict=True)
    with pytest.raises(ConvlensError, match="reduce"):
        dataset_examples(
            model, data, ["conv2"], k=3, reduce="mean", progress=False, checkpoint=ckpt, strict=True
        )
    with pytest.warns(ConvlensWarning, match=r"k 3 \(checkpoint\) vs 2 \(now\).*starts over"):
        got = dataset_examples(model, data, ["conv2"], k=2, progress=False, checkpoint=ckpt)
    assert got.k == 2 and torch.load(ckpt, weights_only=True)["settings"]["k"] == 2


def test_running_state_merge_equals_one_pass() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (30, 5), generator=g).float()  # many ties
    pos = torch.randint(0, 9, (30, 5), generator=g)
    idx = torch.arange(30)
    one = RunningChannels(5, 4, torch.device("cpu"))
    one.add(scores, pos, idx, torch.zeros(5, dtype=torch.long), 9)
    parts = []
    for r in range(3):
        st = RunningChannels(5, 4, torch.device("cpu"))
        sel = idx[r::3]
        st.add(scores[sel], pos[sel], sel, torch.zeros(5, dtype=torch.long), 9)
        parts.append(st.state_dict())
    merged = RunningChannels.merge(parts, 4)
    ref = one.state_dict()
    for key in ("top_scores", "top_index", "top_pos", "bottom_scores", "bottom_index"):
        assert torch.equal(merged[key], ref[key]), key
    assert torch.allclose(merged["mean"], ref["mean"], rtol=1e-15)
    assert torch.allclose(merged["m2"], ref["m2"], rtol=1e-12)


# ------------------------------------------------------------------ data forms


def _write_folder(root: Path, sizes: list[tuple[int, int]], labelled: bool = True) -> Path:
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(sizes):
        sub = root / (f"class_{i % 2}" if labelled else "")
        sub.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(sub / f"img_{i:02d}.png")
    return root


def test_folder_with_a_bundle_and_a_corrupt_image(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos", [(40, 50)] * 7)
    (root / "class_1" / "broken.png").write_bytes(b"not a png")
    bundle = convlens.load_model("simple_cnn", weights=None)
    with pytest.warns(UserWarning, match="broken.png"):
        r = dataset_examples(bundle, root, ["bn2"], k=3, batch_size=3, progress=False)
    assert r.classes == ["class 0", "class 1"]
    assert len(r.skipped) == 1 and r.skipped[0].path.endswith("broken.png")
    assert r.stats("bn2", 0).count == 7
    ex = r.top("bn2", 0)[0]
    assert ex.path is not None and Path(ex.path).is_file()
    assert ex.label in (0, 1)
    d = r.to_dict()
    assert d["dataset"]["length"] == 8 and d["dataset"]["count"] == 7
    assert len(d["dataset"]["skipped"]) == 1
    with pytest.raises(DatasetError, match=r"broken\.png"):
        dataset_examples(bundle, root, ["bn2"], progress=False, strict=True, batch_size=2)


def test_flat_folder_of_mixed_sizes_without_a_bundle_is_resized(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "flat", [(20, 24), (30, 30), (20, 24)], labelled=False)
    with pytest.warns(UserWarning, match="resized to 20x24"):
        r = dataset_examples(Tiny().eval(), root, ["conv1"], k=2, progress=False)
    assert r.classes is None and r.top("conv1", 0)[0].label is None
    assert r.input_shape == (3, 20, 24)
    assert any("resized" in n for n in r.notes)


def test_shapes_pair_uses_the_val_split(tmp_path: Path) -> None:
    pair = convlens.data.shapes(
        tmp_path / "shapes", train_per_class=2, val_per_class=2, progress=False
    )
    bundle = convlens.load_model("simple_cnn", weights=None)
    r = dataset_examples(bundle, pair, ["bn3"], k=2, progress=False)
    assert r.length == len(pair[1]) == 20
    assert r.classes == list(pair[1].classes)
    assert r.settings["split"] == "val"
    top = r.top("bn3", 0)[0]
    assert top.path == str(pair[1].samples[top.index][0])
    assert top.label == pair[1].samples[top.index][1]
    # The module alone takes the dataset's own (normalised) tensors as they are.
    r2 = dataset_examples(bundle.model, pair[1], ["bn3"], k=2, progress=False)
    assert r2.input_shape == (3, 64, 64)


def test_bad_input() -> None:
    model, data = tiny_model(), tiny_data(n=6)
    with pytest.raises(LayerNotFoundError, match="conv1"):
        dataset_examples(model, data, ["conv3"], progress=False)
    with pytest.raises(DatasetError, match="empty"):
        dataset_examples(model, [], ["conv1"], progress=False)
    with pytest.warns(UserWarning, match="clamped to k=6"):
        r = dataset_examples(model, data, ["conv1"], k=50, progress=False)
    assert r.k == 6 and len(r.top("conv1", 0)) == 6

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(3, 4, 4, stride=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x).flatten(2).transpose(1, 2)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = Tokens()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.tokens(x)

    with pytest.raises(ValueError, match=r"3-D tensor .* \[N, C, H, W\]"):
        dataset_examples(Wrap(), data, ["tokens"], progress=False)
    with pytest.raises(ValueError, match="reduce"):
        dataset_examples(model, data, ["conv1"], reduce="median", progress=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="folder path"):
        dataset_examples(model, 3.5, ["conv1"], progress=False)


def test_model_left_clean() -> None:
    model, data = tiny_model(), tiny_data(n=9)
    model.train()
    model.conv2.eval()
    seen = []
    handle = model.conv1.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    try:
        dataset_examples(model, data, ["conv2"], k=2, batch_size=4, progress=False)
        assert model.training and not model.conv2.training and model.conv1.training
        assert list(model.conv1._forward_hooks) == [handle.id]  # the user's hook only
        assert not model.conv2._forward_hooks
        assert seen  # the user's own hook ran during the pass
    finally:
        handle.remove()

    class Boom(Tiny):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.conv1(x)
            raise RuntimeError("boom")

    boom = Boom().eval()
    with pytest.raises(RuntimeError, match="boom"):
        dataset_examples(boom, data, ["conv2"], progress=False)
    assert not boom.conv1._forward_hooks and not boom.conv2._forward_hooks


def test_dataparallel_is_unwrapped() -> None:
    model, data = tiny_model(), tiny_data(n=11)
    a = dataset_examples(model, data, ["conv2"], k=3, progress=False)
    b = dataset_examples(nn.DataParallel(model), data, ["conv2"], k=3, progress=False)
    assert a.top("conv2", 2) == b.top("conv2", 2)
    assert math.isclose(a.stats("conv2", 2).mean, b.stats("conv2", 2).mean)


def test_the_users_hooks_see_only_real_activations() -> None:
    class Blocky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Conv2d(4, 5, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(x))

    torch.manual_seed(0)
    model = Blocky().eval()
    kept: list = []
    handle = model.block.register_forward_hook(lambda m, i, o: kept.append(o))
    try:
        r = dataset_examples(model, tiny_data(n=6), ["head"], k=2, batch_size=3, progress=False)
        assert r.layers["head"].receptive is not None and r.layers["head"].receptive.bounded
        # The pass ran the model twice (two batches of 3); the probes (shape trace, fx
        # trace for the receptive field) never reached the user's hook.
        assert len(kept) == 2
        assert all(type(o) is torch.Tensor and not o.is_meta and o.shape[0] == 3 for o in kept)
        assert list(model.block._forward_hooks) == [handle.id]
    finally:
        handle.remove()
