"""convlens.plot: every figure function on tiny inputs, shared colour scales, saving."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import convlens
import convlens.plot as cplot
from convlens.analysis.filters import KERNELS, filter_responses, test_images
from convlens.models import SimpleCNN

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    """Plot functions must build figures without pyplot (no global figure registry)."""
    plt.close("all")
    yield
    assert plt.get_fignums() == []


@pytest.fixture(scope="module")
def model() -> SimpleCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = SimpleCNN()
    return m.eval()


@pytest.fixture(scope="module")
def x32() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def acts(model: SimpleCNN, x32: torch.Tensor) -> dict[str, torch.Tensor]:
    return convlens.capture(model, x32, ["bn1", "bn3"])


@pytest.fixture(scope="module")
def occ(model: SimpleCNN, x32: torch.Tensor):
    return convlens.occlude(model, x32[0], (8, 20, 10, 24), ["bn1", "bn3"])


def _image_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.images]


def _colorbars(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


# ---------------------------------------------------------------- channels


def test_channels_panels_show_each_channel() -> None:
    img = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(2))
    fig = cplot.channels(img, title="tiny")
    assert isinstance(fig, Figure)
    axes = _image_axes(fig)
    assert len(axes) == 4
    assert len(_colorbars(fig)) == 3
    np.testing.assert_allclose(axes[0].images[0].get_array(), img.permute(1, 2, 0).numpy())
    for c, ax in enumerate(axes[1:]):
        im = ax.images[0]
        np.testing.assert_allclose(im.get_array(), img[c].numpy())
        assert im.get_clim() == (0.0, 1.0)
    assert "[3, 6, 5]" in axes[0].get_title()
    assert fig._suptitle is not None and fig._suptitle.get_text() == "tiny"


@pytest.mark.parametrize(
    "bad",
    [torch.rand(6, 5), torch.rand(1, 6, 5), torch.rand(4, 6, 5), torch.rand(1, 3, 6, 5)],
    ids=["HW", "1HW", "4HW", "batch"],
)
def test_channels_rejects_non_rgb(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        cplot.channels(bad)


def test_channels_rejects_numpy() -> None:
    with pytest.raises(ValueError):
        cplot.channels(np.zeros((3, 4, 4), dtype=np.float32))  # type: ignore[arg-type]


# ---------------------------------------------------------------- filters


def test_filter_grid_default_is_course_grid_with_shared_symmetric_scale() -> None:
    fig = cplot.filter_grid()
    assert isinstance(fig, Figure)
    axes = _image_axes(fig)
    assert len(axes) == 8  # 2 images x (input + 3 kernels)
    assert len(_colorbars(fig)) == 1
    assert len(fig.axes) == 9
    imgs = test_images()
    resp = filter_responses(
        {k: imgs[k] for k in ("vertical_edge", "diagonal_line")},
        {k: KERNELS[k] for k in ("vertical", "horizontal", "diagonal")},
    )
    v = float(resp.abs().max())
    assert v == 6.0  # the diagonal kernel on the diagonal line
    inputs = [ax for ax in axes if ax.get_title().startswith("input:")]
    responses = [ax for ax in axes if not ax.get_title().startswith("input:")]
    assert [ax.get_title() for ax in inputs] == ["input: vertical_edge", "input: diagonal_line"]
    assert len(responses) == 6
    for ax in responses:
        assert ax.images[0].get_clim() == (-v, v)
    # Panels hold the actual responses, in row-major order.
    for ax, r in zip(responses, resp.flatten(0, 1)):
        np.testing.assert_array_equal(ax.images[0].get_array(), r.numpy())
    # 10x10 images are annotated: one label per non-zero response cell.
    for ax, r in zip(responses, resp.flatten(0, 1)):
        assert len(ax.texts) == int((r != 0).sum())


def test_filter_grid_all_images_and_kernels_share_one_scale() -> None:
    imgs = test_images()
    fig = cplot.filter_grid(imgs, KERNELS, annotate=False)
    axes = _image_axes(fig)
    assert len(axes) == len(imgs) * (len(KERNELS) + 1)
    v = float(filter_responses(imgs, KERNELS).abs().max())
    clims = {ax.images[0].get_clim() for ax in axes if not ax.get_title().startswith("input:")}
    assert clims == {(-v, v)}
    assert all(not ax.texts for ax in axes)


def test_filter_grid_custom_inputs() -> None:
    img = torch.zeros(5, 5)
    img[2, 2] = 1.0
    k = torch.tensor([[0.0, 0.0, 0.0], [0.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    fig = cplot.filter_grid({"dot": img}, {"neg": k})
    axes = _image_axes(fig)
    assert len(axes) == 2
    assert axes[1].images[0].get_clim() == (-2.0, 2.0)  # symmetric even for a negative peak


def test_kernels_figure() -> None:
    fig = cplot.kernels()
    axes = _image_axes(fig)
    assert len(axes) == len(KERNELS)
    assert [ax.get_title() for ax in axes] == list(KERNELS)
    vmax = max(float(k.abs().max()) for k in KERNELS.values())
    for ax, k in zip(axes, KERNELS.values()):
        assert ax.images[0].get_clim() == (-vmax, vmax)
        assert len(ax.texts) == k.numel()  # every weight is written
    one = cplot.kernels({"vertical": KERNELS["vertical"]})
    assert len(_image_axes(one)) == 1
    assert [t.get_text() for t in _image_axes(one)[0].texts][:3] == ["-1", "0", "1"]


# ---------------------------------------------------------------- activations


def test_mean_maps(acts: dict[str, torch.Tensor]) -> None:
    fig = cplot.mean_maps(acts, relu={"bn1": True})
    axes = _image_axes(fig)
    assert len(axes) == 2
    assert len(_colorbars(fig)) == 2
    np.testing.assert_allclose(
        axes[0].images[0].get_array(), acts["bn1"][0].clamp(min=0).mean(0).numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(
        axes[1].images[0].get_array(), acts["bn3"][0].mean(0).numpy(), rtol=1e-5, atol=1e-7
    )
    assert "(ReLU)" in axes[0].get_title() and "16 ch, 32x32" in axes[0].get_title()
    assert "(ReLU)" not in axes[1].get_title() and "64 ch, 8x8" in axes[1].get_title()


def test_mean_maps_bad_input() -> None:
    with pytest.raises(ValueError, match="no activations"):
        cplot.mean_maps({})
    with pytest.raises(ValueError, match="batch of 2"):
        cplot.mean_maps({"a": torch.rand(2, 4, 5, 5)})
    with pytest.raises(ValueError, match=r"fc.*\[C, H, W\]"):
        cplot.mean_maps({"fc": torch.rand(1, 10)})


@pytest.mark.parametrize("max_maps, shown", [(64, 16), (10, 10), (1, 1)])
def test_feature_maps_count(acts: dict[str, torch.Tensor], max_maps: int, shown: int) -> None:
    fig = cplot.feature_maps(acts["bn1"], title="bn1", max_maps=max_maps)
    axes = _image_axes(fig)
    assert len(axes) == shown == min(16, max_maps)
    assert [ax.get_title() for ax in axes] == [str(i) for i in range(shown)]
    for ax in axes:
        assert ax.images[0].get_clim() == (0.0, 1.0)
    # Each map is scaled to its own range.
    arr = np.asarray(axes[0].images[0].get_array())
    assert arr.min() == pytest.approx(0.0) and arr.max() == pytest.approx(1.0)
    suptitle = fig._suptitle.get_text()
    assert suptitle.startswith("bn1: ")
    assert (f"{shown} of 16" in suptitle) if shown < 16 else ("all 16" in suptitle)


def test_feature_maps_accepts_chw_and_rejects_bad_shapes(acts: dict[str, torch.Tensor]) -> None:
    fig = cplot.feature_maps(acts["bn3"][0], max_maps=64)
    assert len(_image_axes(fig)) == 64
    with pytest.raises(ValueError, match="batch of 2"):
        cplot.feature_maps(torch.rand(2, 4, 5, 5))
    with pytest.raises(ValueError):
        cplot.feature_maps(torch.rand(1, 10))
    with pytest.raises(ValueError):
        cplot.feature_maps(torch.rand(5, 5))


def test_channel_stats(acts: dict[str, torch.Tensor]) -> None:
    act = acts["bn1"]
    stats = convlens.channel_stats(act[0])
    for src in (stats, act):
        fig = cplot.channel_stats(src, title="bn1")
        assert isinstance(fig, Figure)
        ax1, ax2 = fig.axes
        assert ax1.get_title() == "bn1"
        assert len(ax1.patches) == 2 * 16  # max bars and mean bars
        assert len(ax2.patches) == 16
        means = [p.get_height() for p in ax1.patches[16:]]
        np.testing.assert_allclose(means, stats.mean.numpy(), rtol=1e-6, atol=1e-7)
        active = [p.get_height() for p in ax2.patches]
        np.testing.assert_allclose(active, stats.fraction_active.numpy(), rtol=1e-6)
    with pytest.raises(ValueError):
        cplot.channel_stats(torch.rand(3, 1, 4, 4))


# ---------------------------------------------------------------- occlusion


def test_occlusion_two_layers_four_panels(occ) -> None:
    fig = cplot.occlusion(occ)
    axes = _image_axes(fig)
    assert len(axes) == 4
    assert len(_colorbars(fig)) == 2
    orig, occluded = occ.display_images()
    np.testing.assert_allclose(axes[0].images[0].get_array(), orig.permute(1, 2, 0).numpy())
    np.testing.assert_allclose(axes[1].images[0].get_array(), occluded.permute(1, 2, 0).numpy())
    for ax, name in zip(axes[2:], ["bn1", "bn3"]):
        np.testing.assert_array_equal(ax.images[0].get_array(), occ.layers[name].diff.numpy())
        assert ax.get_title().startswith(f"{name} |change|")
        assert len(ax.patches) == 1  # the box outline
    # The outline on the input sits on the box (top, bottom, left, right) = (8, 20, 10, 24).
    rect = axes[0].patches[0]
    assert rect.get_xy() == (10 - 0.5, 8 - 0.5)
    assert (rect.get_width(), rect.get_height()) == (14, 12)


def test_occlusion_layer_subset_and_unknown(occ) -> None:
    assert len(_image_axes(cplot.occlusion(occ, ["bn3"]))) == 3
    with pytest.raises(ValueError, match="layer9"):
        cplot.occlusion(occ, ["bn1", "layer9"])


# ---------------------------------------------------------------- saving


def test_save_figure_writes_png_atomically(tmp_path) -> None:
    out = tmp_path / "figs"
    fig = cplot.kernels()
    path = cplot.save_figure(fig, out / "kernels.png")
    assert path == out / "kernels.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width > 50 and im.height > 50
    assert sorted(p.name for p in out.iterdir()) == ["kernels.png"]  # no temp files left
    # Overwriting keeps a single file.
    cplot.save_figure(cplot.channels(torch.rand(3, 4, 4)), path)
    assert sorted(p.name for p in out.iterdir()) == ["kernels.png"]
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_save_figure_failure_leaves_no_temp_and_keeps_old_file(tmp_path) -> None:
    target = tmp_path / "fig.notaformat"
    target.write_bytes(b"old")
    with pytest.raises(ValueError):
        cplot.save_figure(cplot.kernels(), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.notaformat"]


def test_microscope_grid_reads_a_site(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "analysis"))
    from _examples_fixtures import tiny_data, tiny_model

    import convlens
    from convlens.plot import microscope_grid

    site = convlens.microscope(
        tiny_model(),
        tiny_data(n=9),
        ["conv2"],
        out=tmp_path / "s",
        channels="0-3",
        k=2,
        steps=2,
        size=16,
        diversity=0,
        progress=False,
    )
    fig = microscope_grid(site, max_channels=3, examples=2)
    axes = fig.get_axes()
    assert len(axes) == 3 * 3
    assert sum(1 for ax in axes if ax.images) == 9  # a render and 2 crops per row
    from matplotlib.colors import to_hex

    doc = json.loads((site / "microscope.json").read_text())
    for r, u in enumerate(doc["layers"][0]["units"][:3]):  # the ratio to the top example
        check = u["render_vs_dataset"]
        want = f"ch {u['channel']}: render"
        want += "" if check["ratio"] is None else f" ×{check['ratio']:.2f}"
        want += " (below top)" if check["below"] else ""
        assert axes[3 * r].get_title() == want
        framed = to_hex(axes[3 * r].spines["left"].get_edgecolor()) == "#c2410c"
        assert framed == check["below"]
    with pytest.raises(KeyError, match="conv2"):
        microscope_grid(site, "conv9")
    with pytest.raises(FileNotFoundError, match="convlens microscope"):
        microscope_grid(tmp_path / "nothing")


def test_atlas_grid_places_each_icon_at_its_cell_faded_by_count(tmp_path):
    import math

    import numpy as np
    from PIL import Image

    from convlens.plot import atlas_grid

    (tmp_path / "icons").mkdir()
    cells = []
    for row, col, count, rgb in [(0, 1, 9, (255, 0, 0)), (1, 0, 1, (0, 0, 255))]:
        name = f"icons/r{row}c{col}.png"
        Image.new("RGB", (4, 4), rgb).save(tmp_path / name)
        cells.append({"row": row, "col": col, "count": count, "icon": name})
    doc = {
        "layer": "conv2",
        "settings": {"grid": 2},
        "levels": [{"grid": 2, "cells": cells}],
        "class_atlases": [{"name": "odd", "grid": 2, "cells": cells[:1]}],
    }
    (tmp_path / "atlas.json").write_text(json.dumps(doc))
    fig = atlas_grid(tmp_path)
    (ax,) = fig.get_axes()
    img = np.asarray(ax.images[0].get_array())
    assert img.shape == (8, 8, 3)
    assert np.allclose(img[0:4, 4:8], [1, 0, 0])  # the fullest cell: opaque red, top right
    assert np.allclose(img[0:4, 0:4], 1.0)  # no cell: blank
    a = 0.25 + 0.75 * math.log1p(1) / math.log1p(9)  # one sample: faded blue, bottom left
    assert np.allclose(img[4:8, 0:4], [1 - a, 1 - a, 1.0])
    assert "2 icons" in fig._suptitle.get_text()
    only = np.asarray(atlas_grid(tmp_path, class_name="odd").get_axes()[0].images[0].get_array())
    assert np.allclose(only[4:8, 0:4], 1.0)
    with pytest.raises(KeyError, match="odd"):
        atlas_grid(tmp_path, class_name="even")
    with pytest.raises(KeyError, match="no level 5"):
        atlas_grid(tmp_path, 5)
    with pytest.raises(FileNotFoundError, match="convlens atlas"):
        atlas_grid(tmp_path / "nothing")
