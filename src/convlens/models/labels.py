"""Readable ImageNet-1k class names, shipped with convlens (no download).

``imagenet_simple_labels.json`` is anishathalye/imagenet-simple-labels @ 0f6e9ef (public
domain): one short, unique name per class in index order (652 is ``"military uniform"``).
torchvision models keep their own ``meta["categories"]``; timm models and
``efficientnet_lite0`` use this list.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

__all__ = ["imagenet_labels"]

_FILE = "imagenet_simple_labels.json"


@functools.cache
def _load() -> tuple[str, ...]:
    text = resources.files("convlens.models").joinpath(_FILE).read_text(encoding="utf-8")
    labels = json.loads(text)
    if not isinstance(labels, list) or len(labels) != 1000:
        raise RuntimeError(f"convlens' bundled {_FILE} is damaged: reinstall convlens")
    return tuple(str(s) for s in labels)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, in index order (a fresh list each call).

    Example:
        >>> imagenet_labels()[652]
        'military uniform'
    """
    return list(_load())
