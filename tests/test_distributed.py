"""convlens.distributed and dataset_examples on 2 CPU processes (gloo, spawn, a fresh
file:// init per test, one thread per rank, a timeout): identical to one process."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent / "analysis"))

from _examples_fixtures import tiny_data, tiny_model

from _ranks import init_gloo, spawn
from convlens import distributed
from convlens._io import to_jsonable
from convlens.analysis.examples import DatasetExamples, dataset_examples

TIMEOUT_S = 120
N_IMAGES = 45  # odd: the ranks' shards differ in length
LAYERS = ["conv1", "relu", "conv2", "fc"]


def _worker(rank: int, world: int, init: str, out: str) -> None:
    init_gloo(rank, world, init, TIMEOUT_S)
    try:
        ctx = distributed.context()
        assert (ctx.rank, ctx.world) == (rank, world)
        # The primitives: shards cover range(N) once; gathers pad and trim.
        mine = list(distributed.shard(N_IMAGES, rank, world))
        got = distributed.all_gather_tensors(torch.tensor(mine))
        assert sorted(int(v) for t in got for v in t) == list(range(N_IMAGES))
        assert [len(t) for t in got] == [len(range(r, N_IMAGES, world)) for r in range(world)]
        objs = distributed.all_gather_objects({"rank": rank, "files": ["f"] * (rank + 3)})
        assert objs == [{"rank": r, "files": ["f"] * (r + 3)} for r in range(world)]
        tensors = distributed.all_gather_objects(torch.arange(rank + 2))
        assert [v.tolist() for v in tensors] == [list(range(r + 2)) for r in range(world)]

        r = dataset_examples(
            tiny_model(),
            tiny_data(n=N_IMAGES),
            LAYERS,
            k=5,
            batch_size=4,
            progress=False,
            checkpoint=Path(out) / "state.pt",
        )
        r.save(Path(out) / f"rank{rank}")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'init'}"
    spawn(_worker, (world, init, str(tmp_path)), world, TIMEOUT_S)


def _numbers(r: DatasetExamples) -> dict:
    d = to_jsonable(r.to_dict())
    for key in ("seconds", "images_per_second", "world_size"):
        d["settings"].pop(key, None)
    d["settings"].pop("versions", None)
    d.pop("versions", None)
    return d


def _split_moments(d: dict) -> tuple[dict, list[float]]:
    """The exact part (indices, positions, scores, counts) and the float64 moments."""
    moments: list[float] = []
    for layer in d["layers"].values():
        st = layer["_state"]
        moments += st.pop("m2") + [v for row in st.pop("class_sum") for v in row]
        for ch in layer["channels"]:
            moments += [ch["stats"].pop("mean"), ch["stats"].pop("std"), ch.pop("selectivity")]
            moments += ch.pop("class_means")
    return d, moments


def test_two_processes_equal_one(tmp_path: Path) -> None:
    _spawn(2, tmp_path)
    one = dataset_examples(
        tiny_model(), tiny_data(n=N_IMAGES), LAYERS, k=5, batch_size=4, progress=False
    )
    want_exact, want_moments = _split_moments(_numbers(one))
    for rank in range(2):
        got = DatasetExamples.load(tmp_path / f"rank{rank}")
        assert got.settings["world_size"] == 2
        assert got.stats("conv2", 0).count == N_IMAGES  # the merged count is the dataset's
        exact, moments = _split_moments(_numbers(got))
        assert exact == want_exact
        assert moments == pytest.approx(want_moments, rel=1e-12, abs=1e-12, nan_ok=True)
    # One checkpoint per rank, each with its own shard's state.
    for rank in range(2):
        ck = torch.load(tmp_path / f"state.pt.rank{rank}-of-2", weights_only=True)
        assert ck["done"] and ck["settings"]["world_size"] == 2
        assert int(ck["states"]["fc"]["count"]) == len(range(rank, N_IMAGES, 2))


def test_shard_and_merges_in_one_process() -> None:
    assert [list(distributed.shard(5, r, 2)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="rank 2"):
        distributed.shard(5, 2, 2)
    ctx = distributed.context()
    assert (ctx.rank, ctx.world, ctx.active) == (0, 1, False)
    assert distributed.all_gather_tensors(torch.arange(3))[0].tolist() == [0, 1, 2]
    # Ties: score descending, index ascending; empty slots (-1) last.
    s, i, _ = distributed.merge_topk(
        [torch.tensor([3.0, 1.0, -torch.inf]), torch.tensor([3.0, 2.0])],
        [torch.tensor([4, 0, -1]), torch.tensor([1, 7])],
        k=4,
    )
    assert i.tolist() == [1, 4, 7, 0] and s.tolist() == [3.0, 3.0, 2.0, 1.0]
    n, m, m2 = distributed.merge_moments(
        [torch.tensor(2.0), torch.tensor(1.0)],
        [torch.tensor(1.0), torch.tensor(4.0)],
        [torch.tensor(2.0), torch.tensor(0.0)],
    )
    # The union {0, 2, 4}: mean 2, sum of squared deviations 8.
    assert (n.item(), m.item(), m2.item()) == (3.0, 2.0, 8.0)
    json.dumps(to_jsonable({"n": n}))


def _held_by_autograd(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Something outside Python holding ``x``: the graph of ``x * w`` saves ``x``."""
    return {"y": x * torch.ones(x.shape, requires_grad=True)}


def test_released_waits_for_another_thread_to_drop_the_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(distributed, "_release_gave_up", False)
    x = torch.randn(4)
    let_go = threading.Event()
    holder: dict[str, torch.Tensor] = {}

    def drop_later() -> None:
        time.sleep(0.3)
        let_go.set()
        holder.clear()  # frees the graph, and with it the C++ reference to x

    thread = threading.Thread(target=drop_later)
    with distributed.released([x]):
        holder.update(_held_by_autograd(x))  # as a collective's work holds its tensors
        assert x._use_count() == 2
        thread.start()
    assert let_go.is_set() and x._use_count() == 1
    thread.join()


def test_released_gives_up_after_its_timeout_and_then_waits_no_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(distributed, "RELEASE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(distributed, "_release_gave_up", False)
    x = torch.randn(4)
    t0 = time.monotonic()
    with distributed.released([x]):
        held = _held_by_autograd(x)  # never dropped inside the block
    assert 0.2 <= time.monotonic() - t0 < 5 and x._use_count() == 2
    monkeypatch.setattr(distributed, "RELEASE_TIMEOUT_S", 60.0)
    t0 = time.monotonic()
    with distributed.released([x]):
        again = _held_by_autograd(x)
    assert time.monotonic() - t0 < 5  # not another wait
    del held, again
