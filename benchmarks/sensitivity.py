"""Occlusion sensitivity on resnet18: convlens vs Captum's ``Occlusion``, side by side.

resnet18 (random init, seed 0, eval), one 224 px image (the bundled sample photo with
resnet18's preprocessing), a 32 px window at stride 16 (13 x 13 = 169 windows), fill 0.
Two targets: class 258 (a logit), and channel 0 of ``layer2`` (its mean).
``--model efficientnet_lite0``: the same for timm's Lite0 (random init, its TF-"same"
padded convolutions; class target only), written to ``sensitivity_efficientnet_lite0.json``.

Timing: every method runs once per round, in the same process, methods interleaved round
by round so drift and other load hit all of them alike; the table shows medians.
Memory: every method runs once more in a fresh subprocess, which reports its peak
resident set size during the call minus its resident size just before it, after the
model, the input and a warm-up forward were in place (Linux: ``VmHWM`` from
``/proc/self/status``, reset with ``/proc/self/clear_refs`` just before the call). That
counts everything the call touches, torch's allocator and oneDNN's buffers included
(Python's ``tracemalloc`` would see none of it); memory the warm-up freed but the
allocator kept can be reused unseen, for either tool. Max abs difference: each method's attribution
against Captum's at ``perturbations_per_eval=1``.

Captum is only in the benchmark environment (never a convlens dependency):

    .venv-bench/bin/pip install captum --no-deps   # its other needs are already there
    .venv-bench/bin/python benchmarks/sensitivity.py [--rounds 3] [--ppe 1,4,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

import convlens
from _machine import cpu_name
from convlens._io import versions, write_json

WINDOW, STRIDE, CLASS, LAYER, CHANNEL = 32, 16, 258, "layer2", 0


MODELS = ("resnet18", "efficientnet_lite0")


def _setup(name: str = "resnet18") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    bundle = convlens.load_model(name, weights=None)
    model = torchvision.models.resnet18().eval() if name == "resnet18" else bundle.model.eval()
    x = bundle.preprocess(convlens.sample_image())
    return model, x


def _captum(model: nn.Module, x: torch.Tensor, target: str, ppe: int, how: str) -> torch.Tensor:
    from captum.attr import Occlusion

    if target == "class":
        forward: Callable[[torch.Tensor], torch.Tensor] = model
        tgt: int | None = CLASS
    elif how == "hook":  # what a user writes: the whole model, a hook on the layer

        def forward(inp: torch.Tensor) -> torch.Tensor:
            store: dict[str, torch.Tensor] = {}
            layer = model.get_submodule(LAYER)
            h = layer.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
            try:
                model(inp)
            finally:
                h.remove()
            return store["a"][:, CHANNEL].mean(dim=(1, 2))

        tgt = None
    else:  # the fairest: a forward written to stop at the layer
        m: Any = model
        trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2)

        def forward(inp: torch.Tensor) -> torch.Tensor:
            return trunk(inp)[:, CHANNEL].mean(dim=(1, 2))

        tgt = None
    with torch.no_grad():
        attr = Occlusion(forward).attribute(
            x.unsqueeze(0),
            sliding_window_shapes=(3, WINDOW, WINDOW),
            strides=(3, STRIDE, STRIDE),
            baselines=0,
            target=tgt,
            perturbations_per_eval=ppe,
        )
    return attr[0]  # [3, H, W], the same in each channel


def _convlens(
    model: nn.Module, x: torch.Tensor, target: str, method: str, approximate: float | None = None
) -> torch.Tensor:
    spec: int | str = CLASS if target == "class" else f"{LAYER}:{CHANNEL}"
    r = convlens.sensitivity(
        model,
        x,
        spec,
        window=WINDOW,
        stride=STRIDE,
        method=method,  # type: ignore[arg-type]
        approximate=approximate,
        progress=False,
    )
    return r.attribution


def _methods(ppes: list[int], target: str) -> dict[str, Callable[..., torch.Tensor]]:
    out: dict[str, Callable[..., torch.Tensor]] = {}
    if target == "class":
        for p in ppes:
            out[f"captum ppe={p}"] = lambda m, x, p=p: _captum(m, x, "class", p, "")
    else:
        for p in ppes:
            out[f"captum, hook on layer2, ppe={p}"] = lambda m, x, p=p: _captum(
                m, x, "layer", p, "hook"
            )
        for p in ppes:
            out[f"captum, forward stops at layer2, ppe={p}"] = lambda m, x, p=p: _captum(
                m, x, "layer", p, "trunk"
            )
    out["convlens (incremental, default)"] = lambda m, x: _convlens(m, x, target, "incremental")
    out["convlens method=naive"] = lambda m, x: _convlens(m, x, target, "naive")
    out["convlens approximate=0.5 (NOT exact)"] = lambda m, x: _convlens(
        m, x, target, "incremental", 0.5
    )
    return out


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(target: str, name: str, ppes: list[int], model_name: str) -> None:
    """Run one method once; print its peak resident size above the resident size before."""
    model, x = _setup(model_name)
    with torch.no_grad():
        model(x.unsqueeze(0))  # warm-up: oneDNN and the allocator's first blocks
    fn = _methods(ppes, target)[name]
    try:  # reset the high-water mark (VmHWM) to the current resident size
        Path("/proc/self/clear_refs").write_text("5")
        how = "VmHWM after clear_refs"
    except OSError:
        how = "ru_maxrss (not reset: includes the set-up)"
    before = _status_mib("VmRSS")
    t = time.perf_counter()
    fn(model, x)
    seconds = time.perf_counter() - t
    if how.startswith("VmHWM"):
        peak = _status_mib("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"before_mib": before, "peak_mib": peak, "seconds": seconds, "how": how}))


def _memory(target: str, name: str, ppes: list[int], model_name: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", target, name, "--ppe", ",".join(map(str, ppes))]
    cmd += ["--model", model_name]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    data = json.loads(done.stdout.strip().splitlines()[-1])
    data["extra_mib"] = data["peak_mib"] - data["before_mib"]
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ppe", default="1,4,16,64", help="Captum's perturbations_per_eval")
    ap.add_argument("--layer-ppe", default="16,64", help="the same for the layer target")
    ap.add_argument("--targets", default="class,layer")
    ap.add_argument(
        "--model",
        choices=MODELS,
        default="resnet18",
        help="random-init model; efficientnet_lite0 (timm's TF-'same' convs) has the class target only",
    )
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("TARGET", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], [int(p) for p in args.ppe.split(",")], args.model)
        return
    if args.model != "resnet18" and args.targets != "class":
        ap.error(f"--model {args.model}: only --targets class (the layer target is resnet18's)")

    import captum

    model, x = _setup(args.model)
    load_start = os.getloadavg()
    print(
        f"{args.model} (random init), 1x3x224x224, window {WINDOW} stride {STRIDE} (169 windows), "
        f"CPU {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"captum {captum.__version__}, load average {load_start[0]:.2f}"
    )
    report: dict[str, Any] = {
        "model": f"{args.model} (random init, seed 0)",
        "input": f"sample image, {args.model} preprocessing, 3x224x224",
        "window": WINDOW,
        "stride": STRIDE,
        "class": CLASS,
        "layer_target": f"{LAYER}:{CHANNEL}",
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "captum": captum.__version__,
        "versions": versions(),
        "rounds": args.rounds,
        "load_average_start": load_start,
        "targets": {},
    }
    for target in args.targets.split(","):
        ppes = [int(p) for p in (args.ppe if target == "class" else args.layer_ppe).split(",")]
        methods = _methods(ppes, target)
        outputs = {name: fn(model, x) for name, fn in methods.items()}  # warm-up, numbers
        reference = outputs.get("captum ppe=1")
        if reference is None:  # Captum's plainest run: one window per forward
            reference = _captum(model, x, target, 1, "trunk")
        diffs = {k: float((v - reference).abs().max()) for k, v in outputs.items()}
        times: dict[str, list[float]] = {k: [] for k in methods}
        for r in range(args.rounds):
            for name, fn in methods.items():
                t = time.perf_counter()
                fn(model, x)
                times[name].append(time.perf_counter() - t)
            print(f"  {target} round {r + 1}/{args.rounds} done")
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {}
        if not args.skip_memory:
            for name in methods:
                mem[name] = _memory(target, name, ppes, args.model)
        best = min((v, k) for k, v in med.items() if k.startswith("captum"))
        print(f"\n{target} target: median of {args.rounds} rounds; speed-up vs {best[1]}")
        print(f"{'method':<44} {'seconds':>8} {'speed-up':>9} {'peak +MiB':>10} {'max |diff|':>11}")
        for name in methods:
            extra = f"{mem[name]['extra_mib']:.0f}" if name in mem else "-"
            print(
                f"{name:<44} {med[name]:>8.2f} {best[0] / med[name]:>8.2f}x {extra:>10} "
                f"{diffs[name]:>11.2e}"
            )
        report["targets"][target] = {
            "captum_ppe": ppes,
            "reference": "captum ppe=1",
            "reference_max_abs": float(reference.abs().max()),
            "seconds": times,
            "median_s": med,
            "best_captum": best[1],
            "speedup_vs_best_captum": {k: best[0] / v for k, v in med.items()},
            "max_abs_diff": diffs,
            "memory": mem,
        }
    report["load_average_end"] = os.getloadavg()
    print(f"load average at the end {report['load_average_end'][0]:.2f}")
    stem = "sensitivity" if args.model == "resnet18" else f"sensitivity_{args.model}"
    path = write_json(args.out / f"{stem}.json", report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
