from __future__ import annotations

import math

import pytest
import torch

from convlens.analysis.featurevis import ImageParam, fft_scale, spectrum_freqs
from convlens.analysis.featurevis.param import COLOR_CORRELATION_SVD_SQRT


def _known_image(h=24, w=30):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([0.2 + 0.6 * xx, 0.5 + 0.3 * torch.sin(6 * yy), 0.8 - 0.5 * xx * yy])


@pytest.mark.parametrize("fft", [True, False])
@pytest.mark.parametrize("decorrelate", [True, False])
def test_round_trips_a_known_image(fft, decorrelate):
    img = _known_image()  # non-square, odd half-spectrum width
    p = ImageParam((24, 30), batch=2, fft=fft, decorrelate=decorrelate).set_image(img)
    out = p()
    assert out.shape == (2, 3, 24, 30)
    torch.testing.assert_close(out, img.expand(2, -1, -1, -1), atol=2e-5, rtol=0)


def test_odd_width_round_trip_and_alpha():
    rgba = torch.cat([_known_image(17, 21), torch.full((1, 17, 21), 0.3)])
    p = ImageParam((17, 21), alpha=True).set_image(rgba)
    torch.testing.assert_close(p()[0], rgba, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\[4, 17, 21\]"):
        p.set_image(torch.rand(3, 17, 21))


def test_spectrum_scale_is_lucids_one_over_f():
    f = spectrum_freqs(8, 8)
    assert f.shape == (8, 5)
    assert f[0, 0] == 0 and f[0, 4] == pytest.approx(0.5) and f[4, 0] == pytest.approx(0.5)
    assert f[1, 1] == pytest.approx(math.sqrt(2) / 8)
    s = fft_scale(8, 8)
    assert s[0, 0] == pytest.approx(8.0)  # the DC term is clamped at 1 / max(h, w)
    assert s[0, 1] == pytest.approx(8.0) and s[0, 4] == pytest.approx(2.0)
    assert fft_scale(8, 8, decay=2.0)[0, 4] == pytest.approx(4.0)


def test_colour_matrix_is_normalised_by_its_largest_column():
    p = ImageParam(4)
    norms = p.color.norm(dim=0)
    assert float(norms.max()) == pytest.approx(1.0)
    torch.testing.assert_close(
        p.color * COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max(), COLOR_CORRELATION_SVD_SQRT
    )


def test_seeded_init_is_reproducible_and_small():
    a = ImageParam(32, batch=3, generator=torch.Generator().manual_seed(1))
    b = ImageParam(32, batch=3, generator=torch.Generator().manual_seed(1))
    c = ImageParam(32, batch=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.raw, b.raw) and not torch.equal(a.raw, c.raw)
    img = a().detach()
    assert float(img.min()) > 0.4 and float(img.max()) < 0.6  # starts near grey


def test_gradients_flow_to_the_spectrum_and_favour_low_frequencies():
    p = ImageParam(32)
    p().mean().backward()
    assert p.raw.grad is not None and p.raw.grad.abs().sum() > 0
    g = torch.view_as_complex(p.raw.grad).abs()[0, 0]
    assert g[0, 0] > 10 * g[16, 16]  # the mean only moves the DC term


def test_bad_sizes():
    with pytest.raises(ValueError):
        ImageParam(0)
    with pytest.raises(ValueError):
        ImageParam(8, batch=0)


@pytest.mark.gpu
def test_runs_on_cuda_with_a_cuda_generator():
    g = torch.Generator(device="cuda").manual_seed(0)
    p = ImageParam(32, batch=2, generator=g, device="cuda")
    img = p()
    assert img.is_cuda and p.scale.is_cuda and img.shape == (2, 3, 32, 32)
    q = ImageParam(32, batch=2, device="cuda").set_image(img[0].detach())
    torch.testing.assert_close(q()[1], img[0].detach(), atol=1e-4, rtol=0)
