"""RISE's deletion and insertion: curves of a linear score by hand, AUCs, the blur, the
random baseline, and the public function on tiny hand-weighted models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from convlens.analysis.attribution.faithfulness import (
    Faithfulness,
    auc,
    blur,
    deletion_insertion,
    faithfulness,
    gaussian_kernel,
    pixel_order,
)
from convlens.analysis.attribution.result import Attribution

# one channel, 2 x 2: pixel p (row-major) contributes W[p] * x[p]; the score adds 0.5
X = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
W = torch.tensor([1.0, 2.0, -1.0, 0.5])
# the order this map gives: pixel 1, 2, 3, then 0
S = torch.tensor([[[0.1, 0.4], [0.3, 0.2]]])


def linear_score(xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return (xb.flatten(1) * W).sum(1) + 0.5


def linear_model(weights: torch.Tensor, classes: int = 1) -> nn.Module:
    """Flatten then Linear: logit c = sum_p weights[c, p] x[p] (no bias)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(weights.shape[1], classes, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(weights)
    return net.eval()


def make_attribution(x: torch.Tensor, saliency: torch.Tensor, target: list[str]) -> Attribution:
    return Attribution(
        map=saliency,
        score=torch.zeros(len(x)),
        target=tuple(target),
        method="hand",
        input=x,
    )


# ------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize("batch", [1, 3, 100])
def test_deletion_curve_of_a_linear_score_by_hand(batch):
    curves = deletion_insertion(
        linear_score, X, S, metric="deletion", steps=4, batch=batch, substrate=torch.zeros_like(X)
    )
    # 4.5; minus 2*2; plus 1*3 (w=-1); minus 0.5*4; minus 1*1
    assert curves.tolist() == [[4.5, 0.5, 3.5, 1.5, 0.5]]
    assert float(auc(curves)[0]) == pytest.approx((10.5 - 4.5 / 2 - 0.5 / 2) / 4)


def test_insertion_curve_starts_from_the_substrate_and_restores_the_image():
    ones = torch.ones_like(X)
    curves = deletion_insertion(
        linear_score, X, S, metric="insertion", steps=4, batch=2, substrate=ones
    )
    # from all ones (2.5 + 0.5 = 3); restore pixel 1 (+2*1), 2 (-1*2), 3 (+0.5*3), 0 (+0)
    assert curves.tolist() == [[3.0, 5.0, 3.0, 4.5, 4.5]]


def test_pixels_per_step_is_the_ceiling_and_the_curve_stays_flat_once_all_are_changed():
    z = torch.zeros_like(X)
    # steps=3: ceil(4/3)=2 pixels per step: pixels {1, 2}, then {3, 0}, then none left
    got = deletion_insertion(linear_score, X, S, metric="deletion", steps=3, batch=8, substrate=z)
    assert got.tolist() == [[4.5, 3.5, 0.5, 0.5]]
    # steps=1: everything at once
    got = deletion_insertion(linear_score, X, S, metric="deletion", steps=1, batch=8, substrate=z)
    assert got.tolist() == [[4.5, 0.5]]


def test_all_channels_of_a_pixel_change_together_and_rows_name_the_image():
    x = torch.stack([X[0, 0], 10 * X[0, 0]]).unsqueeze(0)  # [1, 2, 2, 2]
    x = torch.cat([x, -x])  # two images
    sal = torch.stack([S[0], S[0].flip(-1)])  # image 1: order 0, 3, 2, 1
    seen: list[list[int]] = []

    def score(xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        seen.append(rows.tolist())
        return xb.flatten(1).sum(1)

    got = deletion_insertion(
        score, x, sal, metric="deletion", steps=4, batch=4, substrate=torch.zeros_like(x)
    )
    # image 0: 11 * (10, 8, 5, 1, 0); image 1: -11 * (10, 9, 5, 2, 0)
    assert got.tolist() == [
        [110.0, 88.0, 55.0, 11.0, 0.0],
        [-110.0, -99.0, -55.0, -22.0, 0.0],
    ]
    assert [r for rows in seen for r in rows] == [0] * 5 + [1] * 5
    assert [len(r) for r in seen] == [4, 4, 2]


def test_ties_keep_the_pixel_index_order():
    flat = torch.tensor([[[0.0, 1.0, 1.0], [0.0, 1.0, 0.5]]])
    assert pixel_order(flat).tolist() == [[1, 2, 4, 5, 0, 3]]
    assert pixel_order(torch.zeros(1, 3, 3)).tolist() == [list(range(9))]
    # large maps with few distinct values: within each value, pixel index order
    v = torch.randint(0, 3, (2, 200, 250), generator=torch.Generator().manual_seed(0)).float()
    order = pixel_order(v)
    for i in range(2):
        flat = v[i].flatten()
        want = torch.cat([torch.nonzero(flat == level).flatten() for level in (2.0, 1.0, 0.0)])
        assert torch.equal(order[i], want)
    with pytest.raises(ValueError, match="NaN"):
        pixel_order(torch.tensor([[[math.nan, 1.0]]]))


def test_auc_golden_values():
    assert float(auc(torch.tensor([10.0, 8.0, 5.0, 1.0, 0.0]))) == pytest.approx(4.75)
    assert float(auc(torch.tensor([1.0, 1.0]))) == pytest.approx(1.0)
    assert float(auc(torch.tensor([0.0, 1.0]))) == pytest.approx(0.5)
    assert float(auc(torch.tensor([1.0, 0.0, 0.0]))) == pytest.approx(0.25)
    batch = auc(torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    assert batch.tolist() == pytest.approx([0.75, 0.75])
    with pytest.raises(ValueError, match="at least 2"):
        auc(torch.tensor([1.0]))


def rise_gkern(klen: int, nsig: float) -> np.ndarray:
    """RISE's evaluation.gkern, one channel."""
    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    return gaussian_filter(inp, nsig)


@pytest.mark.parametrize(("size", "sigma"), [(11, 5.0), (7, 1.5), (5, 0.8)])
def test_the_blur_kernel_is_rises_gkern(size, sigma):
    ours = gaussian_kernel(size, sigma).double().numpy()
    np.testing.assert_allclose(ours, rise_gkern(size, sigma), atol=1e-7)


def test_blur_convolves_each_channel_with_zero_padding_as_rise():
    x = torch.rand(2, 3, 20, 17, generator=torch.Generator().manual_seed(0))
    k = torch.from_numpy(rise_gkern(11, 5)).float()
    kern = torch.zeros(3, 3, 11, 11)
    for c in range(3):
        kern[c, c] = k
    np.testing.assert_allclose(blur(x).numpy(), F.conv2d(x, kern, padding=5).numpy(), atol=1e-6)


def test_validation_names_the_fix():
    z = torch.zeros_like(X)
    with pytest.raises(ValueError, match="'deletion' or 'insertion'"):
        deletion_insertion(linear_score, X, S, metric="del", batch=1, substrate=z)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps must be"):
        deletion_insertion(linear_score, X, S, metric="deletion", steps=0, batch=1, substrate=z)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        deletion_insertion(linear_score, X, S[0], metric="deletion", batch=1, substrate=z)
    with pytest.raises(ValueError, match="substrate"):
        deletion_insertion(linear_score, X, S, metric="deletion", batch=1, substrate=z[0])


# ------------------------------------------------------------------------ public


def two_class_model() -> tuple[nn.Module, torch.Tensor]:
    """Class 0 rises with the left column, class 1 with the right; 3 x 3, 1 channel."""
    left = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).flatten()
    right = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]).flatten()
    return linear_model(torch.stack([left, right]), classes=2), left


