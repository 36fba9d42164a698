"""Shared helpers for tests that run ranks as CPU processes (gloo, ``spawn``, a fresh
``file://`` init per test, one thread per rank, a timeout); imported as ``from _ranks
import ...``, like ``_cli``."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def init_gloo(rank: int, world: int, init: str, timeout_s: float) -> None:
    """In a spawned rank: one thread, the loopback interface, and the gloo group at
    ``init`` (a ``file://`` path fresh for the test) that gives up after ``timeout_s``."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timeout)


def spawn(fn: Callable[..., Any], args: tuple[Any, ...], nprocs: int, timeout_s: float) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; a rank that raises fails
    the test with its traceback, and ranks still running after ``timeout_s`` are
    terminated and fail it too."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail(f"the {nprocs} ranks did not finish in {timeout_s} s")
