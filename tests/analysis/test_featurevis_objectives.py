"""Objectives: golden values on hand-made activations, algebra identities, the shorthand."""

from __future__ import annotations

import pytest
import torch

from convlens.analysis.featurevis import objectives as obj
from convlens.analysis.featurevis.objectives import INPUT, OUTPUT


def reader(tensors: dict[str, torch.Tensor]):
    return lambda name: tensors[name]


@pytest.fixture
def acts():
    g = torch.Generator().manual_seed(0)
    return reader(
        {
            "a": torch.randn(3, 4, 5, 8, generator=g),  # non-square on purpose
            "b": torch.randn(3, 6, 2, 2, generator=g),
            INPUT: torch.rand(3, 3, 4, 4, generator=g),
            OUTPUT: torch.randn(3, 10, generator=g),
        }
    )


def test_channel_is_the_spatial_mean_per_image(acts):
    v = obj.channel("a", 2)(acts)
    assert torch.allclose(v, acts("a")[:, 2].mean((-2, -1)))
    assert v.shape == (3,)


def test_batch_targets_one_image_and_sets_min_batch(acts):
    o = obj.channel("a", 1, batch=2)
    v = o(acts)
    assert v[0] == 0 and v[1] == 0
    assert torch.isclose(v[2], acts("a")[2, 1].mean())
    assert o.min_batch == 3
    assert (o + obj.channel("a", 0)).min_batch == 3
    with pytest.raises(ValueError, match="batch"):
        obj.channel("a", 0, batch=-1)
    with pytest.raises(ValueError, match="render with batch >= 6"):
        obj.channel("a", 0, batch=5)(acts)


def test_neuron_defaults_to_the_centre_of_a_non_square_map(acts):
    t = acts("a")  # 5 rows, 8 columns: the centre is row 2, column 4
    assert torch.equal(obj.neuron("a", 3)(acts), t[:, 3, 2, 4])
    assert torch.equal(obj.neuron("a", 3, x=7, y=0)(acts), t[:, 3, 0, 7])
    assert torch.isfinite(obj.neuron("a", 3)(acts)).all()
    with pytest.raises(ValueError, match=r"outside the 5x8 map of layer 'a'"):
        obj.neuron("a", 3, x=0, y=5)(acts)


def test_missing_channel_names_the_layer_and_its_channel_count(acts):
    with pytest.raises(ValueError, match=r"channel 9 of layer 'a' does not exist: it has 4"):
        obj.channel("a", 9)(acts)


def test_algebra_identities(acts):
    a, b, c = obj.channel("a", 0), obj.channel("b", 5), obj.deepdream("b")
    va, vb, vc = a(acts), b(acts), c(acts)
    assert torch.allclose((a + b)(acts), va + vb)
    assert torch.allclose((a - b)(acts), va - vb)
    assert torch.allclose((2 * a)(acts), (a + a)(acts))
    assert torch.allclose((a * 3)(acts), 3 * va)
    assert torch.allclose((a / 4)(acts), va / 4)
    assert torch.allclose((a - a)(acts), torch.zeros(3))
    assert torch.allclose((-a)(acts), (0 - a)(acts))
    assert torch.allclose((a + 1.5)(acts), va + 1.5)
    assert torch.allclose(sum([a, b, c])(acts), va + vb + vc)
    assert torch.allclose((a + b - 0.5 * c)(acts), va + vb - 0.5 * vc)
    assert (a + b).layers == ("a", "b") and (a + a).layers == ("a",)
    with pytest.raises(TypeError, match="numbers only"):
        a * b
    with pytest.raises(ZeroDivisionError):
        a / 0


def test_descriptions_bracket_sums():
    a, b = obj.channel("a", 0), obj.channel("b", 1)
    assert str(2 * (a + b)) == "2 * (channel(a, 0) + channel(b, 1))"
    assert str(a - (a + b)) == "channel(a, 0) - (channel(a, 0) + channel(b, 1))"


def test_deepdream_direction_class_logit(acts):
    t = acts("b")
    assert torch.allclose(obj.deepdream("b")(acts), t.pow(2).mean((1, 2, 3)))
    # A layer whose every position points along the vector has cosine similarity 1.
    vec = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5, 3.0])
    aligned = reader({"b": vec.view(1, 6, 1, 1).expand(2, 6, 3, 3) * 4})
    assert torch.allclose(obj.direction("b", vec)(aligned), torch.ones(2))
    assert torch.allclose(obj.direction("b", -vec)(aligned), -torch.ones(2))
    with pytest.raises(ValueError, match="6 channels"):
        obj.direction("b", torch.ones(5))(acts)
    assert torch.equal(obj.class_logit(7)(acts), acts(OUTPUT)[:, 7])


def test_penalties_golden_values():
    img = torch.tensor([[0.0, 1.0], [1.0, 1.0]]).view(1, 1, 2, 2)
    r = reader({INPUT: img})
    # vertical |1-0| + |1-1| = 1, horizontal |1-0| + |1-1| = 1
    assert obj.total_variation()(r).item() == pytest.approx(2.0)
    assert obj.l1(constant=0.5)(r).item() == pytest.approx(2.0)  # 4 x 0.5
    assert obj.l2()(r).item() == pytest.approx((3 + 1e-6) ** 0.5)
    assert obj.l1("x")(reader({"x": img * 2})).item() == pytest.approx(6.0)


def test_diversity_is_minus_one_for_identical_images_and_higher_for_different():
    same = torch.rand(1, 4, 3, 3).expand(3, 4, 3, 3)
    v = obj.diversity("a")(reader({"a": same}))
    assert torch.allclose(v, torch.full((3,), -2 / 3))  # (n - 1) similar others / n
    a = torch.zeros(2, 2, 2, 2)
    a[0, 0], a[1, 1] = 1.0, 1.0  # orthogonal Gram matrices
    assert torch.allclose(obj.diversity("a")(reader({"a": a})), torch.zeros(2))


def test_shorthand_forms(acts):
    one = obj.parse("a:2")
    assert one.min_batch == 0 and torch.equal(one(acts), obj.channel("a", 2)(acts))
    many = obj.parse("a:0-2")
    assert many.min_batch == 3
    expect = torch.stack([acts("a")[i, i].mean() for i in range(3)])
    assert torch.allclose(many(acts), expect)
    listed = obj.parse("a:3,1")
    assert torch.allclose(listed(acts)[1], acts("a")[1, 1].mean())
    n = obj.parse("a:1@4,7")
    assert torch.equal(n(acts), acts("a")[:, 1, 4, 7])
    assert torch.equal(obj.parse("output:4")(acts), acts(OUTPUT)[:, 4])
    assert str(obj.parse("layer4.1:0-9")) == "channel(layer4.1, 0-9, one per image)"
    assert obj.parse(one) is one


@pytest.mark.parametrize("bad", ["mixed4a", "mixed4a:", "mixed4a:x", "mixed4a:9-3", ":3", "a:3@3"])
def test_bad_shorthand_says_what_is_accepted(bad):
    with pytest.raises(ValueError, match="layer:0-9"):
        obj.parse(bad)
    with pytest.raises(ValueError, match="takes one channel, not 2"):
        obj.parse("a:1-2@3,3")
