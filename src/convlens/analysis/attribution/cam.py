"""The class-activation-map family as pure tensor functions: Grad-CAM, Grad-CAM++, LayerCAM
and Score-CAM, plus the upsampling, display scaling and default layer they share.

Every function takes the layer's activations ``acts`` ``[N, K, h, w]`` (and, for the
gradient methods, ``grads`` = d(target)/d(acts) of the same shape) and returns **signed,
unscaled** maps: no ReLU, no min-max. :func:`normalize_maps` gives pytorch-grad-cam's
display scaling when asked. Hooks, targets and the model are the caller's business
(:func:`convlens.attribute`); nothing here touches a model except through ``score_fn``.

Numbers follow pytorch-grad-cam (jacobgil/pytorch-grad-cam, ``base_cam.py``,
``grad_cam.py``, ``grad_cam_plusplus.py``, ``layer_cam.py``, ``score_cam.py``) formula for
formula; where they differ from the papers the docstrings say so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from convlens.models.zoo import ModelBundle

__all__ = [
    "CAM_METHODS",
    "cam_map",
    "default_cam_layer",
    "normalize_maps",
    "scorecam_map",
    "scorecam_weights",
    "upsample_map",
]

#: The gradient-weighted methods :func:`cam_map` computes (Score-CAM has its own pair).
CAM_METHODS = ("gradcam", "gradcam_pp", "layercam")

#: pytorch-grad-cam's Grad-CAM++ denominator epsilon (``grad_cam_plusplus.py``).
_PP_EPS = 1e-6
#: pytorch-grad-cam's Score-CAM mask epsilon (``score_cam.py``: ``maxs - mins + 1e-8``).
_SCORE_EPS = 1e-8


def _check_maps(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.dim() != 4:
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(
            f"{name} must be a [N, K, h, w] tensor (a conv layer's output), got {shape}"
        )


def cam_map(method: str, acts: Tensor, grads: Tensor | None) -> Tensor:
    """The signed layer map ``[N, h, w]`` (float32) of a gradient CAM method.

    ``acts`` and ``grads`` are ``[N, K, h, w]``: the layer's activations and the gradient
    of the target with respect to them.

    - ``"gradcam"`` (Selvaraju et al. 2017): ``w_k = mean_ij g_kij``, map ``sum_k w_k A_k``;
      the same operations, in the same order, as Captum's ``LayerGradCam`` with
      ``relu_attributions=False`` (pytorch-grad-cam then clips at 0).
    - ``"gradcam_pp"`` (Chattopadhyay et al. 2018, their Eq. 19 for an exponential output,
      with the raw score's gradient as pytorch-grad-cam uses it):
      ``alpha = g^2 / (2 g^2 + sum_ij(A_k) g^3 + 1e-6)``, ``alpha = 0`` where ``g == 0``,
      ``w_k = sum_ij relu(g) alpha``, map ``sum_k w_k A_k`` (pytorch-grad-cam's formula and
      epsilon exactly; its denominator is not guarded further, nor is this one).
    - ``"layercam"`` (Jiang et al. 2021): map ``sum_k relu(g_kij) A_kij``.

    Nothing is clipped or scaled: apply :func:`normalize_maps` for a display.

    Example:
        >>> acts = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        >>> cam_map("gradcam", acts, torch.full_like(acts, 0.5))
        tensor([[[0.5000, 1.0000],
                 [1.5000, 2.0000]]])
    """
    if method not in CAM_METHODS:
        raise ValueError(
            f"unknown CAM method {method!r}: use one of {', '.join(CAM_METHODS)} "
            "(Score-CAM: scorecam_weights + scorecam_map)"
        )
    _check_maps("acts", acts)
    if grads is None:
        raise ValueError(f"{method} needs grads: the gradient of the target w.r.t. acts")
    _check_maps("grads", grads)
    if grads.shape != acts.shape:
        raise ValueError(
            f"grads {tuple(grads.shape)} must have the shape of acts {tuple(acts.shape)}"
        )
    a = acts.detach().float()
    g = grads.detach().float()
    if method == "gradcam":
        # Captum LayerGradCam: mean over the spatial dims, keepdim, product, sum over K.
        w = torch.mean(g, dim=(2, 3), keepdim=True)
        return torch.sum(w * a, dim=1)
    if method == "layercam":
        return (g.clamp_min(0) * a).sum(dim=1)
    # gradcam_pp, as pytorch-grad-cam's get_cam_weights + get_cam_image.
    g2 = g**2
    g3 = g2 * g
    sum_a = a.sum(dim=(2, 3))[:, :, None, None]
    alpha = g2 / (2 * g2 + sum_a * g3 + _PP_EPS)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    w = (g.clamp_min(0) * alpha).sum(dim=(2, 3))
    return (w[:, :, None, None] * a).sum(dim=1)


def upsample_map(layer_map: Tensor, size: tuple[int, int]) -> Tensor:
    """A layer map ``[N, h, w]`` resized to ``size`` ``(H, W)`` by bilinear interpolation
    with half-pixel centres (``align_corners=False``, no antialiasing), as float32.

    That is pytorch-grad-cam's resize (``cv2.resize(..., (W, H))``, whose default
    ``INTER_LINEAR`` uses half-pixel centres and does not antialias) and torch-cam's
    (``F.interpolate(mode="bilinear", align_corners=False)``); Captum's
    ``LayerAttribution.interpolate`` defaults to ``"nearest"`` instead. Bilinear weights
    sum to 1, so the sign and scale of the map are kept.

    Example:
        >>> upsample_map(torch.tensor([[[0.0, 1.0], [2.0, 3.0]]]), (4, 4))[0, 0]
        tensor([0.0000, 0.2500, 0.7500, 1.0000])
    """
    if not isinstance(layer_map, Tensor) or layer_map.dim() != 3:
        shape = tuple(layer_map.shape) if isinstance(layer_map, Tensor) else type(layer_map)
        raise ValueError(f"layer_map must be [N, h, w], got {shape}")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be two positive ints (H, W), got {tuple(size)}")
    m = layer_map.detach().float()[:, None]
    if tuple(m.shape[-2:]) == (h, w):
        return m[:, 0].clone()
    return F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def normalize_maps(maps: Tensor) -> Tensor:
    """pytorch-grad-cam's display scaling: negatives clipped to 0, then each map min-max
    scaled to ``[0, 1]`` (a constant map gives zeros). ``maps``: ``[N, ...]``, one map per
    row; returns float32 of the same shape.

    pytorch-grad-cam divides by ``1e-7 + range`` (``utils/image.py``, ``scale_cam_image``),
    so its maximum is ``range / (range + 1e-7)``; here it is exactly 1 (a difference of at
    most ``1e-7 / range``). pytorch-grad-cam clips at the *layer's* resolution, scales, then
    resizes and scales again; scaling commutes with bilinear resizing, so its display is
    ``normalize_maps(upsample_map(layer_map.clamp_min(0), size))`` (clipping after the
    resize instead differs only near sign changes).

    Example:
        >>> normalize_maps(torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]]))
        tensor([[[0.0000, 0.0000],
                 [0.3333, 1.0000]]])
    """
    if not isinstance(maps, Tensor) or maps.dim() < 2:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be [N, ...] with one map per row, got {shape}")
    m = maps.detach().float().clamp_min(0)
    flat = m.reshape(m.shape[0], -1)
    lo = flat.amin(dim=1, keepdim=True)
    span = flat.amax(dim=1, keepdim=True) - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1.0), 0.0)
    return out.reshape(m.shape)


ScoreFn = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def scorecam_weights(
    score_fn: ScoreFn,
    x: Tensor,
    acts: Tensor,
    *,
    batch: int,
    baseline_scores: Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Score-CAM's channel weights ``[N, K]`` (float32), as pytorch-grad-cam computes them.

    Each channel's map ``acts[n, k]`` is upsampled to the input's size (bilinear,
    ``align_corners=True``: pytorch-grad-cam's ``nn.UpsamplingBilinear2d``), min-max
    scaled per channel, ``(u - min) / (max - min + 1e-8)``, and multiplied into the image
    ``x[n]``; the target's score on that masked image is the channel's score, and
    ``weights = softmax over k`` of the scores.

    ``score_fn(xb, rows)`` gets a masked batch ``xb`` ``[B, C, H, W]`` and ``rows``, a
    LongTensor ``[B]`` of the image each row belongs to (a batch mixes images), and returns
    the target's score per row ``[B]`` (run under ``torch.no_grad``). ``batch`` is the
    number of rows per call; ``progress(done, total)`` is called after each call.

    Speed: a channel that is constant at the layer (``max == min``: the mask is zero, the
    masked image all zeros) is not run; the score of an all-zero input is computed once
    per image (or taken from ``baseline_scores`` ``[N]``, the target's score on
    ``zeros_like(x)``, when the caller has it) and shared. The masks are built per batch,
    never all ``N x K`` at once (pytorch-grad-cam holds all ``N x K`` masked images);
    ``xb`` keeps ``x``'s memory format (pass ``x`` channels-last for a channels-last model).

    Matches pytorch-grad-cam: the mask (upsampling, scaling, epsilon), the product with
    the normalised input, the raw score, the channel softmax; up to float round-off of
    the forwards (batches differ), the weights are equal. Differs: a channel constant at
    the layer but not after upsampling (``align_corners=True`` rounds some constants)
    counts as constant here; pytorch-grad-cam scales that rounding noise to ``[0, 1]``.
    The paper (Wang et al. 2020, Algorithm 1) takes the softmax over channels of
    ``f(M_k * X) - f(X_b)``: subtracting the per-image baseline score does not change a
    softmax, so the weights are the paper's too. The authors' released code differs (the
    class probability as the weight, without a channel softmax).

    Example:
        >>> x, acts = torch.rand(2, 3, 8, 8), torch.rand(2, 64, 2, 2)
        >>> w = scorecam_weights(lambda xb, rows: xb.sum(dim=(1, 2, 3)), x, acts, batch=16)
        >>> w.shape, bool(torch.allclose(w.sum(1), torch.ones(2)))
        (torch.Size([2, 64]), True)
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be the [N, C, H, W] model input, got {shape}")
    _check_maps("acts", acts)
    n, k = int(acts.shape[0]), int(acts.shape[1])
    if int(x.shape[0]) != n:
        raise ValueError(f"x has {x.shape[0]} images but acts has {n}: pass the same batch")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int (rows per forward), got {batch!r}")
    dev = x.device
    size = (int(x.shape[-2]), int(x.shape[-1]))
    # Contiguous NCHW float32, as pytorch-grad-cam's numpy round trip gives (bilinear
    # results depend on the memory format in the last bits).
    flat = acts.detach().to(device=dev, dtype=torch.float32).contiguous()
    flat = flat.reshape(n * k, 1, *flat.shape[-2:])
    const = flat.amax(dim=(1, 2, 3)) == flat.amin(dim=(1, 2, 3))  # [N*K]

    zero_scores: Tensor | None = None
    if baseline_scores is not None:
        zero_scores = torch.as_tensor(baseline_scores).detach().to(dev, torch.float32)
        if zero_scores.shape != (n,):
            raise ValueError(
                f"baseline_scores must be [N] = [{n}] (the score of zeros_like(x) per "
                f"image), got {tuple(zero_scores.shape)}"
            )
    # Bookkeeping on the CPU (one sync here, none per batch): the live rows (image-major),
    # then one all-zero row per image that has a constant channel, filling the last batch.
    const_cpu = const.cpu()
    live = torch.nonzero(~const_cpu).flatten()
    zero_imgs = torch.zeros(0, dtype=torch.long)
    if zero_scores is None and bool(const_cpu.any()):
        zero_imgs = torch.nonzero(const_cpu.view(n, k).any(dim=1)).flatten()
        zero_scores = torch.zeros(n, dtype=torch.float32, device=dev)
    n_live, total = int(live.numel()), int(live.numel() + zero_imgs.numel())
    rows_all = torch.cat([live // k, zero_imgs])

    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    scores = torch.zeros(n * k, dtype=torch.float32, device=dev)
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        m = max(0, min(stop, n_live) - start)  # live rows in this batch (they come first)
        rows = rows_all[start:stop].to(dev)
        xb = torch.empty((stop - start, *x.shape[1:]), dtype=x.dtype, device=dev, memory_format=fmt)
        if m:
            idx = live[start : start + m].to(dev)
            masks = _score_masks(flat, idx, size).to(x.dtype)
            torch.mul(x.index_select(0, rows[:m]), masks, out=xb[:m])
        xb[m:].zero_()
        out = score_fn(xb, rows)
        if not isinstance(out, Tensor) or out.shape != (stop - start,):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"score_fn must return one score per row, [{stop - start}], got {got}")
        out = out.detach().to(dev, torch.float32)
        if m:
            scores[idx] = out[:m]
        if zero_scores is not None and m < stop - start:
            zero_scores[rows[m:]] = out[m:]
        if progress is not None:
            progress(stop, total)
    if zero_scores is not None and bool(const_cpu.any()):
        const_idx = torch.nonzero(const_cpu).flatten()
        scores[const_idx.to(dev)] = zero_scores[(const_idx // k).to(dev)]
    return torch.softmax(scores.view(n, k), dim=-1)


def _score_masks(flat: Tensor, idx: Tensor, size: tuple[int, int]) -> Tensor:
    """pytorch-grad-cam's Score-CAM masks ``[B, 1, H, W]`` for rows ``idx`` of ``flat``."""
    up = F.interpolate(flat.index_select(0, idx), size=size, mode="bilinear", align_corners=True)
    lo = up.amin(dim=(2, 3), keepdim=True)
    hi = up.amax(dim=(2, 3), keepdim=True)
    return (up - lo) / (hi - lo + _SCORE_EPS)


