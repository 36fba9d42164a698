from __future__ import annotations

import json

from _cli import run
from convlens.data._shapes import generate_shapes


def test_train_on_a_folder_then_resume_then_use_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path / "home"))
    data = generate_shapes(tmp_path / "shapes", train_per_class=6, val_per_class=3, progress=False)
    out = tmp_path / "run"
    r = run(
        "train",
        "--data",
        str(data),
        "--epochs",
        "1",
        "--out",
        str(out),
        "--quiet",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    for name in (
        "model.safetensors",
        "model.json",
        "metrics.json",
        "curves.png",
        "filters_before_after.png",
        "confusion.png",
        "predictions.png",
    ):
        assert (out / name).exists(), name
        assert f"wrote {out / name}" in r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["val_accuracy"] <= 1 and len(metrics["history"]) == 1
    assert "circle" in metrics["per_class_accuracy"] and metrics["images_per_s"] > 0

    r = run(
        "train",
        "--data",
        str(data),
        "--epochs",
        "2",
        "--out",
        str(out),
        "--resume",
        "--quiet",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    assert [h["epoch"] for h in json.loads((out / "metrics.json").read_text())["history"]] == [1, 2]

    # the trained model is a MODEL for the other commands
    r = run(
        "occlude",
        "--model",
        str(out),
        "--layers",
        "bn1,bn3",
        "--box",
        "10,30,12,40",
        "--out",
        str(tmp_path / "o"),
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    occ = json.loads((tmp_path / "o" / "occlusion.json").read_text())
    assert occ["layers"]["bn1"]["shape"] == [16, 64, 64]  # the run's own 64 px preprocessing


def test_train_bad_input_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path / "home"))
    r = run("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("convlens: error: no dataset")
    r = run(
        "train",
        "--data",
        "shapes",
        "--resume",
        "--out",
        str(tmp_path / "empty"),
        "--epochs",
        "1",
        "--quiet",
    )
    assert r.exit_code == 2 and "nothing to resume" in r.stderr
