"""The course notebooks: stored without outputs, every convlens name they use exists, and
(slow) they run top to bottom in quick mode."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_cnn_basics.ipynb", "02_activation_maximization.ipynb", "03_your_model.ipynb"]


def _load(name: str) -> dict[str, Any]:
    nb: dict[str, Any] = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    return nb


def _code(nb: dict[str, Any]) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_the_three_notebooks_are_there() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")) == NAMES


def stored_outputs(nb: dict[str, Any]) -> list[str]:
    """What a stored notebook should not carry: outputs and execution counts, per cell."""
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        if cell.get("outputs"):
            found.append(f"cell {i}: {len(cell['outputs'])} outputs")
        if cell.get("execution_count") is not None:
            found.append(f"cell {i}: execution_count {cell['execution_count']}")
    return found


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name: str) -> None:
    found = stored_outputs(_load(name))
    assert not found, (
        f"{name} is stored with outputs ({'; '.join(found)}); clear them: "
        f"jupyter nbconvert --clear-output --inplace notebooks/{name}"
    )


def test_the_output_check_catches_outputs() -> None:
    nb = _load(NAMES[0])
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
    cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "x"}]
    cell["execution_count"] = 3
    assert len(stored_outputs(nb)) == 2


def convlens_names(sources: list[str]) -> set[str]:
    """Every dotted convlens name the code uses: ``convlens.plot.channels``,
    ``convlens.objectives.channel`` (through ``from convlens import objectives as obj``),
    ``convlens.analysis.filters.selectivity`` (through ``from ... import``)."""
    alias: dict[str, str] = {}
    used: set[str] = set()
    for src in sources:
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "convlens":
                        used.add(a.name)
                        if a.asname:  # import convlens.data as cd
                            alias[a.asname] = a.name
                        else:  # import convlens.plot binds convlens
                            alias["convlens"] = "convlens"
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("convlens"):
                for a in node.names:
                    used.add(f"{node.module}.{a.name}")
                    alias[a.asname or a.name] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                parts = []
                cur: ast.expr = node
                while isinstance(cur, ast.Attribute):
                    parts.append(cur.attr)
                    cur = cur.value
                if isinstance(cur, ast.Name) and cur.id in alias:
                    used.add(".".join([alias[cur.id], *reversed(parts)]))
    return used


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            if not hasattr(obj, p):
                return False
            obj = getattr(obj, p)
        return True
    return False


def test_name_resolution_catches_a_missing_name() -> None:
    names = convlens_names(
        ["import convlens\nfrom convlens import objectives as o\nconvlens.gone(); o.nothing"]
    )
    assert "convlens.gone" in names and "convlens.objectives.nothing" in names
    assert not _resolve("convlens.gone") and not _resolve("convlens.objectives.nothing")
    assert _resolve("convlens.objectives.channel")


@pytest.mark.parametrize("name", NAMES)
def test_every_convlens_name_a_notebook_uses_exists(name: str) -> None:
    names = convlens_names(_code(_load(name)))
    assert len(names) >= 5
    missing = sorted(n for n in names if not _resolve(n))
    assert not missing, f"{name} uses names convlens no longer has: {missing}"


def _private(dotted: str) -> bool:
    return any(p.startswith("_") for p in dotted.split("."))


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_use_only_public_names(name: str) -> None:
    assert not [n for n in convlens_names(_code(_load(name))) if _private(n)]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_quick_mode(name: str, tmp_path: Path) -> None:
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    proc = subprocess.run(
        [sys.executable, str(NOTEBOOKS / "run.py"), name, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{name}: ok in" in proc.stdout