def scorecam_map(weights: Tensor, acts: Tensor) -> Tensor:
    """Score-CAM's signed layer map ``[N, h, w]``: ``sum_k w_k A_k`` (no ReLU), with
    ``weights`` ``[N, K]`` from :func:`scorecam_weights`.

    Example:
        >>> acts = torch.tensor([[[[1.0, 2.0]], [[3.0, -4.0]]]])
        >>> scorecam_map(torch.tensor([[0.25, 0.75]]), acts)
        tensor([[[ 2.5000, -2.5000]]])
    """
    _check_maps("acts", acts)
    n, k = int(acts.shape[0]), int(acts.shape[1])
    if not isinstance(weights, Tensor) or weights.shape != (n, k):
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be [N, K] = [{n}, {k}] (one per channel), got {got}")
    w = weights.detach().to(device=acts.device, dtype=torch.float32)
    return (w[:, :, None, None] * acts.detach().float()).sum(dim=1)


# (module names that identify the family, the CAM layer). Grad-CAM's convention is the last
# convolutional block, whose output the head pools (pytorch-grad-cam's README: resnet
# ``layer4[-1]``, vgg/densenet/mobilenet ``features[-1]``, mnasnet ``layers[-1]``).
_CAM_LAYERS: list[tuple[tuple[str, ...], str]] = [
    (("conv1", "bn1", "bn3", "fc"), "bn3"),  # simple_cnn (the course's deep layer)
    (("layer1", "layer4", "fc"), "layer4"),  # resnet family (torchvision and timm)
    (("inception3a", "inception5b"), "inception5b"),  # googlenet
    (("conv2d0", "mixed5b", "softmax2"), "mixed5b"),  # inceptionv1
    (("Mixed_7c", "fc"), "Mixed_7c"),  # torchvision inception_v3
    (("conv_stem", "blocks", "conv_head", "bn2"), "bn2"),  # timm efficientnets
    (("conv_stem", "blocks", "global_pool", "conv_head"), "blocks"),  # timm mobilenetv3
    (("features", "classifier"), "features"),  # torchvision vgg, densenet, mobilenet, ...
    (("layers", "classifier"), "layers"),  # torchvision mnasnet
    (("stem", "trunk_output", "fc"), "trunk_output"),  # torchvision regnet
    (("stage4", "conv5", "fc"), "conv5"),  # torchvision shufflenet
    (("features", "pre_logits", "head"), "features"),  # timm vgg
    (("stem", "features", "head"), "features"),  # timm rexnet
    (("stem", "stages", "head"), "stages"),  # timm convnext, cspnet
    (("stem", "s4", "final_conv", "head"), "final_conv"),  # timm regnet
]


