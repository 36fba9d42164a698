"""Small file helpers: every file convlens writes lands atomically (temp file + rename),
a failed write is one line naming the file, and one live run owns an output folder.

Fault injection, for tests only: ``CONVLENS_TEST_FAIL_WRITES=ENOSPC:N`` (any errno name:
``EIO``, ``EROFS``, ...) makes every :func:`atomic_open` after the first ``N`` of this
process fail as a full disk would, when its data is flushed. It is read here and nowhere
else, so a test can make a subprocess (``torchrun``, the CLI) run out of space.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import math
import os
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from convlens.errors import ConvlensError, ConvlensWarning, FolderLockedError, WriteError

__all__ = [
    "LOCK_NAME",
    "LOCK_STALE_AFTER",
    "atomic_open",
    "folder_lock",
    "to_jsonable",
    "versions",
    "write_json",
]

#: errnos of a write that failed for a reason outside convlens: one line, not a traceback
_WRITE_ERRNOS = {
    errno_mod.ENOSPC: "free space (or use another --out) and rerun: the files already written "
    "are intact and a rerun resumes (convlens examples: with --resume)",
    errno_mod.EDQUOT: "free space within your quota (or use another --out) and rerun: the "
    "files already written are intact and a rerun resumes (convlens examples: with --resume)",
    errno_mod.EFBIG: "the file system cannot hold a file this large: use another --out",
    errno_mod.EIO: "the disk reported an I/O error: check it, then rerun; the files already "
    "written are intact and a rerun resumes (convlens examples: with --resume)",
    errno_mod.EROFS: "the folder is on a read-only file system: use another --out",
    errno_mod.EACCES: "the folder is not writable by you: fix its permissions or use another --out",
    errno_mod.EPERM: "the folder is not writable by you: fix its permissions or use another --out",
}

_FAULT_ENV = "CONVLENS_TEST_FAIL_WRITES"
_writes = 0  # atomic writes so far in this process (for the test-only fault injection)
_writes_lock = threading.Lock()


def write_error(e: OSError, path: str | os.PathLike[str]) -> WriteError | None:
    """``e`` as a one-line :class:`~convlens.errors.WriteError` naming ``path``, the
    errno's meaning and the fix, when it is a full disk, an I/O error or a read-only or
    forbidden folder; ``None`` for any other error.

    Example:
        >>> str(write_error(OSError(errno.ENOSPC, "No space left on device"), "a.json"))
        "cannot write 'a.json': no space left on device (ENOSPC); free space ..."
    """
    if isinstance(e, WriteError):
        return e
    if e.errno not in _WRITE_ERRNOS:
        return None
    name = errno_mod.errorcode.get(e.errno, str(e.errno))
    meaning = os.strerror(e.errno).lower()
    return WriteError(
        f"cannot write {os.fspath(path)!r}: {meaning} ({name}); {_WRITE_ERRNOS[e.errno]}",
        e.errno,
        os.fspath(path),
    )


def _injected_fault() -> None:
    """The test-only fault of the module docstring (``CONVLENS_TEST_FAIL_WRITES``)."""
    global _writes
    spec = os.environ.get(_FAULT_ENV)
    if not spec:
        return
    name, _, after = spec.partition(":")
    code = getattr(errno_mod, name.strip(), None)
    if not isinstance(code, int) or not after.strip().isdigit():
        raise ValueError(
            f"{_FAULT_ENV}={spec!r}: expected an errno name and a count, e.g. ENOSPC:3"
        )
    with _writes_lock:
        _writes += 1
        n = _writes
    if n > int(after):
        raise OSError(code, os.strerror(code))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only on success.

    Whatever fails (the body, a full disk, a read-only folder, Ctrl-C) the file at
    ``path`` is what it was before and no temporary file is left. A full disk, an I/O
    error or a folder that cannot be written raises
    :class:`~convlens.errors.WriteError`: one line with the file, the errno and the fix.

    Example:
        >>> with atomic_open("out/a.bin") as fh:
        ...     fh.write(b"...")
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise (write_error(e, path) or e) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, mode) as fh:
            yield fh
            _injected_fault()
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            wrapped = write_error(e, path)
            if wrapped is not None:
                raise wrapped from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy values, tuples and paths to JSON types; NaN becomes ``None``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):  # torch.Tensor, numpy arrays and scalars
        return to_jsonable(tolist())
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically. Returns the path."""
    data = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    with atomic_open(path, "w") as fh:
        fh.write(data)
    return Path(path)


