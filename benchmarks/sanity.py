"""Adebayo et al.'s sanity check on the pretrained ``efficientnet_lite0`` and the sample photo.

"Sanity Checks for Saliency Maps" (NeurIPS 2018) re-initialises a trained model's layers
from the top down (cascading) and recomputes each map: a map that explains the model must
change with it, and the paper found that the gradient and Grad-CAM do while guided
backpropagation barely does (it stays close to an edge map of the image). This script
runs ``convlens.sanity`` on the offline pretrained model (its weights ship with pip, no
download) for the sample photo's top-1 class, prints the Spearman rank correlation of
each method's map with the original after each randomized unit, and writes the figure
``benchmarks/figures/sanity_lite0.png`` and the numbers to
``benchmarks/results/sanity_lite0.json``.

    python benchmarks/sanity.py [--steps 16] [--device auto]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import convlens
from _machine import cpu_name
from convlens._io import versions, write_json

HERE = Path(__file__).resolve().parent
METHODS = ("saliency", "integrated_gradients", "guided_backprop", "gradcam")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16, help="integrated gradients' steps")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bundle = convlens.load_model("efficientnet_lite0")
    x = bundle.preprocess(convlens.sample_image()).unsqueeze(0)
    top = convlens.classify(bundle, convlens.sample_image(), k=1)[0]
    t0 = time.perf_counter()
    s = convlens.sanity(bundle, x, top.index, methods=METHODS, steps=args.steps, device=args.device)
    seconds = time.perf_counter() - t0
    print(
        f"efficientnet_lite0, top-1 {top.label} ({top.index}), {len(s.units)} units, {seconds:.0f} s"
    )
    header = f"{'randomized through':<22}" + "".join(f"{m[:18]:>20}" for m in s.methods)
    print(header + "   (Spearman of |map| with the original)")
    for k, unit in enumerate(s.units):
        row = "".join(f"{float(s.abs_correlation[m][k, 0]):>20.3f}" for m in s.methods)
        print(f"{unit:<22}{row}")
    print("signed maps:")
    for k, unit in enumerate(s.units):
        row = "".join(f"{float(s.correlation[m][k, 0]):>20.3f}" for m in s.methods)
        print(f"{unit:<22}{row}")
    from convlens.plot import sanity as sanity_figure

    fig = sanity_figure(s)
    (HERE / "figures").mkdir(exist_ok=True)
    fig.savefig(HERE / "figures" / "sanity_lite0.png", dpi=90, bbox_inches="tight")
    write_json(
        HERE / "results" / "sanity_lite0.json",
        {
            "model": bundle.description,
            "target": {"index": top.index, "label": top.label},
            "cpu": cpu_name(),
            "seconds": seconds,
            "sanity": s.to_dict(),
            "versions": versions(),
        },
    )


if __name__ == "__main__":
    main()
