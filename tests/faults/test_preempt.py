"""Preemption: SIGTERM (a cluster's preemption, torchrun's shutdown) and Ctrl-C stop a
pass at the next batch boundary with its checkpoint written; the command line exits with
143 or 130 and one line giving the command that resumes, and that command finishes with
the same result as an uninterrupted run. In one process, in the Python API (the handlers
restored after), under torchrun with 2 ranks (SIGTERM to the agent or to one rank), and
in the microscope's renders (a rerun of the same command, without --force, finishes)."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _jobs import (
    EXAMPLES,
    JOB_TIMEOUT_S,
    MODEL,
    checkpoint,
    clean_examples,
    convlens_cmd,
    examples_numbers,
    finish,
    kill_leftovers,
    make_folder,
    photos,
    rank_pid,
    run,
    run_ok,
    site_doc,
    site_files,
    start,
    torchrun_cmd,
    wait_for,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "analysis"))

from _examples_fixtures import tiny_data, tiny_model

from convlens import _signals
from convlens._io import to_jsonable
from convlens.analysis.examples import dataset_examples
from convlens.errors import Preempted


@pytest.fixture(autouse=True)
def _no_job_left_running() -> Iterator[None]:
    yield
    kill_leftovers()


@pytest.fixture(autouse=True)
def _ctrl_c_delivered() -> Iterator[None]:
    """Ctrl-C as a terminal delivers it, even when pytest itself was started with SIGINT
    ignored (``python -m pytest &`` from a script): convlens rightly leaves an ignored
    signal ignored, and the commands these tests start would inherit it."""
    before = signal.getsignal(signal.SIGINT)
    if before is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _resume_line(stderr: str, signame: str) -> list[str]:
    """The one stderr line of a stopped process, parsed: the command that resumes."""
    lines = [line for line in stderr.splitlines() if line.startswith("convlens: ")]
    assert len(lines) == 1, stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"convlens: stopped by {signame}: the checkpoint "), line
    assert "Traceback" not in stderr
    return shlex.split(line.split("; resume with: ", 1)[1])


# ------------------------------------------------------------------------ one process


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_examples_and_the_printed_command_resumes_it(
    signum: int, status: int, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [*EXAMPLES, "--data", str(photos(tmp_path_factory)), "--out", str(out)]
    want = clean_examples(tmp_path_factory, world=1)
    job = start(convlens_cmd(*args))
    ckpt = out / "examples.ckpt"
    wait_for("the first checkpoint", ckpt.is_file, job)
    first = checkpoint(ckpt)
    os.kill(job.pid, signum)
    rc, stdout, stderr = finish(job)
    assert rc == status, stderr[-3000:]
    assert stderr.count("\n") == 1 and stdout == ""  # one line, and nothing written
    resume = _resume_line(stderr, signal.Signals(signum).name)
    assert resume[-1] == "--resume" and resume[:-1][-len(args) :] == args
    stopped = checkpoint(ckpt)
    assert not stopped["done"] and stopped["next_batch"] >= first["next_batch"]
    assert not (out / "examples.json").exists()

    rc, _, stderr = run(resume)
    assert rc == 0, stderr[-3000:]
    assert examples_numbers(out / "examples.json") == want


class _Signalling(torch.utils.data.Dataset):
    """tiny_data that sends this process ``signum`` when item ``at`` is read (on a loader
    thread: the handler runs in the main thread, as with a real signal)."""

    def __init__(self, signum: int | None, at: int = 10) -> None:
        self.items = tiny_data(n=40)
        self.signum, self.at = signum, at

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        if i == self.at and self.signum is not None:
            os.kill(os.getpid(), self.signum)
        return self.items[i]


def _api_numbers(r: Any) -> dict[str, Any]:
    d = to_jsonable(r.to_dict())
    for key in ("seconds", "images_per_second", "versions"):
        d["settings"].pop(key, None)
    d.pop("versions", None)
    return d


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_api_stops_at_a_batch_boundary_and_restores_the_handlers(
    signum: int, tmp_path: Path
) -> None:
    run_kw: dict[str, Any] = {"k": 3, "batch_size": 4, "progress": False, "workers": 1}
    want = _api_numbers(dataset_examples(tiny_model(), _Signalling(None), ["conv2"], **run_kw))
    before = {s: signal.getsignal(s) for s in _signals.SIGNALS}
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Preempted) as caught:
        dataset_examples(tiny_model(), _Signalling(signum), ["conv2"], checkpoint=ckpt, **run_kw)
    assert caught.value.signum == signum
    assert caught.value.exit_status == 128 + signum
    assert str(ckpt) in str(caught.value)
    assert {s: signal.getsignal(s) for s in _signals.SIGNALS} == before  # nothing left behind
    stopped = checkpoint(ckpt)
    assert not stopped["done"] and 1 <= stopped["next_batch"] < 10  # item 10 is in batch 3
    got = dataset_examples(tiny_model(), _Signalling(None), ["conv2"], checkpoint=ckpt, **run_kw)
    assert _api_numbers(got) == want


def test_handlers_are_restored_on_error_and_an_ignored_signal_stays_ignored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(RuntimeError), _signals.deferred():
            assert signal.getsignal(signal.SIGTERM) is _signals._handler
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            raise RuntimeError("boom")
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old_int)


def test_a_signal_after_the_last_check_still_stops_and_sigterm_twice_waits() -> None:
    with pytest.raises(Preempted) as caught, _signals.deferred():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # torchrun's and the cluster's: one stop
        assert _signals.requested() == signal.SIGTERM
    assert caught.value.exit_status == 143
    assert _signals.requested() is None
    with pytest.raises(Preempted) as caught, _signals.deferred():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C twice: at once
        pytest.fail("a second Ctrl-C must stop at once")
    assert caught.value.exit_status == 130


# ------------------------------------------------------------------- torchrun, 2 ranks


@pytest.mark.parametrize("target", ["agent", "rank1"])
def test_sigterm_under_torchrun_leaves_checkpoints_that_resume(
    target: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = [*EXAMPLES, "--data", str(photos(tmp_path_factory)), "--out", str(out)]
    want = clean_examples(tmp_path_factory, world=2)
    job = start(torchrun_cmd(*args))
    ckpts = [out / f"examples.ckpt.rank{r}-of-2" for r in range(2)]
    wait_for("both ranks' first checkpoints", lambda: all(p.is_file() for p in ckpts), job)
    os.kill(job.pid if target == "agent" else rank_pid(job, 1), signal.SIGTERM)
    rc, stdout, stderr = finish(job, JOB_TIMEOUT_S)
    assert rc != 0 and "wrote" not in stdout
    stops = [line for line in stderr.splitlines() if line.startswith("convlens: ")]
    states = [checkpoint(p) for p in ckpts]
    if target == "agent":  # every rank stopped at a batch boundary with its checkpoint
        assert len(stops) == 2, stderr[-3000:]
        assert not any(s["done"] for s in states)
    else:  # rank 1 stopped, then torchrun stopped rank 0 (SIGTERM too); nothing hung
        assert any("rank 1's" in line for line in stops), stderr[-3000:]
        assert all(line.startswith("convlens: stopped by SIGTERM") for line in stops)
        assert not states[1]["done"]
    resume = _resume_line(stops[0] + "\n", "SIGTERM")
    assert resume[-1] == "--resume" and "torch.distributed.run" in resume
    assert resume[:-1][-len(args) :] == args

    rc, _, stderr = run(resume)
    assert rc == 0, stderr[-3000:]
    assert examples_numbers(out / "examples.json") == want


# ------------------------------------------------------------------------- microscope

MICROSCOPE = [
    "microscope", *MODEL, "--layers", "bn2", "--channels", "0-15", "--steps", "16",
    "--size", "32", "--k", "3", "--diversity", "0", "--batch", "2",
]  # fmt: skip


def test_sigterm_stops_the_microscope_between_render_batches_and_a_rerun_finishes(
    tmp_path: Path,
) -> None:
    args = [*MICROSCOPE, "--data", str(make_folder(tmp_path / "photos", 60))]
    clean = tmp_path / "clean"
    run_ok(convlens_cmd(*args, "--out", str(clean)))

    site = tmp_path / "site"
    job = start(convlens_cmd(*args, "--out", str(site), "--force"))
    renders = site / "0-bn2"
    wait_for("the first rendered channel", lambda: any(renders.glob("r-*/0000.json")), job)
    job.send_signal(signal.SIGTERM)
    rc, stdout, stderr = finish(job)
    assert rc == 143, stderr[-3000:]
    assert stderr.count("\n") == 1 and stdout == ""
    line = stderr.strip()
    assert line.startswith("convlens: stopped by SIGTERM: ") and "channels rendered" in line
    resume = shlex.split(line.split("; resume with: ", 1)[1])
    assert "--force" not in resume and resume[-len(args) - 2 :] == [*args, "--out", str(site)]
    finished = len(list(renders.glob("r-*/*.json")))
    assert 1 <= finished < 16 and not (site / "microscope.json").exists()

    rc, stdout, stderr = run(resume)
    assert rc == 0, stderr[-3000:]
    assert f"rendered {16 - finished} channel(s), reused {finished}" in stdout  # none lost
    got, want = site_files(site), site_files(clean)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []
    assert site_doc(site) == site_doc(clean)
