#!/usr/bin/env bash
# Build .venv-bench: a benchmark-only environment where Lucent (torch-lucent 0.1.8) runs
# beside convlens on torch 2.14.1, for the side-by-side feature-visualization benchmark
# (benchmarks/_lucent.py wraps Lucent's render_vis). Lucent is never a convlens dependency:
# it is installed here only, and nothing in src/ imports it.
#
#   bash benchmarks/setup_lucent_env.sh          # idempotent: rerun to repair or check
#   .venv-bench/bin/python benchmarks/_lucent.py # smoke check: two seeded renders, timings
#
# Environment: PYTHON (default python3, >= 3.11 for the pinned IPython), VENV (default
# <repo>/.venv-bench), ALLOW_TORCH_DOWNLOAD=1 to let pip fetch torch from an index when
# the pinned wheels are not on local disk (several GB: off by default).
#
# What is installed, and how it differs from Lucent's own metadata:
#   torch 2.14.1, torchvision 0.29.1  the pins of this project's machines (local wheels).
#       Lucent asks torch>=1.5.0 and any torchvision; a constraints file holds every pip
#       call below to these exact versions, so no step can pull another torch.
#   convlens (editable, with its own dependencies: numpy, pillow, tqdm, timm, ...).
#   torch-lucent 0.1.8 with --no-deps. Its metadata lists as install requirements its
#       test tooling (pytest, pytest-mock, coverage, coveralls), future (Python 2 shims,
#       never imported) and scikit-learn (used only by lucent.misc.channel_reducer, which
#       render/objectives/param/transform/modelzoo never import): none of these is
#       installed. `pip check` therefore reports them as
#       missing; that is expected.
#   kornia 0.4.1: exactly Lucent's pin (kornia<=0.4.1), --no-deps (it needs only numpy
#       and torch>=1.6.0, both present). It imports and runs under torch 2.14.1 unchanged:
#       translate, get_rotation_matrix2d and warp_affine (all Lucent uses) run forward and
#       backward; rotation by 90 degrees matches torch.rot90 to 1e-5. Its only complaint is
#       a FutureWarning at import ("torch.jit.script is deprecated"). No patch needed.
#       Do NOT move to kornia >= 0.10: Lucent compares versions as strings
#       (KORNIA_VERSION < '0.4.0' in lucent/optvis/transform.py), and "0.10.0" < "0.4.0"
#       would give get_rotation_matrix2d a scale of the wrong shape.
#       Note (Lucent's behaviour, not an upgrade effect): kornia 0.4.1's translate samples
#       with align_corners=False on a (w-1)-normalised grid, so an integer jitter is not an
#       exact pixel shift but a slightly resampled one. grid_sample's semantics have not
#       changed since torch 1.3, so Lucent did the same on the torch of its day.
#   decorator, ipython: imported at import time by lucent.optvis.objectives and
#       lucent.misc.io.showing (which lucent.optvis.render imports). Pinned to the
#       versions verified here.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-bench}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
LUCENT_VERSION=0.1.8
KORNIA_VERSION=0.4.1
CAPTUM_VERSION=0.9.0  # benchmarks/sensitivity.py; it needs nothing that is not there already
DECORATOR_VERSION=5.3.1
IPYTHON_VERSION=9.18.1

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "== creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
else
    echo "== reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
PY="$VENV/bin/python"
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$CONSTRAINTS"

installed() {  # installed NAME VERSION -> 0 when exactly that version is installed
    [[ "$("$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" == "$2" ]]
}

# 1. torch + torchvision, from local disk only (unless ALLOW_TORCH_DOWNLOAD=1).
if installed torch "$TORCH_VERSION" && installed torchvision "$TORCHVISION_VERSION"; then
    echo "== torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION already installed"
else
    echo "== checking where pip would take torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION from"
    pip_ install --quiet --dry-run --no-deps --ignore-installed --report - \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
        | "$PY" -c '
import json, os, sys
urls = [i["download_info"]["url"] for i in json.load(sys.stdin)["install"]]
remote = [u for u in urls if not u.startswith("file:")]
for u in urls:
    print("   ", u)
if remote and os.environ.get("ALLOW_TORCH_DOWNLOAD") != "1":
    sys.exit("torch/torchvision are not on local disk here; pip would download them "
             "(several GB). Set ALLOW_TORCH_DOWNLOAD=1 to allow it.")
'
    pip_ install -c "$CONSTRAINTS" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# 2. convlens, editable, with its dependencies (torch held by the constraints).
echo "== installing convlens (editable) from $ROOT"
pip_ install --quiet -c "$CONSTRAINTS" -e "$ROOT"

# 3. The few dependencies Lucent needs to import and run, then Lucent itself without its
#    dependency list (in this order, so that pip's resolver has no half-met Lucent to
#    complain about while installing IPython).
echo "== installing decorator $DECORATOR_VERSION, ipython $IPYTHON_VERSION"
pip_ install --quiet -c "$CONSTRAINTS" \
    "decorator==$DECORATOR_VERSION" "ipython==$IPYTHON_VERSION"
echo "== installing kornia $KORNIA_VERSION, torch-lucent $LUCENT_VERSION (both --no-deps)"
pip_ install --quiet -c "$CONSTRAINTS" --no-deps \
    "kornia==$KORNIA_VERSION" "torch-lucent==$LUCENT_VERSION"
echo "== installing captum $CAPTUM_VERSION (--no-deps)"
pip_ install --quiet -c "$CONSTRAINTS" --no-deps "captum==$CAPTUM_VERSION"

# 4. Check: everything the benchmark uses imports and runs; report the versions.
echo "== checking"
"$PY" -W ignore::FutureWarning - <<'EOF'
import importlib.metadata as md
import platform

import numpy as np
import torch

import convlens
import kornia
import lucent
from captum.attr import Occlusion
from lucent.modelzoo import inceptionv1
from lucent.optvis import objectives, param, render, transform  # noqa: F401

assert hasattr(render, "render_vis") and hasattr(objectives, "channel")
np.random.seed(0)
torch.manual_seed(0)
x = torch.rand(2, 3, 64, 64, requires_grad=True)
y = transform.compose(transform.standard_transforms)(x)
y.sum().backward()
assert torch.isfinite(x.grad).all()
m = inceptionv1(pretrained=False).eval()
with torch.no_grad():
    assert m(torch.rand(1, 3, 224, 224)).shape == (1, 1008)

print(f"python {platform.python_version()}")
for name in ["torch", "torchvision", "convlens", "torch-lucent", "kornia", "numpy",
             "pillow", "tqdm", "decorator", "ipython", "timm", "captum"]:
    print(f"  {name:<13} {md.version(name)}")
print(f"  cuda available: {torch.cuda.is_available()} (Lucent then puts its images on "
      f"{'cuda:0' if torch.cuda.is_available() else 'cpu'})")
print("ok: lucent.optvis.{render,objectives,param,transform} and "
      "lucent.modelzoo.inceptionv1 import and run")
EOF
