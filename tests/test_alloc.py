"""``keep_heap``: large blocks served from, and kept in, glibc's heap while renders run."""

from __future__ import annotations

import ctypes
import sys
import threading

import pytest
import torch

from convlens import _alloc
from convlens._alloc import heap_kept, keep_heap

glibc = pytest.mark.skipif(_alloc._glibc() is None, reason="glibc's malloc only")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
            "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _mallinfo() -> _MallInfo2:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc older than 2.33 has no mallinfo2")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


MB64 = 64 * 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _big_tensor_lifetime() -> tuple[int, int]:
    """(bytes mmapped while a 64 MB tensor lives, bytes the heap holds after it is freed)"""
    t = torch.ones(MB64 // 4)
    during = _mallinfo().hblkhd
    del t
    return during, _mallinfo().arena


@glibc
def test_inside_a_block_big_tensors_come_from_the_heap_and_stay_there() -> None:
    base = _mallinfo().hblkhd
    mapped, _ = _big_tensor_lifetime()  # outside: glibc mmaps a block this size
    assert mapped - base >= MB64
    rss = _rss()
    with keep_heap():
        assert heap_kept()
        mapped, held = _big_tensor_lifetime()
        assert mapped - base < MB64  # served from the heap ...
        assert held >= MB64  # ... and still held after the free, for the next step
        assert _rss() - rss >= MB64 * 3 // 4
    assert not heap_kept()
    assert _rss() - rss < MB64 // 4  # given back on the way out
    mapped, _ = _big_tensor_lifetime()  # and glibc's behaviour is back
    assert mapped - base >= MB64


@glibc
def test_nested_blocks_restore_on_the_last_exit_only() -> None:
    with keep_heap():
        with keep_heap():
            pass
        assert heap_kept()
        _, held = _big_tensor_lifetime()
        assert held >= MB64
    assert not heap_kept()


@pytest.fixture
def fake_glibc(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """A stand-in C library recording ``mallopt(p, v)`` and ``malloc_trim(pad)`` as
    ``(0, pad)``, with none of the variables that turn ``keep_heap`` off set."""
    calls: list[tuple[int, int]] = []

    class Fake:
        def mallopt(self, p: int, v: int) -> int:
            calls.append((p, v))
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append((0, pad))
            return 1

    monkeypatch.setattr(_alloc, "_libc", Fake())
    for k in (*_alloc._USER_TUNING, "CONVLENS_KEEP_HEAP"):
        monkeypatch.delenv(k, raising=False)
    return calls


@pytest.mark.parametrize(
    "env", [("CONVLENS_KEEP_HEAP", "0"), ("MALLOC_MMAP_MAX_", "65536"), ("GLIBC_TUNABLES", "x")]
)
def test_the_users_choice_stands(
    monkeypatch: pytest.MonkeyPatch, fake_glibc: list[tuple[int, int]], env: tuple[str, str]
) -> None:
    monkeypatch.setenv(*env)
    with keep_heap():
        assert not heap_kept()
    assert fake_glibc == []


def test_off_glibc_it_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_alloc, "_libc", False)
    with keep_heap():
        assert not heap_kept()


def test_restored_even_when_the_block_raises(fake_glibc: list[tuple[int, int]]) -> None:
    with pytest.raises(KeyError), keep_heap():
        raise KeyError("x")
    assert not heap_kept()
    # in: no mmap, no trim; out: glibc's defaults (trim 128 KiB, 65536 maps), then a trim
    assert fake_glibc == [(-4, 0), (-1, 2**31 - 1), (-1, 128 * 1024), (-4, 65536), (0, 0)]


def test_threads_share_one_setting(fake_glibc: list[tuple[int, int]]) -> None:
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with keep_heap():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(10)
    with keep_heap():
        pass
    assert heap_kept()  # the other thread's block is still open: nothing restored yet
    release.set()
    t.join(10)
    assert not heap_kept()
    assert fake_glibc.count((-4, 0)) == 1 and fake_glibc.count((-4, 65536)) == 1


def test_renders_run_inside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import convlens

    render_mod = sys.modules["convlens.analysis.featurevis.render"]

    seen: list[bool] = []
    real = render_mod._values

    def spy(*a: object, **k: object) -> torch.Tensor:
        seen.append(heap_kept() or _alloc._glibc() is None or not _alloc._wanted())
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(render_mod, "_values", spy)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    convlens.render(net, "0:1", steps=2, size=16, progress=False, device="cpu")
    assert seen and all(seen)
    assert not heap_kept()
