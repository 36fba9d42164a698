from __future__ import annotations

import pytest
import torch

from convlens.analysis.featurevis import transforms as T


def _smooth(n=2, h=64, w=64):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([torch.sin(2 * xx + yy), torch.cos(3 * yy), xx * yy]) * 0.4 + 0.5
    return base.expand(n, -1, -1, -1).clone()


@pytest.mark.parametrize("fused", [True, False])
def test_same_seed_same_tensor_other_seed_differs(fused):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = T.standard(fused=fused)
    a = t(x, torch.Generator().manual_seed(5))
    b = t(x, torch.Generator().manual_seed(5))
    c = t(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert a.shape != c.shape or not torch.equal(a, c)


def test_pad_value_and_jitter_moves_both_ways():
    x = torch.zeros(1, 1, 10, 10)
    p = T.Pad(3)(x, torch.Generator())
    assert p.shape == (1, 1, 16, 16) and float(p[0, 0, 0, 0]) == 0.5 and float(p[0, 0, 5, 5]) == 0
    marker = torch.zeros(1, 1, 20, 20)
    marker[0, 0, 10, 10] = 1.0
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        out = T.Jitter(4)(marker, g)
        assert out.shape == (1, 1, 16, 16)
        y, x_ = divmod(int(out.flatten().argmax()), 16)
        seen.add((y, x_))
    ys, xs = {y for y, _ in seen}, {x_ for _, x_ in seen}
    assert ys == xs == {6, 7, 8, 9, 10}  # offsets 0..4: the marker moves up/down, left/right
    with pytest.raises(ValueError):
        T.Jitter(20)(marker, g)


def test_scale_and_rotate_sizes_and_identity():
    x = _smooth(1, 50, 50)
    g = torch.Generator()
    assert T.RandomScale([1.1])(x, g).shape[-2:] == (55, 55)
    torch.testing.assert_close(T.RandomRotate([0.0])(x, g), x, atol=1e-5, rtol=0)
    r90 = T.RandomRotate([90.0])(x, g)  # a quarter turn is exact on a square grid
    assert any(torch.allclose(r90, torch.rot90(x, k, dims=(2, 3)), atol=1e-4) for k in (1, -1))


@pytest.mark.parametrize("seed", range(6))
def test_fused_affine_matches_the_sequential_transforms(seed):
    x = _smooth(2, 96, 96)
    fused = T.standard(fused=True)(x, torch.Generator().manual_seed(seed))
    seq = T.standard(fused=False)(x, torch.Generator().manual_seed(seed))
    assert fused.shape == seq.shape
    inner = (slice(None), slice(None), slice(18, -18), slice(18, -18))  # away from the padding edge
    assert float((fused - seq)[inner].abs().max()) < 0.02  # one resample instead of two


def test_standard_sets():
    assert len(T.STANDARD_SCALES) == 11 and T.STANDARD_SCALES[0] == pytest.approx(0.9)
    assert T.STANDARD_SCALES[-1] == pytest.approx(1.1)
    assert T.STANDARD_ANGLES.count(0.0) == 6 and min(T.STANDARD_ANGLES) == -10
