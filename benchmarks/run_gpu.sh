#!/usr/bin/env bash
# One prepared pass on a CUDA machine: the whole test suite (gpu tests included) and the
# benchmarks on cuda and cpu. Logs go to $OUT (or benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# packages the device image lacks travel as wheels in .whl/ (see the device README)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs 2>&1 | tee "$out/pytest.log" | tail -15
timeout 120 python3 benchmarks/capture.py --device cuda --rounds 50 --out "$out" 2>&1 | tee "$out/bench-capture-cuda.log"
timeout 120 python3 benchmarks/capture.py --device cpu --rounds 10 --out "$out" 2>&1 | tee "$out/bench-capture-cpu.log"
# training on the GPU: the shapes set, the course recipe, 5 epochs
CONVLENS_HOME=/tmp/clhome timeout 240 python3 -m convlens train --data shapes --epochs 5 \
  --out /tmp/train-cuda --device cuda --quiet 2>&1 | tail -4 | tee "$out/train-cuda.log"
cp /tmp/train-cuda/metrics.json "$out/train-cuda-metrics.json" 2>/dev/null || true
# one render step, bfloat16 and float32 (on CUDA the depthwise swap and keep_heap do nothing)
timeout 120 python3 benchmarks/render_step.py --device cuda --out "$out" 2>&1 | tee "$out/bench-render-step-cuda.log"
# the microscope: the full blocks.4 microscope on CUDA, and under torchrun --nproc-per-node 1
# (the Imagenette val JPEGs come from ../shared/data when the machine has it)
timeout 420 python3 benchmarks/microscope.py --device cuda --skip-lucent --skip-renders \
  --torchrun 1 --out "$out" 2>&1 | tee "$out/bench-microscope-cuda.log"
# the activation atlas (needs umap-learn: put its wheels, numba and llvmlite included, in .whl/)
timeout 420 python3 benchmarks/atlas.py --device cuda --skip-steps 2>&1 | tee "$out/bench-atlas-cuda.log"
cp benchmarks/results/atlas.json "$out/atlas-cuda.json" 2>/dev/null || true
