"""convlens.plot.attribution / sanity / faithfulness_curves on hand-built results."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import convlens.plot as cplot
from convlens.analysis.attribution.faithfulness import Faithfulness
from convlens.analysis.attribution.result import Attribution
from convlens.analysis.attribution.sanity import Sanity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
H, W = 12, 10


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    """Plot functions must build figures without pyplot (no global figure registry)."""
    plt.close("all")
    yield
    assert plt.get_fignums() == []


def _attr(
    method: str,
    maps: torch.Tensor,
    *,
    channels: int = 3,
    seed: int = 0,
    **kw: object,
) -> Attribution:
    n = maps.shape[0]
    g = torch.Generator().manual_seed(seed)
    fields: dict = {
        "map": maps.float(),
        "score": torch.arange(1, n + 1, dtype=torch.float32) * 0.5,
        "target": tuple(str(3 + i) for i in range(n)),
        "method": method,
        "input": torch.randn(n, channels, *maps.shape[1:], generator=g),
    }
    fields.update(kw)
    return Attribution(**fields)


def _maps(n: int, scale: float, seed: int) -> torch.Tensor:
    return scale * torch.randn(n, H, W, generator=torch.Generator().manual_seed(seed))


def _pct(*maps: torch.Tensor) -> float:
    """The documented vmax, computed independently: numpy's 99.5th percentile of |map|."""
    return float(np.percentile(np.concatenate([m.abs().numpy().ravel() for m in maps]), 99.5))


def _map_axes(fig: Figure) -> list[Axes]:
    """Axes showing a map over the grey image (two images: background, map)."""
    return [ax for ax in fig.axes if len(ax.images) == 2]


def _image_axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if len(ax.images) == 1 and ax.get_label() != "<colorbar>"]


