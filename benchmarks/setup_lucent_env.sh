#!/usr/bin/env bash
# Build .venv-bench: a benchmark-only environment where Lucent (torch-lucent 0.1.8) runs
# beside convlens on torch 2.14.1, for the side-by-side feature-visualization benchmark
# (benchmarks/_lucent.py wraps Lucent's render_vis), and beside the attribution anchors
# (Captum, pytorch-grad-cam, torch-cam) for benchmarks/attribution.py and sensitivity.py.
# None of them is ever a convlens dependency: they are installed here only, and nothing in
# src/ imports them.
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
#
# The attribution anchors (benchmarks/attribution.py, benchmarks/sensitivity.py), also
# never convlens dependencies, each checked below with one call on resnet18 (random init)
# at 224 px under torch 2.14.1:
#   captum 0.9.0 with --no-deps. Its requirements are matplotlib, numpy, packaging, tqdm
#       and torch>=2.3, all already here (convlens and torch bring them); its extras
#       (tutorials: torchtext; optional: openai, scikit-learn, annoy; test/dev tooling) are
#       never imported by captum.attr. Saliency, IntegratedGradients (with the convergence
#       delta), GuidedBackprop (on torchvision's in-place nn.ReLU: it warns that it sets
#       backward hooks, and runs) and LayerGradCam run unchanged.
#   grad-cam 1.5.7 (pytorch-grad-cam) with --no-deps, after its runtime dependencies:
#       its metadata lists numpy, Pillow, torch>=1.7.1, torchvision>=0.13, ttach, tqdm,
#       opencv-python-headless, matplotlib, scikit-learn, scipy, and every one of them is
#       needed: `import pytorch_grad_cam` runs its __init__, which imports every CAM class,
#       and so cv2 (utils/image.py: scale_cam_image resizes each map with cv2.resize),
#       matplotlib and scipy.ndimage (utils/image.py), sklearn.decomposition (KernelPCA in
#       utils/svd_on_activations.py, NMF in feature_factorization) and ttach (base_cam.py).
#       They are installed first, pinned, under the torch constraints (none of them needs
#       torch); grad-cam itself then goes in with --no-deps so that its unpinned
#       `torch>=1.7.1` / `torchvision>=0.13` are never resolved again:
#         ttach 0.0.3 (pure Python, no requirements), opencv-python-headless 5.1.0.95 (the
#         headless wheel: no Qt/X11 libraries), scipy 1.17.1 (the newest for Python 3.11),
#         scikit-learn 1.9.1 with what it pulls in: joblib 1.6.0, threadpoolctl 3.8.0,
#         narwhals 2.29.0, cloudpickle 3.1.3.
#       GradCAM, GradCAMPlusPlus, LayerCAM and ScoreCAM run unchanged (ScoreCAM draws a
#       tqdm bar per image: TQDM_DISABLE=1 in the environment silences it).
#   torchcam 0.5.0 with --no-deps. Its requirements (torch>=2.4.1,<3, numpy>=1.26.4,<3,
#       pillow>=9.3.0, matplotlib>=3.8.4,<4) are all here already; --no-deps keeps pip
#       from re-resolving torch. Its extras (demo: streamlit; docs; quality; test) are not
#       installed. torchcam.methods.GradCAM on layer4 runs unchanged.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-bench}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
LUCENT_VERSION=0.1.8
KORNIA_VERSION=0.4.1
CAPTUM_VERSION=0.9.0  # benchmarks/sensitivity.py, attribution.py; needs nothing more
GRADCAM_VERSION=1.5.7  # pytorch-grad-cam, benchmarks/attribution.py
TORCHCAM_VERSION=0.5.0
TTACH_VERSION=0.0.3
OPENCV_VERSION=5.1.0.95  # opencv-python-headless
SCIPY_VERSION=1.17.1
SKLEARN_VERSION=1.9.1
JOBLIB_VERSION=1.6.0
THREADPOOLCTL_VERSION=3.8.0
NARWHALS_VERSION=2.29.0
CLOUDPICKLE_VERSION=3.1.3
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
echo "== installing pytorch-grad-cam's runtime dependencies (ttach, opencv-python-headless, scipy, scikit-learn)"
pip_ install --quiet -c "$CONSTRAINTS" \
    "ttach==$TTACH_VERSION" "opencv-python-headless==$OPENCV_VERSION" \
    "scipy==$SCIPY_VERSION" "scikit-learn==$SKLEARN_VERSION" "joblib==$JOBLIB_VERSION" \
    "threadpoolctl==$THREADPOOLCTL_VERSION" "narwhals==$NARWHALS_VERSION" \
    "cloudpickle==$CLOUDPICKLE_VERSION"
