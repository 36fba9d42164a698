"""The CAM family against the published formulas, computed by hand or by naive loops."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import convlens
from convlens.analysis.attribution.cam import (
    cam_map,
    default_cam_layer,
    normalize_maps,
    scorecam_map,
    scorecam_weights,
    upsample_map,
)

# One image, K=2 channels of 2x2, with negative gradients, zeros, and a Grad-CAM++
# denominator that is exactly 0 without the epsilon (channel 1: sum(A)=2, g=-1).
A = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, -1.0], [2.0, 1.0]]]])
G = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]], [[-1.0, 0.0], [1.0, -3.0]]]])


def test_gradcam_by_hand():
    # w0 = mean(1, -1, 0, 2) = 0.5; w1 = mean(-1, 0, 1, -3) = -0.75; map = 0.5 A0 - 0.75 A1
    expected = torch.tensor([[[0.5, 1.75], [0.0, 1.25]]])
    torch.testing.assert_close(cam_map("gradcam", A, G), expected)


def test_gradcam_pp_by_hand():
    # alpha = g^2 / (2 g^2 + sum(A) g^3 + 1e-6); w = sum relu(g) alpha.
    # Channel 0 (sum A = 10): g=1 -> 1/12, g=-1 -> relu 0, g=0 -> 0, g=2 -> 2 * 4/88 = 1/11.
    # Channel 1 (sum A = 2): g=-1 -> alpha = 1/1e-6 but relu(g) = 0; g=1 -> 1/4; g=-3 -> 0.
    w0, w1 = 1 / 12 + 1 / 11, 0.25
    expected = torch.tensor([[[w0, 2 * w0 - w1], [3 * w0 + 2 * w1, 4 * w0 + w1]]])
    torch.testing.assert_close(cam_map("gradcam_pp", A, G), expected, rtol=1e-6, atol=1e-6)


def test_layercam_by_hand():
    # relu(G0) * A0 = [[1, 0], [0, 8]]; relu(G1) * A1 = [[0, 0], [2, 0]]
    expected = torch.tensor([[[1.0, 0.0], [2.0, 8.0]]])
    torch.testing.assert_close(cam_map("layercam", A, G), expected)


def _loops(method: str, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The published formulas, one number at a time (float64)."""
    n, k, h, w = acts.shape
    a, g = acts.double().tolist(), grads.double().tolist()
    out = torch.zeros(n, h, w, dtype=torch.float64)
    for b in range(n):
        for c in range(k):
            s = sum(a[b][c][i][j] for i in range(h) for j in range(w))
            if method == "gradcam":
                wk = sum(g[b][c][i][j] for i in range(h) for j in range(w)) / (h * w)
            elif method == "gradcam_pp":
                wk = 0.0
                for i in range(h):
                    for j in range(w):
                        gij = g[b][c][i][j]
                        alpha = 0.0 if gij == 0 else gij**2 / (2 * gij**2 + s * gij**3 + 1e-6)
                        wk += max(gij, 0.0) * alpha
            for i in range(h):
                for j in range(w):
                    if method == "layercam":
                        out[b, i, j] += max(g[b][c][i][j], 0.0) * a[b][c][i][j]
                    else:
                        out[b, i, j] += wk * a[b][c][i][j]
    return out.float()


def test_gradcam_pp_alpha_is_zero_where_the_gradient_is():
    # sum(A) overflows float32 to inf: where g == 0 the formula is 0 / (0 + inf * 0 + eps) =
    # nan; pytorch-grad-cam's rule sets alpha = 0 there, so the channel adds 0, not nan.
    acts = torch.tensor([[[[3e38, 3e38], [1.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]]]])
    grads = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]])
    assert torch.isinf(acts[0, 0].sum())
    # Channel 1 (sum A = 10): w1 = 1 / (2 + 10 + 1e-6).
    expected = acts[:, 1] / 12.000001
    torch.testing.assert_close(cam_map("gradcam_pp", acts, grads), expected)


