"""`convlens attribute`: the files it writes, the same numbers as the Python API, what
--sanity and --faithfulness add, 2 processes (gloo spawn and torchrun) writing what one
writes, and the one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

import convlens
from _cli import assert_ok, assert_one_line_error, assert_png, assert_wrote, no_temp_files, run
from _ranks import init_gloo, spawn
from convlens.analysis.attribution.faithfulness import faithfulness
from convlens.images import load_image

ARGS = ["--model", "simple_cnn", "--weights", "none", "--device", "cpu"]
TIMEOUT_S = 120
# The dataset runs: 3 of 5 images (--limit), so rank 0 takes 2 and rank 1 takes 1.
DATA_ARGS = ["--methods", "saliency,gradcam", "--limit", "3"]


def _png(path: Path, seed: int, size: int = 40) -> Path:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _folder(root: Path, n: int = 5, classes: int = 3) -> Path:
    for i in range(n):
        _png(root / f"kind_{i % classes}" / f"{i:02d}.png", seed=i)
    return root


def _bundle() -> convlens.ModelBundle:
    return convlens.load_model("simple_cnn", weights=None)


def _input(bundle: convlens.ModelBundle, path: Path) -> torch.Tensor:
    return bundle.preprocess(load_image(path))


def _numbers(path: Path) -> dict[str, Any]:
    """attribution.json without what may differ between runs: times, world size, versions."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in ("seconds", "versions")}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    d = json.loads(path.read_text())
    d["settings"].pop("world_size")
    return strip(d)


def test_image_writes_figure_maps_and_the_api_numbers(tmp_path: Path) -> None:
    img = _png(tmp_path / "photo.png", seed=0)
    out = tmp_path / "out"
    res = run(
        "attribute", *ARGS, "--image", str(img), "--methods", "integrated_gradients,gradcam",
        "--steps", "8", "--out", str(out),
    )  # fmt: skip
    assert_ok(res)
    assert_wrote(res, [out / "attribution.json", out / "photo.png"])
    assert_png(out / "photo.png")
    assert no_temp_files(out)
    d = json.loads((out / "attribution.json").read_text())
    assert d["format"] == "convlens-attribute/1" and d["methods"] == [
        "integrated_gradients",
        "gradcam",
    ]
    assert d["source"] == {"images": [str(img)], "count": 1, "skipped": []}
    assert d["sanity"] is None and not (out / "sanity.png").exists()
    assert d["settings"]["world_size"] == 1 and d["settings"]["steps"] == 8
    assert d["settings"]["methods"]["integrated_gradients"]["steps"] == 8
    assert "torch" in d["versions"] and d["settings"]["seconds"] > 0
    entry = d["images"][0]
    assert (entry["index"], entry["figure"], entry["maps"]) == (0, "photo.png", "maps/photo")
    ig, cam = entry["methods"]["integrated_gradients"], entry["methods"]["gradcam"]
    assert "faithfulness" not in ig and "delta" not in cam and cam["layer"] == "bn3"
    # The same numbers as convlens.attribute on the same input.
    bundle = _bundle()
    x = _input(bundle, img)
    api = convlens.attribute(bundle, x, method="integrated_gradients", steps=8)
    assert ig["target"] == api.target[0] and ig["steps"] == 8
    assert ig["score"] == float(api.score[0]) == cam["score"]  # one target for both methods
    assert ig["delta"] == float(api.delta[0]) and abs(ig["delta"]) < 0.05 * abs(ig["score"])
    assert d["summary"]["integrated_gradients"]["max_abs_delta"] == abs(ig["delta"])
    saved = convlens.Attribution.load(out / "maps" / "photo", name="integrated_gradients")
    assert torch.equal(saved.map, api.map) and saved.delta is not None
    saved_cam = convlens.Attribution.load(out / "maps" / "photo", name="gradcam")
    api_cam = convlens.attribute(bundle, x, api.target[0], method="gradcam")
    assert saved_cam.layer == "bn3" and torch.equal(saved_cam.map, api_cam.map)
    assert "integrated_gradients" in res.stdout and f"delta {ig['delta']:.2g}" in res.stdout


