"""One way to name a model: ``simple_cnn``, a torchvision architecture, or a checkpoint.

``load_model(spec)`` returns a :class:`ModelBundle`: the model in eval mode with the
preprocessing it expects (resize, crop, normalisation), its class labels and its name.
Architectures without a checkpoint are randomly initialised from a seed (``pretrained`` is
``False`` and every output says so).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from convlens.device import DeviceLike, resolve_device
from convlens.errors import ModelLoadError
from convlens.models.checkpoint import read_checkpoint
from convlens.models.simple_cnn import SimpleCNN

__all__ = [
    "ModelBundle",
    "Preprocess",
    "as_batch",
    "build_architecture",
    "default_layers",
    "load_model",
    "torchvision_names",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, normalise: ``[3, H, W]`` in [0, 1] (or a PIL
    image) to the model's input ``[3, crop, crop]``.

    Example:
        >>> Preprocess(resize=256, crop=224)(torch.rand(3, 300, 400)).shape
        torch.Size([3, 224, 224])
    """

    resize: int | None = 256
    crop: int | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __call__(self, img: torch.Tensor | Image.Image) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF
        from torchvision.transforms import InterpolationMode

        if isinstance(img, Image.Image):
            from convlens.images import load_image

            img = load_image(img)
        if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3:
            raise ValueError("preprocess takes an RGB image [3, H, W] in [0, 1] or a PIL image")
        x = img.float()
        mode = InterpolationMode(self.interpolation)
        if self.resize is not None:
            x = TF.resize(x, [self.resize], interpolation=mode, antialias=True)
        if self.crop is not None:
            x = TF.center_crop(x, [self.crop, self.crop])
        return TF.normalize(x, list(self.mean), list(self.std))

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Back to ``[0, 1]`` pixel space (for display)."""
        m = torch.tensor(self.mean, device=x.device).view(-1, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(-1, 1, 1)
        return (x * s + m).clamp(0, 1)


@dataclass
class ModelBundle:
    """A model with everything needed to feed it and read its output."""

    model: nn.Module
    name: str
    arch: str
    preprocess: Preprocess
    labels: list[str] | None = None
    pretrained: bool = False
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def normalize(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` of the input normalisation."""
        return self.preprocess.mean, self.preprocess.std

    @property
    def input_size(self) -> int:
        """The side of the (square) input the preprocessing produces."""
        return int(self.preprocess.crop or self.preprocess.resize or 224)

    @property
    def description(self) -> str:
        """One line saying what this is, e.g. ``resnet18 (random init, seed 0)``."""
        if self.pretrained:
            return f"{self.name} ({self.source})"
        return f"{self.name} (random init, seed {self.info.get('seed', 0)}: not trained)"


def torchvision_names() -> list[str]:
    """torchvision's classification architectures (``resnet18``, ``googlenet``, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision_preprocess(name: str) -> tuple[Preprocess, list[str] | None]:
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return Preprocess(), None
    tf = weights.transforms()
    pre = Preprocess(
        resize=int(tf.resize_size[0]),
        crop=int(tf.crop_size[0]),
        mean=tuple(float(v) for v in tf.mean),
        std=tuple(float(v) for v in tf.std),
        interpolation=tf.interpolation.value,
    )
    return pre, list(weights.meta.get("categories") or []) or None


def build_architecture(arch: str, num_classes: int | None = None, *, seed: int = 0) -> nn.Module:
    """A randomly initialised model of architecture ``arch``, seeded so the same seed gives
    the same weights; the global RNG state is left untouched.

    Example:
        >>> build_architecture("simple_cnn", 10).fc.out_features
        10
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "simple_cnn":
            return SimpleCNN(num_classes=num_classes or 10)
        names = torchvision_names()
        if arch not in names:
            close = difflib.get_close_matches(arch, [*names, "simple_cnn"], n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ModelLoadError(
                f"unknown model {arch!r}{hint}. Use 'simple_cnn', a torchvision "
                "classification model name, or a checkpoint path"
            )
        import torchvision

        kwargs: dict[str, Any] = {"weights": None}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if arch in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = True
        return torchvision.models.get_model(arch, **kwargs)


def _from_checkpoint(path: Path, arch: str | None, seed: int) -> ModelBundle:
    state, info = read_checkpoint(path)
    arch = arch or info.get("arch")
    if arch is None:
        arch = "simple_cnn" if {"conv1.weight", "bn3.weight", "fc.weight"} <= set(state) else None
    if arch is None:
        raise ModelLoadError(
            f"{str(path)!r} does not say which architecture it holds: pass --arch NAME "
            "(e.g. --arch resnet18)"
        )
    num_classes = info.get("num_classes")
    if num_classes is None and "fc.weight" in state:
        num_classes = int(state["fc.weight"].shape[0])
    model = build_architecture(arch, num_classes, seed=seed)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = "; ".join(ln.strip() for ln in str(e).splitlines()[1:3])
        raise ModelLoadError(
            f"{str(path)!r} does not fit architecture {arch!r}: {detail} (pass the right --arch)"
        ) from None
    if missing or unexpected:
        raise ModelLoadError(
            f"{str(path)!r} does not fit architecture {arch!r}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]} "
            "(pass the right --arch)"
        )
    pre = (
        Preprocess(resize=160, crop=128)
        if arch == "simple_cnn"
        else _torchvision_preprocess(arch)[0]
    )
    if "preprocess" in info and isinstance(info["preprocess"], dict):
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in info["preprocess"].items()
        }
        pre = Preprocess(**fields)
    classes = info.get("classes")
    return ModelBundle(
        model=model,
        name=path.name,
        arch=arch,
        preprocess=pre,
        labels=list(classes) if classes else None,
        pretrained=True,
        source=f"checkpoint {path}",
        info={k: v for k, v in info.items() if k != "classes"},
    )


