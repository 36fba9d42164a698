from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import convlens
from convlens.data import shapes
from convlens.models import SimpleCNN
from convlens.models.zoo import build_architecture, load_model
from convlens.train import RECIPES, ResumeError, TrainConfig, evaluate, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """30 train / 8 val images per class of the shapes set, cached under a tmp home."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("CONVLENS_HOME", str(home))
    train_ds, val_ds = shapes(train_per_class=30, val_per_class=8, progress=False)
    yield train_ds, val_ds
    mp.undo()


@pytest.fixture(autouse=True)
def _home(tiny, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("CONVLENS_HOME", str(tiny[0].root.parent.parent))


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_beats_chance_and_writes_checkpoint(tiny, tmp_path):
    train_ds, val_ds = tiny
    torch.manual_seed(0)
    model = build_architecture("simple_cnn", 10, seed=0)
    model.eval()  # a mode that must come back
    r = train(
        model, train_ds, val_ds, epochs=8, lr=5e-3, out=tmp_path, device="cpu", progress=False
    )
    assert not model.training
    assert len(r.history) == 8 and r.val_accuracy is not None
    assert r.val_accuracy > 0.3  # chance is 0.1
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]
    for row in r.history:
        assert {"train_loss", "val_loss", "val_accuracy", "seconds"} <= set(row)
    assert r.final.confusion.sum() == len(val_ds)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "conv1_before.safetensors",
        "metrics.json",
        "model.json",
        "model.safetensors",
        "training_state.pt",
    ]
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["arch"] == "simple_cnn" and info["epoch"] == 8 and info["classes"] == r.classes
    assert len(info["history"]) == 8 and info["versions"]["torch"] == torch.__version__
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["val_accuracy"] == pytest.approx(r.val_accuracy)
    assert set(metrics["per_class_accuracy"]) == set(r.classes)
    assert metrics["images_per_s"] > 0
    # the checkpoint loads back as a model with the same outputs
    bundle = load_model(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(x), r.model.eval()(x))
    assert bundle.labels == r.classes
    assert bundle.preprocess.crop == 64
    assert not torch.equal(r.conv1_before, r.conv1_after)


class Crash(Exception):
    pass


@pytest.mark.parametrize("recipe", ["course", "fast"])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tiny, tmp_path, recipe):
    train_ds, val_ds = tiny
    kw = dict(epochs=3, recipe=recipe, device="cpu", progress=False, batch_size=32)
    full = train(
        build_architecture("simple_cnn", 10, seed=1), train_ds, val_ds, out=tmp_path / "full", **kw
    )

    def crash_after_2(row):
        if row["epoch"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train(
            build_architecture("simple_cnn", 10, seed=1),
            train_ds,
            val_ds,
            out=tmp_path / "cut",
            callbacks=[crash_after_2],
            **kw,
        )
    assert json.loads((tmp_path / "cut" / "model.json").read_text())["epoch"] == 2
    resumed = train(
        build_architecture("simple_cnn", 10, seed=99),
        train_ds,
        val_ds,
        out=tmp_path / "cut",
        resume=True,
        **kw,
    )
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    assert torch.equal(resumed.conv1_before, full.conv1_before)


def test_killed_mid_epoch_loses_only_that_epoch(tiny, tmp_path, monkeypatch):
    train_ds, val_ds = tiny
    kw = dict(epochs=2, device="cpu", progress=False, batch_size=64)
    full = train(
        build_architecture("simple_cnn", 10, seed=2), train_ds, val_ds, out=tmp_path / "full", **kw
    )
    steps = {"n": 0}
    real_step = torch.optim.Adam.step

    def dying_step(self, *a, **k):
        steps["n"] += 1
        if steps["n"] == 7:  # epoch 2, batch 2 (5 batches per epoch)
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(
            build_architecture("simple_cnn", 10, seed=2),
            train_ds,
            val_ds,
            out=tmp_path / "cut",
            **kw,
        )
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert json.loads((tmp_path / "cut" / "model.json").read_text())["epoch"] == 1
    resumed = train(
        build_architecture("simple_cnn", 10, seed=2),
        train_ds,
        val_ds,
        out=tmp_path / "cut",
        resume=True,
        **kw,
    )
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_errors(tiny, tmp_path):
    train_ds, val_ds = tiny
    with pytest.raises(ResumeError, match="nothing to resume"):
        train(
            SimpleCNN(),
            train_ds,
            val_ds,
            epochs=1,
            out=tmp_path,
            resume=True,
            device="cpu",
            progress=False,
        )
    train(SimpleCNN(), train_ds, val_ds, epochs=1, out=tmp_path, device="cpu", progress=False)
    with pytest.raises(ResumeError, match="seed"):
        train(
            SimpleCNN(),
            train_ds,
            val_ds,
            epochs=2,
            seed=5,
            out=tmp_path,
            resume=True,
            device="cpu",
            progress=False,
        )
    with pytest.raises(ValueError, match="out="):
        train(SimpleCNN(), train_ds, val_ds, resume=True, device="cpu", progress=False)


def test_config_validation_and_recipes():
    assert RECIPES["course"] == TrainConfig()  # Adam 1e-3, batch 64, 8 epochs
    assert (RECIPES["course"].epochs, RECIPES["course"].lr, RECIPES["course"].batch_size) == (
        8,
        1e-3,
        64,
    )
    fast = RECIPES["fast"]
    assert fast.epochs == 10
    assert [fast.crop_for(e, 128) for e in range(10)] == [64] * 4 + [96] * 3 + [128] * 3
    six = dataclasses.replace(fast, epochs=6)  # the probe: 64 -> 96 -> 128 over 6
    assert [six.crop_for(e, 128) for e in range(6)] == [64, 64, 96, 96, 128, 128]
    assert fast.label_smoothing == 0.1 and fast.schedule == "onecycle" and fast.lr == 1e-2
    with pytest.raises(ValueError, match="unknown recipe"):
        train(SimpleCNN(), None, recipe="slow")  # type: ignore[arg-type]


def test_course_pipeline_gives_the_same_validation_numbers(tiny):
    _, val_ds = tiny
    model = build_architecture("simple_cnn", 10, seed=4)
    a = evaluate(model, val_ds, device="cpu")
    b = evaluate(model, val_ds, device="cpu", pipeline="course", workers=0)
    assert a.accuracy == b.accuracy
    assert torch.equal(a.confusion, b.confusion)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)


def test_course_pipeline_trains(tiny, tmp_path):
    train_ds, val_ds = tiny
    r = train(
        build_architecture("simple_cnn", 10, seed=0),
        train_ds,
        val_ds,
        epochs=1,
        pipeline="course",
        device="cpu",
        progress=False,
    )
    assert r.history[0]["train_loss"] > 0 and r.val_accuracy is not None


class Constant(nn.Module):
    """Always predicts class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(x.shape[0], 10) + self.w
        out[:, 0] = 1.0
        return out


def test_evaluate_confusion_golden(tiny):
    _, val_ds = tiny
    r = evaluate(Constant(), val_ds, device="cpu")
    assert r.accuracy == pytest.approx(0.1)  # 8 of 80
    assert r.confusion[:, 0].tolist() == [8] * 10 and int(r.confusion.sum()) == 80
    assert r.per_class_accuracy == [1.0] + [0.0] * 9
    # cross-entropy of logits (1, 0, ..., 0): class 0 -> log(e + 9) - 1, others log(e + 9)
    import math

    expected = (math.log(math.e + 9) - 1 + 9 * math.log(math.e + 9)) / 10
    assert r.loss == pytest.approx(expected, rel=1e-5)


def test_public_reexports():
    assert convlens.train is train and convlens.evaluate is evaluate