def _colorbars(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


@pytest.fixture()
def pair() -> list[Attribution]:
    ig = _attr(
        "integrated_gradients",
        _maps(3, 1.0, 1),
        delta=torch.tensor([1e-3, -2e-3, 5e-4]),
        steps=50,
        labels=("tabby", None, "goldfish"),
    )
    cam = _attr("gradcam", _maps(3, 100.0, 2), layer="layer4")
    return [ig, cam]


# ---------------------------------------------------------------- attribution


def test_one_row_per_image_and_one_map_per_method(pair, tmp_path) -> None:
    fig = cplot.attribution(pair)
    assert isinstance(fig, Figure)
    maps = _map_axes(fig)
    assert len(maps) == 3 * 2
    assert len(_image_axes(fig)) == 3
    # each map panel draws its result's .map for its image, in row-major order
    for k, ax in enumerate(maps):
        row, col = divmod(k, 2)
        np.testing.assert_array_equal(ax.images[1].get_array(), pair[col].map[row].numpy())
        assert ax.images[1].get_cmap().name == "RdBu_r"
    assert cplot.save_figure(fig, tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC


def test_figure_scale_is_symmetric_and_shared_by_every_map(pair) -> None:
    fig = cplot.attribution(pair)
    v = _pct(*pair[0].map, *pair[1].map)
    clims = {ax.images[1].get_clim() for ax in _map_axes(fig)}
    assert len(clims) == 1
    lo, hi = clims.pop()
    assert lo == -hi and hi == pytest.approx(v, rel=1e-6)
    # robust: far below the larger method's maximum, which saturates
    assert hi < float(pair[1].map.abs().max())
    assert len(_colorbars(fig)) == 1


def test_method_scale_is_symmetric_per_column(pair) -> None:
    fig = cplot.attribution(pair, scale="method")
    maps = _map_axes(fig)
    for col, r in enumerate(pair):
        v = _pct(*r.map)
        for ax in maps[col::2]:
            lo, hi = ax.images[1].get_clim()
            assert lo == -hi and hi == pytest.approx(v, rel=1e-6)
    assert _pct(*pair[0].map) < 0.1 * _pct(*pair[1].map)  # the two columns really differ
    assert len(_colorbars(fig)) == 2


def test_scale_counts_only_the_images_shown(pair) -> None:
    fig = cplot.attribution(pair, images=[2, 0], titles=["third", "first"])
    v = _pct(pair[0].map[2], pair[0].map[0], pair[1].map[2], pair[1].map[0])
    for ax in _map_axes(fig):
        assert ax.images[1].get_clim() == pytest.approx((-v, v), rel=1e-6)
    assert [ax.get_title() for ax in _image_axes(fig)] == ["third", "first"]
    np.testing.assert_array_equal(_map_axes(fig)[0].images[1].get_array(), pair[0].map[2])


def test_vmax_is_never_zero() -> None:
    sparse = torch.zeros(3, H, W)
    sparse[0, 3, 4] = -2.0  # one value in 360: the 99.5th percentile of |map| is 0
    zero = torch.zeros(3, H, W)
    for maps, want in ((sparse, 2.0), (zero, 1.0)):
        assert _pct(maps) == 0.0
        fig = cplot.attribution(_attr("saliency", maps))
        for ax in _map_axes(fig):
            assert ax.images[1].get_clim() == (-want, want)


def test_titles_carry_target_score_delta_layer(pair) -> None:
    fig = cplot.attribution(pair)
    titles = [ax.get_title() for ax in _map_axes(fig)]
    assert titles[0].splitlines()[0] == "integrated_gradients"
    assert "target tabby (3), score 0.5" in titles[0]
    assert "delta 0.001" in titles[0]
    assert "target 4, score 1" in titles[2]  # no label: the target itself
    assert "delta -0.002" in titles[2]
    assert titles[1].splitlines()[0] == "gradcam @ layer4"
    assert "delta" not in titles[1]


def _faith(metric: str, aucs: list[float], random: list[float]) -> Faithfulness:
    n, k = len(aucs), 6
    fr = torch.linspace(0, 1, k)
    return Faithfulness(
        metric=metric,
        curves=torch.rand(n, k, generator=torch.Generator().manual_seed(len(metric))),
        auc=torch.tensor(aucs),
        random_curves=torch.rand(n, k, generator=torch.Generator().manual_seed(9)),
        random_auc=torch.tensor(random),
        fractions=fr,
        method="integrated_gradients",
    )


def test_titles_contain_the_aucs_given(pair) -> None:
    faith = {
        "integrated_gradients": [
            _faith("deletion", [0.123, 0.2, 0.3], [0.301, 0.302, 0.303]),
            _faith("insertion", [0.456, 0.5, 0.6], [0.401, 0.402, 0.403]),
        ]
    }
    fig = cplot.attribution(pair, faithfulness=faith)
    titles = [ax.get_title() for ax in _map_axes(fig)]
    assert "deletion AUC 0.123 (random 0.301)" in titles[0]
    assert "insertion AUC 0.456 (random 0.401)" in titles[0]
    assert "deletion AUC 0.300 (random 0.303)" in titles[4]
    assert "AUC" not in titles[1]  # gradcam has none
    tiny = {"gradcam": _faith("deletion", [0.00123, 0.5, 0.5], [0.00456, 0.5, 0.5])}
    fig = cplot.attribution(pair, faithfulness=tiny)
    assert "deletion AUC 0.00123 (random 0.00456)" in _map_axes(fig)[1].get_title()
    single = cplot.attribution(
        pair[0], faithfulness={"integrated_gradients": faith["integrated_gradients"][0]}
    )
    assert "deletion AUC 0.200 (random 0.302)" in _map_axes(single)[1].get_title()


def test_hostile_labels_draw_literally(tmp_path) -> None:
    labels = ("$\\frac{1}{$ 50% {x}", "two\nlines\x00\ttab", "x" * 500)
    a = _attr("saliency", _maps(3, 1.0, 3), labels=labels, model_name="m$^_{")
    fig = cplot.attribution(a, titles=["$$", "a\nb", "<b>"])
    cplot.save_figure(fig, tmp_path / "h.png")  # mathtext would raise on a stray $
    titles = [ax.get_title() for ax in _map_axes(fig)]
    assert "$\\frac{1}{$ 50% {x}" in titles[0]
    assert "two lines tab" in titles[1]
    assert max(len(line) for t in titles for line in t.splitlines()) < 80
    assert [ax.get_title() for ax in _image_axes(fig)] == ["$$", "a b", "<b>"]


@pytest.mark.parametrize("channels", [1, 4])
def test_one_and_four_channel_inputs(channels: int, tmp_path) -> None:
    a = _attr("saliency", _maps(2, 1.0, 4), channels=channels)
    fig = cplot.attribution(a)
    pics = a.display_images()
    for i, ax in enumerate(_image_axes(fig)):
        arr = ax.images[0].get_array()
        if channels == 1:
            assert arr.shape == (H, W)
            np.testing.assert_allclose(arr, pics[i, 0].numpy())
        else:
            assert arr.shape == (H, W, 3)
            np.testing.assert_allclose(arr, pics[i, :3].permute(1, 2, 0).numpy())
    cplot.save_figure(fig, tmp_path / f"c{channels}.png")


def test_bad_arguments_say_the_fix(pair) -> None:
    with pytest.raises(TypeError, match="Attribution"):
        cplot.attribution([pair[0], object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="scale"):
        cplot.attribution(pair, scale="image")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same images"):
        cplot.attribution([pair[0], _attr("saliency", _maps(2, 1.0, 5))])
    with pytest.raises(ValueError, match="indices"):
        cplot.attribution(pair, images=[3])
    with pytest.raises(ValueError, match="one title per shown image"):
        cplot.attribution(pair, images=[0], titles=["a", "b"])
    with pytest.raises(ValueError, match="key it by method name"):
        cplot.attribution(pair, faithfulness={"saliency": _faith("deletion", [0.1] * 3, [0.2] * 3)})
    with pytest.raises(ValueError, match="same batch"):
        cplot.attribution(pair, faithfulness={"gradcam": _faith("deletion", [0.1] * 2, [0.2] * 2)})


# ---------------------------------------------------------------- faithfulness curves


def test_faithfulness_curves_one_panel_per_metric_aucs_in_legend(tmp_path) -> None:
    d = _faith("deletion", [0.1, 0.3], [0.5, 0.7])
    i = _faith("insertion", [0.8, 0.6], [0.4, 0.2])
    fig = cplot.faithfulness_curves([d, i])
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == 2
    assert "deletion" in axes[0].get_title() and "insertion" in axes[1].get_title()
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["integrated_gradients: AUC 0.200", "random: AUC 0.600"]
    solid, dashed = axes[0].lines[:2]
    np.testing.assert_allclose(solid.get_ydata(), d.curves.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(dashed.get_ydata(), d.random_curves.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(solid.get_xdata(), d.fractions.numpy())
    assert solid.get_linestyle() == "-" and dashed.get_linestyle() == "--"
    one = cplot.faithfulness_curves(i, index=1)
    ax = next(a for a in one.axes if a.lines)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), i.curves[1].numpy())
    assert "AUC 0.600" in ax.get_legend().get_texts()[0].get_text()
    cplot.save_figure(fig, tmp_path / "f.png")
    with pytest.raises(ValueError, match="index"):
        cplot.faithfulness_curves(d, index=2)
    with pytest.raises(TypeError, match="Faithfulness"):
        cplot.faithfulness_curves(object())  # type: ignore[arg-type]


# ---------------------------------------------------------------- sanity


def _sanity(units: int, methods: tuple[str, ...] = ("saliency", "guided_backprop")) -> Sanity:
    g = torch.Generator().manual_seed(7)
    n = 2
    maps = {
        m: torch.randn(units + 1, n, H, W, generator=g) * (1 + k) for k, m in enumerate(methods)
    }
    for m in methods:  # randomized models change the scale by orders of magnitude
        maps[m] *= torch.logspace(0, 3, units + 1).view(-1, 1, 1, 1)
    corr = {m: torch.rand(units, n, generator=g) * 2 - 1 for m in methods}
    absc = {m: torch.rand(units, n, generator=g) for m in methods}
    corr[methods[0]][1, 1] = float("nan")  # a constant map's correlation is NaN
    return Sanity(
        units=tuple(f"block{u}.conv" for u in range(units, 0, -1)),
        cascade=True,
        methods=methods,
        correlation=corr,
        abs_correlation=absc,
        maps=maps,
        target=("258", "$x$"),
        settings={"model": "tiny\nnet"},
    )


def test_sanity_maps_each_on_its_own_symmetric_scale(tmp_path) -> None:
    s = _sanity(units=3)
    fig = cplot.sanity(s, index=1)
    grid = [ax for ax in fig.axes if ax.images]
    assert len(grid) == 2 * 4  # 2 methods x (original + 3 units)
    for k, ax in enumerate(grid):
        r, c = divmod(k, 4)
        m = s.maps[s.methods[r]][c, 1]
        np.testing.assert_array_equal(ax.images[0].get_array(), m.numpy())
        lo, hi = ax.images[0].get_clim()
        assert lo == -hi and hi == pytest.approx(_pct(m), rel=1e-6)
        assert f"±{hi:.3g}" in ax.get_title()
    assert [ax.get_title().splitlines()[0] for ax in grid[:4]] == [
        "original",
        "to block3.conv",
        "to block2.conv",
        "to block1.conv",
    ]
    assert grid[0].get_ylabel() == "saliency" and grid[4].get_ylabel() == "guided_backprop"
    assert "target $x$" in fig.get_suptitle() and "tiny net" in fig.get_suptitle()
    cplot.save_figure(fig, tmp_path / "s.png")


def test_sanity_curves_signed_solid_abs_dashed() -> None:
    s = _sanity(units=3)
    fig = cplot.sanity(s)
    curves = next(ax for ax in fig.axes if ax.lines)
    lines = [ln for ln in curves.lines if len(ln.get_xdata()) == 3]
    assert len(lines) == 4
    for k, m in enumerate(s.methods):
        signed, absolute = lines[2 * k], lines[2 * k + 1]
        np.testing.assert_array_equal(signed.get_ydata(), s.correlation[m][:, 0].numpy())
        np.testing.assert_array_equal(absolute.get_ydata(), s.abs_correlation[m][:, 0].numpy())
        assert signed.get_linestyle() == "-" and absolute.get_linestyle() == "--"
    assert [t.get_text() for t in curves.get_xticklabels()] == list(s.units)
    assert any(ln.get_ydata()[0] == 0 and ln.get_ydata()[-1] == 0 for ln in curves.lines)


def test_sanity_many_units_draws_a_spread_subset() -> None:
    s = _sanity(units=20, methods=("gradcam",))
    fig = cplot.sanity(s)
    grid = [ax for ax in fig.axes if ax.images]
    heads = [ax.get_title().splitlines()[0] for ax in grid]
    assert len(grid) == 1 + 8
    assert (
        heads[0] == "original" and heads[1] == "to block20.conv" and heads[-1] == "to block1.conv"
    )
    with pytest.raises(ValueError, match="index"):
        cplot.sanity(s, index=2)
    with pytest.raises(TypeError, match="Sanity"):
        cplot.sanity(object())  # type: ignore[arg-type]
