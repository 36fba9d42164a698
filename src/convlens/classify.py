"""Top-k classification with readable labels, batched over many images.

``classify(bundle, image, k=5)`` loads and preprocesses each image the way the bundle's
model expects, runs the model in eval mode under ``no_grad`` in batches, and returns
:class:`Prediction` ``(label, index, probability)`` lists, most probable first.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import nn

from convlens.device import DeviceLike, resolve_device
from convlens.images import ImageSource, load_image
from convlens.models.forms import OutputKey, dtype_support, model_dtype, select_output
from convlens.models.layers import evaluating, unwrap
from convlens.models.zoo import ModelBundle

__all__ = ["Prediction", "classify"]

ImageLike = ImageSource | torch.Tensor


@dataclass(frozen=True)
class Prediction:
    """One of the top-k classes for one image: readable ``label``, class ``index`` and
    softmax ``probability``.

    Example:
        >>> Prediction("military uniform", 652, 0.19).to_dict()
        {'label': 'military uniform', 'index': 652, 'probability': 0.19}
    """

    label: str
    index: int
    probability: float

    def to_dict(self) -> dict[str, Any]:
        """``{"label", "index", "probability"}`` for JSON."""
        return {"label": self.label, "index": self.index, "probability": self.probability}


def _model_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


def _to_input(bundle: ModelBundle, img: ImageLike, preprocessed: bool, where: str) -> torch.Tensor:
    c = len(bundle.preprocess.mean)
    if isinstance(img, torch.Tensor):
        if preprocessed:
            if img.ndim != 3 or img.shape[0] != c:
                raise ValueError(
                    f"{where}: expected the model's input [{c}, H, W], got {list(img.shape)}"
                )
            return img.float()
        takes = (1, 3) if c == 1 else (c,)  # a greyscale model takes RGB (made grey) too
        if img.ndim != 3 or img.shape[0] not in takes:
            what = "an RGB image tensor [3, H, W]" if c == 3 else f"an image [{c}, H, W]"
            raise ValueError(f"{where}: expected {what}, got {list(img.shape)}")
        lo, hi = float(img.min()), float(img.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"{where}: values in [{lo:.2f}, {hi:.2f}], not pixels in [0, 1]; if it is "
                "already the model's input (bundle.preprocess(...)), pass preprocessed=True"
            )
        return bundle.preprocess(img)
    if preprocessed:
        raise ValueError(f"{where}: preprocessed=True needs tensors, got {type(img).__name__}")
    return bundle.preprocess(load_image(img))


def _chunks(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def _logits(out: Any, output: OutputKey | None = None) -> torch.Tensor:
    # A tensor; or from a dict / tuple / dataclass the entry ``output`` names, by default
    # the only 2-d tensor, else ``logits`` (GoogLeNet's output tuple in train mode).
    return select_output(out, output, what="classify")[0]


@overload
def classify(
    bundle: ModelBundle,
    image: ImageSource,
    k: int = 5,
    *,
    batch_size: int = 32,
    device: DeviceLike | None = None,
    preprocessed: bool = False,
    progress: bool = False,
    output: OutputKey | None = None,
) -> list[Prediction]: ...


@overload
def classify(
    bundle: ModelBundle,
    image: list[ImageLike] | tuple[ImageLike, ...],
    k: int = 5,
    *,
    batch_size: int = 32,
    device: DeviceLike | None = None,
    preprocessed: bool = False,
    progress: bool = False,
    output: OutputKey | None = None,
) -> list[list[Prediction]]: ...


@overload
def classify(  # [3, H, W]: one image; [N, 3, H, W]: a batch
    bundle: ModelBundle,
    image: torch.Tensor,
    k: int = 5,
    *,
    batch_size: int = 32,
    device: DeviceLike | None = None,
    preprocessed: bool = False,
    progress: bool = False,
    output: OutputKey | None = None,
) -> list[Prediction] | list[list[Prediction]]: ...


def classify(
    bundle: ModelBundle,
    image: ImageLike | list[ImageLike] | tuple[ImageLike, ...],
    k: int = 5,
    *,
    batch_size: int = 32,
    device: DeviceLike | None = None,
    preprocessed: bool = False,
    progress: bool = False,
    output: OutputKey | None = None,
) -> list[Prediction] | list[list[Prediction]]:
    """The ``k`` most probable classes of ``image``, most probable first.

    ``image`` is anything :func:`convlens.load_image` takes (path, URL, bytes, PIL image,
    array) or a ``[3, H, W]`` tensor in [0, 1]; each is preprocessed with
    ``bundle.preprocess``. A list (or a ``[N, 3, H, W]`` tensor) gives one list per
    image, computed in batches of ``batch_size``. ``preprocessed=True`` takes tensors that
    already are the model's input. ``device``: ``None`` runs where the model is;
    otherwise the model is moved there (in place). Probabilities are the softmax of the
    logits, in float32 (the output itself for a model whose ``outputs_probabilities`` is
    true, such as ``inceptionv1``, which ends in ``softmax2``). A random-init bundle warns
    that its predictions mean nothing.

    Any model form: ``torch.compile`` and DataParallel are unwrapped, a TorchScript module
    just runs (classify needs no hooks), a float16 / bfloat16 model gets its input cast
    to its dtype, and a model that returns a dict, tuple, list, namedtuple or dataclass
    has its class scores chosen by ``output`` (a key, an index or an attribute name; by
    default the only 2-d tensor). A greyscale bundle (a normalisation of one value) takes
    RGB images and makes them grey.

    Example:
        >>> bundle = convlens.load_model("efficientnet_lite0")
        >>> [p.label for p in convlens.classify(bundle, convlens.sample_image(), k=3)]
        ['academic gown', 'square academic cap', 'military uniform']
    """
    if not isinstance(bundle, ModelBundle):
        raise TypeError(
            f"classify takes a ModelBundle (convlens.load_model(...)), not {type(bundle).__name__}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    single = not isinstance(image, (list, tuple)) and not (
        isinstance(image, torch.Tensor) and image.ndim == 4
    )
    items: Sequence[ImageLike] = [image] if single else list(image)  # type: ignore[list-item, arg-type]
    if not items:
        raise ValueError("no images to classify")
    if not bundle.pretrained:
        warnings.warn(
            f"{bundle.description}: predictions of an untrained model are meaningless "
            "(load it with weights='default')",
            UserWarning,
            stacklevel=2,
        )
    model = unwrap(bundle.model)
    if device is not None:
        model.to(resolve_device(device))
    dev = _model_device(model)
    dtype = model_dtype(model)
    labels = bundle.labels or []
    already_softmax = bool(getattr(model, "outputs_probabilities", False))
    results: list[list[Prediction]] = []
    chunks = _chunks(items, batch_size)
    if progress:
        from convlens._progress import tqdm

        total = -(-len(items) // batch_size)
        chunks = tqdm(chunks, total=total, desc="classify", unit="batch", disable=None)
    with evaluating(model), torch.no_grad(), dtype_support(dtype, dev):
        for start, chunk in chunks:
            x = torch.stack(
                [
                    _to_input(bundle, im, preprocessed, f"image {start + i}")
                    for i, im in enumerate(chunk)
                ]
            ).to(dev, dtype)
            logits = _logits(model(x), output)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(
                    f"the model returned shape {list(logits.shape)}, not class scores "
                    f"[{x.shape[0]}, classes]: classify needs a classifier"
                )
            probs = logits.float() if already_softmax else logits.float().softmax(dim=1)
            top_p, top_i = probs.topk(min(k, probs.shape[1]), dim=1)
            for ps, idx in zip(top_p.cpu().tolist(), top_i.cpu().tolist()):
                results.append(
                    [
                        Prediction(labels[i] if i < len(labels) else f"class {i}", int(i), p)
                        for p, i in zip(ps, idx)
                    ]
                )
    return results[0] if single else results
