"""Helpers of the fault tests that run real jobs: a generated image folder, ``convlens``
and ``torchrun`` subprocesses in their own process group (killed whole on a timeout),
torchrun's workers found by rank through ``/proc``, and outputs compared without their
timings. Imported as ``from _jobs import ...`` (tests/faults is on ``sys.path``)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

#: the most any one job may take before the test kills its process group and fails
JOB_TIMEOUT_S = 240
#: one thread per process, gloo over loopback
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
#: a tiny model on the CPU, no progress bars
MODEL = ["--model", "simple_cnn", "--weights", "none", "--device", "cpu", "--quiet"]


def make_folder(root: Path, n: int, classes: int = 3, size: int = 32) -> Path:
    """``n`` random ``size``-px PNGs in ``classes`` class folders."""
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        sub = root / f"kind_{i % classes}"
        sub.mkdir(parents=True, exist_ok=True)
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(sub / f"{i:04d}.png")
    return root


def once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], Any]) -> Path:
    """A folder made by ``make`` once per test session (shared by the fault test files)."""
    base = tmp_path_factory.getbasetemp() / f"faults-{name}"
    done = base / ".done"
    if not done.is_file():
        base.mkdir(parents=True, exist_ok=True)
        make(base)
        done.write_text("")
    return base


def convlens_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "convlens", *args]


def torchrun_cmd(*args: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(restarts),
        "-m",
        "convlens",
        *args,
    ]


_started: list[subprocess.Popen[str]] = []


def start(cmd: list[str]) -> subprocess.Popen[str]:
    """``cmd`` in its own session (so a failed test can kill all of it: see
    :func:`kill_leftovers`)."""
    proc = subprocess.Popen(
        cmd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _started.append(proc)
    return proc


def kill_leftovers() -> None:
    """Kill the process group of every job started here that a failed test left running
    (the test files call it after each test, from an autouse fixture)."""
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            kill_group(proc)
            proc.communicate()


def kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def finish(proc: subprocess.Popen[str], timeout: float = JOB_TIMEOUT_S) -> tuple[int, str, str]:
    """Wait for ``proc``; on a timeout kill its process group and fail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} ran past {timeout} s\n{err[-3000:]}")
    return proc.returncode, out, err


def run(cmd: list[str], timeout: float = JOB_TIMEOUT_S) -> tuple[int, str, str]:
    return finish(start(cmd), timeout)


def run_ok(cmd: list[str]) -> str:
    rc, out, err = run(cmd)
    assert rc == 0, f"exit {rc}\n{out[-2000:]}\n{err[-4000:]}"
    return out


def wait_for(
    what: str, ready: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 120
) -> None:
    """Poll ``ready`` every 10 ms; fail (killing ``proc``'s group) if ``proc`` ends or
    ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc)
            _, err = proc.communicate()
            pytest.fail(f"never saw {what} (exit {proc.returncode})\n{err[-3000:]}")
        time.sleep(0.01)


def workers(agent: int) -> dict[int, int]:
    """torchrun's live workers: ``{RANK: pid}`` of the children of the agent ``agent``."""
    found: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent:
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for entry in env:
            if entry.startswith(b"RANK="):
                found[int(entry[5:])] = int(d.name)
    return found


def rank_pid(proc: subprocess.Popen[str], rank: int, other_than: set[int] = frozenset()) -> int:
    """The pid of torchrun's worker ``rank`` (one not in ``other_than``: a new round's)."""
    box: dict[str, int] = {}

    def ready() -> bool:
        pid = workers(proc.pid).get(rank)
        if pid is not None and pid not in other_than:
            box["pid"] = pid
        return "pid" in box

    wait_for(f"torchrun's rank {rank}", ready, proc)
    return box["pid"]


def checkpoint(path: Path) -> dict[str, Any]:
    """An examples checkpoint's ``next_batch`` and ``done``."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return {"next_batch": int(ck["next_batch"]), "done": bool(ck["done"])}


def examples_numbers(path: Path) -> dict[str, Any]:
    """examples.json without what differs between equal runs (timings, versions)."""
    d = json.loads(path.read_text())
    for key in ("seconds", "images_per_second", "versions"):
        d["settings"].pop(key, None)
    d.pop("versions", None)
    return d


def site_files(site: Path) -> dict[str, bytes]:
    """Every PNG and per-channel JSON of a microscope site by relative path (the pages,
    microscope.json and the cached dataset pass hold timings: compared apart)."""
    return {
        str(p.relative_to(site)): p.read_bytes()
        for p in sorted(site.rglob("*"))
        if p.is_file()
        and p.relative_to(site).parts[0] != "cache"
        and (p.suffix == ".png" or (p.suffix == ".json" and p.parent != site))
    }


def site_pass(site: Path) -> dict[str, Any]:
    """The site's cached dataset pass (examples.json) without its timings."""
    (found,) = (site / "cache").glob("examples-*/examples.json")
    return examples_numbers(found)


def site_doc(site: Path) -> dict[str, Any]:
    """microscope.json without its timings and work counts."""
    d = json.loads((site / "microscope.json").read_text())
    for key in ("stages", "work", "versions", "created"):
        d.pop(key, None)
    return d


#: The examples job of the fault tests: 500 images per rank under torchrun, so a rank
#: checkpoints at 256 (CHECKPOINT_EVERY) with half its pass to go, on a tiny model.
N_IMAGES = 1000
EXAMPLES = ["examples", *MODEL, "--layers", "bn2,fc", "--k", "4", "--batch-size", "4"]


def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's folder of ``N_IMAGES`` generated images."""
    return once(tmp_path_factory, "photos", lambda p: make_folder(p, N_IMAGES))


def clean_examples(tmp_path_factory: pytest.TempPathFactory, world: int) -> dict[str, Any]:
    """The numbers of an uninterrupted ``EXAMPLES`` run on ``photos`` (one process, or
    torchrun with 2), made once per session."""
    data = photos(tmp_path_factory)
    args = [*EXAMPLES, "--data", str(data), "--out"]

    def make(out: Path) -> None:
        run_ok(convlens_cmd(*args, str(out)) if world == 1 else torchrun_cmd(*args, str(out)))

    return examples_numbers(
        once(tmp_path_factory, f"clean-examples-{world}", make) / "examples.json"
    )