def test_faithfulness_scores_the_class_probability_by_hand():
    net, _ = two_class_model()
    x = torch.ones(1, 1, 3, 3)
    sal = torch.arange(9.0).flip(0).view(1, 3, 3)  # pixel 0 first, then 1, ...
    f = faithfulness(net, x, make_attribution(x, sal, ["0"]), steps=9, batch=7)
    assert isinstance(f, Faithfulness)
    # logits (6 - 3 * removed_left..., 3 - removed_right): by hand, step by step
    left = [2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    right = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    expected = []
    for k in range(10):
        a, b = sum(left[k:]), sum(right[k:])
        expected.append(math.exp(a) / (math.exp(a) + math.exp(b)))
    assert f.curves[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(f.auc[0]) == pytest.approx(
        (sum(expected) - expected[0] / 2 - expected[-1] / 2) / 9, abs=1e-6
    )
    assert f.fractions.tolist() == pytest.approx([k / 9 for k in range(10)])
    assert f.target == ("0",) and f.method == "hand" and f.metric == "deletion"
    assert f.random_curves.shape == (1, 10) and f.random_auc.shape == (1,)
    # the random walk starts and ends where the map's does
    assert float(f.random_curves[0, 0]) == pytest.approx(expected[0])
    assert float(f.random_curves[0, -1]) == pytest.approx(expected[-1])


def test_a_perfect_map_deletes_faster_than_random_and_inserts_faster():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(3, 64, generator=g)
    net = linear_model(weights, classes=3)
    x = torch.randn(4, 1, 8, 8, generator=g)
    target = ["0", "1", "2", "0"]
    # the exact contribution of each pixel to the target's logit
    perfect = torch.stack([weights[int(t)].view(8, 8) * x[i, 0] for i, t in enumerate(target)])
    a = make_attribution(x, perfect, target)
    d = faithfulness(net, x, a, metric="deletion", steps=16, batch=13, seed=3)
    assert (d.auc < d.random_auc).all()
    # the anti-map (least salient first) is worse than random
    worst = faithfulness(net, x, make_attribution(x, -perfect, target), steps=16, seed=3)
    assert (worst.auc > worst.random_auc).all()
    i = faithfulness(net, x, a, metric="insertion", steps=16, seed=3)
    assert (i.auc > i.random_auc).all()
    assert i.settings["substrate"].startswith("blur")


def test_the_random_ordering_is_reproducible_for_a_seed():
    net, _ = two_class_model()
    x = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    a = make_attribution(x, torch.rand(2, 3, 3), ["0", "1"])
    state = torch.random.get_rng_state()
    one = faithfulness(net, x, a, steps=9, seed=5, batch=4)
    two = faithfulness(net, x, a, steps=9, seed=5, batch="auto")
    other = faithfulness(net, x, a, steps=9, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG untouched
    assert torch.equal(one.random_curves, two.random_curves)
    assert torch.equal(one.curves, two.curves)
    assert not torch.equal(one.random_curves, other.random_curves)
    # the orders drawn: torch.randperm from Generator().manual_seed(seed), one per image
    gen = torch.Generator().manual_seed(5)
    orders = [torch.randperm(9, generator=gen) for _ in range(2)]
    for img, order in enumerate(orders):
        ranks = torch.empty(9)
        ranks[order] = torch.arange(9.0)
        sal = (9 - ranks).view(1, 3, 3)  # a map that walks the same order
        want = deletion_insertion(
            lambda xb, rows, t=img: net(xb).softmax(1)[:, t],
            x[img : img + 1],
            sal,
            metric="deletion",
            steps=9,
            batch=10,
            substrate=torch.zeros(1, 1, 3, 3),
        )
        assert torch.allclose(one.random_curves[img], want[0], atol=1e-6)


def test_a_unit_target_scores_the_units_raw_value():
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Flatten()).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    a = make_attribution(x, S, ["0:1"])  # channel 1's mean: -2 * mean(x)
    f = faithfulness(net, x, a, steps=4)
    # deleting pixels 1, 2, 3, 0 (values 2, 3, 4, 1): -2 * (10, 8, 5, 1, 0) / 4
    assert f.curves[0].tolist() == pytest.approx([-5.0, -4.0, -2.5, -0.5, 0.0])


def test_faithfulness_leaves_the_model_as_it_found_it():
    net, _ = two_class_model()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(1, 1, 3, 3)
    faithfulness(net, x[0], make_attribution(x, torch.rand(1, 3, 3), ["1"]), steps=3)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_faithfulness_validates_with_one_line_errors():
    net, _ = two_class_model()
    x = torch.rand(1, 1, 3, 3)
    a = make_attribution(x, torch.rand(1, 3, 3), ["1"])
    with pytest.raises(ValueError, match="'deletion' or 'insertion'"):
        faithfulness(net, x, a, metric="delete")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps must be"):
        faithfulness(net, x, a, steps=0)
    with pytest.raises(ValueError, match="pass the images the attribution was computed on"):
        faithfulness(net, torch.rand(1, 1, 4, 4), a)
    with pytest.raises(ValueError, match="batch must be"):
        faithfulness(net, x, a, batch=0)
    with pytest.raises(TypeError, match="Attribution"):
        faithfulness(net, x, torch.rand(1, 3, 3))
    callable_target = make_attribution(x, torch.rand(1, 3, 3), ["callable"])
    with pytest.raises(ValueError, match="callable target"):
        faithfulness(net, x, callable_target)


def test_to_dict_and_repr():
    net, _ = two_class_model()
    x = torch.rand(2, 1, 3, 3)
    f = faithfulness(net, x, make_attribution(x, torch.rand(2, 3, 3), ["0", "1"]), steps=3)
    d = f.to_dict()
    assert d["metric"] == "deletion" and len(d["images"]) == 2
    assert d["images"][1]["target"] == "1" and len(d["images"][0]["curve"]) == 4
    assert d["images"][0]["auc"] == pytest.approx(float(f.auc[0]))
    assert d["settings"]["pixels_per_step"] == 3
    r = repr(f)
    assert "\n" not in r and r.startswith("Faithfulness(metric='deletion'")


def test_with_convlens_attribute_and_a_dict_output_model():
    from convlens.analysis.attribution import attribute

    class DictOut(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"aux": x.mean(dim=(1, 2, 3)), "logits": self.inner(x)}

    g = torch.Generator().manual_seed(2)
    net = DictOut(linear_model(torch.randn(3, 36, generator=g), classes=3))
    x = torch.randn(2, 1, 6, 6, generator=g)
    a = attribute(net, x, method="input_x_gradient", output="logits")
    f = faithfulness(net, x, a, steps=12)
    assert f.settings["output"] == a.settings.get("output") == "logits"
    with torch.no_grad():
        p = net(x)["logits"].softmax(1)
    top = [int(t) for t in a.target]
    assert f.curves[:, 0].tolist() == pytest.approx([float(p[i, t]) for i, t in enumerate(top)])
    # input x gradient of a linear logit is each pixel's exact contribution: a perfect map
    assert (f.auc < f.random_auc).all()
