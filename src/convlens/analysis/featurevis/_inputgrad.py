"""A faster input gradient for a model's first convolution, in a private copy of the model.

Every attribution method and every render ends its backward pass at the input image, and
the last step, the gradient through the stem convolution (3 input channels, often a 7x7
kernel at stride 2), is the slowest convolution of the whole backward on a CPU: oneDNN's
backward-data kernel for a 3-channel result runs at a fraction of its forward speed
(resnet18's stem: 128 ms for 32 rows, against 57 ms for its forward).

The same gradient is one *forward* convolution. For a convolution with stride ``s``,
``grad_x[c, s*u + r]`` (``r < s``, per spatial dimension) collects ``W[o, c, a] g[o, u + d]``
over the taps ``a = r + p - s*d``: a correlation of the output gradient ``g`` with a small
kernel per phase ``r``. The ``s*s`` phases of the ``C`` input channels stack as ``C*s*s``
output channels of one ``conv2d`` over ``g`` (``ceil(k/s)`` taps), and ``pixel_shuffle(s)``
interleaves them back into the input's grid. On the stem above it takes 60 ms instead of
128; it is exact (the same sums, in a different order).

A second case is precision, not layout: oneDNN's bfloat16 backward-data kernel for a
*strided depthwise* convolution is 5-25x slower than its float32 one on a CPU
(``efficientnet_lite0``'s ``blocks.1.0.conv_dw`` for 8 images at 224 px: 36 ms against
8 ms; ``blocks.2.0``: 17.5 ms against 1.8 ms), which made a bfloat16 render step slower
than a float32 one. :class:`LowPrecisionDepthwise` keeps the forward as it is (autocast's
bfloat16 or float16 convolution) and computes only the input gradient in float32, cast
back to the input's dtype. It is used only for a CPU convolution running in bfloat16 or
float16; in float32, and on CUDA, the original module's own forward runs, so float32
renders keep their pixels bit for bit.

:func:`fast_input_grads` swaps both in for the convolutions of a copy made by
:func:`~convlens.analysis.featurevis._fold.structural_copy` (never on a user's model).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "InputGradConv2d",
    "LowPrecisionDepthwise",
    "fast_input_grads",
    "phase_kernel",
    "same_pads",
]

#: convolutions with at most this many input channels get the fast input gradient (the
#: stem of an RGB, RGBA or grey model; deeper convolutions have fast backward kernels)
MAX_IN_CHANNELS = 4


def _taps(k: int, s: int, p: int) -> tuple[int, int]:
    """The offsets ``d`` (``lo..hi``) of the output gradient any phase reads in one
    dimension: ``a = r + p - s*d`` must be a tap ``0 <= a < k`` for some ``r < s``."""
    lo = -((k - 1 - p) // s)  # ceil((p - k + 1) / s)
    hi = (s - 1 + p) // s
    return lo, hi


def phase_kernel(weight: torch.Tensor, stride: int, padding: tuple[int, int]) -> torch.Tensor:
    """The ``[C*s*s, O, Ty, Tx]`` kernel whose correlation with the output gradient gives
    the input gradient's ``s*s`` phases (channel ``(c*s + ry)*s + rx``, as
    ``pixel_shuffle`` reads them), for a convolution's ``[O, C, ky, kx]`` weight.

    Example:
        >>> phase_kernel(torch.ones(1, 1, 3, 3), 2, (1, 1)).shape
        torch.Size([4, 1, 2, 2])
    """
    n_out, C, ky, kx = weight.shape
    s = stride
    (ly, hy), (lx, hx) = _taps(ky, s, padding[0]), _taps(kx, s, padding[1])
    Ty, Tx = hy - ly + 1, hx - lx + 1
    wt = weight.transpose(0, 1)  # [C, O, ky, kx]
    out = weight.new_zeros(C, s, s, n_out, Ty, Tx)
    for ry in range(s):
        for ty in range(Ty):
            a = ry + padding[0] - s * (ly + ty)
            if not 0 <= a < ky:
                continue
            for rx in range(s):
                for tx in range(Tx):
                    b = rx + padding[1] - s * (lx + tx)
                    if 0 <= b < kx:
                        out[:, ry, rx, :, ty, tx] = wt[:, :, a, b]
    return out.reshape(C * s * s, n_out, Ty, Tx)


def _input_grad(
    g: torch.Tensor,
    kernel: torch.Tensor,
    stride: int,
    padding: tuple[int, int],
    ksize: tuple[int, int],
    size: tuple[int, int],
) -> torch.Tensor:
    """The input gradient ``[B, C, H, W]`` from the output gradient ``g`` and the phase
    kernel (see :func:`phase_kernel`)."""
    s = stride
    (ly, hy), (lx, hx) = _taps(ksize[0], s, padding[0]), _taps(ksize[1], s, padding[1])
    H, W = size
    Uy, Ux = math.ceil(H / s), math.ceil(W / s)
    Ho, Wo = g.shape[-2:]
    # phase row u reads g[u + ly .. u + hy]; pad so every read is inside (zeros outside)
    top, left = max(0, -ly), max(0, -lx)
    bottom, right = max(0, Uy - 1 + hy - (Ho - 1)), max(0, Ux - 1 + hx - (Wo - 1))
    py, px = max(top, bottom), max(left, right)
    y = F.conv2d(g, kernel, padding=(py, px))
    oy, ox = ly + py, lx + px
    y = y[:, :, oy : oy + Uy, ox : ox + Ux]
    if s > 1:
        y = F.pixel_shuffle(y, s)
    return y[:, :, :H, :W]


_C = TypeVar("_C", bound=nn.Conv2d)


def _twin(cls: type[_C], conv: nn.Conv2d) -> _C:
    """A ``cls`` instance that is ``conv``: its own attribute tables over the same
    parameters, buffers and submodules (nothing copied)."""
    new = cls.__new__(cls)
    new.__dict__ = dict(conv.__dict__)
    new._parameters = dict(conv._parameters)
    new._buffers = dict(conv._buffers)
    new._modules = dict(conv._modules)
    return new


class _PhaseConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conv: InputGradConv2d,
    ) -> torch.Tensor:
        ctx.conv = conv
        ctx.size = tuple(x.shape[-2:])
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        conv: InputGradConv2d = ctx.conv
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # under autocast the output gradient may be in a lower precision than the weight
            gx = _input_grad(
                g,
                conv.phase(weight).to(g.dtype),
                conv.stride[0],
                conv.pad2,
                tuple(weight.shape[-2:]),
                ctx.size,
            ).to(x.dtype)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            _, gw, gb = torch.ops.aten.convolution_backward(
                g,
                x.to(g.dtype),
                weight.to(g.dtype),
                [weight.shape[0]] if ctx.has_bias else None,
                list(conv.stride),
                list(conv.pad2),
                list(conv.dilation),
                False,
                [0, 0],
                conv.groups,
                [
                    False,
                    bool(ctx.needs_input_grad[1]),
                    bool(ctx.has_bias and ctx.needs_input_grad[2]),
                ],
            )
            gw = None if gw is None else gw.to(weight.dtype)
            gb = None if gb is None else gb.to(weight.dtype)
        return gx, gw, gb, None


class InputGradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same weights, same forward) whose input gradient is computed as
    one forward convolution of the output gradient (see the module's docstring). Made only
    by :func:`fast_input_grads`, in a copy of a model.

    Example:
        >>> conv = InputGradConv2d.from_conv(nn.Conv2d(3, 8, 7, stride=2, padding=3))
    """

    pad2: tuple[int, int]
    _phase_cache: tuple[tuple[Any, ...], torch.Tensor] | None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> InputGradConv2d:
        """The same convolution (its parameters shared, not copied)."""
        new = _twin(cls, conv)
        new.pad2 = cast_pad(conv.padding)
        new._phase_cache = None
        return new

    def phase(self, weight: torch.Tensor) -> torch.Tensor:
        """The phase kernel of ``weight``, kept while the weight is unchanged."""
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        cached = self._phase_cache
        if cached is None or cached[0] != key:
            k = phase_kernel(weight.detach(), self.stride[0], self.pad2)
            if weight.is_contiguous(memory_format=torch.channels_last):
                k = k.contiguous(memory_format=torch.channels_last)
            self._phase_cache = cached = (key, k)
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return cast(torch.Tensor, _PhaseConv.apply(x, self.weight, self.bias, self))
        return super().forward(x)