def default_cam_layer(model: nn.Module | ModelBundle) -> str:
    """The layer a CAM method uses when none is named: the last convolutional block of a
    family the registry knows, else the last ``nn.Conv2d``.

    ============================  =================  ===================================
    family                        layer              why
    ============================  =================  ===================================
    simple_cnn                    ``bn3``            the course's deep layer (pre-ReLU)
    resnet (torchvision, timm)    ``layer4``         = pytorch-grad-cam's ``layer4[-1]``
    googlenet                     ``inception5b``    the last block, before ``avgpool``
    inceptionv1                   ``mixed5b``        the last block, before ``avgpool0``
    inception_v3                  ``Mixed_7c``       the last block, before ``avgpool``
    timm efficientnet (lite0)     ``bn2``            ``conv_head`` + BN + act: the map
                                                     ``global_pool`` averages
    timm mobilenetv3              ``blocks``         its ``conv_head`` runs after pooling
    torchvision ``features`` +    ``features``       = pytorch-grad-cam's ``features[-1]``
    ``classifier`` (vgg, ...)                        (vgg, densenet, mobilenet, convnext)
    mnasnet / regnet              ``layers`` /       = ``layers[-1]`` / the last stage
                                  ``trunk_output``
    shufflenet                    ``conv5``          the last conv + BN + ReLU
    timm vgg / rexnet             ``features``       the last block, before the head
    timm convnext, cspnet         ``stages``         the last stage
    timm regnet                   ``final_conv``     after ``s4``
    ============================  =================  ===================================

    Other models get their last ``nn.Conv2d`` (check it: in a transformer that is the patch
    embedding; pass ``layer=``). A model with no ``nn.Conv2d`` raises ``ValueError``.

    Names are those of the unwrapped model (``DataParallel``, ``torch.compile``);
    a ``ModelBundle`` is accepted too.

    Example:
        >>> default_cam_layer(torchvision.models.resnet18())
        'layer4'
    """
    from convlens.models.layers import unwrap

    net = unwrap(model if isinstance(model, nn.Module) else model.model)
    children = {name for name, _ in net.named_children()}
    convs = [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            "a CAM method needs a convolutional layer; this model has none: use a "
            "pixel-space method such as integrated_gradients"
        )
    names = {name for name, _ in net.named_modules()}
    for needed, layer in _CAM_LAYERS:
        if set(needed) <= names and layer in children:
            return layer
    return convs[-1]
