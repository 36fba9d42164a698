"""Two runs, one folder (issue 19, item 5): while a live run holds an output folder, a
second ``convlens examples|microscope|tour`` into it is refused in one line naming the
first (pid, host, start time) and writes nothing; a lock left by a dead run (its pid gone
on this host, or no heartbeat from another host) is taken over with a note; the lock is
released on every exit path (normal, error, SIGTERM handled by raising); under torchrun
rank 0 holds it for the job."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from _jobs import make_folder

from _cli import assert_ok, assert_one_line_error, run
from _ranks import init_gloo, spawn
from convlens import distributed
from convlens._io import LOCK_NAME, LOCK_STALE_AFTER, folder_lock
from convlens.errors import FolderLockedError

TIMEOUT_S = 60
ARGS = ["--model", "simple_cnn", "--weights", "none", "--device", "cpu", "--quiet"]

# A run that holds the folder until told to stop; SIGTERM raises (as convlens's handler
# does at a batch boundary), so the lock is released by folder_lock's finally.
HOLDER = """
import signal, sys, time
from convlens._io import folder_lock

def stop(signum, frame):
    raise SystemExit(143)

signal.signal(signal.SIGTERM, stop)
with folder_lock(sys.argv[1], "examples"):
    time.sleep(float(sys.argv[2]))
"""


def _folder(root: Path, n: int = 6) -> Path:
    return make_folder(root, n, classes=2, size=24)


def _hold(folder: Path, seconds: float = TIMEOUT_S) -> subprocess.Popen[str]:
    """A real second process holding ``folder``; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(seconds)],
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not (folder / LOCK_NAME).is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the holder did not take the lock (exit {proc.poll()})")
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[str], sig: int) -> int:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=TIMEOUT_S)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(timeout=TIMEOUT_S)
    return p.pid


def test_a_second_run_is_refused_naming_the_first_and_writes_nothing(tmp_path: Path) -> None:
    data, out = _folder(tmp_path / "photos"), tmp_path / "out"
    holder = _hold(out)
    try:
        rec = json.loads((out / LOCK_NAME).read_text())
        assert rec["pid"] == holder.pid and rec["host"] == socket.gethostname()
        res = run("examples", *ARGS, "--data", str(data), "--layers", "bn2", "--out", str(out))
        line = assert_one_line_error(
            res,
            "is being written by another convlens run",
            f"`convlens examples` pid {holder.pid} on {socket.gethostname()}",
            f"started {rec['started']}",
            str(out / LOCK_NAME),
        )
        assert "use another --out" in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing interleaved
        from convlens.microscope import microscope
        from convlens.models import load_model

        with pytest.raises(FolderLockedError, match=f"pid {holder.pid}"):
            microscope(load_model("simple_cnn", weights=None), data, ["bn2"], out=out)
        from convlens.tour import tour

        with pytest.raises(FolderLockedError, match=f"pid {holder.pid}"):
            tour(quick=True, out=out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
        # SIGTERM: the holder's handler raises, folder_lock's finally removes the lock
        assert _stop(holder, signal.SIGTERM) == 143
        assert not (out / LOCK_NAME).exists()
    finally:
        _stop(holder, signal.SIGKILL)
    res = run("examples", *ARGS, "--data", str(data), "--layers", "bn2", "--out", str(out))
    assert_ok(res)
    assert "took over" not in res.stderr
    assert not (out / LOCK_NAME).exists()  # released after a normal run


def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path: Path) -> None:
    data, out = _folder(tmp_path / "photos"), tmp_path / "out"
    holder = _hold(out)
    _stop(holder, signal.SIGKILL)  # no finally: the lock stays, naming a dead pid
    assert (out / LOCK_NAME).is_file()
    res = run("examples", *ARGS, "--data", str(data), "--layers", "bn2", "--out", str(out))
    assert_ok(res)
    notes = [line for line in res.stderr.splitlines() if "took over" in line]
    assert len(notes) == 1, res.stderr
    assert notes[0].startswith(f"convlens: note: took over the lock of {str(out)!r}")
    assert f"pid {holder.pid} is not running" in notes[0]
    assert (out / "examples.json").is_file() and not (out / LOCK_NAME).exists()


