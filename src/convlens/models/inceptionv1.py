"""InceptionV1 (GoogLeNet) as Lucid and Lucent use it: TensorFlow's ``inception5h`` graph.

This is the network of the feature-visualization literature (Olah et al., Distill 2017),
with the layer names of the TensorFlow graph: ``conv2d0``, ``maxpool0``,
``localresponsenorm0``, ``conv2d1``, ``conv2d2``, ``localresponsenorm1``, ``maxpool1``,
``mixed3a``, ``mixed3b``, ``maxpool4``, ``mixed4a`` ... ``mixed4e``, ``maxpool10``,
``mixed5a``, ``mixed5b``, ``avgpool0``, ``softmax2``. Each conv layer is a convolution
``<name>_pre_relu_conv`` followed by an ``nn.ReLU`` called ``<name>``; each ``mixedXX``
block has four branches (``_1x1``; ``_3x3_bottleneck`` then ``_3x3``; ``_5x5_bottleneck``
then ``_5x5``; ``_pool`` then ``_pool_reduce``) joined by a :class:`Concat` module called
``mixedXX`` in that order, so hooking ``"mixed4a"`` gives the block's output.

Facts taken from the published layout (torch-lucent 0.1.8, ``lucent/modelzoo/inceptionv1``
and ``lucent/optvis/transform.py``):

- weights: :data:`WEIGHTS_URL`, ProGamerGov's conversion of the TensorFlow graph, a state
  dict of 116 tensors: 57 convolutions ``<layer>_pre_relu_conv.{weight,bias}`` and the
  classifier ``softmax2_pre_activation_matmul.{weight,bias}`` (1024 -> 1008). The file has
  no auxiliary heads (``softmax0``/``softmax1``); Lucent neither builds nor computes them.
- input: RGB pixels in [-117, 138], i.e. ``x * 255 - 117`` for ``x`` in [0, 1].
- TensorFlow ``SAME`` padding as fixed pads, exact for even sizes: ``conv2d0`` (7x7,
  stride 2) pads 2 left/top and 3 right/bottom; the stride-2 max pools (3x3) pad one
  ``-inf`` row/column on the right/bottom; 3x3 and 5x5 convolutions pad 1 and 2 zeros on
  every side, the stride-1 branch pools 1 ``-inf`` on every side.
- local response normalisation after ``maxpool0`` and after ``conv2d2``: size 9,
  alpha 9.99999974738e-05, beta 0.5, k 1 (PyTorch's convention: alpha is divided by size).
- 1008 outputs: 0 is ``"dummy"`` (background), 1..1000 the ImageNet classes in the order
  of TensorFlow's ``imagenet_comp_graph_label_strings.txt``, 1001..1007 unused.

Two deliberate differences from Lucent's ``InceptionV1``, both documented on the class:
the classifier pools globally (Lucent's fixed 7x7 average pool and ``reshape(-1, 1024)``
are right only at 224 px), and ReLU gradients are PyTorch's unless
``redirected_relu=True`` (Lucent's default).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INPUT_MEAN",
    "INPUT_SCALE",
    "MIN_INPUT_SIZE",
    "NUM_CLASSES",
    "WEIGHTS_URL",
    "Concat",
    "InceptionV1",
    "PaddedConv2d",
    "PaddedMaxPool2d",
    "RedirectedReLU",
    "inception5h_labels",
]

#: Where Lucent's model zoo downloads the converted ``inception5h`` weights from.
WEIGHTS_URL = (
    "https://github.com/ProGamerGov/pytorch-old-tensorflow-models/raw/master/inception5h.pth"
)
#: The classifier's outputs: background, 1000 ImageNet classes, 7 unused.
NUM_CLASSES = 1008
#: The model's input is ``x * INPUT_SCALE - INPUT_MEAN`` for pixels ``x`` in [0, 1].
INPUT_SCALE = 255.0
INPUT_MEAN = 117.0
#: The smallest input side the layers accept (every stride-2 stage needs 2 pixels).
MIN_INPUT_SIZE = 32

_LABELS_FILE = "inception5h_labels.json"


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(9, alpha=9.99999974738e-05, beta=0.5, k=1.0)


class _Mixed(NamedTuple):
    """One inception block: input channels and the width of each branch."""

    name: str
    cin: int
    c1x1: int
    c3x3_bottleneck: int
    c3x3: int
    c5x5_bottleneck: int
    c5x5: int
    pool_reduce: int

    @property
    def cout(self) -> int:
        return self.c1x1 + self.c3x3 + self.c5x5 + self.pool_reduce


# fmt: off
_BLOCKS = (
    _Mixed("mixed3a", 192, 64, 96, 128, 16, 32, 32),      # -> 256
    _Mixed("mixed3b", 256, 128, 128, 192, 32, 96, 64),    # -> 480
    _Mixed("mixed4a", 480, 192, 96, 204, 16, 48, 64),     # -> 508
    _Mixed("mixed4b", 508, 160, 112, 224, 24, 64, 64),    # -> 512
    _Mixed("mixed4c", 512, 128, 128, 256, 24, 64, 64),    # -> 512
    _Mixed("mixed4d", 512, 112, 144, 288, 32, 64, 64),    # -> 528
    _Mixed("mixed4e", 528, 256, 160, 320, 32, 128, 128),  # -> 832
    _Mixed("mixed5a", 832, 256, 160, 320, 48, 128, 128),  # -> 832
    _Mixed("mixed5b", 832, 384, 192, 384, 48, 128, 128),  # -> 1024
)
# fmt: on
#: The stride-2 max pool that comes before these blocks.
_POOL_BEFORE = {"mixed4a": "maxpool4", "mixed5a": "maxpool10"}


class _RedirectedReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.where(x < 0, grad * 0.1, grad)


class RedirectedReLU(nn.ReLU):
    """A ReLU whose gradient is 0.1 (not 0) where its input is negative; the forward is a
    plain ReLU. This is Lucent's ``RedirectedReLU``, which its ``InceptionV1`` uses by
    default so that feature visualization from a random image is not stuck at dead units
    (Lucid's own version redirects only while no gradient flows at all).

    Example:
        >>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
        >>> RedirectedReLU()(x).sum().backward()
        >>> x.grad
        tensor([0.1000, 1.0000])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _RedirectedReLUFunction.apply(x)
        return out


class Concat(nn.Module):
    """Joins an inception block's branches along the channel dimension; its output is the
    block's output (what a hook on ``"mixed4a"`` sees).

    Example:
        >>> Concat()(torch.ones(1, 2, 4, 4), torch.zeros(1, 3, 4, 4)).shape
        torch.Size([1, 5, 4, 4])
    """

    def forward(self, *branches: torch.Tensor) -> torch.Tensor:
        return torch.cat(branches, dim=1)


class PaddedConv2d(nn.Conv2d):
    """A convolution after fixed zero pads ``(left, right, top, bottom)``: TensorFlow's
    ``SAME`` for a stride-2 kernel, which pads more on the right and bottom.

    Example:
        >>> PaddedConv2d(3, 8, 7, stride=2, pads=(2, 3, 2, 3))(torch.rand(1, 3, 224, 224)).shape
        torch.Size([1, 8, 112, 112])
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, pads: tuple[int, ...]):
        super().__init__(cin, cout, kernel, stride=stride)
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pads={self.pads}"


class PaddedMaxPool2d(nn.MaxPool2d):
    """A 3x3 stride-2 max pool after one ``-inf`` row and column on the right and bottom
    (TensorFlow's ``SAME`` for even sizes).

    Example:
        >>> PaddedMaxPool2d()(torch.rand(1, 8, 112, 112)).shape
        torch.Size([1, 8, 56, 56])
    """

    def __init__(self) -> None:
        super().__init__(kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1), value=float("-inf")))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pads=(0, 1, 0, 1)"


class InceptionV1(nn.Module):
    """InceptionV1 with the layer names and weights layout of TensorFlow's ``inception5h``
    (as in Lucid and Lucent), for pixels mapped with ``x * 255 - 117`` (RGB).

    The output is ``softmax2``: class probabilities ``[N, 1008]`` (the logits are the
    output of ``softmax2_pre_activation_matmul``). Differences from Lucent 0.1.8's model:

    - ``avgpool0`` averages over the whole map, so any input of at least
      :data:`MIN_INPUT_SIZE` px works; at 224 px this equals Lucent's 7x7 average pool.
      Lucent's fixed pool fails below 224 px and returns several rows per image above.
    - ReLUs pass PyTorch's gradients; ``redirected_relu=True`` makes every ReLU a
      :class:`RedirectedReLU` (Lucent's default), which changes gradients only.
    - the auxiliary heads (``softmax0``, ``softmax1``) are absent, as in Lucent and in the
      weights file. The pads reproduce Lucent's fixed pads, which match TensorFlow's
      ``SAME`` at even sizes only (odd intermediate sizes lose a row, as in Lucent).

    ``num_classes`` other than 1008 gives a fresh classifier (for fine-tuning).

    Example:
        >>> model = InceptionV1().eval()
        >>> x = torch.rand(1, 3, 224, 224) * 255 - 117
        >>> model(x).shape
        torch.Size([1, 1008])
    """

    #: The output is already a softmax (``convlens.classify`` reads this and does not
    #: apply another).
    outputs_probabilities = True

    def __init__(self, num_classes: int = NUM_CLASSES, *, redirected_relu: bool = False) -> None:
        super().__init__()
        relu = RedirectedReLU if redirected_relu else nn.ReLU
        self.redirected_relu = redirected_relu
        self.conv2d0_pre_relu_conv = PaddedConv2d(3, 64, 7, stride=2, pads=(2, 3, 2, 3))
        self.conv2d0 = relu()
        self.maxpool0 = PaddedMaxPool2d()
        self.localresponsenorm0 = _lrn()
        self.conv2d1_pre_relu_conv = nn.Conv2d(64, 64, 1)
        self.conv2d1 = relu()
        self.conv2d2_pre_relu_conv = nn.Conv2d(64, 192, 3, padding=1)
        self.conv2d2 = relu()
        self.localresponsenorm1 = _lrn()
        self.maxpool1 = PaddedMaxPool2d()
        for b in _BLOCKS:
            if b.name in _POOL_BEFORE:
                self.add_module(_POOL_BEFORE[b.name], PaddedMaxPool2d())
            self._add_block(b, relu)
        self.avgpool0 = nn.AdaptiveAvgPool2d(1)
        self.softmax2_pre_activation_matmul = nn.Linear(_BLOCKS[-1].cout, num_classes)
        self.softmax2 = nn.Softmax(dim=1)
        self.reset_parameters()

    def _add_block(self, b: _Mixed, relu: type[nn.ReLU]) -> None:
        def conv_relu(branch: str, cin: int, cout: int, kernel: int) -> None:
            conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
            self.add_module(f"{b.name}_{branch}_pre_relu_conv", conv)
            self.add_module(f"{b.name}_{branch}", relu())

        conv_relu("1x1", b.cin, b.c1x1, 1)
        conv_relu("3x3_bottleneck", b.cin, b.c3x3_bottleneck, 1)
        conv_relu("3x3", b.c3x3_bottleneck, b.c3x3, 3)
        conv_relu("5x5_bottleneck", b.cin, b.c5x5_bottleneck, 1)
        conv_relu("5x5", b.c5x5_bottleneck, b.c5x5, 5)
        self.add_module(f"{b.name}_pool", nn.MaxPool2d(3, stride=1, padding=1))
        conv_relu("pool_reduce", b.cin, b.pool_reduce, 1)
        self.add_module(b.name, Concat())

    def reset_parameters(self) -> None:
        """A random init whose activations stay in range at every depth for inputs in
        [-117, 138]: He-normal convolutions, zero biases, a small classifier (so the
        untrained softmax is not one-hot)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=3e-4)
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = getattr(self, name)(x)
        return out

    def _block(self, name: str, x: torch.Tensor) -> torch.Tensor:
        def branch(part: str, inp: torch.Tensor) -> torch.Tensor:
            return self._run(f"{name}_{part}", self._run(f"{name}_{part}_pre_relu_conv", inp))

        b1 = branch("1x1", x)
        b3 = branch("3x3", branch("3x3_bottleneck", x))
        b5 = branch("5x5", branch("5x5_bottleneck", x))
        bp = branch("pool_reduce", self._run(f"{name}_pool", x))
        concat: Concat = getattr(self, name)
        return concat(b1, b3, b5, bp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, 1008]`` for a batch ``[N, 3, H, W]`` of pixels mapped
        with ``x * 255 - 117``."""
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"InceptionV1 takes a batch [N, 3, H, W] with H, W >= {MIN_INPUT_SIZE}, got "
                f"{list(x.shape)}: add a batch dimension (x[None]) or enlarge the image"
            )
        x = self.conv2d0(self.conv2d0_pre_relu_conv(x))
        x = self.localresponsenorm0(self.maxpool0(x))
        x = self.conv2d1(self.conv2d1_pre_relu_conv(x))
        x = self.conv2d2(self.conv2d2_pre_relu_conv(x))
        x = self.maxpool1(self.localresponsenorm1(x))
        for b in _BLOCKS:
            if b.name in _POOL_BEFORE:
                x = self._run(_POOL_BEFORE[b.name], x)
            x = self._block(b.name, x)
        x = torch.flatten(self.avgpool0(x), 1)
        return self.softmax2(self.softmax2_pre_activation_matmul(x))


@functools.cache
def _labels() -> tuple[str, ...]:
    text = resources.files("convlens.models").joinpath(_LABELS_FILE).read_text(encoding="utf-8")
    labels = json.loads(text)
    if not isinstance(labels, list) or len(labels) != NUM_CLASSES:
        raise RuntimeError(f"convlens' bundled {_LABELS_FILE} is damaged: reinstall convlens")
    return tuple(str(s) for s in labels)


def inception5h_labels() -> list[str]:
    """The names of InceptionV1's 1008 outputs, in index order (a fresh list each call):
    ``"dummy"`` at 0 and 1001..1007, the ImageNet classes in between, in the order of
    TensorFlow's ``imagenet_comp_graph_label_strings.txt`` (WordNet's first name of each
    synset, as in torchvision's list, where the two ``crane``/``maillot`` pairs are told
    apart).

    Example:
        >>> inception5h_labels()[1:4]
        ['kit fox', 'English setter', 'Siberian husky']
    """
    return list(_labels())
