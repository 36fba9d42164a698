"""A worker killed under ``torchrun --max-restarts``: the restarted round rendezvouses
afresh (convlens.distributed.round_store) and the job finishes with the same outputs as
an uninterrupted run, for ``examples`` (killed in the dataset pass, after a checkpoint)
and ``microscope`` (killed in the dataset pass, then in the renders), and ``attribute
--data`` (no checkpoint: the restarted round recomputes). Real processes:
torchrun on 2 CPU processes, gloo, SIGKILL from outside, every job under a timeout."""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _jobs import (
    EXAMPLES,
    MODEL,
    checkpoint,
    clean_examples,
    examples_numbers,
    finish,
    kill_leftovers,
    make_folder,
    photos,
    rank_pid,
    run_ok,
    site_doc,
    site_files,
    site_pass,
    start,
    torchrun_cmd,
    wait_for,
    workers,
)

from convlens import distributed

MICROSCOPE = [
    "microscope", *MODEL, "--layers", "bn2", "--channels", "0-15", "--steps", "16",
    "--size", "32", "--k", "3", "--diversity", "0", "--batch", "2",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_job_left_running() -> Iterator[None]:
    yield
    kill_leftovers()


@pytest.fixture
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return photos(tmp_path_factory)


def test_examples_finishes_after_a_worker_is_killed_mid_pass(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    args = [*EXAMPLES, "--data", str(photos(tmp_path_factory))]
    clean = clean_examples(tmp_path_factory, world=2)

    out = tmp_path / "killed"
    job = start(torchrun_cmd(*args, "--out", str(out), "--resume", restarts=2))
    ck1 = out / "examples.ckpt.rank1-of-2"
    wait_for("rank 1's first checkpoint", ck1.is_file, job)
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    at_kill = checkpoint(ck1)
    rc, stdout, stderr = finish(job)
    assert rc == 0, stderr[-4000:]
    assert not at_kill["done"], "the kill landed after rank 1's pass: nothing was tested"
    assert "exitcode: -9" in stderr  # torchrun saw the SIGKILL and restarted the round
    assert "connectFullMesh" not in stderr and "Connection refused" not in stderr
    assert "2 process(es)" in stdout
    assert examples_numbers(out / "examples.json") == clean
    assert checkpoint(ck1)["done"] and checkpoint(out / "examples.ckpt.rank0-of-2")["done"]


def test_microscope_finishes_after_workers_are_killed_in_the_pass_and_the_renders(
    data: Path, tmp_path: Path
) -> None:
    args = [*MICROSCOPE, "--data", str(data)]
    clean = tmp_path / "clean"
    run_ok(torchrun_cmd(*args, "--out", str(clean)))

    site = tmp_path / "killed"
    job = start(torchrun_cmd(*args, "--out", str(site), restarts=2))
    # 1. rank 1 killed in the dataset pass, after its first checkpoint
    ck1 = site / "cache"
    wait_for(
        "rank 1's dataset-pass checkpoint",
        lambda: any(ck1.glob("examples-*.ckpt.rank1-of-2")),
        job,
    )
    first_round = set(workers(job.pid).values())
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    (ck1_file,) = ck1.glob("examples-*.ckpt.rank1-of-2")
    assert not checkpoint(ck1_file)["done"]
    # 2. in the restarted round, rank 0 killed in the renders: its first channel is
    # rendered (channel 0), its last (channel 14) not yet
    renders = site / "0-bn2"
    wait_for("rank 0's first render", lambda: any(renders.glob("r-*/0000.json")), job, timeout=200)
    os.kill(rank_pid(job, 0, other_than=first_round), signal.SIGKILL)
    assert not any(renders.glob("r-*/0014.json")), "rank 0's renders were done: nothing tested"
    rc, _, stderr = finish(job)
    assert rc == 0, stderr[-4000:]
    assert stderr.count("exitcode: -9") == 2
    assert "connectFullMesh" not in stderr
    assert site_pass(site) == site_pass(clean)
    got, want = site_files(site), site_files(clean)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []  # byte for byte
    assert site_doc(site) == site_doc(clean)


def test_attribute_over_a_dataset_finishes_after_a_worker_is_killed(tmp_path: Path) -> None:
    """``attribute --data`` has no checkpoint: the restarted round recomputes every image,
    and the job's outputs equal a clean run's."""
    data = make_folder(tmp_path / "photos", 12)
    args = [
        "attribute", *MODEL[:-1], "--data", str(data), "--methods", "saliency,integrated_gradients",
        "--steps", "8",
    ]  # fmt: skip
    clean = tmp_path / "clean"
    run_ok(torchrun_cmd(*args, "--out", str(clean)))

    out = tmp_path / "killed"
    job = start(torchrun_cmd(*args, "--out", str(out), restarts=2))
    wait_for("rank 1's first figure", lambda: any(out.glob("0001_*.png")), job)
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    assert not any(out.glob("0011_*.png")), "rank 1 had finished: nothing was tested"
    rc, _, stderr = finish(job)
    assert rc == 0, stderr[-4000:]
    assert "exitcode: -9" in stderr and "connectFullMesh" not in stderr

    def numbers(folder: Path) -> dict[str, Any]:
        d = json.loads((folder / "attribution.json").read_text())
        d["settings"].pop("seconds")
        d.pop("versions")
        for image in d["images"]:
            for method in image["methods"].values():
                method.pop("seconds")
        return d

    assert numbers(out) == numbers(clean)
    figures = sorted(p.name for p in clean.glob("*.png"))
    assert sorted(p.name for p in out.glob("*.png")) == figures and len(figures) == 12


def _round_worker(rank: int, env: dict[str, str], out: str) -> None:
    """One rank of a simulated torchrun round: torchrun's environment, then
    convlens.distributed.context() and one gather."""
    torch.set_num_threads(1)
    os.environ.update({**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
    ctx = distributed.context(timeout=datetime.timedelta(seconds=60))
    try:
        got = distributed.all_gather_objects((ctx.rank, os.getpid()))
        Path(out, f"rank{rank}").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("agent_store", [True, False])
def test_every_round_rendezvouses_afresh_in_one_store(agent_store: bool, tmp_path: Path) -> None:
    """Three rounds of 2 ranks against one store, as torchrun's agent keeps it across
    restarts: each round finds its own ranks, never the previous round's addresses.
    Without the agent's store (TORCHELASTIC_USE_AGENT_STORE=False) rank 0 hosts it."""
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    port = agent.port
    if not agent_store:
        del agent  # rank 0 of each round hosts a store on the port
    for restart in range(3):
        env = {
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "TORCHELASTIC_RESTART_COUNT": str(restart),
            "TORCHELASTIC_RUN_ID": "test",
            "TORCHELASTIC_USE_AGENT_STORE": str(agent_store),
            "GLOO_SOCKET_IFNAME": "lo",
        }
        out = tmp_path / f"round{restart}"
        out.mkdir()
        procs = mp.start_processes(
            _round_worker, args=(env, str(out)), nprocs=2, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + 120
        while not procs.join(timeout=5):
            if time.monotonic() > deadline:
                for p in procs.processes:
                    p.kill()
                pytest.fail(f"round {restart} did not finish in 120 s")
        pids = {p.pid for p in procs.processes}
        for rank in range(2):
            got = json.loads((out / f"rank{rank}").read_text())
            assert [r for r, _ in got] == [0, 1] and {pid for _, pid in got} == pids
