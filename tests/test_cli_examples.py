"""`convlens examples`: the files it writes, the same numbers as the Python API and as
under torchrun with 2 processes, resuming, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import convlens
from _cli import assert_ok, assert_one_line_error, assert_png, assert_wrote, run
from convlens._io import to_jsonable


def _folder(root: Path, n: int = 23, classes: int = 3, size: int = 40) -> Path:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        sub = root / f"kind_{i % classes}"
        sub.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(sub / f"{i:02d}.png")
    return root


def _numbers(path: Path) -> dict:
    d = json.loads(path.read_text())
    for key in ("seconds", "images_per_second", "world_size", "versions"):
        d["settings"].pop(key, None)
    d.pop("versions", None)
    return d


def _strip_moments(d: dict) -> dict:
    for layer in d["layers"].values():
        layer["_state"].pop("m2")
        layer["_state"].pop("class_sum")
        for ch in layer["channels"]:
            for key in ("mean", "std"):
                ch["stats"].pop(key)
            ch.pop("selectivity")
            ch.pop("class_means")
    return d


ARGS = ["--model", "simple_cnn", "--weights", "none", "--device", "cpu", "--quiet"]


def test_writes_json_and_figures_equal_to_the_api(tmp_path: Path) -> None:
    data = _folder(tmp_path / "photos")
    out = tmp_path / "out"
    res = run(
        "examples", *ARGS, "--data", str(data), "--layers", "bn2,fc", "--k", "3", "--out", str(out)
    )
    assert_ok(res)
    assert_wrote(res, [out / "examples.json", out / "examples_bn2.png", out / "examples_fc.png"])
    assert_png(out / "examples_bn2.png")
    assert "bn2: 32 channels, receptive field 8x8 px, stride 2" in res.stdout
    d = json.loads((out / "examples.json").read_text())
    assert d["dataset"]["length"] == d["dataset"]["count"] == 23
    assert d["dataset"]["classes"] == ["kind 0", "kind 1", "kind 2"]
    assert d["settings"]["world_size"] == 1 and d["settings"]["seconds"] > 0
    ch = d["layers"]["bn2"]["channels"][5]
    assert len(ch["top"]) == len(ch["bottom"]) == 3
    assert set(ch["stats"]) == {"count", "mean", "std", "min", "max", "active"}
    e = ch["top"][0]
    assert Path(e["path"]).is_file() and e["class"] in d["dataset"]["classes"]
    assert len(e["box"]) == 4
    assert d["layers"]["bn2"]["receptive_field"]["size"] == [8, 8]
    # The same numbers as the Python API on the same data.
    bundle = convlens.load_model("simple_cnn", weights=None)
    api = convlens.dataset_examples(bundle, data, ["bn2", "fc"], k=3, progress=False)
    api.save(tmp_path / "api")
    assert (
        _numbers(out / "examples.json")["layers"]
        == _numbers(tmp_path / "api" / "examples.json")["layers"]
    )


def test_channels_and_mean(tmp_path: Path) -> None:
    data = _folder(tmp_path / "photos", n=8)
    out = tmp_path / "out"
    res = run(
        "examples",
        *ARGS,
        "--data",
        str(data),
        "--layers",
        "bn3",
        "--channels",
        "2-4",
        "--reduce",
        "mean",
        "--k",
        "2",
        "--out",
        str(out),
    )
    assert_ok(res)
    d = json.loads((out / "examples.json").read_text())
    assert [c["channel"] for c in d["layers"]["bn3"]["channels"]] == [2, 3, 4]
    assert d["reduce"] == "mean"


def test_resume_and_refusal(tmp_path: Path) -> None:
    data = _folder(tmp_path / "photos", n=12)
    out = tmp_path / "out"
    base = ["examples", *ARGS, "--data", str(data), "--layers", "bn2", "--out", str(out)]
    assert_ok(run(*base, "--k", "3"))
    first = _numbers(out / "examples.json")
    assert (out / "examples.ckpt").is_file()
    assert_ok(run(*base, "--k", "3", "--resume"))  # a finished checkpoint: the same result
    assert _numbers(out / "examples.json") == first
    res = run(*base, "--k", "2", "--resume", "--strict")
    assert_one_line_error(res, "other settings", "k 3 (checkpoint) vs 2 (now)", "--strict")
    res = run(*base, "--k", "2", "--resume")  # not strict: a note, and a fresh pass
    assert_ok(res)
    assert "other settings: k 3 (checkpoint) vs 2 (now); the pass starts over" in res.stderr
    assert json.loads((out / "examples.json").read_text())["k"] == 2
    assert_ok(run(*base, "--k", "2"))  # without --resume: starts over
    assert json.loads((out / "examples.json").read_text())["k"] == 2


def test_one_line_errors(tmp_path: Path) -> None:
    data = _folder(tmp_path / "photos", n=5)
    out = str(tmp_path / "out")
    res = run("examples", *ARGS, "--data", str(data), "--layers", "bn4", "--out", out)
    assert_one_line_error(res, "no layer 'bn4'", "'bn1'")
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run("examples", *ARGS, "--data", str(empty), "--layers", "bn2", "--out", out)
    assert_one_line_error(res, "has no images")
    res = run(
        "examples", *ARGS, "--data", str(data), "--layers", "bn2", "--batch-size", "x", "--out", out
    )
    assert_one_line_error(res, "--batch-size")
    (data / "kind_0" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    res = run("examples", *ARGS, "--data", str(data), "--layers", "bn2", "--strict", "--out", out)
    assert_one_line_error(res, "zz_broken.png")
    res = run("examples", *ARGS, "--data", str(data), "--layers", "bn2", "--k", "20", "--out", out)
    assert_ok(res)
    assert "1 unreadable image(s) skipped" in res.stderr
    assert "clamped to k=6" in res.stderr
    d = json.loads((tmp_path / "out" / "examples.json").read_text())
    assert d["dataset"]["count"] == 5 and len(d["dataset"]["skipped"]) == 1
    assert d["dataset"]["skipped"][0]["path"].endswith("zz_broken.png")


def test_torchrun_two_processes_write_the_same_numbers(tmp_path: Path) -> None:
    data = _folder(tmp_path / "photos", n=23)
    common = [*ARGS, "--data", str(data), "--layers", "bn2,fc", "--k", "4", "--batch-size", "4"]
    plain = tmp_path / "plain"
    assert_ok(run("examples", *common, "--out", str(plain)))
    dist_out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "convlens",
        "examples",
        *common,
        "--out",
        str(dist_out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert proc.stdout.count("wrote ") == 3  # rank 0 alone writes and reports
    got = json.loads((dist_out / "examples.json").read_text())
    assert got["settings"]["world_size"] == 2
    assert got["dataset"]["count"] == 23
    a, b = _numbers(dist_out / "examples.json"), _numbers(plain / "examples.json")
    for d in (a, b):
        d["settings"].pop("world_size", None)
    assert _strip_moments(a) == _strip_moments(b)
    want = json.loads((plain / "examples.json").read_text())
    for key in ("bn2", "fc"):
        for c_got, c_want in zip(got["layers"][key]["channels"], want["layers"][key]["channels"]):
            assert c_got["stats"]["mean"] == pytest.approx(c_want["stats"]["mean"], rel=1e-12)
            assert c_got["stats"]["std"] == pytest.approx(c_want["stats"]["std"], rel=1e-9)
    assert (dist_out / "examples.ckpt.rank0-of-2").is_file()
    assert (dist_out / "examples.ckpt.rank1-of-2").is_file()
    assert to_jsonable(got)["format"] == "convlens-examples/1"
