"""The stem convolution's input gradient as one forward convolution, and strided depthwise
convolutions' input gradient in float32 under low precision (``_inputgrad``)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from convlens.analysis.featurevis._fold import fold_batchnorm, structural_copy
from convlens.analysis.featurevis._inputgrad import (
    InputGradConv2d,
    LowPrecisionDepthwise,
    fast_input_grads,
    phase_kernel,
    same_pads,
)


def _grads(conv: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_(True)
    y = conv(x)
    params = [p for p in conv.parameters() if p.requires_grad]
    return (y, *torch.autograd.grad(y, [x, *params], g))


@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "padding"),
    [
        (c, k, s, p)
        for c, k, s, p in itertools.product([1, 3, 4], [1, 2, 3, 4, 7], [1, 2, 3], [0, 1, 3])
        if p < k
    ],
)
def test_input_gradient_equals_autograd(
    channels: int, kernel: int, stride: int, padding: int
) -> None:
    # every phase layout: sizes divisible by the stride and not, odd kernels and even
    torch.manual_seed(kernel * 100 + stride * 10 + padding)
    conv = nn.Conv2d(channels, 5, kernel, stride=stride, padding=padding).double()
    fast = InputGradConv2d.from_conv(conv)
    for h, w in [(9, 10), (16, 17)]:
        x = torch.randn(2, channels, h, w, dtype=torch.float64)
        g = torch.randn_like(conv(x))
        want = _grads(conv, x, g)
        got = _grads(fast, x, g)
        assert torch.equal(got[0], want[0])  # the forward is the convolution itself
        for a, b in zip(got[1:], want[1:], strict=True):  # input, weight and bias gradients
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_phase_kernel_by_hand() -> None:
    # a 1-D view: kernel [w0, w1, w2], stride 2, padding 1. y[i] = w0 x[2i-1] + w1 x[2i] + w2 x[2i+1]
    # so dL/dx[2u] = w1 g[u] (phase 0: one tap) and dL/dx[2u+1] = w2 g[u] + w0 g[u+1]
    w = torch.tensor([[[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]])
    k = phase_kernel(w, 2, (1, 1))  # 2 x 2 phases, taps at offsets 0 and +1
    assert k.shape == (4, 1, 2, 2)
    # even rows (ry=0) read the middle kernel row at offset 0; odd rows (ry=1) kernel
    # rows 2 and 0, which are zero here
    # (ry=0, rx=0): even columns take w1 at offset 0
    assert k[0, 0].tolist() == [[2.0, 0.0], [0.0, 0.0]]
    # (ry=0, rx=1): odd columns take w2 at offset 0 and w0 at offset +1
    assert k[1, 0].tolist() == [[3.0, 1.0], [0.0, 0.0]]
    assert k[2].abs().sum() == 0 and k[3].abs().sum() == 0


def test_swapped_into_copies_only_and_gradients_unchanged() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, 33, 31)
    got = fold_batchnorm(net, x[:1])
    assert got is not None
    copy, folded = got
    assert folded == 1
    assert type(net[0]) is nn.Conv2d  # the user's model is never changed
    assert isinstance(copy[0], InputGradConv2d) and type(copy[3]) is nn.Conv2d  # 8 inputs
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    (ga,) = torch.autograd.grad(net(xa)[:, 1].sum(), [xa])
    (gb,) = torch.autograd.grad(copy(xb)[:, 1].sum(), [xb])
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
    # no gradient needed: the plain convolution runs
    with torch.no_grad():
        torch.testing.assert_close(copy(x), net(x), rtol=1e-4, atol=1e-6)


def test_kept_layer_and_non_eligible_convolutions_are_left_alone() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, dilation=2),  # dilated: not swapped
        nn.Conv2d(8, 8, 3, stride=2),  # 8 input channels: not swapped
    )
    assert fast_input_grads(structural_copy(net)) == 0
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Conv2d(1, 2, 3, stride=(1, 2)))
    assert fast_input_grads(structural_copy(stem), keep={"0"}) == 0  # kept; strides differ


def test_phase_kernel_follows_weight_changes() -> None:
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    fast = InputGradConv2d.from_conv(conv)
    x = torch.randn(1, 3, 8, 8)
    g = torch.randn(1, 4, 4, 4)
    _grads(fast, x, g)
    with torch.no_grad():
        conv.weight.mul_(2)  # shared storage: the copy's kernel must be rebuilt
    torch.testing.assert_close(_grads(fast, x, g)[1], _grads(conv, x, g)[1])


def test_under_autocast_bfloat16() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, 7, stride=2, padding=3)
    fast = InputGradConv2d.from_conv(conv)
    x = torch.randn(2, 3, 32, 32)
    out = []
    for m in (conv, fast):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(xi)
        (gi,) = torch.autograd.grad(y.float().square().sum(), [xi])
        assert gi.dtype == torch.float32
        out.append(gi)
    torch.testing.assert_close(out[1], out[0], rtol=0.05, atol=0.05 * float(out[0].abs().max()))


# --- strided depthwise convolutions: the input gradient in float32 under low precision


def _depthwise(kind: str, c: int, k: int, s: int) -> nn.Conv2d:
    if kind == "same":  # timm's TF-"same" convolution (Lite0's strided depthwise ones)
        from timm.layers import Conv2dSame

        return Conv2dSame(c, c, k, stride=s, groups=c, bias=True)
    return nn.Conv2d(c, c, k, stride=s, padding=k // 2, groups=c, bias=True)


def _frozen_copy(conv: nn.Conv2d) -> nn.Conv2d:
    twin = structural_copy(nn.Sequential(conv))
    assert fast_input_grads(twin) == 1
    assert isinstance(twin[0], LowPrecisionDepthwise)
    return twin[0]


@pytest.mark.parametrize(
    ("kind", "kernel", "stride", "size"),
    [
        (kind, k, s, n)
        for kind in ("same", "plain")
        for k, s in ((3, 2), (5, 2), (3, 3))
        for n in (13, 16)
    ],
)
def test_strided_depthwise_input_gradient_is_float32_under_bfloat16(
    kind: str, kernel: int, stride: int, size: int
) -> None:
    torch.manual_seed(kernel * 10 + stride + size)
    conv = _depthwise(kind, 6, kernel, stride)
    fast = _frozen_copy(conv)
    x = torch.randn(2, 6, size, size).contiguous(memory_format=torch.channels_last)
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(xi)
        with torch.no_grad():
            y_ref = conv(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_ref)  # the forward is autocast's own convolution, bit for bit
    g = torch.randn(y.shape).to(torch.bfloat16)
    (got,) = torch.autograd.grad(y, [xi], g)
    assert got.dtype == torch.float32 and got.shape == x.shape
    # the exact gradient of the same bfloat16 output gradient, in float64
    c64 = _depthwise(kind, 6, kernel, stride).double()
    c64.load_state_dict(conv.state_dict())
    x64 = x.double().requires_grad_(True)
    (want,) = torch.autograd.grad(c64(x64), [x64], g.double())
    # float32 arithmetic: within 1e-5 of the float64 sums (bfloat16's would be ~1e-2 off)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["same", "plain"])
def test_strided_depthwise_in_float32_is_the_original_module_bit_for_bit(kind: str) -> None:
    torch.manual_seed(3)
    conv = _depthwise(kind, 4, 3, 2)
    fast = _frozen_copy(conv)
    x = torch.randn(2, 4, 15, 14)
    g = torch.randn_like(conv(x))
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = conv(a), fast(b)
    assert torch.equal(ya, yb)
    (ga,) = torch.autograd.grad(ya, [a], g)
    (gb,) = torch.autograd.grad(yb, [b], g)
    assert torch.equal(ga, gb)


def test_a_bfloat16_model_gets_a_bfloat16_input_gradient() -> None:
    torch.manual_seed(4)
    conv = _depthwise("same", 4, 3, 2).to(torch.bfloat16)
    fast = _frozen_copy(conv)
    x = torch.randn(1, 4, 10, 10, dtype=torch.bfloat16, requires_grad=True)
    y = fast(x)
    (gx,) = torch.autograd.grad(y.float().sum(), [x])
    assert gx.dtype == torch.bfloat16
    c64 = _depthwise("same", 4, 3, 2).double()
    c64.load_state_dict({k: v.double() for k, v in conv.state_dict().items()})
    x64 = x.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(c64(x64).sum(), [x64])
    torch.testing.assert_close(gx.double(), want, rtol=1e-2, atol=1e-2)


def test_same_pads_are_timms() -> None:
    from timm.layers.padding import get_same_padding

    for n, k, s in itertools.product([7, 8, 112, 113], [1, 3, 5], [1, 2, 3]):
        conv = nn.Conv2d(2, 2, k, stride=s, groups=2)
        left, right, top, bottom = same_pads((n, n + 1), conv)
        assert top + bottom == get_same_padding(n, k, s, 1)
        assert left + right == get_same_padding(n + 1, k, s, 1)
        assert (top, left) == ((top + bottom) // 2, (left + right) // 2)


def test_only_strided_depthwise_frozen_convolutions_are_swapped() -> None:
    net = nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # stride 1: bfloat16's kernel is fast
        nn.Conv2d(8, 16, 3, stride=2, groups=8),  # grouped, not depthwise
        nn.Conv2d(16, 16, 3, stride=2, padding="valid", groups=16),  # a string padding
        nn.Conv2d(16, 16, 3, stride=2, groups=16),  # swapped
    )
    copy = structural_copy(net)
    assert fast_input_grads(copy) == 1
    assert [type(m).__name__ for m in copy] == [
        "Conv2d",
        "Conv2d",
        "Conv2d",
        "LowPrecisionDepthwise",
    ]
    assert type(net[3]) is nn.Conv2d  # never the user's model