def cast_pad(padding: Any) -> tuple[int, int]:
    """A convolution's ``padding`` as two ints (only called on numeric paddings)."""
    return int(padding[0]), int(padding[1])


def _eligible(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.in_channels <= MAX_IN_CHANNELS
        and m.groups == 1
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and m.dilation == (1, 1)
        and m.stride[0] == m.stride[1]
        and m.weight.dtype in (torch.float32, torch.float64)
    )


_LOW = (torch.bfloat16, torch.float16)


def same_pads(size: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """timm's ``Conv2dSame`` padding for an input of ``size``, as ``F.pad`` takes it
    (left, right, top, bottom): TensorFlow's "same", the odd pixel at the end.

    Example:
        >>> same_pads((112, 112), nn.Conv2d(8, 8, 3, stride=2, groups=8))
        (0, 1, 0, 1)
    """
    pads = []
    for n, k, s, d in zip(size, conv.kernel_size, conv.stride, conv.dilation):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class _Float32InputGrad(torch.autograd.Function):
    """A convolution in autocast's dtype whose input gradient is computed in float32."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        conv: LowPrecisionDepthwise,
        pads: tuple[int, int, int, int],
    ) -> torch.Tensor:
        ctx.conv, ctx.pads = conv, pads
        ctx.in_shape, ctx.in_dtype = tuple(x.shape), x.dtype
        ctx.save_for_backward(weight)
        xp = F.pad(x, pads) if any(pads) else x
        padding = (0, 0) if any(pads) or conv.same else conv.padding
        # still under autocast here: the convolution runs in its dtype, as it would have
        return F.conv2d(xp, weight, bias, conv.stride, padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> Any:
        (weight,) = ctx.saved_tensors
        conv: LowPrecisionDepthwise = ctx.conv
        left, right, top, bottom = ctx.pads
        n, c, h, w = ctx.in_shape
        padded = (n, c, h + top + bottom, w + left + right)
        padding = [0, 0] if any(ctx.pads) or conv.same else list(conv.padding)
        # only the input's size and layout are read for the input gradient
        shape_of = torch.empty(padded, dtype=torch.float32, device=g.device).contiguous(
            memory_format=torch.channels_last
        )
        gx = torch.ops.aten.convolution_backward(
            g.float().contiguous(memory_format=torch.channels_last),
            shape_of,
            weight.detach().float().contiguous(),
            None,
            list(conv.stride),
            padding,
            list(conv.dilation),
            False,
            [0, 0],
            conv.groups,
            [True, False, False],
        )[0]
        if any(ctx.pads):
            gx = gx[:, :, top : top + h, left : left + w]
        return gx.to(ctx.in_dtype), None, None, None, None


class LowPrecisionDepthwise(nn.Conv2d):
    """A strided depthwise ``nn.Conv2d`` (or timm's ``Conv2dSame``), the same weights and
    forward, whose input gradient is computed in float32 when it runs in bfloat16 or
    float16 on a CPU (see the module's docstring). Made only by :func:`fast_input_grads`,
    in a copy of a model.

    Example:
        >>> conv = LowPrecisionDepthwise.from_conv(nn.Conv2d(8, 8, 3, stride=2, groups=8))
    """

    same: bool
    _original: Any

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> LowPrecisionDepthwise:
        """The same convolution (its parameters shared, not copied)."""
        new = _twin(cls, conv)
        new.same = type(conv) is not nn.Conv2d  # timm's Conv2dSame (see _eligible_depthwise)
        new._original = type(conv).forward
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.dtype in _LOW or torch.is_autocast_enabled("cpu")
        if not (low and x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad):
            return cast(torch.Tensor, self._original(self, x))
        pads = same_pads((x.shape[-2], x.shape[-1]), self) if self.same else (0, 0, 0, 0)
        return cast(torch.Tensor, _Float32InputGrad.apply(x, self.weight, self.bias, self, pads))


def _eligible_depthwise(m: nn.Module) -> bool:
    if not isinstance(m, nn.Conv2d):
        return False
    same = type(m).__name__ == "Conv2dSame"
    return (
        (type(m) is nn.Conv2d or same)
        and m.groups > 1
        and m.groups == m.in_channels == m.out_channels
        and max(m.stride) > 1
        and m.padding_mode == "zeros"
        and (same or not isinstance(m.padding, str))
        and not m.weight.requires_grad
    )


def fast_input_grads(copy: nn.Module, keep: Collection[str] = ()) -> int:
    """Give every small-input convolution of ``copy`` (a structural copy convlens owns:
    never a user's model) the fast input gradient, and every strided depthwise one the
    float32 input gradient in low precision; returns how many were swapped.

    Example:
        >>> net = structural_copy(nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3)))
        >>> fast_input_grads(net)
        1
    """
    swapped = 0
    for name, m in list(copy.named_modules()):
        if name in keep or not name:  # the copy itself is one module: nothing to swap into
            continue
        if _eligible(m):
            new: nn.Module = InputGradConv2d.from_conv(cast(nn.Conv2d, m))
        elif _eligible_depthwise(m):
            new = LowPrecisionDepthwise.from_conv(cast(nn.Conv2d, m))
        else:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = copy.get_submodule(parent_name) if parent_name else copy
        setattr(parent, leaf, new)
        swapped += 1
    return swapped