def load_model(
    spec: str | os.PathLike[str],
    *,
    arch: str | None = None,
    seed: int = 0,
    device: DeviceLike = "cpu",
) -> ModelBundle:
    """Resolve ``spec`` to a :class:`ModelBundle` (model in eval mode on ``device``).

    ``spec`` is ``"simple_cnn"``, a torchvision architecture name (``"resnet18"``,
    ``"googlenet"``, ...: random init from ``seed``), or a checkpoint path
    (``.safetensors`` with its JSON sidecar, a folder holding ``model.safetensors``, or a
    ``.pt``/``.pth`` state dict together with ``arch``).

    Example:
        >>> b = load_model("resnet18")
        >>> b.input_size, b.pretrained
        (224, False)
    """
    s = os.fspath(spec)
    dev = resolve_device(device)
    path = Path(s).expanduser()
    looks_like_path = path.suffix in (".safetensors", ".pt", ".pth", ".bin", ".json") or os.sep in s
    if path.exists() or looks_like_path:
        bundle = _from_checkpoint(path, arch, seed)
    else:
        model = build_architecture(s, seed=seed)
        if s == "simple_cnn":
            pre, labels = Preprocess(resize=160, crop=128), None
        else:
            pre, labels = _torchvision_preprocess(s)
        bundle = ModelBundle(
            model=model, name=s, arch=s, preprocess=pre, labels=labels, info={"seed": seed}
        )
    bundle.model.to(dev).eval()
    return bundle


def as_batch(bundle: ModelBundle, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Preprocess ``[3, H, W]`` images in [0, 1] into one model-input batch."""
    return torch.stack([bundle.preprocess(im) for im in images])


_DEFAULT_LAYERS: list[tuple[tuple[str, ...], list[str]]] = [
    (("conv1", "bn1", "bn3", "fc"), ["bn1", "bn3"]),  # simple_cnn
    (("layer1", "layer4"), ["layer1", "layer4"]),  # resnet family
    (("inception3a", "inception4e"), ["inception3a", "inception4e"]),  # googlenet
]


def default_layers(bundle: ModelBundle | nn.Module) -> list[str]:
    """An early and a deep layer to show by default (resnet: layer1/layer4; googlenet:
    inception3a/inception4e; simple_cnn: bn1/bn3); otherwise the first and last conv.

    Example:
        >>> default_layers(load_model("resnet18"))
        ['layer1', 'layer4']
    """
    model = bundle.model if isinstance(bundle, ModelBundle) else bundle
    names = {n for n, _ in model.named_modules()}
    for needed, layers in _DEFAULT_LAYERS:
        if set(needed) <= names:
            return list(layers)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) >= 2:
        return [convs[0], convs[-1]]
    raise ValueError(
        "no default layers for this model: pass --layers (see `convlens layers MODEL`)"
    )
