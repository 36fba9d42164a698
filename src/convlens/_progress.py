"""The one place convlens makes its progress bars.

- In a terminal (or a log file): tqdm's text bar; ``disable=None`` hides it when the
  stream is not a terminal, as tqdm does.
- In a Jupyter kernel with ipywidgets: tqdm's widget bar.
- In a Jupyter kernel without ipywidgets: one text line that updates in place (``\\r``,
  at most once a second), shown even though the kernel's stream is not a terminal, and
  ended by a single newline, so a saved notebook holds one line per bar, not one per
  update (tqdm.auto would print its "IProgress not found" warning, and a plain bar is
  hidden there).

Example:
    >>> from convlens._progress import tqdm
    >>> for _ in tqdm(range(3), desc="demo", disable=True):
    ...     pass
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from tqdm.std import tqdm as _std_tqdm

__all__ = ["in_notebook", "tqdm"]


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (notebook, lab, VS Code, Colab), not a
    terminal IPython or a qtconsole.

    Example:
        >>> in_notebook()
        False
    """
    if "ipykernel" not in sys.modules:
        return False
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if get is not None else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _has_widgets() -> bool:
    return importlib.util.find_spec("ipywidgets") is not None


class _LineBar(_std_tqdm):
    """A text bar for a kernel without widgets: shown, redrawn in place, once a second."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("disable") is None:
            kwargs["disable"] = False
        kwargs.setdefault("mininterval", 1.0)
        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", True)
        super().__init__(*args, **kwargs)


class _Bars:
    """``tqdm(...)``: a progress bar, the kind this process can show (see the module's
    notes); takes tqdm's arguments. ``tqdm.write(text)`` prints above any open bar.

    Example:
        >>> bar = tqdm(total=10, desc="steps", disable=True)
        >>> bar.update(10); bar.close()
    """

    write = staticmethod(_std_tqdm.write)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if in_notebook():
            if _has_widgets():
                from tqdm.notebook import tqdm as _nb_tqdm

                if kwargs.get("disable") is None:
                    kwargs["disable"] = False
                return _nb_tqdm(*args, **kwargs)
            return _LineBar(*args, **kwargs)
        return _std_tqdm(*args, **kwargs)


tqdm = _Bars()