def versions() -> dict[str, str]:
    """Versions of convlens, torch, torchvision and Python, for every saved result."""
    import platform

    import torch
    import torchvision

    from convlens import __version__

    return {
        "convlens": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------ one run per folder

#: the lock file of an output folder (hidden; gone when the run ends)
LOCK_NAME = ".convlens.lock"
#: a lock from another host is stale after this many seconds without a heartbeat (its
#: holder touches the file every ``LOCK_HEARTBEAT`` seconds); on this host a lock is stale
#: as soon as its pid is gone (or is another process now)
LOCK_STALE_AFTER = 600.0
LOCK_HEARTBEAT = 60.0
#: a lock file that cannot be read is a writer's unfinished one for this long, then stale
_LOCK_UNREADABLE_GRACE = 10.0

_held: dict[Path, int] = {}  # folders this process holds, with how deep (re-entrant)
_held_lock = threading.Lock()


def _proc_start(pid: int) -> str | None:
    """A process's start time on Linux (``/proc/PID/stat`` field 22), to tell a reused
    pid from the process that wrote a lock; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return False
    return True


def _describe(rec: dict[str, Any]) -> str:
    return (
        f"`convlens {rec.get('command', '?')}` pid {rec.get('pid', '?')} on "
        f"{rec.get('host', '?')}, started {rec.get('started', '?')}"
    )


def _stale(raw: bytes, lock: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The lock's record, and why it is stale (None: a live run holds it)."""
    try:
        rec = json.loads(raw.decode())
        if not isinstance(rec, dict) or not isinstance(rec.get("pid"), int):
            raise ValueError("not a lock record")
    except (ValueError, UnicodeDecodeError):
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return None, "gone"
        if age < _LOCK_UNREADABLE_GRACE:
            return None, None  # being written by a run that has just started
        return None, "its lock file cannot be read"
    job = _torchrun_job()
    if job is not None and rec.get("job") == job:
        return rec, "an earlier round of this torchrun job (a restart)"
    if rec.get("host") == socket.gethostname():
        pid = int(rec["pid"])
        if pid == os.getpid():
            return rec, "it was this process, which no longer holds it"
        if not _pid_alive(pid):
            return rec, f"pid {pid} is not running"
        start = rec.get("proc_start")
        if start is not None and _proc_start(pid) not in (None, start):
            return rec, f"pid {pid} is another process now"
        return rec, None
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return rec, "gone"
    if age > LOCK_STALE_AFTER:
        return rec, f"no heartbeat for {age:.0f} s (more than {LOCK_STALE_AFTER:.0f} s)"
    return rec, None


def _torchrun_job() -> str | None:
    """The torchrun job this process belongs to (``TORCHELASTIC_RUN_ID``, the same in every
    restart round), or None outside torchrun or with the shared default id ``none``."""
    job = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return job if job and job != "none" and "RANK" in os.environ else None


def _create_lock(lock: Path, data: bytes) -> None:
    """Create ``lock`` holding ``data``, atomically and only if it does not exist
    (``FileExistsError`` otherwise): a hard link of a complete temporary file, or, where
    the file system has no hard links, an exclusive create."""
    fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=f"{lock.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, lock)
            return
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno_mod.EPERM, errno_mod.ENOTSUP, errno_mod.EOPNOTSUPP):
                raise
        with os.fdopen(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _take_lock(
    folder: Path, lock: Path, command: str, token: str, note: Callable[[str], None] | None
) -> None:
    rec = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "proc_start": _proc_start(os.getpid()),
        "job": _torchrun_job(),
        "token": token,
    }
    data = (json.dumps(rec, indent=2) + "\n").encode()
    for _ in range(5):
        try:
            _create_lock(lock, data)
            return
        except FileExistsError:
            pass
        try:
            raw = lock.read_bytes()
        except FileNotFoundError:
            continue  # released meanwhile
        other, why = _stale(raw, lock)
        if why == "gone":
            continue
        if why is None:
            who = _describe(other) if other is not None else "a run that is just starting"
            raise FolderLockedError(
                f"{str(folder)!r} is being written by another convlens run: {who} (lock "
                f"{lock}); wait for it to finish or use another --out (if that run is gone, "
                "delete the lock file)"
            )
        # Take over: move the stale lock aside, and check it is the one judged stale (a
        # run taking it over at the same moment may have put a fresh one there).
        aside = lock.with_name(f"{lock.name}.stale-{token}")
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            continue
        if aside.read_bytes() != raw:
            with contextlib.suppress(OSError):
                os.link(aside, lock)  # put the other run's fresh lock back
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        who = _describe(other) if other is not None else "an unknown run"
        message = f"took over the lock of {str(folder)!r} from a run that is gone ({who}: {why})"
        if note is not None:
            note(message)
        else:
            warnings.warn(message, ConvlensWarning, stacklevel=5)
    raise FolderLockedError(
        f"could not take the lock {lock}: other runs keep taking it; use another --out"
    )


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(LOCK_HEARTBEAT):
        with contextlib.suppress(OSError):
            os.utime(lock)


