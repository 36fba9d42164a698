"""Preemption: SIGTERM and Ctrl-C stop a long pass at its next batch boundary.

A cluster preempts a job with SIGTERM (SLURM, Kubernetes), torchrun stops its workers
with SIGTERM, and a user presses Ctrl-C (SIGINT). Inside :func:`deferred` (the dataset
pass's loop, the microscope's render, crop and attribution loops) such a signal is only
recorded: the loop asks :func:`requested` at each batch boundary, writes its checkpoint
and calls :func:`stop`, which raises :class:`convlens.errors.Preempted`. Outside those
loops, while :func:`handling` is active (the command line around a whole command), the
signal raises :class:`~convlens.errors.Preempted` at once, as Ctrl-C raises
``KeyboardInterrupt``. A second Ctrl-C inside a loop stops at once too; a repeated SIGTERM
does not (torchrun and a cluster may both send one).

The handlers are installed only in the main thread and only while a block is active; on
leaving the outermost block the previous handlers are restored, also on error, so a
Python session (Jupyter) is never left with convlens's handlers. Without a checkpoint to
write, the API installs nothing and a signal does what it always does.

Example:
    >>> with deferred():
    ...     for b in range(n_batches):
    ...         work(b)
    ...         if requested() is not None:
    ...             save_checkpoint(b + 1)
    ...             stop(f"the checkpoint holds {b + 1} of {n_batches} batches")
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any, NoReturn

from convlens.errors import Preempted

__all__ = ["deferred", "handling", "requested", "stop"]

#: The signals that stop a pass: a preemption or shutdown, and Ctrl-C.
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_installed = 0  # depth of active handling() blocks that installed the handlers
_saved: dict[int, Any] = {}  # the handlers to restore
_deferring = 0  # depth of active deferred() blocks
_pending: int | None = None  # the signal received inside a deferred() block, not yet acted on


def _handler(signum: int, _frame: FrameType | None) -> None:
    global _pending
    if _deferring > 0:
        if _pending is None:
            _pending = signum  # acted on at the next batch boundary
            return
        if not (signum == _pending == signal.SIGINT):
            return  # SIGTERM again, or after Ctrl-C: already stopping
    # Outside a loop, or Ctrl-C pressed twice: stop now.
    first = _pending if _pending is not None else signum
    _pending = None
    raise Preempted(first, "not at a batch boundary: the last checkpoint holds the work")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Install convlens's SIGTERM and SIGINT handlers for the block (in the main thread;
    elsewhere nothing) and restore the previous ones on leaving it, also on error.

    Example:
        >>> with handling():
        ...     run_command()   # SIGTERM raises Preempted here
    """
    global _installed, _pending
    if not _main_thread():
        yield
        return
    if _installed == 0:
        _pending = None
        for s in SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:  # an ignored signal stays ignored
                _saved[s] = signal.signal(s, _handler)
    _installed += 1
    try:
        yield
    finally:
        _installed -= 1
        if _installed == 0:
            for num, h in _saved.items():
                signal.signal(num, h)
            _saved.clear()
            _pending = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A loop that stops at batch boundaries: inside it, SIGTERM and SIGINT are recorded
    for :func:`requested`. A signal the loop did not act on is raised as
    :class:`~convlens.errors.Preempted` when the block ends normally.

    Example:
        >>> with deferred():
        ...     for b in batches:
        ...         ...
    """
    global _deferring, _pending
    if not _main_thread():
        yield
        return
    with handling():
        _deferring += 1
        try:
            yield
        finally:
            _deferring -= 1
        if _deferring == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise Preempted(signum, "after the loop finished: its checkpoint holds all of it")


def requested() -> int | None:
    """The signal received inside :func:`deferred` and not yet acted on, else None.

    Example:
        >>> requested() is None
        True
    """
    return _pending


def stop(detail: str) -> NoReturn:
    """Raise :class:`~convlens.errors.Preempted` for the pending signal, with ``detail``
    (what the checkpoint holds), and clear it.

    Example:
        >>> if requested() is not None:
        ...     stop("the checkpoint 'run.ckpt' holds 12 of 40 batches")
    """
    global _pending
    signum = _pending if _pending is not None else signal.SIGTERM
    _pending = None
    raise Preempted(signum, detail)
