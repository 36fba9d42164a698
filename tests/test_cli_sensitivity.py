from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

import convlens
from _cli import PNG_MAGIC, assert_one_line_error, run


def test_sensitivity_class_target_writes_png_and_json(tmp_path: Path) -> None:
    out = tmp_path / "sens"
    result = run(
        "sensitivity", "--model", "simple_cnn", "--target", "3", "--window", "32",
        "--stride", "16", "--quiet", "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["sensitivity.json", "sensitivity.png"]
    assert (out / "sensitivity.png").read_bytes()[:8] == PNG_MAGIC
    with Image.open(out / "sensitivity.png") as im:
        im.verify()
    for p in ("sensitivity.png", "sensitivity.json"):
        assert f"wrote {out / p}" in result.stdout.splitlines()
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["target"] == "3"
    assert data["model"].startswith("simple_cnn (random init")
    assert data["input_shape"] == [3, 128, 128]
    assert data["window_tops"] == [0, 16, 32, 48, 64, 80, 96]
    assert len(data["map"]) == 7 and len(data["map"][0]) == 7
    assert data["method"] == "incremental" and data["exact"] is True
    assert data["image"] == convlens.images.sample_image_path().name
    assert "device" in data["versions"]
    # The numbers are the API's for the same input.
    bundle = convlens.load_model("simple_cnn", weights=None)
    r = convlens.sensitivity(bundle, bundle.preprocess(convlens.sample_image()), 3)
    torch.testing.assert_close(torch.tensor(data["map"]), r.map, atol=1e-6, rtol=1e-5)
    assert "target 3, score" in result.stdout
    assert "7x7 windows of 32x32 px" in result.stdout


def test_sensitivity_layer_target_and_image_file(tmp_path: Path) -> None:
    img = tmp_path / "img.png"
    Image.new("RGB", (150, 130), (200, 40, 40)).save(img)
    out = tmp_path / "sens"
    result = run(
        "sensitivity", "--model", "simple_cnn", "--image", str(img), "--target", "bn2:5",
        "--window", "48", "--stride", "36", "--fill", "mean", "--method", "naive",
        "--quiet", "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sensitivity.json").read_text())
    assert data["target"] == "bn2:5" and data["fill"] == "mean" and data["method"] == "naive"
    assert data["image"] == str(img)
    assert data["window_tops"] == [0, 36, 72, 108]  # the last cut to 20 px, as Captum does


def test_default_target_is_the_top_class(tmp_path: Path) -> None:
    out = tmp_path / "sens"
    result = run("sensitivity", "--window", "64", "--stride", "64", "--quiet", "--device", "cpu",
                 "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    target = json.loads((out / "sensitivity.json").read_text())["target"]
    assert f"--target {target}: the model's top class" in result.stderr


def test_bad_target_is_one_line(tmp_path: Path) -> None:
    result = run("sensitivity", "--target", "bn2:x", "--out", str(tmp_path / "x"))
    assert_one_line_error(result, "'bn2:x'", "'layer:channel'")
    assert not (tmp_path / "x").exists()


def test_unknown_layer_lists_close_matches(tmp_path: Path) -> None:
    result = run("sensitivity", "--target", "bn4:0", "--device", "cpu", "--out", str(tmp_path))
    assert_one_line_error(result, "'bn4'", "closest names", "'bn1'")


def test_window_larger_than_image(tmp_path: Path) -> None:
    result = run("sensitivity", "--window", "200", "--target", "0", "--device", "cpu",
                 "--out", str(tmp_path / "x"))  # fmt: skip
    assert_one_line_error(result, "window 200x200 is larger than the input (128x128")
    assert not (tmp_path / "x").exists()