@pytest.mark.parametrize("method", ["gradcam", "gradcam_pp", "layercam"])
def test_cam_map_matches_loops(method):
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(2, 3, 3, 4, generator=gen).relu()
    grads = torch.randn(2, 3, 3, 4, generator=gen)
    grads[grads.abs() < 0.3] = 0.0  # exact zeros: Grad-CAM++'s alpha = 0 rule
    got = cam_map(method, acts, grads)
    assert got.shape == (2, 3, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, _loops(method, acts, grads), rtol=1e-5, atol=1e-5)


class GapNet(nn.Module):
    """conv 2->3 (3x3, padding 1) -> ReLU -> 2x2 max-pool (``pool``: the CAM layer) ->
    global average pool -> linear 3->2. Hand weights; channel 2 is dead (always 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0 / 9.0  # a box blur of input channel 0
            self.conv.weight[1, 1] = torch.tensor([[-1.0, 0, 1]] * 3)  # a vertical edge
            self.conv.bias.copy_(torch.tensor([0.1, 0.2, -1.0]))  # channel 2: relu(-1) = 0
            self.fc.weight.copy_(torch.tensor([[1.0, -0.5, 2.0], [-1.0, 1.0, 0.5]]))
            self.fc.bias.copy_(torch.tensor([0.3, -0.2]))

    def layer(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer(x).mean(dim=(2, 3)))


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 2, 8, 8, generator=torch.Generator().manual_seed(0))


def test_gradcam_is_captums_layergradcam_and_cam_for_a_gap_head():
    net, x, target = GapNet(), _images(), torch.tensor([0, 1, 0])
    acts = net.layer(x)
    score = net.fc(acts.mean(dim=(2, 3))).gather(1, target[:, None]).sum()
    (grads,) = torch.autograd.grad(score, acts)
    got = cam_map("gradcam", acts, grads)
    # Captum LayerGradCam (relu_attributions=False, attr_dim_summation=True).
    captum = torch.sum(torch.mean(grads, dim=(2, 3), keepdim=True) * acts, dim=1)
    torch.testing.assert_close(got, captum, rtol=0, atol=0)
    # Under global average pooling + linear, Grad-CAM is CAM (Zhou et al.) / (h w).
    h, w = acts.shape[-2:]
    cam = torch.einsum("nk,nkij->nij", net.fc.weight[target] / (h * w), acts)
    torch.testing.assert_close(got, cam.detach())
    assert not got.requires_grad


def test_cam_map_errors():
    with pytest.raises(ValueError, match="unknown CAM method 'gradcamm'"):
        cam_map("gradcamm", A, G)
    with pytest.raises(ValueError, match="needs grads"):
        cam_map("gradcam", A, None)
    with pytest.raises(ValueError, match="shape of acts"):
        cam_map("layercam", A, G[:, :1])
    with pytest.raises(ValueError, match=r"\[N, K, h, w\]"):
        cam_map("gradcam", A[0], G[0])


def test_upsample_map_bilinear_half_pixel():
    m = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    got = upsample_map(m, (4, 4))
    # Half-pixel centres: output i samples source (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75,
    # 1.25, clamped to [0, 1].
    expected = torch.tensor(
        [[0.0, 0.25, 0.75, 1.0], [0.5, 0.75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5], [2, 2.25, 2.75, 3]]
    )
    torch.testing.assert_close(got[0], expected)
    torch.testing.assert_close(got[1], torch.full((4, 4), -1.0))  # the sign is kept
    assert upsample_map(m, (2, 3)).shape == (2, 2, 3)
    same = upsample_map(m, (2, 2))
    torch.testing.assert_close(same, m)
    assert same.data_ptr() != m.data_ptr()
    with pytest.raises(ValueError, match=r"\[N, h, w\]"):
        upsample_map(m[0], (4, 4))


def test_normalize_maps_golden():
    maps = torch.tensor(
        [
            [[-1.0, 0.0], [1.0, 3.0]],  # relu, then / 3
            [[1.0, 2.0], [3.0, 5.0]],  # min 1, range 4
            [[2.0, 2.0], [2.0, 2.0]],  # constant -> zeros
            [[-3.0, -1.0], [-2.0, -0.5]],  # all negative -> zeros
        ]
    )
    expected = torch.tensor(
        [
            [[0.0, 0.0], [1 / 3, 1.0]],
            [[0.0, 0.25], [0.5, 1.0]],
            [[0.0, 0.0], [0.0, 0.0]],
            [[0.0, 0.0], [0.0, 0.0]],
        ]
    )
    got = normalize_maps(maps)
    torch.testing.assert_close(got, expected)
    assert got.dtype == torch.float32 and not torch.isnan(got).any()


def test_scorecam_golden_by_hand():
    # x = ones [1, 1, 1, 4]; score = the sum of the masked input. Channel 0 = [0, 0, 3]:
    # align_corners=True samples 0, 2/3, 4/3, 2 -> [0, 0, 1, 3] -> mask / 3, sum 4/3
    # (align_corners=False would give [0, 0, 1.125, 3]: sum 1.375). Channel 1 is constant
    # (5): mask 0, score 0.
    x = torch.ones(1, 1, 1, 4)
    acts = torch.tensor([[[[0.0, 0.0, 3.0]], [[5.0, 5.0, 5.0]]]])
    seen: list[int] = []

    def score(xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        seen.append(len(rows))
        return xb.sum(dim=(1, 2, 3))

    w = scorecam_weights(score, x, acts, batch=16)
    s = torch.tensor([[4 / 3, 0.0]])
    torch.testing.assert_close(w, torch.softmax(s, dim=1))
    assert seen == [2]  # channel 0, then one all-zero row for the constant channel


def _naive_scorecam(net: nn.Module, x: torch.Tensor, acts: torch.Tensor, target: torch.Tensor):
    """pytorch-grad-cam's ScoreCAM, one forward per (image, channel)."""
    up = nn.UpsamplingBilinear2d(size=tuple(x.shape[-2:]))
    n, k = acts.shape[:2]
    scores = torch.zeros(n, k)
    with torch.no_grad():
        for i in range(n):
            for c in range(k):
                u = up(acts[i : i + 1, c : c + 1])
                mask = (u - u.min()) / (u.max() - u.min() + 1e-8)
                scores[i, c] = net(x[i : i + 1] * mask)[0, target[i]]
    return torch.softmax(scores, dim=1)


