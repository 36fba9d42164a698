"""Checkpoints that cannot lie (issue 19, item 3): a checkpoint that is truncated, corrupt,
foreign, of another format, of other settings or of another world size is never used
silently. One note names the file and why and the run starts over (its result equals a
clean run's), or with strict / --strict it is refused in one line. The microscope's own
resumable files (the saved pass, each channel's PNGs and JSON) are checked the same way."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))

from _examples_fixtures import tiny_data, tiny_model
from _jobs import make_folder

from _cli import assert_ok, assert_one_line_error, run
from _ranks import init_gloo, spawn
from convlens._io import to_jsonable
from convlens.analysis.examples import dataset_examples
from convlens.errors import CheckpointError, ConvlensWarning
from convlens.microscope import microscope

LAYERS = ["conv2", "fc"]


def _numbers(r: Any) -> dict:
    d = to_jsonable(r.to_dict())
    for key in ("seconds", "images_per_second"):
        d["settings"].pop(key, None)
    d["settings"].pop("versions", None)
    d.pop("versions", None)
    return d


def _pass(ckpt: Path | None, **kw: Any) -> Any:
    args: dict[str, Any] = dict(k=3, batch_size=4, progress=False, checkpoint=ckpt)
    args.update(kw)
    return dataset_examples(tiny_model(), tiny_data(n=14), LAYERS, **args)


# Each way a checkpoint can lie: what it does to the file, and the reason the note gives.
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    p.write_bytes(b"\x00not a checkpoint\xff" * 64)


def _foreign(p: Path) -> None:
    torch.save({"epoch": 3, "model": {"w": torch.zeros(2)}}, p)


def _edit(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(p: Path) -> None:
        ck = torch.load(p, weights_only=True)
        fn(ck)
        torch.save(ck, p)

    return apply


def _old_format(ck: dict) -> None:
    ck["version"] = 1
    ck["convlens"] = "0.0.1"


def _other_settings(ck: dict) -> None:
    ck["settings"]["k"] = 5


def _wrong_shape(ck: dict) -> None:
    ck["states"]["conv2"]["top_index"] = torch.zeros(6, 9, dtype=torch.long)


def _wrong_type(ck: dict) -> None:
    ck["states"]["fc"]["mean"] = [0.0, 0.0, 0.0]


def _wrong_dtype(ck: dict) -> None:
    ck["states"]["fc"]["hist"] = ck["states"]["fc"]["hist"].float()


def _inconsistent(ck: dict) -> None:  # another shard's or another pass's count
    ck["states"]["conv2"]["count"] = ck["states"]["conv2"]["count"] + 3


def _bad_batch(ck: dict) -> None:
    ck["next_batch"] = 99


CASES = {
    "truncated": (_truncate, "cannot be read: truncated or corrupt"),
    "garbage": (_garbage, "cannot be read: truncated or corrupt"),
    "foreign": (_foreign, "is not a convlens examples checkpoint"),
    "old format": (_edit(_old_format), "written by convlens 0.0.1 in checkpoint format 1"),
    "other settings": (_edit(_other_settings), "other settings: k 5 (checkpoint) vs 3 (now)"),
    "wrong shape": (_edit(_wrong_shape), "top_index has shape (6, 9), this run needs (6, 3)"),
    "wrong type": (_edit(_wrong_type), "its mean is a list, not a tensor"),
    "wrong dtype": (_edit(_wrong_dtype), "its hist is torch.float32, this run needs torch.int64"),
    "inconsistent": (_edit(_inconsistent), "scored 17 images and 0 were skipped"),
    "bad batch": (_edit(_bad_batch), "next_batch 99 is not a batch from 0 to 4"),
}


@pytest.fixture(scope="module")
def clean() -> dict:
    return _numbers(_pass(None))


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_that_lies_is_named_and_the_pass_starts_over(
    tmp_path: Path, clean: dict, case: str
) -> None:
    damage, reason = CASES[case]
    ckpt = tmp_path / "state.pt"
    _pass(ckpt)
    damage(ckpt)
    damaged = ckpt.read_bytes()
    # strict: refused, naming the file and the reason; the file is left as it was
    with pytest.raises(CheckpointError) as refused:
        _pass(ckpt, strict=True)
    msg = str(refused.value)
    assert str(ckpt) in msg and reason in msg and "--strict" in msg and "\n" not in msg
    assert ckpt.read_bytes() == damaged
    # not strict: one warning naming the file and why, then a fresh pass equal to a clean one
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = _pass(ckpt)
    notes = [str(w.message) for w in seen if issubclass(w.category, ConvlensWarning)]
    assert len(notes) == 1, notes
    assert str(ckpt) in notes[0] and reason in notes[0] and "the pass starts over" in notes[0]
    assert _numbers(got) == clean
    # the checkpoint is the fresh run's now: a rerun continues it without a note
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvlensWarning)
        assert _numbers(_pass(ckpt)) == clean


def test_a_checkpoint_of_another_world_size_is_refused_with_how_to_continue(
    tmp_path: Path,
) -> None:
    ckpt = tmp_path / "state.pt"
    _pass(ckpt)
    ckpt.rename(tmp_path / "state.pt.rank1-of-2")  # as a 2-process run leaves it
    with pytest.raises(CheckpointError) as refused:
        _pass(ckpt)  # not strict either: re-sharding is impossible, starting over loses work
    msg = str(refused.value)
    assert "state.pt.rank1-of-2" in msg and "a run of 2 process(es), this one has 1" in msg
    assert "cannot be re-sharded by image index" in msg
    assert "torchrun --nproc-per-node 2" in msg and f"delete {ckpt}* to start over" in msg
    # a 1-process checkpoint seen by this run's own file: used, the other left alone
    (tmp_path / "state.pt.rank1-of-2").rename(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvlensWarning)
        _pass(ckpt)


# ----------------------------------------------------------------------- the command line

ARGS = ["--model", "simple_cnn", "--weights", "none", "--device", "cpu", "--quiet"]


def _folder(root: Path, n: int = 10) -> Path:
    return make_folder(root, n, classes=2, size=24)


def _result(out: Path) -> dict:
    d = json.loads((out / "examples.json").read_text())
    for key in ("seconds", "images_per_second", "versions"):
        d["settings"].pop(key, None)
    d.pop("versions", None)
    return d


@pytest.mark.parametrize("case", ["truncated", "foreign"])
def test_cli_resume_notes_a_bad_checkpoint_and_strict_refuses(tmp_path: Path, case: str) -> None:
    data, out = _folder(tmp_path / "photos"), tmp_path / "out"
    base = ["examples", *ARGS, "--data", str(data), "--layers", "bn2", "--k", "2"]
    assert_ok(run(*base, "--out", str(out)))
    want = _result(out)
    ckpt = out / "examples.ckpt"
    damage, reason = CASES[case]
    damage(ckpt)
    res = run(*base, "--out", str(out), "--resume", "--strict")
    assert_one_line_error(res, str(ckpt), reason, "--strict")
    res = run(*base, "--out", str(out), "--resume")
    assert_ok(res)
    notes = [line for line in res.stderr.splitlines() if "examples.ckpt" in line]
    assert len(notes) == 1, res.stderr
    assert notes[0].startswith("convlens: note: ignoring the checkpoint")
    assert reason in notes[0] and notes[0].endswith("the pass starts over")
    assert _result(out) == want


# ----------------------------------------------------------------------- the microscope


def _site(out: Path, **kw: Any) -> Path:
    args: dict[str, Any] = dict(
        k=2, steps=2, size=16, diversity=0, batch=2, progress=False, channels="0-1"
    )
    args.update(kw)
    return microscope(tiny_model(), tiny_data(n=9), ["conv2"], out=out, **args)


def _files(root: Path) -> dict[str, Any]:
    """Every PNG and JSON a rerun reuses, as bytes; the saved pass without its timings."""
    files: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix not in (".png", ".json") or p.name == "microscope.json":
            continue
        if p.name == "examples.json":
            d = json.loads(p.read_text())
            for key in ("seconds", "images_per_second", "versions"):
                d["settings"].pop(key, None)
            files[p.relative_to(root).as_posix()] = d
        else:
            files[p.relative_to(root).as_posix()] = p.read_bytes()
    return files


def test_microscope_redoes_truncated_pngs_and_json_and_a_bad_saved_pass(tmp_path: Path) -> None:
    out = _site(tmp_path / "s")
    want = _files(out)
    render = next(out.rglob("r-*/0001-channel.png"))
    example_marker = next(out.rglob("e-*/0000.json"))
    attr_png = next(out.rglob("a-*/0000-top-0.png"))
    saved = next(out.rglob("cache/examples-*/examples.json"))
    render.write_bytes(render.read_bytes()[:-20])  # lost its end (IEND)
    example_marker.write_text('{"channel": 0, "layer": "conv')  # truncated JSON
    attr_png.write_bytes(b"")
    saved.write_text(saved.read_text()[:100])
    with pytest.raises(CheckpointError, match="--strict refuses"):
        _site(out, strict=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _site(out)
    notes = [str(w.message) for w in seen if issubclass(w.category, ConvlensWarning)]
    joined = "\n".join(notes)
    assert len(notes) == 4, joined
    assert f"{str(render)!r} is truncated (no IEND chunk" in joined
    assert f"{str(example_marker)!r} is truncated or not JSON" in joined
    assert f"{str(attr_png)!r} is truncated (0 bytes)" in joined
    assert f"ignoring the saved dataset pass {str(saved)!r}" in joined
    assert _files(out) == want  # every file redone, byte for byte as the clean run's
    doc = json.loads((out / "microscope.json").read_text())
    assert doc["work"]["dataset_pass"] == 1 and doc["work"]["rendered"] == 1


def test_microscope_cli_strict_refuses_a_truncated_png_in_one_line(tmp_path: Path) -> None:
    data, out = _folder(tmp_path / "photos", n=6), tmp_path / "site"
    args = [*ARGS, "--data", str(data), "--layers", "conv3", "--channels", "0", "--k", "2"]
    args += ["--steps", "2", "--size", "16", "--diversity", "0", "--no-attributions"]
    assert_ok(run("microscope", *args, "--out", str(out)))
    png = next(out.rglob("r-*/0000-neuron.png"))
    png.write_bytes(png.read_bytes()[:40])
    assert_one_line_error(run("microscope", *args, "--out", str(out), "--strict"), str(png))
    res = run("microscope", *args, "--out", str(out))
    assert_ok(res)
    assert f"convlens: note: {str(png)!r} is truncated" in res.stderr
    assert "rendered 1 channel(s)" in res.stdout


# ----------------------------------------------------------------------- two ranks

TIMEOUT_S = 120


def _rank(rank: int, world: int, init: str, out: str) -> None:
    init_gloo(rank, world, init, TIMEOUT_S)
    try:
        ckpt = Path(out) / "state.pt"
        report: dict[str, Any] = {}
        _pass(ckpt)
        dist.barrier()
        if rank == 0:  # rank 1's checkpoint loses its end
            _truncate(Path(out) / "state.pt.rank1-of-2")
        dist.barrier()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            report["result"] = _numbers(_pass(ckpt))
        report["notes"] = [str(w.message) for w in seen if w.category is ConvlensWarning]
        try:  # a 1-process checkpoint (written by the test) and none of this world size
            _pass(Path(out) / "one.pt")
        except CheckpointError as e:
            report["refused"] = str(e)
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_two_ranks_one_bad_checkpoint_restarts_that_shard_and_another_world_is_refused(
    tmp_path: Path, clean: dict
) -> None:
    _pass(tmp_path / "one.pt")
    spawn(_rank, (2, f"file://{tmp_path / 'init'}", str(tmp_path)), 2, TIMEOUT_S)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["notes"] == []
    (note,) = reports[1]["notes"]
    assert "state.pt.rank1-of-2" in note and "rank 1's shard starts over" in note
    for r in reports:
        got = r["result"]
        got["settings"].pop("world_size")
        want = json.loads(json.dumps(clean))
        want["settings"].pop("world_size")
        for d in (got, want):  # float64 moments merged in another order: checked by value
            for layer in d["layers"].values():
                for key in ("m2", "class_sum", "mean"):
                    layer["_state"].pop(key, None)
                for ch in layer["channels"]:
                    for key in ("mean", "std"):
                        ch["stats"].pop(key)
                    ch.pop("selectivity"), ch.pop("class_means")
        assert got == want
        assert "from a run of 1 process(es), this one has 2" in r["refused"]
        assert "(without torchrun)" in r["refused"]