def _write_lock(folder: Path, **rec: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    base = {"host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    lock.write_text(json.dumps({**base, "command": "microscope", "token": "x", **rec}))
    return lock


def test_stale_locks_dead_pid_reused_pid_other_host_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def take(folder: Path) -> str:
        with (
            pytest.warns(UserWarning, match="took over the lock") as seen,
            folder_lock(folder, "examples") as lock,
        ):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not lock.exists()
        return str(seen[0].message)

    dead = _dead_pid()
    note = take(_write_lock(tmp_path / "a", pid=dead).parent)
    assert f"`convlens microscope` pid {dead} on {socket.gethostname()}" in note
    assert f"pid {dead} is not running" in note
    # a live pid that is another process now (its start time differs): stale
    note = take(_write_lock(tmp_path / "b", pid=os.getppid(), proc_start="1").parent)
    assert "is another process now" in note
    # another host: live while its heartbeat is recent, stale after LOCK_STALE_AFTER
    lock = _write_lock(tmp_path / "c", pid=1, host="elsewhere.example")
    with (
        pytest.raises(FolderLockedError, match=r"pid 1 on elsewhere\.example"),
        folder_lock(lock.parent, "examples"),
    ):
        pass
    old = time.time() - LOCK_STALE_AFTER - 60
    os.utime(lock, (old, old))
    assert "no heartbeat for" in take(lock.parent)
    # a lock file that cannot be read: a run just starting, then (old) stale
    lock = tmp_path / "d" / LOCK_NAME
    lock.parent.mkdir()
    lock.write_bytes(b"")
    with (
        pytest.raises(FolderLockedError, match="just starting"),
        folder_lock(lock.parent, "examples"),
    ):
        pass
    os.utime(lock, (old, old))
    assert "cannot be read" in take(lock.parent)
    # a restarted torchrun round: the lock of the same job (even from another host) is its own
    lock = _write_lock(tmp_path / "e", pid=1, host="node7", job="job-1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-2")
    with pytest.raises(FolderLockedError, match="pid 1 on node7"), folder_lock(lock.parent, "x"):
        pass
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-1")
    assert "an earlier round of this torchrun job" in take(lock.parent)


def test_the_lock_is_released_on_errors_and_interrupts(tmp_path: Path) -> None:
    for exc in (ValueError("boom"), KeyboardInterrupt(), SystemExit(143)):
        with pytest.raises(type(exc)), folder_lock(tmp_path, "examples"):
            assert (tmp_path / LOCK_NAME).is_file()
            raise exc
        assert not (tmp_path / LOCK_NAME).exists()
    # re-entrant in one process, released by the outermost block only
    with folder_lock(tmp_path, "tour"), folder_lock(tmp_path, "microscope"):
        pass
    assert not (tmp_path / LOCK_NAME).exists()
    data = _folder(tmp_path / "photos", n=2)
    out = tmp_path / "out"
    res = run("examples", *ARGS, "--data", str(data), "--layers", "bn9", "--out", str(out))
    assert_one_line_error(res, "no layer 'bn9'")
    assert not (out / LOCK_NAME).exists()


# ----------------------------------------------------------------------- torchrun ranks


def _rank(rank: int, world: int, init: str, out: str) -> None:
    init_gloo(rank, world, init, TIMEOUT_S)
    try:
        ctx = distributed.context()
        report: dict[str, Any] = {"pid": os.getpid()}
        with folder_lock(Path(out) / "free", "examples", ctx=ctx) as lock:
            report["holder"] = json.loads(lock.read_text())["pid"]  # rank 0 has written it
            distributed.barrier()
        try:
            with folder_lock(Path(out) / "held", "examples", ctx=ctx):
                report["held"] = "taken"
        except FolderLockedError as e:
            report["held"] = str(e)
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_under_torchrun_rank_0_holds_the_lock_and_every_rank_is_refused(tmp_path: Path) -> None:
    with folder_lock(tmp_path / "held", "microscope"):  # this process: another live run
        spawn(_rank, (2, f"file://{tmp_path / 'init'}", str(tmp_path)), 2, TIMEOUT_S)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["holder"] == reports[1]["holder"] == reports[0]["pid"]  # rank 0's
    for r in reports:
        assert f"pid {os.getpid()}" in r["held"] and "`convlens microscope`" in r["held"]
    assert not (tmp_path / "free" / LOCK_NAME).exists()
