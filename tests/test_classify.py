"""Top-k classification: the offline EfficientNet-Lite0 on the sample photo, batching,
bad input, the classify command, and a trained checkpoint classifying like the model
that wrote it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convlens
from _cli import run
from convlens import Prediction, classify, load_model
from convlens.images import sample_image_path
from convlens.models.zoo import ModelBundle, Preprocess

MILITARY_UNIFORM = 652


@pytest.fixture(autouse=True)
def _caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


@pytest.fixture(scope="module")
def lite0() -> ModelBundle:
    return load_model("efficientnet_lite0")


def _png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (80, 100)) -> Path:
    Image.fromarray(np.full((*size, 3), rgb, dtype=np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- the course's example


def test_cli_classify_grace_hopper_offline(no_network: None, tmp_path: Path) -> None:
    sample = sample_image_path()
    assert sample.name == "grace_hopper.jpg"
    out = tmp_path / "out"
    r = run("classify", "--model", "efficientnet_lite0", "--image", str(sample),
            "--out", str(out), "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads((out / "classify.json").read_text())
    assert data["model"].startswith("efficientnet_lite0 (ImageNet weights from ")
    assert data["pretrained"] is True and data["top"] == 5
    (entry,) = data["images"]
    assert entry["image"] == str(sample)
    preds = entry["predictions"]
    assert len(preds) == 5
    top5 = {p["index"]: p["label"] for p in preds}
    assert top5.get(MILITARY_UNIFORM) == "military uniform", preds
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert probs[0] > 0.1  # a trained model is confident; a random one spreads ~0.001
    # the printed table carries the same rows
    rows = [ln.split(maxsplit=3) for ln in r.stdout.splitlines() if ln[:4].strip().isdigit()]
    assert [int(row[2]) for row in rows] == [p["index"] for p in preds]
    assert [row[3] for row in rows] == [p["label"] for p in preds]
    assert f"wrote {out / 'classify.json'}" in r.stdout.splitlines()
    assert r.stderr == ""


def test_classify_api_matches_the_softmax(lite0: ModelBundle) -> None:
    img = convlens.sample_image()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pretrained bundle does not warn
        preds = classify(lite0, img)
    assert len(preds) == 5 and all(isinstance(p, Prediction) for p in preds)
    assert MILITARY_UNIFORM in [p.index for p in preds]
    with torch.no_grad():
        probs = lite0.model(lite0.preprocess(img)[None]).softmax(1)[0]
    expected_p, expected_i = probs.topk(5)
    assert [p.index for p in preds] == expected_i.tolist()
    np.testing.assert_allclose([p.probability for p in preds], expected_p.numpy(), rtol=1e-6)
    assert [p.label for p in preds] == [lite0.labels[i] for i in expected_i.tolist()]  # type: ignore[index]
    assert preds[0].to_dict() == {
        "label": preds[0].label,
        "index": preds[0].index,
        "probability": preds[0].probability,
    }


@pytest.mark.filterwarnings("ignore:.*untrained model")
def test_batches_equal_single_images(tmp_path: Path) -> None:
    bundle = load_model("simple_cnn", weights=None, seed=3)
    img = convlens.sample_image()
    red = _png(tmp_path / "red.png", (220, 30, 30))
    batch = classify(bundle, [img, red, str(red), img], k=3, batch_size=3)
    assert len(batch) == 4 and all(len(p) == 3 for p in batch)
    singles = [classify(bundle, img, k=3), classify(bundle, red, k=3)]
    assert [p.index for p in singles[0]] != [p.index for p in singles[1]]  # a real check
    for got, want in zip(batch, [singles[0], singles[1], singles[1], singles[0]]):
        assert [p.index for p in got] == [p.index for p in want]
        np.testing.assert_allclose(
            [p.probability for p in got], [p.probability for p in want], rtol=1e-4, atol=1e-6
        )
    # an already preprocessed [N, 3, H, W] batch gives the same answer
    x = torch.stack([bundle.preprocess(img), bundle.preprocess(img)])
    again = classify(bundle, x, k=3, preprocessed=True)
    assert [p.index for p in again[1]] == [p.index for p in singles[0]]


def test_k_is_capped_at_the_number_of_classes_and_labels_fall_back() -> None:
    bundle = load_model("simple_cnn", weights=None)  # 10 classes, no labels
    with pytest.warns(UserWarning, match=r"simple_cnn \(random init.*meaningless"):
        preds = classify(bundle, torch.rand(3, 50, 60), k=20)
    assert len(preds) == 10
    assert sorted(p.index for p in preds) == list(range(10))
    assert {p.label for p in preds} == {f"class {i}" for i in range(10)}
    assert sum(p.probability for p in preds) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"image": torch.randn(3, 32, 32) * 3}, ValueError, "preprocessed=True"),
        ({"image": torch.rand(1, 32, 32)}, ValueError, r"\[3, H, W\]"),
        ({"image": []}, ValueError, "no images"),
        ({"image": torch.rand(3, 8, 8), "k": 0}, ValueError, "positive integer"),
        ({"image": torch.rand(3, 8, 8), "batch_size": 0}, ValueError, "batch_size"),
        ({"image": "nope.jpg", "preprocessed": True}, ValueError, "needs tensors"),
        ({"image": "/no/such/file.jpg"}, convlens.ImageLoadError, "no such file"),
    ],
)
def test_bad_input_says_the_fix(lite0: ModelBundle, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        classify(lite0, **kwargs)


def test_classify_needs_a_bundle() -> None:
    with pytest.raises(TypeError, match="ModelBundle"):
        classify(torch.nn.Linear(2, 2), torch.rand(3, 8, 8))  # type: ignore[call-overload]


def test_classify_needs_a_classifier() -> None:
    bundle = ModelBundle(
        model=torch.nn.Conv2d(3, 4, 3),
        name="conv",
        arch="conv",
        preprocess=Preprocess(resize=None, crop=None),
        pretrained=True,
    )
    with pytest.raises(ValueError, match="class scores"):
        classify(bundle, torch.rand(3, 8, 8))


# ---------------------------------------------------------------- the command


def test_cli_many_images_and_top(tmp_path: Path) -> None:
    a, b = _png(tmp_path / "a.png", (250, 250, 250)), _png(tmp_path / "b.png", (10, 90, 200))
    out = tmp_path / "out"
    r = run("classify", "--model", "simple_cnn", "--image", str(a), str(b),
            "--top", "3", "--batch-size", "1", "--out", str(out), "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads((out / "classify.json").read_text())
    assert [e["image"] for e in data["images"]] == [str(a), str(b)]
    assert all(len(e["predictions"]) == 3 for e in data["images"])
    assert data["top"] == 3 and data["versions"]["device"] == "cpu"


def test_cli_random_init_says_so(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run("classify", "--model", "resnet18", "--weights", "none", "--top", "2",
            "--out", str(out), "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == "resnet18 (random init, seed 0: not trained)"
    assert r.stderr.splitlines() == [
        "convlens: note: resnet18 (random init, seed 0: not trained): its predictions mean nothing"
    ]
    data = json.loads((out / "classify.json").read_text())
    assert data["pretrained"] is False and data["weights"] is None
    assert "random init" in data["model"]
    assert data["images"][0]["image"] == "grace_hopper.jpg"  # the default image


def test_cli_bad_image_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    r = run("classify", "--image", str(bad), "--out", str(tmp_path / "o"), "--device", "cpu")
    assert r.exit_code == 2
    (line,) = r.stderr.splitlines()
    assert line.startswith("convlens: error: ") and "notes.jpg" in line and "not an image" in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- a trained checkpoint


def test_checkpoint_written_by_train_classifies_like_the_trained_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`convlens train` calls convlens.train.train, which returns the trained model: the
    checkpoint it wrote loads back with exactly that model's outputs."""
    load_data = pytest.importorskip("convlens.data").load_data  # issue 3's training
    generate_shapes = pytest.importorskip("convlens.data._shapes").generate_shapes
    train = pytest.importorskip("convlens.train").train
    from convlens.models.zoo import build_architecture

    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path / "home"))
    folder = generate_shapes(
        tmp_path / "shapes", train_per_class=8, val_per_class=2, progress=False
    )
    train_ds, val_ds = load_data(str(folder), progress=False)
    out = tmp_path / "run"
    model = build_architecture("simple_cnn", len(train_ds.classes), seed=0)
    result = train(model, train_ds, val_ds, epochs=1, out=out, device="cpu", progress=False)
    bundle = load_model(out)
    assert bundle.pretrained and bundle.arch == "simple_cnn"
    assert bundle.labels == train_ds.classes and bundle.input_size == 64
    val = sorted((folder / "val").glob("*/*.png"))
    x = torch.stack([bundle.preprocess(convlens.load_image(p)) for p in val])
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), trained(x), rtol=0, atol=0)
    in_memory = ModelBundle(
        trained, "trained", "simple_cnn", bundle.preprocess, train_ds.classes, pretrained=True
    )
    preds = classify(bundle, [str(p) for p in val], k=3)
    assert preds == classify(in_memory, [str(p) for p in val], k=3)
    assert all(p.label in train_ds.classes for row in preds for p in row)
    # and the command reads the run folder too
    r = run("classify", "--model", str(out), "--image", str(val[0]), "--top", "3",
            "--out", str(tmp_path / "c"), "--device", "cpu")  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "c" / "classify.json").read_text())["images"][0]["predictions"]
    assert [(g["label"], g["index"]) for g in got] == [(p.label, p.index) for p in preds[0]]


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_classify_on_cuda_matches_cpu(exact_cuda: None) -> None:
    cpu = load_model("efficientnet_lite0")
    gpu = load_model("efficientnet_lite0", device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    img = convlens.sample_image()
    on_gpu = classify(gpu, [img, img], k=5)
    on_cpu = classify(cpu, img, k=5)
    assert MILITARY_UNIFORM in [p.index for p in on_gpu[0]]
    for batch in on_gpu:
        assert [p.index for p in batch] == [p.index for p in on_cpu]
        np.testing.assert_allclose(
            [p.probability for p in batch], [p.probability for p in on_cpu], atol=1e-4
        )
    moved = classify(cpu, img, k=5, device="cuda")  # device= moves the model
    assert next(cpu.model.parameters()).is_cuda
    assert [p.index for p in moved] == [p.index for p in on_cpu]
