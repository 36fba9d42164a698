"""One render step, A/B: what keeping the heap and the float32 depthwise gradient each give.

The microscope's render step (``convlens.microscope._render_batch``'s loop body) on the
pretrained ``efficientnet_lite0`` to ``blocks.4``: 8 images of 128 px upsampled to 224,
Lucid's transforms, BatchNorms folded, Adam. Each row switches one of this session's two
changes on or off in the same process: ``keep_heap`` (``convlens._alloc``: large blocks
served from and kept in glibc's heap while a render runs) and the float32 input gradient
of strided depthwise convolutions under bfloat16 (``_inputgrad.LowPrecisionDepthwise``).
Reported: the best of ``--rounds`` means of ``--steps`` steps, ms per step, after 3 warm-up
steps. ``--icons`` measures the atlas's icon step instead: ``blocks.5``, 32 images of
80 px, not upsampled.

    python benchmarks/render_step.py [--steps 8] [--rounds 3] [--device cpu] [--icons]

Results: ``results/render_step.json`` (``render_step_icons.json``). Timing: run it on a
quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

import torch

import convlens
from convlens import _alloc
from convlens._io import versions, write_json
from convlens.analysis.featurevis import _inputgrad
from convlens.analysis.featurevis._amp import MixedPrecision
from convlens.analysis.featurevis.objectives import Objective, channel
from convlens.analysis.featurevis.param import ImageParam
from convlens.analysis.featurevis.render import _fold_checked, _Forward, _frozen
from convlens.device import resolve_device
from convlens.microscope import _plan
from convlens.microscope.renders import _UnitObjective
from convlens.models.layers import evaluating

HERE = Path(__file__).resolve().parent
#: (layer, images, size, upsampled): the microscope's renders and the atlas's icons
SETUPS = {"renders": ("blocks.4", 8, 128, True), "icons": ("blocks.5", 32, 80, False)}


@contextlib.contextmanager
def _switched(swap: bool, heap: bool) -> Any:
    real = _inputgrad._eligible_depthwise
    _inputgrad._eligible_depthwise = real if swap else (lambda m: False)
    _alloc.ENABLED = heap
    try:
        yield
    finally:
        _inputgrad._eligible_depthwise = real
        _alloc.ENABLED = True


def _ms_per_step(
    bundle: Any, setup: str, precision: str, dev: Any, steps: int, rounds: int
) -> list[float]:
    from convlens.analysis.featurevis.render import _normalizer, _Pipeline

    layer, n, size, upsampled = SETUPS[setup]
    net = bundle.model
    plan = _plan(net, bundle, size, 32, None, 0, 0, precision=precision, schedule="cosine", dev=dev)
    if not upsampled:  # the atlas's icons: the model sees the 80 px image itself
        normalize, _ = _normalizer("auto", bundle, plan.channels)
        plan.pipe = _Pipeline(normalize, None, True, plan.dtype)
    with evaluating(net), _frozen(net):
        probe = plan.pipe(torch.rand(1, plan.channels, size, size)).to(dev)
        run, _ = _fold_checked(net, channel(layer, 0), probe, True)
        obj_fn = _UnitObjective(layer, list(range(n)), 0, [("channel", 0)], plan.diversity_weight)
        obj = Objective(obj_fn, [layer])
        param = ImageParam(size, batch=n, generator=torch.Generator().manual_seed(0)).to(dev)
        params = list(param.parameters())
        opt = torch.optim.Adam(params, lr=plan.lr, betas=plan.schedule.betas)
        mp = MixedPrecision(plan.precision, dev, plan.dtype)
        tgen = torch.Generator().manual_seed(0)
        fwd = _Forward(run, obj)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            image = param()
            x = plan.pipe(plan.transform(image, tgen))
            with mp.autocast():
                acts = fwd(x, image)
            if mp.backward(-obj(acts).sum(), params):
                opt.step()

        means = []
        with fwd.hooked(False), _alloc.keep_heap():
            for _ in range(3):
                step()
            for _ in range(rounds):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                means.append((time.perf_counter() - t0) / steps * 1000)
    return means


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--icons", action="store_true", help="the atlas's icon step")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    setup = "icons" if args.icons else "renders"
    from _machine import cpu_name

    dev = resolve_device(args.device)
    bundle = convlens.load_model("efficientnet_lite0", device=dev)
    rows = []
    for precision in ("float32", "bfloat16"):
        swaps = (False, True) if precision == "bfloat16" else (False,)
        for swap in swaps:
            for heap in (False, True):
                with _switched(swap, heap):
                    means = _ms_per_step(bundle, setup, precision, dev, args.steps, args.rounds)
                row = {
                    "precision": precision,
                    "depthwise_float32_grad": swap,
                    "keep_heap": heap,
                    "ms_per_step": round(min(means), 1),
                    "rounds": [round(m, 1) for m in means],
                }
                rows.append(row)
                print(row, flush=True)
    base = rows[0]["ms_per_step"]
    for r in rows:
        r["speedup_vs_float32_before"] = round(base / r["ms_per_step"], 2)
    doc = {
        "benchmark": "render_step",
        "setup": dict(zip(("layer", "images", "size", "upsampled"), SETUPS[setup])),
        "device": str(dev),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("_icons" if args.icons else "") + ("" if dev.type == "cpu" else f"_{dev.type}")
    print(f"wrote {write_json(args.out / f'render_step{suffix}.json', doc)}")


if __name__ == "__main__":
    main()