def _score_fn(net: nn.Module, target: torch.Tensor, log: list[torch.Tensor] | None = None):
    def score(xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        assert rows.dtype == torch.long and rows.shape == (xb.shape[0],)
        if log is not None:
            log.append(rows.clone())
        return net(xb)[torch.arange(len(rows)), target[rows]]

    return score


def test_scorecam_matches_naive_loop_for_every_batch_size():
    net, x, target = GapNet(), _images(3), torch.tensor([0, 1, 1])
    with torch.no_grad():
        acts = net.layer(x)
    assert (acts[:, 2] == 0).all()  # the dead channel takes the shortcut
    with torch.no_grad():
        assert float(net(torch.zeros(1, 2, 8, 8))[0, 0]) != 0.0  # so its score is not 0
    ref = _naive_scorecam(net, x, acts, target)
    for batch in (1, 3, 3 * 3 + 3):
        log: list[torch.Tensor] = []
        w = scorecam_weights(_score_fn(net, target, log), x, acts, batch=batch)
        torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
        assert w.shape == (3, 3) and w.dtype == torch.float32
        rows = torch.cat(log)
        # 6 live (image, channel) rows image-major, then one zero row per image.
        assert rows.tolist() == [0, 0, 1, 1, 2, 2, 0, 1, 2]
        assert all(len(r) <= batch for r in log)


def test_scorecam_shortcut_equals_running_constant_channels():
    net, x, target = GapNet(), _images(2), torch.tensor([1, 0])
    with torch.no_grad():
        acts = net.layer(x)
    acts[1, 0] = 0.7  # a constant, non-zero channel: also a zero mask
    calls: list[torch.Tensor] = []
    w = scorecam_weights(_score_fn(net, target, calls), x, acts, batch=4)
    ran = sum(len(r) for r in calls)
    assert ran == 2 * 3 - 3 + 2  # 3 constant channels skipped, one zero row per image
    # The same numbers with every constant channel run as a zeroed image.
    with torch.no_grad():
        zero = net(torch.zeros(2, 2, 8, 8))[torch.arange(2), target]
    expected = torch.zeros(2, 3)
    with torch.no_grad():
        for i in range(2):
            for c in range(3):
                if acts[i, c].max() == acts[i, c].min():
                    expected[i, c] = net(x[i : i + 1] * 0)[0, target[i]]
                else:
                    u = nn.UpsamplingBilinear2d(size=(8, 8))(acts[i : i + 1, c : c + 1])
                    mask = (u - u.min()) / (u.max() - u.min() + 1e-8)
                    expected[i, c] = net(x[i : i + 1] * mask)[0, target[i]]
    torch.testing.assert_close(w, torch.softmax(expected, dim=1), rtol=1e-5, atol=1e-6)
    # Given the zero-input scores, no zero rows are run and the weights are the same.
    calls.clear()
    w2 = scorecam_weights(_score_fn(net, target, calls), x, acts, batch=4, baseline_scores=zero)
    assert sum(len(r) for r in calls) == 2 * 3 - 3
    torch.testing.assert_close(w2, w, rtol=1e-5, atol=1e-6)


def test_scorecam_keeps_channels_last():
    net, x, target = GapNet(), _images(2), torch.tensor([0, 1])
    with torch.no_grad():
        acts = net.layer(x)
    formats: list[bool] = []

    def score(xb: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        formats.append(xb.is_contiguous(memory_format=torch.channels_last))
        return net(xb)[torch.arange(len(rows)), target[rows]]

    xcl = x.contiguous(memory_format=torch.channels_last)
    w = scorecam_weights(score, xcl, acts, batch=8)
    assert formats and all(formats)
    ref = scorecam_weights(_score_fn(net, target), x, acts, batch=8)
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)


def test_scorecam_progress_and_errors():
    net, x, target = GapNet(), _images(2), torch.tensor([0, 0])
    with torch.no_grad():
        acts = net.layer(x)
    ticks: list[tuple[int, int]] = []
    scorecam_weights(
        _score_fn(net, target), x, acts, batch=3, progress=lambda d, t: ticks.append((d, t))
    )
    assert ticks == [(3, 6), (6, 6)]  # 4 live rows + 2 zero rows
    with pytest.raises(ValueError, match="one score per row"):
        scorecam_weights(lambda xb, rows: net(xb), x, acts, batch=3)
    with pytest.raises(ValueError, match="positive int"):
        scorecam_weights(_score_fn(net, target), x, acts, batch=0)
    with pytest.raises(ValueError, match="baseline_scores must be"):
        scorecam_weights(_score_fn(net, target), x, acts, batch=3, baseline_scores=torch.zeros(3))
    with pytest.raises(ValueError, match="pass the same batch"):
        scorecam_weights(_score_fn(net, target), x[:1], acts, batch=3)


def test_scorecam_map_by_hand():
    acts = torch.tensor([[[[1.0, 2.0]], [[3.0, -4.0]]], [[[0.0, 1.0]], [[1.0, 0.0]]]])
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    expected = torch.tensor([[[2.5, -2.5]], [[0.5, 0.5]]])
    torch.testing.assert_close(scorecam_map(w, acts), expected)
    with pytest.raises(ValueError, match=r"weights must be \[N, K\] = \[2, 2\]"):
        scorecam_map(w[:1], acts)


def test_scorecam_weights_sum_to_one_and_follow_the_score():
    # Channel 1 keeps more of the image where the score looks: it gets the larger weight.
    x = torch.ones(1, 1, 2, 2)
    acts = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]]])
    w = scorecam_weights(lambda xb, rows: xb.sum(dim=(1, 2, 3)), x, acts, batch=2)
    torch.testing.assert_close(w, torch.softmax(torch.tensor([[1.0, 3.0]]), dim=1))
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)


