"""Receptive fields: hand-computed values, and a brute force (the input pixels with a
nonzero gradient) on small nets whose weights are positive, so nothing cancels."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import convlens.analysis.receptive as receptive
from convlens.analysis.receptive import ReceptiveField, receptive_field
from convlens.errors import LayerNotFoundError
from convlens.models import SimpleCNN

# ------------------------------------------------------------------ helpers


def _positive(model: nn.Module) -> nn.Module:
    """Weights in [0.1, 1]: with a positive input and no ReLU or max pool,
    every input pixel a unit reads gets a strictly positive gradient."""
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.1, 1.0)
    return model.eval()


def _layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    got: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: got.append(o.clone()))
    try:
        model(x)
    finally:
        handle.remove()
    return got[0]


def _check_brute_force(
    model: nn.Module, layer: str, shape: tuple[int, ...], *, exact: bool = True
) -> list[tuple[int, int]]:
    """For every unit of ``layer``, the pixels with a nonzero gradient are exactly its box
    (``exact=False``: lie inside it). Returns the units whose box holds more than they
    see (none when exact)."""
    rf = receptive_field(model, layer, shape)
    assert rf.bounded, rf.reason
    # One copy of the image per unit, so one backward gives every unit's gradient.
    image = torch.rand(shape[1:]) + 0.5
    h, w = _layer_output(model, layer, image[None]).shape[-2:]
    ys, xs = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    x = image.expand(h * w, *shape[1:]).clone().requires_grad_(True)
    out = _layer_output(model, layer, x)
    (grads,) = torch.autograd.grad(out[torch.arange(h * w), :, ys, xs].sum(), x)
    loose = []
    for y in range(h):
        for x_ in range(w):
            seen = grads[y * w + x_].abs().sum(0) > 0
            top, bottom, left, right = rf.box(y, x_)
            expected = torch.zeros_like(seen)
            expected[top:bottom, left:right] = True
            if exact:
                assert torch.equal(seen, expected), (layer, (y, x_), rf.box(y, x_))
            else:
                assert not (seen & ~expected).any(), (layer, (y, x_), rf.box(y, x_))
                if not torch.equal(seen, expected):
                    loose.append((y, x_))
    return loose


# ------------------------------------------------------------ hand-computed


def test_simple_cnn_hand_values():
    # Per axis (stride S, lo, hi): input (1, 0, 1); conv 3x3 p1 gives (S, lo - S, hi + S);
    # the 2x2 pool gives (2S, lo, hi + S). size = hi - lo, offset = lo.
    m = SimpleCNN()
    shape = (1, 3, 64, 64)
    expected = {  # layer: (size, stride, offset)
        "conv1": (3, 1, -1),
        "bn1": (3, 1, -1),
        "pool#0": (4, 2, -1),
        "conv2": (8, 2, -3),
        "bn2": (8, 2, -3),
        "pool#1": (10, 4, -3),
        "bn3": (18, 4, -7),
        "pool#2": (22, 8, -7),
    }
    for layer, (size, stride, offset) in expected.items():
        rf = receptive_field(m, layer, shape)
        assert (rf.layer, rf.input_hw, rf.bounded, rf.reason) == (layer, (64, 64), True, "")
        assert (rf.size, rf.stride, rf.offset) == ((size,) * 2, (stride,) * 2, (offset,) * 2)
    bn3 = receptive_field(m, "bn3", shape)
    assert bn3.box(0, 0) == (0, 11, 0, 11)  # [-7, 11) clipped at 0
    assert bn3.box(5, 3) == (13, 31, 5, 23)  # rows -7 + 20 .. +18, columns -7 + 12 .. +18
    assert bn3.box(15, 15) == (53, 64, 53, 64)  # the bottom-right unit, clipped at 64
    assert bn3.box(15, 0) == (53, 64, 0, 11)


def test_simple_cnn_global_layers_and_calls():
    m = SimpleCNN()
    for layer in ("gap", "fc"):
        rf = receptive_field(m, layer, (1, 3, 64, 64))
        assert not rf.bounded
        assert rf.reason == "'gap' (AdaptiveAvgPool2d) pools the whole map"
        assert rf.box(0, 0) == (0, 64, 0, 64)
    with pytest.raises(ValueError, match=r"runs 3 times.*pool#0\.\.pool#2"):
        receptive_field(m, "pool", (1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"pool#3 does not exist"):
        receptive_field(m, "pool#3", (1, 3, 64, 64))


def test_resnet18_hand_values():
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.resnet18(weights=None)
    # conv1 7x7 s2 p3: (2, -3, 4); maxpool 3 s2 p1: (4, -5, 6). layer1: four 3x3 p1 convs,
    # each -4/+4: (4, -21, 22) (the identity shortcuts lie inside). layer2.0: conv1 3x3 s2
    # p1 (8, -25, 26), conv2 (8, -33, 34); downsample 1x1 s2 (8, -21, 22), inside it.
    # layer2.1: two more 3x3 convs, -8/+8 each: (8, -49, 50), the known 99.
    expected = {
        "conv1": (7, 2, -3),
        "maxpool": (11, 4, -5),
        "layer1": (43, 4, -21),
        "layer1.0.bn2": (27, 4, -13),
        "layer2.0.downsample": (43, 8, -21),
        "layer2.0.bn2": (67, 8, -33),
        "layer2": (99, 8, -49),
    }
    for layer, (size, stride, offset) in expected.items():
        rf = receptive_field(m, layer, (1, 3, 224, 224))
        assert (rf.size, rf.stride, rf.offset) == ((size,) * 2, (stride,) * 2, (offset,) * 2)
    rf = receptive_field(m, "layer2", (1, 3, 224, 224))
    assert rf.box(0, 0) == (0, 50, 0, 50)
    assert rf.box(27, 27) == (167, 224, 167, 224)  # -49 + 216 = 167; 167 + 99 clipped
    assert not receptive_field(m, "fc", (1, 3, 224, 224)).bounded


# -------------------------------------------------------------- brute force


class Chain(nn.Module):
    """Stride 2 with an even kernel, dilation, asymmetric zero pads, average pooling and
    a non-square kernel, on a non-square input."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 4, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, dilation=2)  # unpadded: see test_hull_at_borders
        self.pad = nn.ZeroPad2d((1, 2, 0, 1))  # left, right, top, bottom
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.c3 = nn.Conv2d(3, 2, (2, 3), padding=(0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.pool(self.pad(self.c2(self.c1(x)))))


def test_brute_force_chain():
    m = _positive(Chain())
    shape = (1, 2, 30, 26)
    for layer in ("c1", "c2", "pool", "c3"):
        _check_brute_force(m, layer, shape)
    rf = receptive_field(m, "c3", shape)
    # (S, lo, hi): c1 (2, -1, 3); c2 d2: (2, -1, 11); pad top 0 / left 1: rows
    # (2, -1, 11), cols (2, -3, 9); pool: rows (4, -3, 13), cols (4, -5, 11); c3 (2, 3)
    # p(0, 1): rows (4, -3, 17), cols (4, -9, 15).
    assert (rf.stride, rf.size, rf.offset) == ((4, 4), (20, 24), (-3, -9))


class Residual(nn.Module):
    """A strided block with a 1x1 stride-2 shortcut, then an in-place sum read through the
    tensor it changed (the graph's ``out`` reads ``small``'s node, which now holds the sum)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.short = nn.Conv2d(2, 3, 1, stride=2)
        self.block = nn.Identity()
        self.small = nn.Conv2d(3, 3, 1)
        self.big = nn.Conv2d(3, 3, 5, padding=2)
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.b(self.a(x)) + self.short(x))
        y = self.small(h)
        y.add_(self.big(h))  # fx traces `y += ...` as `y = y + ...`: not in place
        return self.out(y)


def test_brute_force_residual_and_inplace_sum():
    m = _positive(Residual())
    shape = (1, 2, 17, 20)
    for layer in ("short", "block", "small", "out"):
        _check_brute_force(m, layer, shape)
    short = receptive_field(m, "short", shape)
    assert (short.size, short.stride) == ((1, 1), (2, 2))  # a 1x1 stride-2 conv alone
    # block: a (2, -1, 2), b (2, -3, 4); the shortcut (2, 0, 1) lies inside it.
    block = receptive_field(m, "block", shape)
    assert (block.size, block.offset) == ((7, 7), (-3, -3))
    assert receptive_field(m, "small", shape).size == (7, 7)  # before the += reached it
    assert receptive_field(m, "out", shape).size == (15, 15)  # big: -4/+4 on (2, -3, 4)


class Branches(nn.Module):
    """Three branches of different kernels joined along channels, then a strided conv."""

    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(2, 2, 3, padding=1)
        self.b2 = nn.Conv2d(2, 2, 5, padding=2)
        self.b3 = nn.Conv2d(2, 2, (5, 1), padding=(2, 0))  # inside b2's: see test_hull_*
        self.joined = nn.Identity()
        self.head = nn.Conv2d(6, 2, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)
        return self.head(self.joined(y))


def test_brute_force_channel_concatenation():
    m = _positive(Branches())
    shape = (1, 2, 15, 16)
    for layer in ("b1", "joined", "head"):
        _check_brute_force(m, layer, shape)
    joined = receptive_field(m, "joined", shape)
    assert (joined.size, joined.offset) == ((5, 5), (-2, -2))  # 5x5 holds 3x3 and 5x1


class Padded(nn.Module):
    """Reflect and replicate padding (they read border pixels again, inside the window)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(2, 2, 3, stride=2, padding=1, padding_mode="replicate")
        self.c3 = nn.Conv2d(2, 2, 5, padding=2, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c3(self.c2(self.c1(x)))


def test_brute_force_reflect_and_replicate_padding():
    m = _positive(Padded())
    for layer in ("c1", "c2", "c3"):
        _check_brute_force(m, layer, (1, 2, 15, 14))
    circular = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"))
    rf = receptive_field(circular, "0", (1, 2, 8, 8))
    assert not rf.bounded and "circular" in rf.reason


class TFSame(nn.Module):
    """timm's TF-"same" layers: the top/left padding depends on the input size."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers import Conv2dSame
        from timm.layers.pool2d_same import AvgPool2dSame

        self.c1 = Conv2dSame(2, 3, 4, stride=2)
        self.c2 = Conv2dSame(3, 3, 5, stride=2)
        self.pool = AvgPool2dSame(3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.c2(self.c1(x)))


def test_brute_force_timm_same_padding():
    pytest.importorskip("timm")
    m = _positive(TFSame())
    shape = (1, 2, 21, 24)
    for layer in ("c1", "c2", "pool"):
        _check_brute_force(m, layer, shape)
    # c2 (k5, s2) pads 2 on top of c1's 11 rows (total 4) but 1 left of its 12 columns
    # (total 3): rows (4, -1 - 2*2, 3 + 2*2), columns (4, -1 - 1*2, 3 + 3*2).
    c2 = receptive_field(m, "c2", shape)
    assert (c2.stride, c2.offset, c2.size) == ((4, 4), (-5, -3), (12, 12))


def _clipped(rf: ReceptiveField, y: int, x: int) -> bool:
    top, left = rf.offset[0] + y * rf.stride[0], rf.offset[1] + x * rf.stride[1]
    H, W = rf.input_hw
    return top < 0 or left < 0 or top + rf.size[0] > H or left + rf.size[1] > W


def test_hull_at_borders_and_of_uneven_branches():
    """Where the box is a hull, not the exact set: it holds every pixel seen, and is larger
    for some units at the border (where it is clipped) and for uneven branches."""
    shape = (1, 2, 15, 12)
    # A padded dilated conv: unit 1's window starts in the padding and skips c1's unit 0.
    dilated = _positive(nn.Sequential(nn.Conv2d(2, 2, 4, 2, 1), nn.Conv2d(2, 2, 3, 1, 2, 2)))
    # 2x2 stride 2 never reads row 14; the next conv's bottom padding sits where it was.
    dropped = _positive(nn.Sequential(nn.Conv2d(2, 2, 2, 2), nn.Conv2d(2, 2, 3, padding=1)))
    for model, unit in ((dilated, (0, 1)), (dropped, (6, 0))):
        loose = _check_brute_force(model, "1", shape, exact=False)
        rf = receptive_field(model, "1", shape)
        assert unit in loose and all(_clipped(rf, *u) for u in loose), loose
    # Units that read only ZeroPad2d's zeros see nothing at all.
    assert (0, 0) in _check_brute_force(_positive(Chain()), "pad", (1, 2, 30, 26), exact=False)
    # Branches 3x3, 1x7, 5x1: their union is a cross, each box its bounding rectangle.
    cross = Branches()
    cross.b2 = nn.Conv2d(2, 2, (1, 7), padding=(0, 3))
    loose = _check_brute_force(_positive(cross), "joined", shape, exact=False)
    assert len(loose) == 15 * 12
    assert receptive_field(cross, "joined", shape).size == (5, 7)


# ---------------------------------------------------------------- unbounded


class Upsampled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.up(self.c1(x)))


def test_upsample_is_unbounded_but_layers_before_it_are_not():
    m = Upsampled()
    rf = receptive_field(m, "c2", (1, 3, 16, 12))
    assert not rf.bounded
    assert rf.reason == "'up' (Upsample) cannot be bounded"
    assert rf.box(0, 0) == rf.box(20, 7) == (0, 16, 0, 12)
    before = receptive_field(m, "c1", (1, 3, 16, 12))
    assert before.bounded and before.size == (3, 3)


class Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.c1(x), self.c2(x)], dim=2))


def test_concatenation_along_rows_is_unbounded():
    rf = receptive_field(Stacked(), "out", (1, 3, 8, 8))
    assert not rf.bounded
    assert rf.reason == "'cat' along dim 2 cannot be bounded (only channels, dim 1)"


class Gated(nn.Module):
    """A squeeze-excite gate, beside products with a parameter and a number."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(1, 4, 1, 1))
        self.scaled = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.gated = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scaled(self.conv(x) * self.scale + 1.0)
        return self.gated(x * torch.sigmoid(self.fc(self.pool(x))))


def test_squeeze_excite_gate_is_unbounded_constants_are_not():
    m = Gated()
    scaled = receptive_field(m, "scaled", (1, 3, 16, 16))
    assert scaled.bounded and scaled.size == (3, 3)
    gated = receptive_field(m, "gated", (1, 3, 16, 16))
    assert not gated.bounded
    assert gated.reason == "'pool' (AdaptiveAvgPool2d) pools the whole map"


class ShapeReader(nn.Module):
    """Reads sizes, makes zeros from them, casts: none of it widens the field."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        n, c = x.size(0), x.shape[1]
        x = x * (c / 4) + x.new_zeros(n, c, 1, 1) + torch.zeros_like(x)
        return self.out(F.relu(x.contiguous().float()))


def test_shape_reads_do_not_unbound():
    rf = receptive_field(ShapeReader(), "out", (2, 3, 16, 16))
    assert rf.bounded, rf.reason
    assert (rf.size, rf.stride, rf.offset) == ((3, 3), (2, 2), (-1, -1))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 2
        return self.conv(x)


def test_untraceable_model_is_unbounded_with_the_reason():
    m = DataDependent()
    rf = receptive_field(m, "conv", (1, 3, 8, 8))
    assert not rf.bounded
    assert rf.reason.startswith("torch.fx cannot trace the model")
    assert rf.box(3, 3) == (0, 8, 0, 8)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


# ---------------------------------------------------------------- plumbing


def test_data_parallel_training_flags_and_hooks():
    m = SimpleCNN().train()
    m.bn2.eval()
    flags = [mod.training for mod in m.modules()]
    wrapped = nn.DataParallel(m)
    for layer in ("bn1", "pool#1", "bn3", "fc"):
        assert receptive_field(wrapped, layer, (1, 3, 32, 32)) == receptive_field(
            m, layer, (1, 3, 32, 32)
        )
    assert [mod.training for mod in m.modules()] == flags
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_unknown_layer_lists_close_names():
    with pytest.raises(LayerNotFoundError, match="bn3") as e:
        receptive_field(SimpleCNN(), "bn4", (1, 3, 32, 32))
    assert "bn3" in e.value.suggestions


def test_one_trace_per_model_and_input_shape(monkeypatch):
    calls: list[tuple[int, ...]] = []
    compute = receptive._compute

    def spy(model, shape):
        calls.append(shape)
        return compute(model, shape)

    monkeypatch.setattr(receptive, "_compute", spy)
    m = SimpleCNN()
    for layer in ("bn1", "bn2", "pool#2", "fc"):
        receptive_field(m, layer, (1, 3, 32, 32))
    receptive_field(m, "bn1", (3, 32, 32))  # the same shape, batch of one
    assert calls == [(1, 3, 32, 32)]
    receptive_field(m, "bn1", (1, 3, 40, 40))
    assert calls == [(1, 3, 32, 32), (1, 3, 40, 40)]


def test_to_dict_and_validation():
    rf = receptive_field(SimpleCNN(), "bn2", (1, 3, 64, 48))
    d = json.loads(json.dumps(rf.to_dict()))
    assert d == {
        "layer": "bn2",
        "input_hw": [64, 48],
        "stride": [2, 2],
        "size": [8, 8],
        "offset": [-3, -3],
        "bounded": True,
        "reason": "",
    }
    with pytest.raises(ValueError, match="0 or more"):
        rf.box(-1, 0)
    with pytest.raises(TypeError, match="integer"):
        rf.box(1.5, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        rf.box(0, 40)  # columns [77, 85) of a 48-wide input
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        receptive_field(SimpleCNN(), "bn2", (64, 48))
