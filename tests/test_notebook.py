"""Results in Jupyter: every result type's ``_repr_html_`` carries its key numbers and an
embedded PNG, escapes hostile names, and its ``__repr__`` is one line."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "analysis"))
from _examples_fixtures import tiny_data, tiny_model

import convlens
from convlens import _notebook
from convlens.analysis.attribution import Attribution, Faithfulness, Sanity
from convlens.analysis.depth import DepthMaps
from convlens.analysis.examples import dataset_examples
from convlens.analysis.featurevis import RenderResult
from convlens.analysis.filters import selectivity
from convlens.analysis.sensitivity import SensitivityResult
from convlens.train import EvalResult, TrainConfig, TrainResult

EVIL = "<script>alert(1)</script>"


def _pngs(html: str) -> list[Image.Image]:
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html):
        out.append(Image.open(io.BytesIO(base64.b64decode(b64))))
    return out


def _render() -> RenderResult:
    g = torch.Generator().manual_seed(0)
    return RenderResult(
        images=torch.rand(2, 3, 16, 16, generator=g),
        values=torch.tensor([[1.0, 2.0], [3.25, 4.5]]),
        thresholds=(8, 16),
        snapshots=torch.rand(2, 2, 3, 16, 16, generator=g),
        times=(0.5, 1.0),
        trace=torch.zeros(16, 2),
        objective=f"{EVIL}:0-1",
        settings={"seed": 7},
        labels=[f"{EVIL}:0", "mixed4a:1"],
    )


def _sensitivity() -> SensitivityResult:
    m = torch.tensor([[0.5, -0.25], [1.75, 0.0]])
    return SensitivityResult(
        map=m,
        attribution=torch.zeros(8, 8),
        score=3.125,
        target="258",
        window=(4, 4),
        stride=(4, 4),
        fill="zero",
        method="incremental",
        exact=True,
        ys=(0, 4),
        xs=(0, 4),
        input=torch.rand(3, 8, 8),
        target_label=EVIL,
    )


def _occlusion() -> Any:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    model.eval()
    torch.manual_seed(0)
    r = convlens.occlude(model, torch.rand(3, 16, 16), box=(4, 8, 4, 8), layers=["0", "2"])
    evil = {EVIL: r.layers["0"], "2": r.layers["2"]}
    return dataclasses.replace(r, layers=evil, model_name=EVIL)


def _attribution() -> Attribution:
    m = torch.zeros(2, 8, 8)
    m[0, 2, 3], m[1, 5, 5] = 2.0, -1.0
    return Attribution(
        map=m,
        score=torch.tensor([4.5, 0.875]),
        target=("258", "3"),
        method="integrated_gradients",
        input=torch.rand(2, 3, 8, 8),
        delta=torch.tensor([0.0125, -0.5]),
        steps=32,
        labels=(EVIL, None),
    )


def _sanity() -> Sanity:
    return Sanity(
        units=("fc", EVIL),
        cascade=True,
        methods=("saliency",),
        correlation={"saliency": torch.tensor([[0.5], [0.25]])},
        abs_correlation={"saliency": torch.tensor([[0.625], [0.375]])},
        maps={"saliency": torch.randn(3, 1, 8, 8)},
        target=("258",),
    )


def _faithfulness() -> Faithfulness:
    return Faithfulness(
        metric="deletion",
        curves=torch.tensor([[1.0, 0.5, 0.0]]),
        auc=torch.tensor([0.3125]),
        random_curves=torch.tensor([[1.0, 0.9, 0.8]]),
        random_auc=torch.tensor([0.8125]),
        fractions=torch.tensor([0.0, 0.5, 1.0]),
        target=(EVIL,),
        method="saliency",
    )


def _examples() -> Any:
    r = dataset_examples(tiny_model(), tiny_data(), ["conv2"], k=2, batch_size=8, progress=False)
    return dataclasses.replace(r, classes=[EVIL, "b", "c"], dataset=EVIL)


def _eval() -> EvalResult:
    return EvalResult(
        accuracy=0.8125,
        loss=0.4375,
        per_class_accuracy=[0.75, 0.875],
        confusion=torch.tensor([[3, 1], [1, 7]]),
        predictions=torch.zeros(12, dtype=torch.long),
        labels=torch.zeros(12, dtype=torch.long),
    )


def _train() -> TrainResult:
    return TrainResult(
        model=nn.Conv2d(3, 4, 3),
        history=[
            {"epoch": 1, "train_loss": 1.5, "val_accuracy": 0.5},
            {"epoch": 2, "train_loss": 0.75, "val_accuracy": 0.8125},
        ],
        final=_eval(),
        classes=[EVIL, "square"],
        config=TrainConfig(),
        conv1_before=torch.randn(4, 3, 3, 3),
        conv1_after=torch.randn(4, 3, 3, 3),
        train_seconds=12.5,
        images_per_s=640.0,
    )


def _depth() -> DepthMaps:
    return DepthMaps(
        model=EVIL,
        image=torch.rand(3, 16, 16),
        layers=("bn1", "layer4"),
        maps={"bn1": torch.rand(8, 8), "layer4": torch.rand(2, 2)},
        shapes={"bn1": (64, 8, 8), "layer4": (512, 2, 2)},
        relu=True,
    )


def _selectivity() -> Any:
    t = selectivity()
    return dataclasses.replace(t, images=(EVIL, *t.images[1:]))


# (factory, numbers the page must show, number of PNGs at least)
CASES: dict[str, tuple[Any, list[str], int]] = {
    "render": (_render, ["3.25", "4.5", "16", "7"], 2),
    "sensitivity": (_sensitivity, ["3.125", "1.75", "top 4, left 0", "4x4"], 2),
    "occlusion": (_occlusion, ["inside_fraction", "area_fraction"], 4),
    "attribution": (_attribution, ["4.5", "0.875", "0.0125", "-0.5", "±2"], 4),
    "sanity": (_sanity, ["0.625", "0.375"], 3),
    "faithfulness": (_faithfulness, ["0.3125", "0.8125", "deletion"], 1),
    "examples": (_examples, ["37", "conv2"], 1),
    "eval": (_eval, ["0.8125", "0.4375", "0.75", "0.875"], 1),
    "train": (_train, ["0.8125", "12.5", "640", "0.875"], 4),
    "depth": (_depth, ["64x8x8", "512x2x2"], 3),
    "selectivity": (_selectivity, ["vertical"], 1),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_html_has_numbers_pngs_and_escapes(name: str) -> None:
    make, numbers, n_png = CASES[name]
    r = make()
    page = r._repr_html_()
    for n in numbers:
        assert n in page, (name, n)
    pngs = _pngs(page)
    assert len(pngs) >= n_png
    assert all(p.size[0] > 0 and p.size[1] > 0 for p in pngs)
    assert "<script" not in page
    if name != "eval":  # an EvalResult carries no names
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "\n" not in repr(r) and len(repr(r)) < 400


def test_key_numbers_come_from_the_result() -> None:
    # The occlusion page shows each layer's own fractions, the examples page each
    # channel's own top score.
    r = _occlusion()
    page = r._repr_html_()
    for ch in r.layers.values():
        assert _notebook.num(ch.inside_fraction) in page
        assert _notebook.num(ch.area_fraction) in page
    ex = _examples()
    page = ex._repr_html_()
    for c in ex.channels("conv2"):
        assert _notebook.num(ex.top("conv2", c)[0].score) in page


def test_signed_and_heat_colours() -> None:
    rgb = _notebook.signed(torch.tensor([[-2.0, 0.0, 1.0]]))
    assert rgb[:, 0, 0].tolist() == [0.0, 0.0, 1.0]  # -max: blue
    assert rgb[:, 0, 1].tolist() == [1.0, 1.0, 1.0]  # zero: white
    assert rgb[:, 0, 2].tolist() == [1.0, 0.5, 0.5]  # +max/2: light red
    h = _notebook.heat(torch.tensor([[0.0, 5.0, 10.0]]))
    assert h[:, 0, 0].tolist() == pytest.approx([0.07, 0.04, 0.3])
    assert h[:, 0, 2].tolist() == pytest.approx([0.99, 0.9, 0.15])


def test_png_round_trip_keeps_pixels() -> None:
    x = torch.zeros(3, 2, 2)
    x[0, 0, 0] = 1.0
    uri = _notebook.png_uri(x)
    im = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")
    assert im.getpixel((0, 0)) == (255, 0, 0)
    assert im.getpixel((1, 1)) == (0, 0, 0)


def test_importing_results_does_not_import_matplotlib() -> None:
    import subprocess

    code = (
        "import sys, torch, convlens\n"
        "from convlens.train import EvalResult\n"
        "e = EvalResult(0.5, 1.0, [0.5], torch.ones(1, 1), torch.zeros(1), torch.zeros(1))\n"
        "e._repr_html_()\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_figures_show_as_png_in_ipython() -> None:
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    import convlens.plot
    from convlens.plot._base import show_in_jupyter

    assert show_in_jupyter() is False  # no shell yet
    shell = InteractiveShell.instance()
    try:
        assert show_in_jupyter() is True
        assert show_in_jupyter() is False  # once
        data, _ = shell.display_formatter.format(convlens.plot.kernels())
        assert data["image/png"][:4] == b"\x89PNG"
    finally:
        InteractiveShell.clear_instance()
