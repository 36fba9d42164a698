"""Execute the course notebooks top to bottom with nbclient, in quick mode by default, and
print each one's wall time; exit 1 naming the first cell that failed.

    python notebooks/run.py                    # all three, CONVLENS_QUICK=1
    python notebooks/run.py 02_activation_maximization.ipynb --timeout 600

The notebooks are read, never written back (they are stored without outputs); their
files go to a temporary folder (``CONVLENS_NOTEBOOK_OUT``) unless ``--out`` says where.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = sorted(p.name for p in HERE.glob("[0-9][0-9]_*.ipynb"))


def run(
    name: str, out: Path, timeout: int = 600, quick: bool = True, keep: Path | None = None
) -> float:
    """Execute ``notebooks/<name>`` in a fresh kernel; returns its wall time in seconds.
    ``keep``: a folder to write the executed copy into (never the notebook itself)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(HERE / name, as_version=4)
    os.environ["CONVLENS_QUICK"] = "1" if quick else "0"
    os.environ["CONVLENS_NOTEBOOK_OUT"] = str(out)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(out)}}
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, keep / name)
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=NOTEBOOKS)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="write executed copies here")
    ap.add_argument("--full", action="store_true", help="the course's settings (CONVLENS_QUICK=0)")
    args = ap.parse_args(argv)
    from nbclient.exceptions import CellExecutionError

    with tempfile.TemporaryDirectory(prefix="convlens-nb-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for name in args.names:
            try:
                seconds = run(Path(name).name, out, args.timeout, not args.full, args.keep)
            except CellExecutionError as e:
                print(f"{name}: FAILED\n{e}", file=sys.stderr)
                return 1
            print(f"{name}: ok in {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