def test_precision_reaches_scorecam_only(tmp_path: Path) -> None:
    img = _png(tmp_path / "photo.png", seed=3)
    out = tmp_path / "out"
    res = run(
        "attribute", *ARGS, "--image", str(img), "--methods", "gradcam,scorecam",
        "--precision", "bfloat16", "--out", str(out),
    )  # fmt: skip
    assert_ok(res)
    d = json.loads((out / "attribution.json").read_text())
    assert d["settings"]["precision"] == "bfloat16"
    methods = d["settings"]["methods"]
    assert methods["scorecam"]["precision"] == "bfloat16"
    assert methods["gradcam"]["precision"] == "float32"
    bundle = _bundle()
    x = _input(bundle, img)
    t = d["images"][0]["methods"]["gradcam"]["target"]
    api = convlens.attribute(bundle, x, t, method="scorecam", precision="bfloat16")
    saved = convlens.Attribution.load(out / "maps" / "photo", name="scorecam")
    assert torch.equal(saved.map, api.map)


def test_unit_target_and_images_that_share_a_name(tmp_path: Path) -> None:
    a, b = _png(tmp_path / "a" / "x.png", seed=1), _png(tmp_path / "b" / "x.png", seed=2)
    out = tmp_path / "out"
    res = run(
        "attribute", *ARGS, "--image", str(a), str(b), "--target", "bn2:1@3,4",
        "--methods", "saliency", "--out", str(out),
    )  # fmt: skip
    assert_ok(res)
    assert_wrote(res, [out / "0000_x.png", out / "0001_x.png"])  # numbered: never collide
    d = json.loads((out / "attribution.json").read_text())
    bundle = _bundle()
    for entry, path in zip(d["images"], (a, b)):
        got = entry["methods"]["saliency"]
        api = convlens.attribute(bundle, _input(bundle, path), "bn2:1@3,4", method="saliency")
        assert got["target"] == "bn2:1@3,4" and got["label"] is None
        assert got["score"] == float(api.score[0])
        saved = convlens.Attribution.load(out / entry["maps"], name="saliency")
        assert torch.equal(saved.map, api.map)


