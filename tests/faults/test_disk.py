"""A full disk (issue 19, item 4): when a write fails (ENOSPC, EIO, a read-only folder) the
previous files are intact byte for byte and no temporary file is left, the error is one
line naming the file, the errno's meaning and the fix, and a rerun after freeing space
resumes. The failure is injected into the writer: ``os.replace`` patched in-process, and
``CONVLENS_TEST_FAIL_WRITES`` (read only in ``convlens._io``) for a subprocess."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))

from _examples_fixtures import tiny_data, tiny_model
from _jobs import make_folder

from _cli import assert_ok, no_temp_files, run
from convlens import _io
from convlens._io import to_jsonable, write_json
from convlens.analysis.examples import dataset_examples
from convlens.errors import WriteError
from convlens.microscope import _png_problem, microscope


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def fail_after(monkeypatch: pytest.MonkeyPatch):
    """``fail_after(n, code)``: every ``os.replace`` of convlens's writer after the first
    ``n`` raises ``OSError(code)``; returns the paths the successful ones wrote."""

    real = os.replace

    def arm(n: int, code: int = errno.ENOSPC) -> list[str]:
        done: list[str] = []

        def replace(src: Any, dst: Any) -> None:
            if len(done) >= n:
                raise OSError(code, os.strerror(code))
            real(src, dst)
            done.append(os.fspath(dst))

        monkeypatch.setattr(_io.os, "replace", replace)
        return done

    return arm


@pytest.mark.parametrize(
    ("code", "meaning", "fix"),
    [
        (errno.ENOSPC, "no space left on device (ENOSPC)", "free space"),
        (errno.EIO, "input/output error (EIO)", "the disk reported an I/O error"),
        (errno.EROFS, "read-only file system (EROFS)", "use another --out"),
        (errno.EACCES, "permission denied (EACCES)", "not writable by you"),
    ],
)
def test_a_failed_write_leaves_the_old_file_and_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, meaning: str, fix: str
) -> None:
    path = write_json(tmp_path / "r.json", {"kept": True})
    before = path.read_bytes()
    monkeypatch.setenv("CONVLENS_TEST_FAIL_WRITES", f"{errno.errorcode[code]}:0")
    monkeypatch.setattr(_io, "_writes", 0)
    with pytest.raises(WriteError) as failed:
        write_json(path, {"kept": False, "big": list(range(1000))})
    msg = str(failed.value)
    assert msg.startswith(f"cannot write {str(path)!r}: {meaning}; ") and fix in msg
    assert "\n" not in msg and failed.value.errno == code and isinstance(failed.value, OSError)
    assert path.read_bytes() == before and no_temp_files(tmp_path)


def test_enospc_during_the_pass_keeps_the_last_checkpoint_and_a_rerun_resumes(
    tmp_path: Path, fail_after: Any
) -> None:
    data = tiny_data(n=30)
    reads: list[int] = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int) -> Any:
            reads.append(i)
            return data[i]

    def run_pass(checkpoint: Path | None = tmp_path / "state.pt") -> Any:
        return dataset_examples(
            tiny_model(),
            Counting(),
            ["conv2", "fc"],
            k=3,
            batch_size=4,
            progress=False,
            checkpoint=checkpoint,
            checkpoint_every=8,
            workers=1,
        )

    clean = to_jsonable(run_pass(None).to_dict())
    written = fail_after(2)  # the third checkpoint write finds the disk full
    with pytest.raises(WriteError, match=r"state\.pt'.*\(ENOSPC\); free space") as failed:
        run_pass()
    assert "\n" not in str(failed.value)
    assert written == [str(tmp_path / "state.pt")] * 2 and no_temp_files(tmp_path)
    ck = torch.load(tmp_path / "state.pt", weights_only=True)  # the second one, complete
    assert ck["next_batch"] == 4 and not ck["done"]
    # space freed: the rerun reads only what the last checkpoint did not cover
    fail_after(10**6)
    reads.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint is used, not noted and dropped
        got = to_jsonable(run_pass().to_dict())
    assert sorted(i for i in reads if i >= 16) == list(range(16, 30))
    assert set(reads) - set(range(16, 30)) <= {0}  # item 0: the input-size probe
    for d in (got, clean):
        d["settings"].pop("seconds"), d["settings"].pop("images_per_second")
    assert got == clean


def test_enospc_in_the_microscope_keeps_finished_files_and_a_rerun_resumes(
    tmp_path: Path, fail_after: Any
) -> None:
    def site(out: Path) -> Path:
        return microscope(
            tiny_model(),
            tiny_data(n=9),
            ["conv2"],
            out=out,
            k=2,
            steps=2,
            size=16,
            diversity=0,
            batch=1,
            progress=False,
            channels="0-3",
            attributions=False,
        )

    clean = _snapshot(site(tmp_path / "clean"))
    out = tmp_path / "s"
    written = fail_after(8)  # the dataset pass (2 files), then part of the renders
    with pytest.raises(WriteError, match=r"\(ENOSPC\); free space"):
        site(out)
    assert no_temp_files(out) and len(written) == 8
    for p in written:  # what was written is complete and as a clean run writes it
        rel = Path(p).relative_to(out).as_posix()
        if p.endswith(".png"):
            assert _png_problem(Path(p)) is None and Path(p).read_bytes() == clean[rel]
    assert not (out / "microscope.json").exists()
    fail_after(10**6)
    site(out)
    doc = json.loads((out / "microscope.json").read_text())
    assert doc["work"]["renders_reused"] >= 1 and doc["work"]["dataset_pass"] == 0
    got = _snapshot(out)
    for rel in [r for r in clean if r.endswith(".png")]:
        assert got[rel] == clean[rel], rel


# ----------------------------------------------------------------------- the command line


def _folder(root: Path, n: int = 10) -> Path:
    return make_folder(root, n, classes=2, size=24)


ARGS = ["--model", "simple_cnn", "--weights", "none", "--device", "cpu", "--quiet"]


def _result(out: Path) -> dict:
    d = json.loads((out / "examples.json").read_text())
    for key in ("seconds", "images_per_second", "versions"):
        d["settings"].pop(key, None)
    d.pop("versions", None)
    return d


def test_cli_enospc_is_one_line_the_old_outputs_stay_and_resume_finishes(tmp_path: Path) -> None:
    data, out = _folder(tmp_path / "photos"), tmp_path / "out"
    base = ["examples", *ARGS, "--data", str(data), "--layers", "bn2", "--out", str(out)]
    assert_ok(run(*base, "--k", "3"))
    before = _snapshot(out)
    assert set(before) == {"examples.json", "examples_bn2.png", "examples.ckpt"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONVLENS_TEST_FAIL_WRITES": "ENOSPC:1"}
    proc = subprocess.run(
        [sys.executable, "-m", "convlens", *base, "--k", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # the checkpoint (write 1) lands, examples.json (write 2) finds the disk full
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    want = f"convlens: error: cannot write {str(out / 'examples.json')!r}: no space left"
    assert lines[0].startswith(want) and "free space" in lines[0] and "--resume" in lines[0]
    after = _snapshot(out)
    assert after["examples.json"] == before["examples.json"]  # the k=3 result, intact
    assert after["examples_bn2.png"] == before["examples_bn2.png"]
    assert no_temp_files(out)
    assert torch.load(out / "examples.ckpt", weights_only=True)["settings"]["k"] == 2
    # space freed: --resume continues the k=2 checkpoint (no note) and finishes
    res = run(*base, "--k", "2", "--resume")
    assert_ok(res)
    assert "note" not in res.stderr, res.stderr
    assert_ok(run(*base, "--k", "2", "--out", str(tmp_path / "clean")))
    assert _result(out) == _result(tmp_path / "clean")


def test_cli_read_only_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder convlens cannot create (an error outside atomic_open) is one line too."""
    data = _folder(tmp_path / "photos", n=4)
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *a: Any, **kw: Any) -> None:
        if self.name == "ro":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    res = run(
        "examples", *ARGS, "--data", str(data), "--layers", "bn2", "--out", str(tmp_path / "ro")
    )
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output
    assert str(tmp_path / "ro") in lines[0] and "permission denied (EACCES)" in lines[0]
