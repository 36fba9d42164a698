"""Importing convlens must not import matplotlib; only convlens.plot does."""

from __future__ import annotations

import json
import subprocess
import sys

# Imports each module in turn in a fresh interpreter and records, after each one, the
# matplotlib modules loaded so far.
_CHECK = """
import importlib, json, sys
seen = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    seen[name] = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib')
print(json.dumps(seen))
"""


def _matplotlib_after(*modules: str) -> dict[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, *modules],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_convlens_does_not_load_matplotlib() -> None:
    modules = [
        "convlens",
        "convlens.analysis",
        "convlens.models",
        "convlens.capture",
        "convlens.cli",
    ]
    seen = _matplotlib_after(*modules)
    assert list(seen) == modules
    for name in modules:
        assert seen[name] == [], f"import {name} loaded {seen[name][:5]}"


def test_import_plot_loads_matplotlib() -> None:
    # Without this, the check above could pass because the subprocess saw nothing.
    seen = _matplotlib_after("convlens", "convlens.plot")
    assert seen["convlens"] == []
    assert "matplotlib" in seen["convlens.plot"]
    assert "matplotlib.figure" in seen["convlens.plot"]
