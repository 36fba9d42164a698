"""Rank and world from torchrun or the caller's process group, disjoint shards, exact merges.

convlens runs unchanged in one process or under ``torchrun`` (one process per GPU, on one
machine or many): each rank takes the shard ``range(rank, N, world)`` of the dataset (no
``DistributedSampler`` padding, which counts images twice), computes its own state with
no collective call inside the loop, and the states are merged once after it. State
tensors have the same shape on every rank, so one ``all_gather`` per tensor merges them
(gloo on CPU, nccl on CUDA); variable-length metadata is pickled and gathered the same way.

The merges themselves are pure functions of the per-rank states (:func:`merge_topk`,
:func:`merge_moments`), so a merge is exactly the same computation in one process.

Example:
    >>> ctx = convlens.distributed.context()     # world 1 without torchrun
    >>> list(shard(10, ctx.rank, ctx.world))
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from convlens.errors import ConvlensError

__all__ = [
    "DistContext",
    "all_gather_objects",
    "all_gather_tensors",
    "barrier",
    "context",
    "launched_by_torchrun",
    "local_device",
    "main_first",
    "merge_moments",
    "merge_topk",
    "released",
    "round_store",
    "shard",
]

#: How long a collective may wait for the other ranks before it fails.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world``, its ``local_rank`` on the machine,
    and whether a process group is in use (``world > 1`` or one the caller made).

    Example:
        >>> DistContext(0, 1, 0, False).is_main
        True
    """

    rank: int
    world: int
    local_rank: int
    active: bool

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes outputs and shows progress."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether the environment is torchrun's (``RANK`` and ``WORLD_SIZE`` set).

    Example:
        >>> launched_by_torchrun()   # in a plain python process
        False
    """
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def context(
    device: torch.device | None = None, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> DistContext:
    """This process's rank and world, initialising the process group when torchrun
    launched it and nobody has yet.

    Inside a process group the caller initialised, its rank and size are used as they
    are. Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) with no group
    yet, one is initialised from the environment: nccl when ``device`` is CUDA, else gloo,
    with ``timeout``. Otherwise this is one process: rank 0 of 1.

    Example:
        >>> ctx = context()
        >>> ctx.rank, ctx.world
        (0, 1)
    """
    local = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local, True)
    if not launched_by_torchrun():
        return DistContext(0, 1, 0, False)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world == 1:
        return DistContext(0, 1, local, False)
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run without torchrun")
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device if device is not None and device.index is not None else local)
    if "TORCHELASTIC_RESTART_COUNT" in os.environ and "MASTER_ADDR" in os.environ:
        store = round_store(rank, world, timeout)
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=world, timeout=timeout
        )
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    return DistContext(rank, world, local, True)


def round_store(rank: int, world: int, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> dist.Store:
    """The key-value store of this torchrun round: torchrun's store at
    ``MASTER_ADDR:MASTER_PORT`` under the prefix ``convlens/<run id>/<restart count>/``.

    torchrun's agent keeps one store for the whole job, so after ``--max-restarts`` restarts
    a worker, the default ``env://`` initialisation of the new round reads the keys the
    dead round's ranks wrote (their gloo addresses) and fails with ``Gloo connectFullMesh
    failed ... Connection refused`` (or hangs until the timeout). Keyed by
    ``TORCHELASTIC_RESTART_COUNT``, every round rendezvouses afresh. Where the agent hosts
    the store (``TORCHELASTIC_USE_AGENT_STORE=True``, torchrun's default) every rank is a
    client; otherwise rank 0 hosts it, as ``env://`` does.

    Example:
        >>> store = round_store(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        >>> dist.init_process_group("gloo", store=store, rank=..., world_size=...)
    """
    addr = os.environ.get("MASTER_ADDR", "")
    port = _env_int("MASTER_PORT", -1)
    if not addr or not 0 <= port < 2**16:
        raise ConvlensError(
            f"MASTER_ADDR={addr!r} MASTER_PORT={os.environ.get('MASTER_PORT')!r}: torchrun sets "
            "both; run under torchrun, or initialise the process group yourself"
        )
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        addr,
        port,
        world_size=world,
        is_master=not agent and rank == 0,
        timeout=timeout,
        wait_for_workers=False,
        multi_tenant=not agent,
    )
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    restart = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    return dist.PrefixStore(f"convlens/{run_id}/{restart}/", store)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device without an index becomes this rank's own GPU
    (``cuda:LOCAL_RANK``); anything else is returned as it is.

    Example:
        >>> local_device(torch.device("cpu"))
        device(type='cpu')
    """
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        count = max(1, torch.cuda.device_count())
        return torch.device("cuda", _env_int("LOCAL_RANK", 0) % count)
    return device


@contextlib.contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block first (a download, a dataset drawn into a cache), then the
    other ranks, which find it done: ``with main_first(ctx): data = shapes()``.

    Example:
        >>> with main_first(context()):
        ...     pass
    """
    if not ctx.is_main:
        barrier()
    try:
        yield
    finally:
        if ctx.is_main:
            barrier()


def shard(n: int, rank: int, world: int) -> range:
    """The indices of ``range(n)`` that ``rank`` of ``world`` takes: every ``world``-th from
    ``rank``. Disjoint, without repeats, together exactly ``range(n)``.

    Example:
        >>> [list(shard(5, r, 2)) for r in range(2)]
        [[0, 2, 4], [1, 3]]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    return range(rank, n, world)


def _backend_device(t: torch.Tensor) -> torch.device:
    """Where a collective's tensors must live: the GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t``, in rank order (``[t]`` in one process). Tensors of different
    shapes are padded to the largest along each dimension, gathered and trimmed back.

    Example:
        >>> all_gather_tensors(torch.arange(3))   # one process
        [tensor([0, 1, 2])]
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [t]
    world = dist.get_world_size()
    dev = _backend_device(t)
    local = t.detach().to(dev)
    shape = torch.tensor(list(local.shape), dtype=torch.long, device=dev)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    with released([shape, *shapes]):
        dist.all_gather(shapes, shape)
    sizes = [tuple(int(v) for v in s.tolist()) for s in shapes]
    biggest = tuple(max(dims) for dims in zip(*sizes)) if local.ndim else ()
    if tuple(local.shape) != biggest:
        padded = torch.zeros(biggest, dtype=local.dtype, device=dev)
        padded[tuple(slice(0, d) for d in local.shape)] = local
        local = padded
    local = local.contiguous()
    out = [torch.empty(biggest, dtype=local.dtype, device=dev) for _ in range(world)]
    with released([local, *out]):
        dist.all_gather(out, local)
    return [o[tuple(slice(0, d) for d in size)].to(t.device) for o, size in zip(out, sizes)]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order: for small metadata only (lists of
    skipped files, timings); state tensors go through :func:`all_gather_tensors`.

    The pickled bytes travel through :func:`all_gather_tensors` (what
    ``dist.all_gather_object`` does, with the tensors held until the backend lets go).

    Example:
        >>> all_gather_objects({"skipped": []})
        [{'skipped': []}]
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return [pickle.loads(p.cpu().numpy().tobytes()) for p in all_gather_tensors(payload)]


#: How long :func:`released` waits for a backend's threads to drop a collective's tensors.
#: After one such wait runs out, it waits no more in this process (a backend that keeps
#: them longer would otherwise cost this at every collective).
RELEASE_TIMEOUT_S = 10.0
_release_gave_up = False


@contextlib.contextmanager
def released(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Hold Python's references to a collective's ``tensors`` until the backend's worker
    threads have dropped theirs.

    A gloo (or nccl) worker thread releases a finished collective's tensors a moment
    after ``wait()`` returns. If Python dropped its own references first, that release
    needs the GIL; when it comes after the interpreter began to exit (a rank that
    gathers, writes and returns), Python ends the thread inside a C++ destructor and the
    process dies of ``terminate called without an active exception`` (SIGABRT), its
    results already written. Waiting here, with the GIL free, until each tensor's C++
    use count is back to what it was before the collective closes that window; it costs
    nothing when the thread is done already, and gives up after
    :data:`RELEASE_TIMEOUT_S` (and from then on waits no more in this process).

    Example:
        >>> with released([shape, *shapes]):
        ...     dist.all_gather(shapes, shape)
    """
    global _release_gave_up
    held = list(tensors)
    count = getattr(torch.Tensor, "_use_count", None)
    before = [count(t) for t in held] if count is not None else []
    yield
    if count is None or _release_gave_up:
        return
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    pause = 1e-4
    while any(count(t) > b for t, b in zip(held, before)):
        if time.monotonic() >= deadline:
            _release_gave_up = True
            return
        time.sleep(pause)  # frees the GIL for the thread that still holds them
        pause = min(2 * pause, 0.01)


def barrier() -> None:
    """Wait for every rank (nothing in one process).

    Example:
        >>> barrier()
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def process_group(ctx: DistContext, owned: bool) -> Iterator[DistContext]:
    """Destroy the process group on leaving when this code made it (``owned``)."""
    try:
        yield ctx
    finally:
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------- merges


def order_key(scores: torch.Tensor, indices: torch.Tensor, *, largest: bool = True) -> torch.Tensor:
    """A permutation of the last dimension sorting by score (descending when ``largest``,
    else ascending), ties by index ascending: the order every top-k in convlens uses.

    Two stable sorts, so the order is exact and deterministic on every device. NaN scores
    go last (below every number for ``largest``, above every number otherwise).

    Example:
        >>> order_key(torch.tensor([1.0, 3.0, 3.0]), torch.tensor([7, 9, 2]))
        tensor([2, 1, 0])
    """
    by_index = torch.sort(indices, dim=-1, stable=True).indices
    s = torch.gather(scores, -1, by_index)
    fill = -torch.inf if largest else torch.inf
    s = torch.where(torch.isnan(s), torch.full_like(s, fill), s)
    by_score = torch.sort(s, dim=-1, descending=largest, stable=True).indices
    return torch.gather(by_index, -1, by_score)


def merge_topk(
    scores: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    extras: Sequence[Sequence[torch.Tensor]] = (),
    *,
    k: int,
    largest: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The top ``k`` (or bottom ``k``) of the union of several ``[..., n_i]`` candidate
    sets along the last dimension: scores, their indices, and ``extras`` (per set, tensors
    shaped like its scores, e.g. positions) carried along. Ties: index ascending.

    Candidates with index ``-1`` are empty slots (a buffer not yet full) and sort after
    every real one. The result of merging rank states equals one process's.

    Example:
        >>> s, i, _ = merge_topk([torch.tensor([5.0, 1.0])], [torch.tensor([0, 1])], k=1)
        >>> s, i
        (tensor([5.]), tensor([0]))
    """
    if not scores:
        raise ValueError("merge_topk needs at least one candidate set")
    s = torch.cat(list(scores), dim=-1)
    idx = torch.cat(list(indices), dim=-1)
    n_extra = len(extras[0]) if extras else 0
    ex = [torch.cat([e[j] for e in extras], dim=-1) for j in range(n_extra)]
    # Empty slots last: give them the worst score, and the largest index among equals.
    empty = idx < 0
    worst = -torch.inf if largest else torch.inf
    s_key = torch.where(empty, torch.full_like(s, worst), s)
    i_key = torch.where(empty, torch.full_like(idx, torch.iinfo(idx.dtype).max), idx)
    order = order_key(s_key, i_key, largest=largest)[..., :k]
    return (
        torch.gather(s, -1, order),
        torch.gather(idx, -1, order),
        [torch.gather(e, -1, order) for e in ex],
    )


def merge_moments(
    counts: Sequence[torch.Tensor], means: Sequence[torch.Tensor], m2s: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and sum of squared deviations of the union of several sets, by Chan's
    parallel formula (float64), applied left to right.

    Example:
        >>> n, m, m2 = merge_moments([torch.tensor(2.0), torch.tensor(1.0)],
        ...                          [torch.tensor(1.0), torch.tensor(4.0)],
        ...                          [torch.tensor(2.0), torch.tensor(0.0)])
        >>> n.item(), m.item(), m2.item()
        (3.0, 2.0, 8.0)
    """
    n = counts[0].double()
    mean = means[0].double()
    m2 = m2s[0].double()
    for nb, mb, m2b in zip(counts[1:], means[1:], m2s[1:]):
        nb, mb, m2b = nb.double(), mb.double(), m2b.double()
        total = n + nb
        safe = torch.where(total > 0, total, torch.ones_like(total))
        delta = mb - mean
        mean = torch.where(total > 0, mean + delta * nb / safe, mean)
        m2 = m2 + m2b + delta * delta * n * nb / safe
        n = total
    return n, mean, m2