echo "== installing grad-cam $GRADCAM_VERSION, torchcam $TORCHCAM_VERSION (both --no-deps)"
pip_ install --quiet -c "$CONSTRAINTS" --no-deps \
    "grad-cam==$GRADCAM_VERSION" "torchcam==$TORCHCAM_VERSION"

# 4. Check: everything the benchmark uses imports and runs; report the versions.
echo "== checking"
TQDM_DISABLE=1 "$PY" -W ignore::FutureWarning - <<'EOF'
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

# The attribution anchors: one small call each on resnet18 (random init) at 224 px.
import warnings

import torchvision

warnings.filterwarnings("ignore", category=UserWarning, module="captum")
from captum.attr import GuidedBackprop, IntegratedGradients, LayerGradCam, Saliency
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchcam.methods import GradCAM as TorchcamGradCAM

torch.manual_seed(0)
net = torchvision.models.resnet18().eval()
x = torch.randn(1, 3, 224, 224)
assert Saliency(net).attribute(x, target=1).shape == (1, 3, 224, 224)
ig, delta = IntegratedGradients(net).attribute(
    x, target=1, n_steps=4, internal_batch_size=4, return_convergence_delta=True
)
assert ig.shape == (1, 3, 224, 224) and torch.isfinite(delta).all()
assert GuidedBackprop(net).attribute(x, target=1).shape == (1, 3, 224, 224)
assert LayerGradCam(net, net.layer4).attribute(x, target=1).shape == (1, 1, 7, 7)
for cam_class in (GradCAM, GradCAMPlusPlus, LayerCAM):
    with cam_class(net, [net.layer4[-1]]) as cam:
        assert cam(x, [ClassifierOutputTarget(1)]).shape == (1, 224, 224)
with ScoreCAM(net, [net.layer4[-1]]) as cam:  # 512 masked forwards: ~10 s on 2 cores
    cam.batch_size = 128
    assert cam(x, [ClassifierOutputTarget(1)]).shape == (1, 224, 224)
with TorchcamGradCAM(net, "layer4") as extractor:
    maps = extractor(1, net(x))
    assert maps[0].shape == (1, 7, 7)
net.zero_grad(set_to_none=True)

print(f"python {platform.python_version()}")
for name in ["torch", "torchvision", "convlens", "torch-lucent", "kornia", "numpy",
             "pillow", "tqdm", "decorator", "ipython", "timm", "captum", "grad-cam",
             "torchcam", "ttach", "opencv-python-headless", "scipy", "scikit-learn"]:
    print(f"  {name:<13} {md.version(name)}")
print(f"  cuda available: {torch.cuda.is_available()} (Lucent then puts its images on "
      f"{'cuda:0' if torch.cuda.is_available() else 'cpu'})")
print("ok: lucent.optvis.{render,objectives,param,transform} and "
      "lucent.modelzoo.inceptionv1 import and run")
print("ok: captum.attr {Saliency,IntegratedGradients,GuidedBackprop,LayerGradCam}, "
      "pytorch_grad_cam {GradCAM,GradCAMPlusPlus,LayerCAM,ScoreCAM} and "
      "torchcam.methods.GradCAM run on resnet18 at 224 px")
EOF
