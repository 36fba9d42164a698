"""Absurd numbers get one line before any allocation, with the estimate, the limit and
the value that fits: ``--size``, ``--batch``, ``--steps`` (microscope, visualize),
``--batch-size`` (examples); ``--channels`` beyond a layer names its count; ``--k`` above
the dataset is clamped with a note. The estimate is a lower bound from a meta-device trace,
checked here against hand-counted numbers."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import convlens._memory as memory
from _cli import assert_ok, assert_one_line_error, run
from convlens import load_model
from convlens._memory import activation_bytes, check_fits, format_bytes
from convlens.errors import ResourceError

SMALL = ["--model", "simple_cnn", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("limits") / "photos"
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(sub / f"{i}.png")
    return root


def test_activation_bytes_counts_the_convolutions_up_to_the_layer() -> None:
    net = load_model("simple_cnn").model
    # conv1 16x32x32, conv2 (after the 2x2 pool) 32x16x16, conv3 64x8x8, fc 10; float32
    assert activation_bytes(net, (3, 32, 32), until="conv2") == 4 * (16 * 32 * 32 + 32 * 16 * 16)
    whole = 16 * 32 * 32 + 32 * 16 * 16 + 64 * 8 * 8 + 10
    assert activation_bytes(net, (3, 32, 32)) == 4 * whole
    assert activation_bytes(net, (3, 32, 32), backward=False) == 4 * 16 * 32 * 32
    # traced on the meta device: an image of 100000 px costs nothing to estimate
    t0 = time.perf_counter()
    assert activation_bytes(net, (3, 100_000, 100_000), until="conv1") == 4 * 16 * 1e10
    assert time.perf_counter() - t0 < 5


def test_check_fits_says_the_estimate_the_limit_and_the_fix() -> None:
    cpu = torch.device("cpu")
    check_fits(1e9, cpu, "x", "y", memory=2 * 10**9)  # fits: nothing
    with pytest.raises(ResourceError) as e:
        check_fits(1.2e11, cpu, "--size 100000: an image", "use --size <= 4000", memory=23 * 10**9)
    assert str(e.value) == (
        "--size 100000: an image needs at least 120 GB; this machine has 23 GB available: "
        "use --size <= 4000"
    )
    assert format_bytes(3.4e6) == "3.4 MB" and format_bytes(999) == "999 B"


def test_the_old_import_path_of_available_memory_still_works() -> None:
    from convlens.analysis.attribution import _core

    assert _core.available_memory is memory.available_memory
    assert _core.available_memory(torch.device("cpu")) > 0


def test_microscope_size_100000_is_one_line_fast_and_allocates_nothing(
    photos: Path, tmp_path: Path
) -> None:
    """The issue's repro, as a user runs it (a fresh process): one line, exit 2, in
    seconds, and the process never holds more than it needs to import torch."""
    cmd = [sys.executable, "-m", "convlens", "microscope", "--size", "100000"]
    cmd += [*SMALL, "--data", str(photos), "--out", str(tmp_path / "site")]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    line = lines[0]
    assert line.startswith("convlens: error: size 100000: one render batch")
    for part in ("at 'bn3'", "needs at least", "TB", "available: use size <= "):
        assert part in line, line
    assert seconds < 120
    assert peak_kb < 3 * 2**20, f"peak {peak_kb} kB"  # torch's import, not 120 GB
    assert not (tmp_path / "site" / "cache").exists()  # refused before the dataset pass


def test_microscope_suggests_a_size_that_passes_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from convlens.microscope import _check_render_memory

    bundle = load_model("simple_cnn")
    cpu = torch.device("cpu")
    monkeypatch.setattr(memory, "available_memory", lambda device: 200 * 10**6)
    with pytest.raises(ResourceError, match=r"use size <= (\d+)") as e:
        _check_render_memory(bundle.model, bundle, ["conv2"], 4000, 8, 4, cpu)
    fits = int(str(e.value).rsplit("use size <= ", 1)[1].split()[0])
    assert 8 <= fits < 4000
    _check_render_memory(bundle.model, bundle, ["conv2"], fits, 8, 4, cpu)  # no error
    with pytest.raises(ResourceError):
        _check_render_memory(bundle.model, bundle, ["conv2"], fits + 1, 8, 4, cpu)


def test_microscope_absurd_batch_names_the_batch(photos: Path, tmp_path: Path) -> None:
    r = run(
        "microscope", *SMALL, "--size", "32", "--batch", "100000000", "--layers", "conv2",
        "--data", str(photos), "--out", str(tmp_path / "site"),
    )  # fmt: skip
    assert_one_line_error(r, "batch 100000000", "needs at least", "use batch <= ")


def test_microscope_channels_beyond_the_layer_name_its_count(photos: Path, tmp_path: Path) -> None:
    r = run(
        "microscope", *SMALL, "--layers", "conv1", "--channels", "0-5000", "--steps", "2",
        "--data", str(photos), "--out", str(tmp_path / "site"),
    )  # fmt: skip
    assert_one_line_error(r, "channel 16", "'conv1'", "16 channels (0-15)")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--size", "100000"], ["size 100000", "needs at least", "use size <= "]),
        (["--size", "32", "--batch", "100000000"], ["batch 100000000", "use batch <= "]),
        (["--size", "32", "--steps", "10000000000"], ["steps 10000000000", "use steps <= "]),
    ],
)
def test_visualize_absurd_values_are_one_line(
    args: list[str], fragments: list[str], tmp_path: Path
) -> None:
    t0 = time.perf_counter()
    r = run("visualize", *SMALL[:4], "--quiet", *args, "--out", str(tmp_path / "v"))
    assert time.perf_counter() - t0 < 60
    assert_one_line_error(r, *fragments, "available")
    assert not (tmp_path / "v").exists()


def test_examples_batch_size_beyond_memory_is_one_line(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a batch of 6 32x32 images cannot fit 100 kB: refused before the first batch
    monkeypatch.setattr(memory, "available_memory", lambda device: 100_000)
    r = run(
        "examples", *SMALL, "--layers", "conv1", "--batch-size", "6",
        "--data", str(photos), "--out", str(tmp_path / "ex"),
    )  # fmt: skip
    line = assert_one_line_error(r, "batch size 6", "6 images of 3x128x128", "100 kB available")
    assert "use batch size <= 1" in line
    assert not (tmp_path / "ex" / "examples.json").exists()


def test_examples_batch_size_above_the_dataset_is_clamped(photos: Path, tmp_path: Path) -> None:
    """A batch larger than the dataset never allocates more rows than there are images,
    so 10^8 on 6 images runs (and equals the default batch's result)."""
    import json

    outs = []
    for bs in ("100000000", "auto"):
        out = tmp_path / f"ex-{bs}"
        r = run(
            "examples", *SMALL, "--layers", "conv1", "--channels", "0-3", "--batch-size", bs,
            "--k", "2", "--data", str(photos), "--out", str(out),
        )  # fmt: skip
        assert_ok(r)
        doc = json.loads((out / "examples.json").read_text())
        outs.append({k: v["channels"] for k, v in doc["layers"].items()})
    assert outs[0] == outs[1]


def test_examples_k_above_the_dataset_is_clamped_with_a_note(photos: Path, tmp_path: Path) -> None:
    r = run(
        "examples", *SMALL, "--layers", "conv1", "--channels", "0-1", "--k", "100",
        "--data", str(photos), "--out", str(tmp_path / "ex"),
    )  # fmt: skip
    assert_ok(r)
    assert "k=100 is more than the dataset's 6 images: clamped to k=6" in r.stderr


def test_attribute_absurd_steps_is_one_line_before_numpy_allocates(
    photos: Path, tmp_path: Path
) -> None:
    """numpy's Gauss-Legendre nodes for 10^9 steps would build a 10^9 x 10^9 matrix."""
    t0 = time.perf_counter()
    r = run(
        "attribute", *SMALL[:4], "--image", str(photos / "a" / "1.png"), "--steps",
        "1000000000", "--methods", "integrated_gradients", "--out", str(tmp_path / "at"),
    )  # fmt: skip
    assert time.perf_counter() - t0 < 60
    assert_one_line_error(r, "steps 1000000000", "needs at least", "use steps <= ")


def test_ig_points_up_to_the_limit_are_unchanged() -> None:
    from convlens.analysis.attribution.gradients import ig_points

    alphas, weights = ig_points(1001)  # above the cheap bound: checked, fits, computed
    assert alphas.shape == (1001,) and abs(float(weights.sum()) - 1.0) < 1e-12


def test_train_batch_beyond_memory_is_one_line_before_decoding(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    data = tmp_path / "set"
    shutil.copytree(photos, data / "train")
    shutil.copytree(photos, data / "val")
    monkeypatch.setattr(memory, "available_memory", lambda device: 1_000_000)
    r = run(
        "train", "--data", str(data), "--epochs", "1", "--batch-size", "1000000000",
        "--device", "cpu", "--quiet", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    line = assert_one_line_error(r, "batch size 1000000000", "6 crops of 128 px", "1.0 MB")
    assert "use batch size <= " in line
    assert not (tmp_path / "run" / "model.pt").exists()


def test_under_torchrun_every_rank_refuses_alike_and_the_job_ends(
    photos: Path, tmp_path: Path
) -> None:
    """2 ranks take the least free memory of any rank (one all_gather before the pass),
    so they refuse together: no rank waits forever in a collective for the other."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "convlens", "microscope", "--size", "100000", *SMALL]
    cmd += ["--data", str(photos), "--out", str(tmp_path / "site")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert time.perf_counter() - t0 < 200
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("convlens: error: ")]
    assert errors, proc.stderr[-3000:]
    assert all(e == errors[0] for e in errors)
    assert errors[0].startswith("convlens: error: size 100000: one render batch")
    assert not (tmp_path / "site" / "cache").exists()


def test_visualize_channels_beyond_the_layer_are_refused_before_allocating(
    tmp_path: Path,
) -> None:
    """``conv1:0-100000`` would be 100001 images: refused with the layer's count (this
    used to build a quadratic description and be killed at 23 GB)."""
    t0 = time.perf_counter()
    r = run(
        "visualize", *SMALL[:4], "--quiet", "--objective", "conv1:0-100000", "--size", "32",
        "--steps", "2", "--out", str(tmp_path / "v"),
    )  # fmt: skip
    assert time.perf_counter() - t0 < 60
    assert_one_line_error(r, "channel 100000 of layer 'conv1'", "16 channels (0-15)")


def test_a_parsed_channel_range_sums_as_before_and_past_the_recursion_limit() -> None:
    from convlens.analysis.featurevis.objectives import channel, parse

    acts = torch.randn(5, 7, 4, 4)
    flat = parse("conv:0-4")
    nested = sum(channel("conv", c, batch=i) for i, c in enumerate(range(5)))
    assert torch.equal(flat(lambda _: acts), nested(lambda _: acts))  # type: ignore[operator]
    assert flat.min_batch == 5 and flat.max_channel == ("conv", 4)
    assert str(flat) == "channel(conv, 0-4, one per image)"
    big = parse("conv:0-2999")  # 3000 terms: one loop, no nested closures
    many = torch.randn(3000, 3000, 1, 1)
    assert big(lambda _: many).shape == (3000,)
