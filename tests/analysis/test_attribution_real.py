"""Attribution at full size (slow): integrated gradients with 256 steps on resnet50 at 224 px
without a hand-set batch, and Adebayo et al.'s finding on the pretrained efficientnet_lite0."""

from __future__ import annotations

import resource

import pytest
import torch
import torchvision

import convlens

pytestmark = pytest.mark.slow


def test_integrated_gradients_256_steps_on_resnet50_fit_without_a_batch() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    a = convlens.attribute(model, x, 3, method="integrated_gradients", steps=256)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert a.steps == 256 and a.map.shape == (1, 224, 224)
    assert peak_gib < 12, f"peak resident memory {peak_gib:.1f} GiB"
    with torch.no_grad():
        change = float(model(x)[0, 3] - model(torch.zeros_like(x))[0, 3])
    assert abs(float(a.delta[0])) < 0.05 * abs(change) + 1e-3


def test_sanity_reproduces_adebayo_on_pretrained_lite0() -> None:
    bundle = convlens.load_model("efficientnet_lite0")
    x = bundle.preprocess(convlens.sample_image()).unsqueeze(0)
    s = convlens.sanity(bundle, x, methods=("saliency", "guided_backprop", "gradcam"))
    # once the top units are randomized, the gradient's map has moved far more than guided
    # backpropagation's, which stays close to the image's edges (Adebayo et al., Fig. 2)
    k = 3  # the classifier, the head and the last two blocks
    assert float(s.abs_correlation["guided_backprop"][k, 0]) > 0.8
    assert float(s.abs_correlation["saliency"][k, 0]) < 0.5
    assert float(s.abs_correlation["gradcam"][k, 0]) < 0.5
    # and with every layer randomized every map has decorrelated from the original
    assert all(abs(float(s.correlation[m][-1, 0])) < 0.3 for m in s.methods)
