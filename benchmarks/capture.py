"""Capture overhead on resnet18: convlens.capture vs a plain forward vs torchvision's
create_feature_extractor, and stop_early vs a full forward. Median of several rounds,
methods interleaved round by round so drift hits all of them alike. Results as ratios.

    python benchmarks/capture.py [--device auto|cpu|cuda] [--rounds 15] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import convlens
from convlens import capture
from convlens.device import resolve_device

LAYERS = ["layer1", "layer2", "layer3", "layer4"]


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(dev).eval()
    x = torch.randn(args.batch, 3, 224, 224, device=dev)
    extractor = create_feature_extractor(model, return_nodes={n: n for n in LAYERS}).eval()

    def plain() -> object:
        with torch.no_grad():
            return model(x)

    def truncated() -> object:  # the floor for stop_early: resnet18 up to layer2, by hand
        with torch.no_grad():
            h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            return model.layer2(model.layer1(h)).cpu()

    def fx() -> object:
        with torch.no_grad():
            return {k: v.cpu() for k, v in extractor(x).items()}

    methods: dict[str, Callable[[], object]] = {
        "plain forward": plain,
        "capture layer1..4": lambda: capture(model, x, LAYERS),
        "capture layer1..4, stop_early=False": lambda: capture(model, x, LAYERS, stop_early=False),
        "create_feature_extractor layer1..4 (+ .cpu())": fx,
        "capture layer2 (stop_early)": lambda: capture(model, x, ["layer2"]),
        "capture layer2, stop_early=False": lambda: capture(model, x, ["layer2"], stop_early=False),
        "hand-written forward up to layer2 (the floor)": truncated,
    }
    # Same numbers from both ways of capturing.
    with torch.no_grad():
        a, b = capture(model, x, LAYERS), extractor(x)
    max_diff = max(float((a[k] - b[k].cpu()).abs().max()) for k in LAYERS)

    timer = _timer(dev)
    for fn in methods.values():  # warm-up (and the stop_early trace cache)
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            times[name].append(timer(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain forward"]

    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(
        f"resnet18, batch {args.batch}x3x224x224, {dev} ({card}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} rounds"
    )
    print(f"{'method':<48} {'median ms':>10} {'vs plain':>9}")
    for k, v in med.items():
        print(f"{k:<48} {v * 1e3:>10.2f} {v / base:>8.3f}x")
    overhead = med["capture layer1..4"] / base - 1
    speedup = base / med["capture layer2 (stop_early)"]
    print(f"capture overhead vs plain forward: {overhead:+.1%} (target within +5%)")
    floor = base / med["hand-written forward up to layer2 (the floor)"]
    print(
        f"stop_early layer2 speed-up vs full forward: {speedup:.2f}x (target >= 1.5x; "
        f"a hand-truncated forward gives {floor:.2f}x)"
    )
    print(f"max |capture - create_feature_extractor|: {max_diff:.2e}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"capture-{dev.type}.json").write_text(
        json.dumps(
            {
                "device": str(dev),
                "card": card,
                "torch": torch.__version__,
                "convlens": convlens.__version__,
                "batch": args.batch,
                "rounds": args.rounds,
                "median_s": med,
                "overhead": overhead,
                "stop_early_speedup": speedup,
                "truncated_speedup": floor,
                "max_abs_diff_vs_fx": max_diff,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
