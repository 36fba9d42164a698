"""`convlens visualize`: the files it writes, the numbers in render.json, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _cli import PNG_MAGIC, run
from convlens.analysis.featurevis import render, score
from convlens.models import load_model

TINY = ["--model", "simple_cnn", "--weights", "none", "--size", "32", "--quiet"]


def test_visualize_writes_pngs_grid_and_json(tmp_path: Path):
    out = tmp_path / "vis"
    r = run("visualize", *TINY, "--objective", "bn2:0-2", "--steps", "6",
            "--thresholds", "3", "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "random init" in r.stderr  # said, not hidden
    names = [f"{i:02d}_bn2_{i}.png" for i in range(3)]
    for name in names:
        for folder in (out, out / "step0003"):
            data = (folder / name).read_bytes()
            assert data[:8] == PNG_MAGIC
            with Image.open(folder / name) as im:
                assert im.size == (32, 32)
    assert (out / "grid.png").read_bytes()[:8] == PNG_MAGIC
    doc = json.loads((out / "render.json").read_text())
    assert doc["thresholds"] == [3, 6]
    assert doc["labels"] == ["bn2:0", "bn2:1", "bn2:2"]
    assert doc["images"] == names
    assert doc["settings"]["steps"] == 6 and doc["settings"]["seed"] == 0
    assert doc["settings"]["size"] == [32, 32] and doc["pretrained"] is False
    assert "torch" in doc["versions"]
    # The JSON's numbers are the API's: the same render in Python gives them.
    bundle = load_model("simple_cnn", weights=None)
    res = render(bundle, "bn2:0-2", size=32, steps=6, thresholds=(3,), progress=False)
    assert torch.allclose(torch.tensor(doc["values"]), res.values, rtol=1e-4)
    pixels = [torch.from_numpy(np.array(Image.open(out / n))) for n in names]
    saved = torch.stack(pixels).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(saved, res.images, atol=1 / 255 + 1e-6)
    rescored = score(bundle, "bn2:0-2", saved)
    assert torch.allclose(rescored, res.final_values, rtol=0.05, atol=0.05)


def test_default_objective_is_the_models_course_layer(tmp_path: Path):
    r = run("visualize", *TINY, "--steps", "1", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "render.json").read_text())["labels"][0] == "bn3:0"
    assert len(list(tmp_path.glob("*_bn3_*.png"))) == 10


@pytest.mark.parametrize(
    ("objective", "message"),
    [
        ("bn2:x", "cannot read objective"),
        ("bn9:0", "closest names"),
        ("bn2:99", "does not exist: it has"),
    ],
)
def test_bad_objectives_fail_in_one_line(tmp_path: Path, objective: str, message: str):
    r = run("visualize", *TINY, "--steps", "1", "--objective", objective, "--out", str(tmp_path))
    assert r.exit_code == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "render.json").exists()


def test_bad_thresholds(tmp_path: Path):
    r = run("visualize", *TINY, "--steps", "4", "--thresholds", "9", "--out", str(tmp_path))
    assert r.exit_code == 2 and "thresholds must lie in 1..steps" in r.stderr
    r = run("visualize", *TINY, "--thresholds", "a,b", "--out", str(tmp_path))
    assert r.exit_code == 2 and "--thresholds" in r.stderr
