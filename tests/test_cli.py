"""The convlens command line: outputs of each command, one-line errors, checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from PIL import Image

from _cli import (
    assert_ok,
    assert_one_line_error,
    assert_png,
    assert_wrote,
    no_temp_files,
    run,
)
from convlens import __version__
from convlens.models import SimpleCNN, save_checkpoint

SIMPLE_LAYERS = ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "pool", "gap", "fc"]


# ---------------------------------------------------------------- filters


@pytest.fixture(scope="module")
def filters_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("filters") / "out"
    return run("filters", "--out", str(out), "--device", "cpu"), out


def test_filters_writes_figures_and_json(filters_run) -> None:
    result, out = filters_run
    assert_ok(result)
    names = ["filters.png", "filters_all.png", "kernels.png", "filters.json"]
    for n in names[:3]:
        assert_png(out / n)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert_wrote(result, [out / n for n in names])
    assert no_temp_files(out)


def test_filters_json_selectivity(filters_run) -> None:
    result, out = filters_run
    assert_ok(result)
    data = json.loads((out / "filters.json").read_text())
    sel = data["selectivity"]
    assert sel["peak"]["vertical_edge"]["vertical"] == 3.0
    assert sel["peak"]["vertical_edge"]["horizontal"] == 0.0  # border excluded
    assert sel["peak"]["horizontal_edge"]["horizontal"] == 3.0
    assert sel["peak"]["diagonal_line"]["diagonal"] == 6.0
    assert sel["best_kernel"]["diagonal_line"] == "diagonal"
    assert data["kernels"]["vertical"] == [[-1.0, 0.0, 1.0]] * 3
    assert data["images"]["vertical_edge"][0] == [0.0] * 5 + [1.0] * 5
    assert data["padding"] == 1
    assert data["versions"]["convlens"] == __version__
    assert data["versions"]["device"] == "cpu"
    # The table printed on stdout carries the same numbers.
    row = next(ln for ln in result.stdout.splitlines() if ln.startswith("vertical_edge"))
    assert row.split()[1] == "3.00"


# ---------------------------------------------------------------- layers


def _layer_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("layer "))
    return {ln.split()[0]: ln.split() for ln in lines[header + 1 :] if ln.strip()}


def test_layers_simple_cnn(tmp_path: Path) -> None:
    result = run("layers", "simple_cnn", "--device", "cpu")
    assert_ok(result)
    assert result.stdout.splitlines()[0].startswith("simple_cnn (random init, seed 0")
    assert "input 1x3x128x128" in result.stdout.splitlines()[0]
    rows = _layer_rows(result.stdout)
    assert list(rows) == SIMPLE_LAYERS
    calls = {name: int(r[3]) for name, r in rows.items()}
    assert calls["pool"] == 3
    assert all(c == 1 for n, c in calls.items() if n != "pool")
    assert rows["conv1"][1:3] == ["Conv2d", "1x16x128x128"]
    assert rows["bn3"][2] == "1x64x32x32"
    assert rows["fc"][2:] == ["1x10", "1", "650"]
    assert not list(tmp_path.iterdir())


def test_layers_out_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = run("layers", "simple_cnn", "--input-size", "64", "--out", str(out), "--device", "cpu")
    assert_ok(result)
    data = json.loads((out / "layers.json").read_text())
    assert data["input_shape"] == [1, 3, 64, 64]
    layers = {d["name"]: d for d in data["layers"]}
    assert list(layers) == SIMPLE_LAYERS
    assert layers["pool"]["calls"] == 3
    assert layers["conv1"]["output_shape"] == [1, 16, 64, 64]
    assert layers["conv1"]["params"] == 448
    assert_wrote(result, [out / "layers.json"])


# ---------------------------------------------------------------- activations


def test_activations(tmp_path: Path) -> None:
    out = tmp_path / "acts"
    result = run(
        "activations", "--model", "simple_cnn", "--layers", "bn1,bn3",
        "--out", str(out), "--device", "cpu", "--max-maps", "8",
    )  # fmt: skip
    assert_ok(result)
    pngs = [
        "mean_maps.png",
        "feature_maps_bn1.png",
        "channel_stats_bn1.png",
        "feature_maps_bn3.png",
        "channel_stats_bn3.png",
    ]
    for n in pngs:
        assert_png(out / n)
    assert sorted(p.name for p in out.iterdir()) == sorted([*pngs, "activations.json"])
    assert_wrote(result, [out / n for n in [*pngs, "activations.json"]])
    data = json.loads((out / "activations.json").read_text())
    assert data["image"] == "grace_hopper.jpg"
    assert data["relu"] is True
    assert data["model"].startswith("simple_cnn")
    assert list(data["layers"]) == ["bn1", "bn3"]
    assert data["layers"]["bn1"]["shape"] == [16, 128, 128]
    assert data["layers"]["bn3"]["shape"] == [64, 32, 32]
    for layer in data["layers"].values():
        assert 0.0 <= layer["fraction_active"] <= 1.0
        assert layer["max"] >= layer["mean"]
    assert no_temp_files(out)


def test_activations_with_image_file(tmp_path: Path) -> None:
    img = tmp_path / "in.png"
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(img)
    out = tmp_path / "acts"
    result = run(
        "activations", "--image", str(img), "--layers", "conv1",
        "--out", str(out), "--device", "cpu", "--no-relu",
    )  # fmt: skip
    assert_ok(result)
    data = json.loads((out / "activations.json").read_text())
    assert data["image"] == str(img)
    assert data["relu"] is False
    assert data["layers"]["conv1"]["shape"] == [16, 128, 128]


# ---------------------------------------------------------------- occlude


def test_occlude_simple_cnn(tmp_path: Path) -> None:
    out = tmp_path / "occ"
    result = run(
        "occlude", "--model", "simple_cnn", "--box", "30,90,40,110",
        "--layers", "bn1,bn3", "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    assert_ok(result)
    assert_png(out / "occlusion.png")
    assert sorted(p.name for p in out.iterdir()) == ["occlusion.json", "occlusion.png"]
    assert_wrote(result, [out / "occlusion.png", out / "occlusion.json"])
    data = json.loads((out / "occlusion.json").read_text())
    assert data["box"] == {"top": 30, "bottom": 90, "left": 40, "right": 110}
    assert data["input_shape"] == [3, 128, 128]
    layers = data["layers"]
    assert list(layers) == ["bn1", "bn3"]
    for layer in layers.values():
        assert 0.0 <= layer["inside_fraction"] <= 1.0
        assert 0.0 <= layer["area_fraction"] <= 1.0
    assert layers["bn1"]["inside_fraction"] > layers["bn1"]["area_fraction"]
    # bn1 is at input resolution; bn3 at a quarter of it.
    assert layers["bn1"]["box_at_layer"] == [30, 90, 40, 110]
    assert layers["bn1"]["area_fraction"] == pytest.approx(60 * 70 / 128**2)
    assert layers["bn3"]["box_at_layer"] == [7, 23, 10, 28]
    assert layers["bn3"]["area_fraction"] == pytest.approx(16 * 18 / 32**2)
    # The printed table agrees with the JSON.
    row = next(ln for ln in result.stdout.splitlines() if ln.startswith("bn1 "))
    assert float(row.split()[1]) == pytest.approx(layers["bn1"]["inside_fraction"], abs=5e-4)


def test_occlude_resnet18_on_cpu(tmp_path: Path) -> None:
    # speed is measured in benchmarks/, not asserted here
    out = tmp_path / "occ"
    result = run(
        "occlude", "--model", "resnet18", "--weights", "none", "--box", "30,90,40,110",
        "--layers", "bn1,layer4", "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    assert_ok(result)
    assert_png(out / "occlusion.png")
    data = json.loads((out / "occlusion.json").read_text())
    assert data["model"].startswith("resnet18 (random init")
    assert data["input_shape"] == [3, 224, 224]
    bn1, layer4 = data["layers"]["bn1"], data["layers"]["layer4"]
    assert bn1["shape"] == [64, 112, 112]
    assert layer4["shape"] == [512, 7, 7]
    assert bn1["box_at_layer"] == [15, 45, 20, 55]
    assert layer4["box_at_layer"] == [0, 3, 1, 4]
    for layer in (bn1, layer4):
        assert 0.0 <= layer["inside_fraction"] <= 1.0
        assert 0.0 <= layer["area_fraction"] <= 1.0
    assert bn1["inside_fraction"] > bn1["area_fraction"]


# ---------------------------------------------------------------- bad input


def test_unknown_layer_lists_close_matches(tmp_path: Path) -> None:
    out = tmp_path / "x"
    result = run("occlude", "--model", "resnet18", "--layers", "bn1,layer5", "--device", "cpu",
                 "--out", str(out))  # fmt: skip
    line = assert_one_line_error(result, "'layer5'", "closest names", "'layer4'")
    assert line.index("'layer4'") < line.index("'layer1'")  # the closest comes first
    assert not out.exists()


def test_unknown_layer_simple_cnn_activations(tmp_path: Path) -> None:
    result = run("activations", "--layers", "bn4", "--device", "cpu", "--out", str(tmp_path / "x"))
    assert_one_line_error(result, "'bn4'", "'bn1'")


def test_unknown_model_suggests_close_names() -> None:
    result = run("layers", "resnet81", "--device", "cpu")
    line = assert_one_line_error(result, "unknown model 'resnet81'", "resnet18")
    assert result.stdout == ""
    assert "simple_cnn" in line


def test_missing_image_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    result = run("occlude", "--image", str(missing), "--device", "cpu",
                 "--out", str(tmp_path / "x"))  # fmt: skip
    assert_one_line_error(result, str(missing), "no such file")


def test_image_that_is_not_an_image(tmp_path: Path) -> None:
    txt = tmp_path / "notes.jpg"
    txt.write_text("hello")
    result = run("activations", "--image", str(txt), "--device", "cpu",
                 "--out", str(tmp_path / "x"))  # fmt: skip
    assert_one_line_error(result, "notes.jpg", "not an image")


@pytest.mark.parametrize("box", ["1,2,3", "1,2,3,4,5", "a,b,c,d", ""])
def test_malformed_box(tmp_path: Path, box: str) -> None:
    out = tmp_path / "x"
    result = run("occlude", "--box", box, "--layers", "bn1", "--device", "cpu", "--out", str(out))
    assert_one_line_error(result, "--box", "four integers")
    assert not out.exists()


@pytest.mark.parametrize("box", ["0,500,0,10", "50,40,0,10", "0,10,20,20"])
def test_box_outside_image(tmp_path: Path, box: str) -> None:
    out = tmp_path / "x"
    result = run("occlude", "--box", box, "--layers", "bn1", "--device", "cpu", "--out", str(out))
    assert_one_line_error(result, "box", "128")
    assert not out.exists()


def test_empty_layers(tmp_path: Path) -> None:
    result = run("occlude", "--layers", ",", "--device", "cpu", "--out", str(tmp_path / "x"))
    assert_one_line_error(result, "--layers is empty")


def test_occlude_non_spatial_layer(tmp_path: Path) -> None:
    result = run("occlude", "--layers", "fc", "--device", "cpu", "--out", str(tmp_path / "x"))
    assert_one_line_error(result, "'fc'", "not a feature map")


def test_activations_notes_non_spatial_layer(tmp_path: Path) -> None:
    out = tmp_path / "acts"
    result = run("activations", "--layers", "bn1,fc", "--device", "cpu", "--out", str(out))
    assert_ok(result)
    data = json.loads((out / "activations.json").read_text())
    assert data["layers"]["fc"] == {"shape": [10], "note": "not a feature map"}
    assert data["layers"]["bn1"]["shape"] == [16, 128, 128]
    assert not (out / "feature_maps_fc.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("command", [["layers", "simple_cnn"], ["filters"]])
def test_cuda_unavailable(tmp_path: Path, command: list[str]) -> None:
    extra = ["--out", str(tmp_path / "x")] if command == ["filters"] else []
    result = run(*command, "--device", "cuda", *extra)
    assert_one_line_error(result, "CUDA is not available", "--device cpu")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- checkpoints


def _model_7_classes() -> SimpleCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return SimpleCNN(num_classes=7)


def test_layers_of_safetensors_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(_model_7_classes(), tmp_path / "m.safetensors", arch="simple_cnn")
    result = run("layers", str(path), "--device", "cpu")
    assert_ok(result)
    first = result.stdout.splitlines()[0]
    assert first.startswith("m.safetensors (checkpoint ")
    rows = _layer_rows(result.stdout)
    assert list(rows) == SIMPLE_LAYERS
    assert rows["fc"][2:] == ["1x7", "1", f"{64 * 7 + 7}"]  # the checkpoint's 7 classes


def test_layers_of_pt_state_dict_with_arch(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(_model_7_classes().state_dict(), path)
    result = run("layers", str(path), "--arch", "simple_cnn", "--device", "cpu")
    assert_ok(result)
    assert result.stdout.splitlines()[0].startswith("m.pt (checkpoint ")
    rows = _layer_rows(result.stdout)
    assert list(rows) == SIMPLE_LAYERS
    assert rows["fc"][2] == "1x7"


def test_pt_state_dict_with_wrong_arch(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    torch.save(_model_7_classes().state_dict(), path)
    result = run("layers", str(path), "--arch", "resnet18", "--device", "cpu")
    assert_one_line_error(result, "m.pt", "does not fit architecture 'resnet18'")


def test_missing_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "gone.safetensors"
    result = run("layers", str(path), "--device", "cpu")
    assert_one_line_error(result, "gone.safetensors", "does not exist")


def test_occlude_with_checkpoint(tmp_path: Path) -> None:
    path = save_checkpoint(_model_7_classes(), tmp_path / "m.safetensors", arch="simple_cnn")
    out = tmp_path / "occ"
    result = run("occlude", "--model", str(path), "--layers", "bn1", "--device", "cpu",
                 "--out", str(out))  # fmt: skip
    assert_ok(result)
    data = json.loads((out / "occlusion.json").read_text())
    assert data["model"].startswith("m.safetensors (checkpoint ")


# ---------------------------------------------------------------- entry points


def test_python_m_convlens_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "convlens", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage: convlens" in proc.stdout
    for cmd in ("filters", "layers", "activations", "occlude"):
        assert cmd in proc.stdout


def test_console_script_version() -> None:
    script = Path(sys.executable).parent / "convlens"
    if not script.exists():
        pytest.skip(f"no console script at {script} (package not installed?)")
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"convlens, version {__version__}"


def test_version_and_help_in_process() -> None:
    result = run("--version")
    assert_ok(result)
    assert __version__ in result.stdout
    result = run("occlude", "--help")
    assert_ok(result)
    assert "--box" in result.stdout and "--fill" in result.stdout


def test_activations_with_only_non_spatial_layers(tmp_path: Path) -> None:
    result = run("activations", "--layers", "fc", "--device", "cpu", "--out", str(tmp_path / "x"))
    assert_one_line_error(result, "feature map")
    assert not (tmp_path / "x" / "mean_maps.png").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["activations", "--max-maps", "0"],
        ["layers", "simple_cnn", "--input-size", "0"],
        ["occlude", "--device", "tpu"],
        ["filters", "--no-such-option"],
    ],
)
def test_click_usage_errors_are_one_line(tmp_path: Path, args: list[str]) -> None:
    result = run(*args, "--out", str(tmp_path / "x")) if args[0] != "layers" else run(*args)
    assert_one_line_error(result)
    assert not (tmp_path / "x").exists()
