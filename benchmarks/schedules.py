"""Which optimisation schedule reaches a render's objective in the fewest steps.

Each model renders ``--channels`` channels of a layer (channel k on image k, 128 px,
Lucid's transforms, seed 0) with Lucid's constant 0.05 for 256 steps in float32 (the
reference: what convlens did before the cosine default), then with each candidate
schedule for its own step budget (a schedule is planned for its budget, so every budget is
its own run) in ``--precision``. Reported: the mean objective (measured in float32 on the
final images, no transforms) at each threshold, and each candidate's final mean against the
reference's 256-step mean. Steps, not seconds, so a busy machine does not change the
answer.

    python benchmarks/schedules.py                       # the four models, the candidates
    python benchmarks/schedules.py --models efficientnet_lite0 --candidates cosine,constant-0.1

Models: ``efficientnet_lite0`` (pretrained, offline) ``blocks.4``; ``resnet18`` (random
init) ``layer3``; ``inceptionv1`` (random init) ``mixed4a``; ``simple_cnn`` (random init)
``bn3``. Results: ``results/schedules.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import convlens
from convlens._io import versions, write_json
from convlens.analysis.featurevis.render import render
from convlens.analysis.featurevis.schedule import SCHEDULES, Schedule

HERE = Path(__file__).resolve().parent

MODELS = {
    "efficientnet_lite0": ("blocks.4", "default"),
    "resnet18": ("layer3", None),
    "inceptionv1": ("mixed4a", None),
    "simple_cnn": ("bn3", None),
}

#: name -> (schedule, steps)
CANDIDATES: dict[str, tuple[Schedule, int]] = {
    "constant-0.05-96": (SCHEDULES["constant"], 96),
    "constant-0.1-96": (Schedule("constant-0.1", lr=0.1), 96),
    "constant-0.2-96": (Schedule("constant-0.2", lr=0.2), 96),
    "cosine-default-momentum-0.1-96": (
        Schedule("cos-0.1", lr=0.1, warmup=0.1, decay="cosine", final=0.05),
        96,
    ),
    "constant-0.1-betas-0.5-0.9-96": (Schedule("b", lr=0.1, betas=(0.5, 0.9)), 96),
    "cosine-0.2-96": (
        Schedule("c2", lr=0.2, warmup=0.05, decay="cosine", final=0.1, betas=(0.5, 0.9)),
        96,
    ),
    "cosine-64": (SCHEDULES["cosine"], 64),
    "cosine-96": (SCHEDULES["cosine"], 96),
    "cosine-128": (SCHEDULES["cosine"], 128),
}


def _load(name: str) -> Any:
    layer, weights = MODELS[name]
    if name == "simple_cnn":
        return convlens.load_model("simple_cnn", weights=None), layer
    return convlens.load_model(name, weights=weights), layer


def _run(model: Any, objective: str, schedule: Schedule, steps: int, precision: str) -> dict:
    ths = [t for t in (32, 64, 96, 128, 192, 256) if t <= steps]
    t0 = time.perf_counter()
    r = render(
        model,
        objective,
        size=128,
        steps=steps,
        schedule=schedule,
        precision=precision,
        thresholds=ths,
        seed=0,
        progress=False,
    )
    return {
        "steps": steps,
        "thresholds": list(r.thresholds),
        "mean": [round(float(v.mean()), 4) for v in r.values],
        "final": [round(float(v), 4) for v in r.final_values],
        "schedule": r.settings["schedule"],
        "precision": r.settings["precision"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--precision", default="bfloat16")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    doc: dict[str, Any] = {"benchmark": "schedules", "versions": versions(), "models": {}}
    for name in args.models.split(","):
        model, layer = _load(name)
        objective = f"{layer}:0-{args.channels - 1}"
        ref = _run(model, objective, SCHEDULES["constant"], 256, "float32")
        print(f"{name} {objective}: constant 0.05, 256 steps, float32: {ref['mean']}", flush=True)
        rows: dict[str, Any] = {"reference": ref}
        for cand in args.candidates.split(","):
            schedule, steps = CANDIDATES[cand]
            got = _run(model, objective, schedule, steps, args.precision)
            got["against_reference"] = round(got["mean"][-1] / ref["mean"][-1], 3)
            rows[cand] = got
            print(f"  {cand}: {got['mean']} ({got['against_reference']:.3f} of it)", flush=True)
        doc["models"][name] = rows
        write_json(args.out / "schedules.json", doc)  # after every model
    print(f"wrote {args.out / 'schedules.json'}")


if __name__ == "__main__":
    main()
