"""Progress bars: tqdm's text bar in a terminal, widgets in a kernel with ipywidgets, one
updating line in a kernel without them."""

from __future__ import annotations

import io
import types

import pytest
from tqdm.std import tqdm as std_tqdm

from convlens import _progress


def _fake_kernel(monkeypatch: pytest.MonkeyPatch, widgets: bool) -> None:
    class ZMQInteractiveShell:
        pass

    shell = ZMQInteractiveShell()
    ipython = types.ModuleType("IPython")
    ipython.get_ipython = lambda: shell  # type: ignore[attr-defined]
    monkeypatch.setitem(__import__("sys").modules, "IPython", ipython)
    monkeypatch.setitem(__import__("sys").modules, "ipykernel", types.ModuleType("ipykernel"))
    monkeypatch.setattr(_progress, "_has_widgets", lambda: widgets)


def test_outside_a_kernel_a_plain_bar() -> None:
    assert not _progress.in_notebook()
    bar = _progress.tqdm(total=3, disable=True)
    assert type(bar) is std_tqdm
    bar.close()


def test_kernel_without_widgets_draws_one_updating_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_kernel(monkeypatch, widgets=False)
    assert _progress.in_notebook()
    out = io.StringIO()
    bar = _progress.tqdm(total=500, desc="render", file=out, mininterval=0, miniters=1)
    assert not bar.disable  # shown although the stream is not a terminal
    for _ in range(500):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line in a saved notebook
    assert text.count("\r") > 10  # redrawn in place
    assert "500/500" in text.rsplit("\r", 1)[-1]


def test_kernel_without_widgets_redraws_at_most_once_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_kernel(monkeypatch, widgets=False)
    out = io.StringIO()
    bar = _progress.tqdm(range(2000), file=out)
    for _ in bar:
        pass
    assert out.getvalue().count("\r") < 10


def test_kernel_with_widgets_uses_tqdm_notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    import tqdm.notebook  # before the fake kernel: ipywidgets reads the real ipykernel

    _fake_kernel(monkeypatch, widgets=True)

    made: list[dict[str, object]] = []

    class Fake:
        def __init__(self, *args: object, **kwargs: object) -> None:
            made.append(kwargs)

    monkeypatch.setattr(tqdm.notebook, "tqdm", Fake)
    bar = _progress.tqdm(total=3, desc="x", disable=None)
    assert isinstance(bar, Fake) and made == [{"total": 3, "desc": "x", "disable": False}]


def test_write_is_tqdm_write() -> None:
    assert _progress.tqdm.write == std_tqdm.write