@contextlib.contextmanager
def _local_lock(
    folder: Path, command: str, note: Callable[[str], None] | None = None
) -> Iterator[Path]:
    folder = folder.absolute()
    lock = folder / LOCK_NAME
    with _held_lock:
        if folder in _held:  # this process holds it already (a command inside another)
            _held[folder] += 1
            reentrant = True
        else:
            reentrant = False
    if reentrant:
        try:
            yield lock
        finally:
            with _held_lock:
                _held[folder] -= 1
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (write_error(e, folder) or e) from None
    token = uuid.uuid4().hex
    try:
        _take_lock(folder, lock, command, token, note)
    except OSError as e:
        raise (write_error(e, lock) or e) from None
    with _held_lock:
        _held[folder] = 1
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True)
    beat.start()
    try:
        yield lock
    finally:
        stop.set()
        with _held_lock:
            _held.pop(folder, None)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(lock.read_bytes().decode()).get("token") == token:
                lock.unlink()


@contextlib.contextmanager
def folder_lock(
    folder: str | os.PathLike[str],
    command: str,
    *,
    ctx: Any = None,
    note: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Own ``folder`` for the length of the block: one live run writes an output folder.

    The lock is ``FOLDER/.convlens.lock``, created atomically, naming this run (pid, host,
    start time, ``command``); it is removed when the block ends, however it ends (an
    error, Ctrl-C, a SIGTERM handler that raises or exits). If another live run holds
    it, :class:`~convlens.errors.FolderLockedError` names that run. A lock left by a run
    that is gone is taken over with a note (``note(message)``; by default a
    :class:`~convlens.errors.ConvlensWarning`): on this
    host when its pid is not running (or is another process now), from another host when
    it had no heartbeat (the holder touches it every minute) for :data:`LOCK_STALE_AFTER`
    seconds, and at once when it was taken by an earlier round of the same torchrun job
    (``TORCHELASTIC_RUN_ID``: a restart after a worker died). Under torchrun (``ctx`` a :class:`convlens.distributed.DistContext` of more
    than one rank) rank 0 takes it for the whole job and every rank raises if it could
    not. Re-entrant within a process.

    Example:
        >>> with folder_lock("site/", "microscope"):
        ...     write_json("site/microscope.json", doc)
    """
    path = Path(folder)
    if ctx is None or getattr(ctx, "world", 1) == 1:
        with _local_lock(path, command, note) as lock:
            yield lock
        return
    from convlens import distributed

    with contextlib.ExitStack() as stack:
        failure: tuple[str, str] | None = None
        lock = path.absolute() / LOCK_NAME
        if ctx.is_main:
            try:
                lock = stack.enter_context(_local_lock(path, command, note))
            except ConvlensError as e:
                failure = (type(e).__name__, str(e))
                distributed.all_gather_objects(failure)  # the other ranks raise it too
                raise
        outcome = distributed.all_gather_objects(failure)
        if outcome[0] is not None:
            kind, message = outcome[0]
            raise (FolderLockedError if kind == "FolderLockedError" else ConvlensError)(message)
        yield lock