# ---- default_cam_layer ----


def test_default_cam_layer_resnet18_and_wrappers():
    net = torchvision.models.resnet18()
    assert default_cam_layer(net) == "layer4"
    assert default_cam_layer(nn.DataParallel(net)) == "layer4"


def test_default_cam_layer_simple_cnn_and_bundle():
    assert default_cam_layer(convlens.SimpleCNN()) == "bn3"
    bundle = convlens.load_model("simple_cnn", weights=None)
    assert default_cam_layer(bundle) == "bn3"


def test_default_cam_layer_googlenet_and_inceptionv1_names():
    g = torchvision.models.googlenet(weights=None, init_weights=False, aux_logits=False)
    assert default_cam_layer(g) == "inception5b"

    class LucidNames(nn.Module):  # InceptionV1's top-level names, without its weight
        def __init__(self) -> None:
            super().__init__()
            self.conv2d0 = nn.Conv2d(3, 4, 3)
            self.mixed4e = nn.Conv2d(4, 4, 1)
            self.mixed5b = nn.Conv2d(4, 4, 1)
            self.softmax2 = nn.Softmax(dim=1)

    assert default_cam_layer(LucidNames()) == "mixed5b"


def test_default_cam_layer_falls_back_to_the_last_conv():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5, 2)
    )
    assert default_cam_layer(net) == "2"