def test_sanity_and_faithfulness_add_their_figure_and_numbers(tmp_path: Path) -> None:
    img = _png(tmp_path / "photo.png", seed=3)
    out = tmp_path / "out"
    res = run(
        "attribute", *ARGS, "--image", str(img), "--methods", "saliency", "--sanity",
        "--faithfulness", "--out", str(out),
    )  # fmt: skip
    assert_ok(res)
    assert_wrote(res, [out / "attribution.json", out / "sanity.png", out / "photo.png"])
    assert_png(out / "sanity.png")
    assert "sanity (the first image only" in res.stdout
    d = json.loads((out / "attribution.json").read_text())
    s = d["sanity"]
    assert s["image"] == str(img) and s["index"] == 0 and s["cascade"] is True
    assert s["units"][0] == "fc" and s["units"][-1] == "conv1"  # output first
    rho = s["correlation"]["saliency"]["mean"]
    assert len(rho) == len(s["units"]) and all(-1 <= v <= 1 for v in rho)
    assert s["abs_correlation"]["saliency"]["mean"][-1] < 0.5  # a random net: a new map
    got = d["images"][0]["methods"]["saliency"]["faithfulness"]
    bundle = _bundle()
    x = _input(bundle, img)
    api = convlens.attribute(bundle, x, method="saliency")
    f = faithfulness(bundle, x, api, metric="deletion")
    assert got["deletion"] == {"auc": float(f.auc[0]), "random_auc": float(f.random_auc[0])}
    assert set(got["insertion"]) == {"auc", "random_auc"}
    assert d["summary"]["saliency"]["deletion_auc"] == got["deletion"]["auc"]
    assert f"deletion AUC {got['deletion']['auc']:.3f}" in res.stdout


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3 * 8 * 8, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = str(_png(tmp_path / "photo.png", seed=4))
    data = str(_folder(tmp_path / "photos", n=2))
    out = str(tmp_path / "out")
    base = ["attribute", *ARGS, "--out", out]
    res = run(*base, "--image", img, "--methods", "saliency,integrated_gradient")
    assert_one_line_error(res, "unknown method 'integrated_gradient'", "'integrated_gradients'")
    res = run(*base, "--image", img, "--target", "10", "--methods", "saliency")
    assert_one_line_error(res, "target class 10 is out of range", "10 classes")
    res = run(*base, "--image", img, "--target", "bn3:99", "--methods", "saliency")
    assert_one_line_error(res, "target channel 99 is out of range")
    res = run(*base, "--image", img, "--target", "bn3:x", "--methods", "saliency")
    assert_one_line_error(res, "--target 'bn3:x'")
    res = run(*base, "--image", img, "--methods", "gradcam", "--layer", "bn4")
    assert_one_line_error(res, "no layer 'bn4'", "'bn3'")
    res = run(*base, "--image", img, "--methods", "saliency", "--layer", "bn3")
    assert_one_line_error(res, "--layer", "CAM")
    res = run(*base, "--image", img, "--data", data)
    assert_one_line_error(res, "--image or --data, not both")
    res = run(*base)
    assert_one_line_error(res, "--image", "--data")
    res = run(*base, "--image", img, "--batch", "x")
    assert_one_line_error(res, "--batch 'x'")
    assert not Path(out).exists()  # nothing written by a refused run
    (Path(data) / "kind_0" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    res = run(*base, "--data", data, "--methods", "saliency")
    assert_ok(res)
    assert "1 unreadable image(s) skipped" in res.stderr and "zz_broken.png" in res.stderr
    d = json.loads((Path(out) / "attribution.json").read_text())
    assert [e["index"] for e in d["images"]] == [0, 2] and d["source"]["count"] == 3
    assert [s["index"] for s in d["source"]["skipped"]] == [1]

    def mlp(*args: Any, **kwargs: Any) -> convlens.ModelBundle:
        from convlens.models.zoo import ModelBundle, Preprocess

        return ModelBundle(_MLP(), "mlp", "mlp", Preprocess(resize=8, crop=8))

    monkeypatch.setattr(convlens.models, "load_model", mlp)
    res = run(*base, "--image", img, "--methods", "saliency,gradcam")
    assert_one_line_error(res, "--methods gradcam", "convolutional layer")
    assert_ok(run(*base, "--image", img, "--methods", "saliency"))  # the model itself works


# ---------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The dataset run in this process: (data folder, output folder)."""
    root = tmp_path_factory.mktemp("attr_data")
    data = _folder(root / "photos", n=5)
    out = root / "one"
    res = run("attribute", *ARGS, *DATA_ARGS, "--data", str(data), "--out", str(out))
    assert_ok(res)
    assert "1 process(es)" in res.stdout and "saliency" in res.stdout
    return data, out


def _check_same(got: Path, want: Path) -> None:
    a, b = _numbers(got / "attribution.json"), _numbers(want / "attribution.json")
    assert a == b
    assert [e["index"] for e in a["images"]] == [0, 1, 2]
    assert a["source"]["count"] == 3 and a["source"]["length"] == 5
    assert [e["class"] for e in a["images"]] == ["kind 0", "kind 0", "kind 1"]
    for e in a["images"]:
        assert_png(got / e["figure"])
        for m in ("saliency", "gradcam"):
            mine = convlens.Attribution.load(got / e["maps"], name=m)
            ref = convlens.Attribution.load(want / e["maps"], name=m)
            assert torch.equal(mine.map, ref.map)
    assert no_temp_files(got)


def _worker(rank: int, world: int, init: str, args: list[str]) -> None:
    init_gloo(rank, world, init, TIMEOUT_S)
    try:
        res = run(*args)
        assert res.exit_code == 0, res.output
        assert ("wrote " in res.stdout) == (rank == 0), res.stdout  # rank 0 alone reports
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_write_what_one_writes(
    tmp_path: Path, one_process: tuple[Path, Path]
) -> None:
    data, want = one_process
    got = tmp_path / "dist"
    args = ["attribute", *ARGS, *DATA_ARGS, "--data", str(data), "--out", str(got)]
    spawn(_worker, (2, f"file://{tmp_path / 'init'}", args), 2, TIMEOUT_S)
    assert json.loads((got / "attribution.json").read_text())["settings"]["world_size"] == 2
    _check_same(got, want)


def test_torchrun_two_processes_write_what_one_writes(
    tmp_path: Path, one_process: tuple[Path, Path]
) -> None:
    data, want = one_process
    got = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "convlens", "attribute", *ARGS, *DATA_ARGS, "--data", str(data), "--out", str(got),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 image(s)" in proc.stdout and "2 process(es)" in proc.stdout
    assert proc.stdout.count("wrote ") == 2  # rank 0 alone: the JSON, then the figures
    _check_same(got, want)
