"""The microscope's diversity images against their channel render, for several diversity
weights.

A few channels of the pretrained ``efficientnet_lite0`` ``blocks.4``, rendered by the
microscope's own code (``convlens.microscope._render_batch``: the channel row and
``--diversity`` diversity rows per channel, Lucid's transforms, Adam at 0.05, seed 0,
BatchNorms folded) at ``--size`` px for ``--steps`` steps, once per weight in
``--weights``. For every weight:

* **ratio**: each diversity image's objective (the channel's mean activation on the final
  image, no diversity term) divided by its channel render's, averaged over the images
  and channels (also the lowest);
* **gram distance**: the mean pairwise cosine distance (1 - cosine similarity) of the
  diversity images' Gram vectors at the layer (what Lucid's diversity term pushes apart),
  averaged over channels;
* **pixel distance**: the mean pairwise cosine distance of the diversity images' pixels
  (each image minus its mean colour).

A weight of 0 is the floor: the images differ only by their random starts.

    python benchmarks/diversity.py [--channels 0,28,56,84] [--weights 0,1,3,10,30,100]
        [--size 128] [--steps 64] [--diversity 4] [--threads 1]

Results: ``results/diversity.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import convlens  # noqa: E402
from convlens._io import versions, write_json  # noqa: E402

LAYER = "blocks.4"


def _pairwise_distance(v: torch.Tensor) -> float:
    """Mean pairwise cosine distance of the rows of ``v`` ``[n, d]``."""
    v = F.normalize(v.double().flatten(1), dim=1)
    sim = v @ v.T
    n = v.shape[0]
    off = (sim.sum() - sim.diagonal().sum()) / (n * (n - 1))
    return float(1 - off)


def _run(net: Any, bundle: Any, args: argparse.Namespace, weight: float) -> dict[str, Any]:
    from convlens.analysis.featurevis.objectives import Objective, channel
    from convlens.analysis.featurevis.render import _fold_checked, _Forward, _frozen
    from convlens.microscope import _plan, _render_batch
    from convlens.models.layers import evaluating

    chans = [int(c) for c in args.channels.split(",")]
    d = args.diversity
    plan = _plan(net, bundle, args.size, args.steps, 0.05, 0, d, diversity_weight=weight)
    rows = [("channel", 0)] + [("diversity", j) for j in range(d)]
    dev = torch.device("cpu")
    t0 = time.perf_counter()
    with evaluating(net), _frozen(net):
        probe = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        run, _ = _fold_checked(net, channel(LAYER, chans[0]), plan.pipe(probe), True)
        images, values, _ = _render_batch(run, LAYER, chans, plan, dev, rows=rows)
        fwd = _Forward(run, Objective(lambda a: a(LAYER), [LAYER]))
        with fwd.hooked(False), torch.no_grad():
            acts = fwd(plan.pipe(images), images)(LAYER).float()
    seconds = time.perf_counter() - t0
    per = len(rows)
    out: dict[str, Any] = {"weight": weight, "seconds": round(seconds, 1), "channels": []}
    ratios, grams, pixels = [], [], []
    for u, c in enumerate(chans):
        v = values[u * per : (u + 1) * per]
        rel = [float(x) / float(v[0]) for x in v[1:]]
        a = acts[u * per + 1 : (u + 1) * per]
        flat = a.flatten(2)
        gram = (flat @ flat.transpose(-1, -2)).flatten(1)
        img = images[u * per + 1 : (u + 1) * per]
        img = img - img.mean(dim=(2, 3), keepdim=True)
        gd, pd = _pairwise_distance(gram), _pairwise_distance(img)
        out["channels"].append(
            {
                "channel": c,
                "channel_value": float(v[0]),
                "diversity_values": [float(x) for x in v[1:]],
                "ratios": rel,
                "gram_distance": gd,
                "pixel_distance": pd,
            }
        )
        ratios += rel
        grams.append(gd)
        pixels.append(pd)
    out["mean_ratio"] = sum(ratios) / len(ratios)
    out["min_ratio"] = min(ratios)
    out["gram_distance"] = sum(grams) / len(grams)
    out["pixel_distance"] = sum(pixels) / len(pixels)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", default="0,28,56,84")
    p.add_argument("--weights", default="0,1,3,10,30,100")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--diversity", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "diversity.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bundle = convlens.load_model("efficientnet_lite0")
    net = bundle.model
    rows = []
    print(
        f"{LAYER} channels {args.channels}, {args.size} px, {args.steps} steps, "
        f"{args.diversity} diversity images, {args.threads} thread(s)"
    )
    print(f"{'weight':>8} {'mean ratio':>10} {'min ratio':>9} {'gram dist':>9} {'pixel dist':>10}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for w in (float(s) for s in args.weights.split(",")):
        r = _run(net, bundle, args, w)
        rows.append(r)
        print(
            f"{w:>8g} {r['mean_ratio']:>10.3f} {r['min_ratio']:>9.3f} "
            f"{r['gram_distance']:>9.4f} {r['pixel_distance']:>10.4f}  ({r['seconds']} s)",
            flush=True,
        )
        doc = {  # written after every weight: an interrupted run keeps what it measured
            "layer": LAYER,
            "model": "efficientnet_lite0 (pretrained)",
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": rows,
            "versions": versions(),
        }
        write_json(Path(args.out), doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