def test_default_cam_layer_needs_a_conv():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="a CAM method needs a convolutional layer") as e:
        default_cam_layer(mlp)
    assert "integrated_gradients" in str(e.value)


class _AutocastSpy(GapNet):
    """GapNet that records, per forward, whether CPU autocast was on and in which dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype | None] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "meta":  # not the trace that sizes the batches
            on = torch.is_autocast_enabled("cpu")
            self.seen.append(torch.get_autocast_dtype("cpu") if on else None)
        return super().forward(x)


def test_scorecam_precision_runs_only_the_masked_forwards_under_autocast():
    x = _images(2)
    ref = convlens.attribute(GapNet(), x, 0, method="scorecam", layer="pool")
    assert ref.settings["precision"] == "float32"
    spy = _AutocastSpy()
    got = convlens.attribute(spy, x, 0, method="scorecam", layer="pool", precision="bfloat16")
    assert got.settings["precision"] == "bfloat16"
    # the activations' pass is float32; every masked forward after it ran under bfloat16
    assert spy.seen[0] is None and bool(spy.seen[1:])
    assert all(d == torch.bfloat16 for d in spy.seen[1:])
    # channel 2 is dead; the others' scores round to bfloat16: the weights move a little
    torch.testing.assert_close(got.layer_map, ref.layer_map, rtol=0.05, atol=0.02)


def test_precision_is_refused_for_gradient_methods_and_auto_means_float32_there():
    x = _images(1)
    with pytest.raises(ValueError, match=r"applies to 'scorecam'.*float32"):
        convlens.attribute(GapNet(), x, 0, method="saliency", precision="bfloat16")
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        convlens.attribute(GapNet(), x, 0, method="scorecam", layer="pool", precision="half")
    a = convlens.attribute(GapNet(), x, 0, method="gradcam", layer="pool", precision="auto")
    assert a.settings["precision"] == "float32"


def test_resolve_precision(monkeypatch):
    from convlens import device as devmod

    cpu = torch.device("cpu")
    assert devmod.resolve_precision("bfloat16", cpu) == torch.bfloat16
    assert devmod.resolve_precision("float16", cpu) == torch.float16
    monkeypatch.setattr(devmod, "cpu_has_fast_bfloat16", lambda: True)
    assert devmod.resolve_precision("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(devmod, "cpu_has_fast_bfloat16", lambda: False)
    assert devmod.resolve_precision("auto", cpu) == torch.float32
    with pytest.raises(ValueError, match="use one of auto, float32, bfloat16, float16"):
        devmod.resolve_precision("fp8", cpu)
