"""Training speed on the real Imagenette: the course's pipeline vs convlens, in one run.

Uses ``../shared/data/imagenette2-224.tar`` (extracted once under $CONVLENS_HOME), the
same 224 px files for both pipelines. Stages:

  a  the data pipeline alone, images/s: PIL decode + transforms in 2 DataLoader workers
     (the course) vs convlens's decoded cache + batch augmentation (cache build timed apart)
  b  one epoch of the course's exact recipe (SimpleCNN, Adam 1e-3, batch 64,
     RandomResizedCrop(128) + flip), seconds, both pipelines
  c  time to accuracy: the ``fast`` recipe (and, with --course-epochs, the course recipe on
     the convlens pipeline), validation accuracy against wall time including one
     validation pass; writes time_to_accuracy.png

    python benchmarks/train_pipeline.py --stages a,b,c [--fast-epochs 4,6,10] [--course-epochs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).parent / "results"

# The course's own pipeline, measured on this 2-core machine (issue 3): 8 epochs of
# 148 s training + 27 s validation each, 23.4 min; validation accuracy by epoch.
COURSE_MEASURED = {
    "epoch_train_s": 148.0,
    "epoch_val_s": 27.0,
    "val_accuracy": [0.459, 0.379, 0.526, 0.537, 0.485, 0.583, 0.578, 0.539],
}


def _data():
    from convlens.data import imagenette

    tar = SHARED / "imagenette2-224.tar"
    if not tar.exists():
        raise SystemExit(f"skipped: {tar} not found (the benchmark needs ../shared/data)")
    return imagenette(tar, progress=False)


def _course_loader(ds, batch_size=64, workers=2, seed=0):
    from convlens.data.loader import epoch_generator

    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=epoch_generator(seed, 0),
    )


def stage_a(train, n_batches: int) -> dict:
    from convlens.data import BatchLoader, decode_cache

    t = time.perf_counter()
    cache = decode_cache(train, progress=False)
    build_s = time.perf_counter() - t  # 0 when the cache exists: rerun with an empty home
    out = {"cache_build_s": build_s, "cache_images": len(cache)}

    def rate(batches):
        t0 = time.perf_counter()
        n = 0
        for i, (x, _) in enumerate(batches):
            n += x.shape[0]
            if i + 1 >= n_batches:
                break
        return n / (time.perf_counter() - t0)

    out["course_images_per_s"] = rate(iter(_course_loader(train)))
    out["convlens_images_per_s"] = rate(
        iter(BatchLoader(cache, train.spec, batch_size=64, train=True))
    )
    out["ratio"] = out["convlens_images_per_s"] / out["course_images_per_s"]
    return out


def stage_b(train, val) -> dict:
    """One epoch of the course's recipe, three ways: the course's pipeline exactly (PIL in 2
    workers, NCHW), the convlens cache with NCHW (the pipeline alone), and convlens's
    default (cache + channels-last)."""
    from convlens.models.zoo import build_architecture
    from convlens.train import train as fit

    runs = {
        "course": {"pipeline": "course", "channels_last": False},
        "convlens_nchw": {"pipeline": "fast", "channels_last": False},
        "convlens": {"pipeline": "fast", "channels_last": True},
    }
    out: dict = {}
    for name, kw in runs.items():
        model = build_architecture("simple_cnn", 10, seed=0)
        r = fit(model, train, val, epochs=1, device="cpu", progress=False, **kw)
        h = r.history[0]
        out[name] = {
            "train_s": h["seconds"],
            "val_s": h["val_seconds"],
            "val_accuracy": h["val_accuracy"],
        }
        print(name, out[name], flush=True)
    base = out["course"]
    for name in ("convlens_nchw", "convlens"):
        out[f"speedup_train_epoch_{name}"] = base["train_s"] / out[name]["train_s"]
        out[f"speedup_with_val_{name}"] = (base["train_s"] + base["val_s"]) / (
            out[name]["train_s"] + out[name]["val_s"]
        )
    return out


def _run(recipe: str, epochs: int | None, train, val, every: bool) -> dict:
    from convlens.models.zoo import build_architecture
    from convlens.train import train as fit

    model = build_architecture("simple_cnn", 10, seed=0)
    r = fit(
        model,
        train,
        val,
        recipe=recipe,
        epochs=epochs,
        validate="every" if every else "last",
        device="cpu",
        progress=False,
    )
    points = []
    elapsed = 0.0
    for h in r.history:
        elapsed += h["seconds"]
        if h.get("val_accuracy") is None:
            continue
        # wall time had training stopped here: training so far + one validation pass
        points.append(
            {
                "epoch": h["epoch"],
                "minutes": (elapsed + h["val_seconds"]) / 60,
                "val_accuracy": h["val_accuracy"],
                "crop": h["crop"],
            }
        )
        print(recipe, epochs, points[-1], flush=True)
    return {
        "epochs": len(r.history),
        "points": points,
        "train_s": elapsed,
        "final_accuracy": r.val_accuracy,
    }


def stage_c(train, val, fast_epochs: list[int], course_epochs: int) -> dict:
    # Each budget is its own run: a one-cycle schedule is planned for its length.
    out: dict = {"fast": [_run("fast", e, train, val, every=False) for e in fast_epochs]}
    if course_epochs:
        out["course_on_convlens"] = _run("course", course_epochs, train, val, every=True)
    return out


def figure(results: dict, path: Path) -> None:
    from convlens.plot import save_figure
    from convlens.plot._base import new_figure

    fig = new_figure(7.5, 4.5)
    ax = fig.subplots()
    m = COURSE_MEASURED
    xs = [
        (i + 1) * (m["epoch_train_s"]) / 60 + m["epoch_val_s"] / 60
        for i in range(len(m["val_accuracy"]))
    ]
    ax.plot(
        xs,
        [100 * a for a in m["val_accuracy"]],
        "o-",
        color="#888",
        label="course recipe, course pipeline (measured, issue 3)",
    )
    c = results.get("c", {})
    if "course_on_convlens" in c:
        pts = c["course_on_convlens"]["points"]
        ax.plot(
            [p["minutes"] for p in pts],
            [100 * p["val_accuracy"] for p in pts],
            "s-",
            color="#2b6cb0",
            label="course recipe, convlens pipeline" + c["course_on_convlens"].get("label", ""),
        )
    if c.get("fast"):
        runs = sorted(c["fast"], key=lambda r: r["epochs"])
        ax.plot(
            [r["points"][-1]["minutes"] for r in runs],
            [100 * r["points"][-1]["val_accuracy"] for r in runs],
            "^-",
            color="#dd6b20",
            label="fast recipe, convlens pipeline (one run per budget: "
            + ", ".join(str(r["epochs"]) for r in runs)
            + " epochs)",
        )
    ax.axhline(58, color="#aaa", lw=0.8, ls="--")
    ax.axhline(70, color="#aaa", lw=0.8, ls=":")
    ax.axvline(23.4 / 6, color="#c53030", lw=0.8, ls="--", label="1/6 of 23.4 min")
    ax.axvline(23.4 / 3, color="#c53030", lw=0.8, ls=":", label="1/3 of 23.4 min")
    ax.set_xlabel("wall time, minutes (training + one validation pass)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("SimpleCNN on Imagenette, 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="a,b,c")
    ap.add_argument("--batches", type=int, default=40, help="batches timed in stage a")
    ap.add_argument(
        "--fast-epochs",
        default="4,6,10",
        help="epoch budgets of the fast recipe, one run each (stage c)",
    )
    ap.add_argument(
        "--course-epochs",
        type=int,
        default=0,
        help="also run the course recipe on the convlens pipeline (stage c)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.manual_seed(0)
    train, val = _data()
    stages = set(args.stages.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "train_pipeline.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if "a" in stages:
        results["a"] = stage_a(train, args.batches)
        print("a", results["a"], flush=True)
    if "b" in stages:
        results["b"] = stage_b(train, val)
        print("b", {k: v for k, v in results["b"].items() if "speedup" in k}, flush=True)
    if "c" in stages:
        budgets = [int(e) for e in args.fast_epochs.split(",") if e]
        results["c"] = stage_c(train, val, budgets, args.course_epochs)
    path.write_text(json.dumps(results, indent=2))
    figure(results, args.out / "time_to_accuracy.png")
    print(f"wrote {path} and {args.out / 'time_to_accuracy.png'}")


if __name__ == "__main__":
    main()
