"""``render``: optimise images so that an objective is as large as possible.

Each step: the parameterized image (:class:`~.param.ImageParam`) goes through the random
transforms (:mod:`.transforms`), is upsampled to the model's input size when it is
smaller (as Lucent does), normalised as the model expects, and run forward with hooks on
the layers the objective reads only; the forward stops as soon as the deepest of them
has run. The objective's sum over the batch is maximised with Adam.

What makes it cheap: the model's parameters get no gradients during a render (their
``requires_grad`` is switched off and restored afterwards), so the backward pass computes
only what the image needs; the input is channels-last (on CPUs this is the faster
convolution path); nothing after the deepest hooked layer runs; and the standard
transforms resample once (see :func:`.transforms.standard`).

What is guaranteed: hooks are removed and every module's train/eval flag and every
parameter's ``requires_grad`` are restored, also when the forward raises (errors are
raised, never swallowed); the same seed gives the same images (transforms draw from a
seeded ``torch.Generator``, never from NumPy or the global RNG).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convlens._alloc import keep_heap
from convlens.analysis.featurevis import transforms as T
from convlens.analysis.featurevis._amp import MixedPrecision
from convlens.analysis.featurevis.objectives import INPUT, OUTPUT, Objective, parse
from convlens.analysis.featurevis.param import ImageParam
from convlens.analysis.featurevis.schedule import DEFAULT_SCHEDULE, Schedule, get_schedule
from convlens.capture import _expected_calls, _StopForward, model_device
from convlens.device import DeviceLike, resolve_device
from convlens.errors import ConvlensError
from convlens.models.forms import (
    HALF_TYPES,
    OutputKey,
    dtype_name,
    dtype_support,
    input_channels,
    is_scripted,
    model_dtype,
    select_output,
)
from convlens.models.layers import LayerRef, evaluating, find_layers
from convlens.models.layers import frozen as _frozen

__all__ = ["RenderResult", "default_objective", "featurevis_layer", "render", "score"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
PreprocessArg = Any  # "auto" | None | False | (mean, std) | Preprocess | callable


@dataclass
class RenderResult:
    """What :func:`render` made.

    ``images``: the final images ``[N, C, H, W]`` in ``[0, 1]`` (CPU), ``C`` the model's
    input channels (3, or 1 for a greyscale network, 4 for a 4-channel one). ``thresholds``:
    the step counts at which a snapshot was taken (the last is ``steps``); ``snapshots``
    ``[T, N, C, H, W]`` the images then (an alpha channel included); ``values``
    ``[T, N]`` the objective of each image at each threshold, measured on the image
    itself (no transforms);
    ``times`` the seconds of optimisation up to each threshold (measuring excluded);
    ``trace`` ``[steps, N]`` the objective at every step, under that step's transforms;
    ``settings`` everything needed to reproduce the render; ``labels`` what each image
    maximises (``"mixed4a:3"``).

    Example:
        >>> r = convlens.render(bundle, "blocks.4:0-9", steps=64)
        >>> r.images.shape, r.final_values  # [10, 3, 128, 128], one value per image
    """

    images: torch.Tensor
    values: torch.Tensor
    thresholds: tuple[int, ...]
    snapshots: torch.Tensor
    times: tuple[float, ...]
    trace: torch.Tensor
    objective: str
    settings: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)

    @property
    def final_values(self) -> torch.Tensor:
        """The objective per image at the end, ``[N]``."""
        return self.values[-1]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no pixels): objective values per threshold, times, settings."""
        return {
            "objective": self.objective,
            "labels": list(self.labels),
            "thresholds": list(self.thresholds),
            "values": [[float(v) for v in row] for row in self.values],
            "seconds": [round(t, 4) for t in self.times],
            "settings": dict(self.settings),
        }

    def __repr__(self) -> str:
        vals = ", ".join(f"{float(v):.3g}" for v in self.final_values[:6])
        more = ", ..." if self.final_values.numel() > 6 else ""
        return (
            f"RenderResult({self.objective}: {tuple(self.images.shape)} images after "
            f"{self.thresholds[-1]} steps, values [{vals}{more}])"
        )

    def _repr_html_(self) -> str:
        from convlens._notebook import render_result

        return render_result(self)


# ------------------------------------------------------------------------ inputs


def _model_and_bundle(model: Any) -> tuple[nn.Module, Any]:
    from convlens.models.zoo import model_and_bundle

    return model_and_bundle(model)


def _imagenet_like(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's normalisation for ``channels`` channels: its RGB values for the first
    three, their average for a single channel and for every channel past the third."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    m, s = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    if channels < 3:
        return (m,) * channels, (s,) * channels
    return IMAGENET_MEAN + (m,) * (channels - 3), IMAGENET_STD + (s,) * (channels - 3)


def _normalizer(
    preprocess: PreprocessArg, bundle: Any, channels: int = 3
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """``[0, 1]`` images of ``channels`` channels -> the model's input, and how to
    describe it."""
    from convlens.models.zoo import Preprocess

    if isinstance(preprocess, str) and preprocess == "auto":
        if bundle is not None:
            mean, std = bundle.normalize
        else:
            mean, std = _imagenet_like(channels)
    elif preprocess is None or preprocess is False:
        return (lambda x: x), "none"
    elif isinstance(preprocess, Preprocess):
        mean, std = preprocess.mean, preprocess.std
    elif isinstance(preprocess, tuple) and len(preprocess) == 2:
        mean, std = preprocess
    elif callable(preprocess):
        return preprocess, getattr(preprocess, "__name__", type(preprocess).__name__)
    else:
        raise TypeError(
            "preprocess is 'auto' (the bundle's normalisation, ImageNet's for a bare "
            "module), None (the model takes [0, 1] images), (mean, std), a Preprocess or "
            f"a function; got {preprocess!r}"
        )
    if len(mean) != channels or len(std) != channels:
        raise ValueError(
            f"the normalisation has {len(mean)} mean and {len(std)} std values but the model "
            f"takes {channels}-channel images: give one value per channel"
        )
    m = torch.tensor([float(v) for v in mean]).view(1, -1, 1, 1)
    s = torch.tensor([float(v) for v in std]).view(1, -1, 1, 1)
    cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def normalize(x: torch.Tensor) -> torch.Tensor:
        if x.device not in cache:
            cache[x.device] = (m.to(x.device), (1.0 / s).to(x.device))
        mm, inv = cache[x.device]
        return (x - mm) * inv

    text = f"mean {[round(float(v), 4) for v in mean]}, std {[round(float(v), 4) for v in std]}"
    return normalize, text


def _transforms(spec: Any) -> tuple[Transform, str]:
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return (lambda x, g: x), "none"
    if isinstance(spec, str):
        if spec == "standard":
            return T.standard(), "standard (pad 12, jitter 8, scale, rotate, jitter 4; fused)"
        if spec == "standard-unfused":
            return T.standard(fused=False), "standard (unfused)"
        raise ValueError(
            f"transforms {spec!r}: use 'standard', 'standard-unfused', 'none', or a list of "
            "transforms from convlens.analysis.featurevis.transforms"
        )
    if isinstance(spec, Sequence):
        return T.Compose(list(spec)), repr(list(spec))
    if callable(spec):
        return spec, repr(spec)
    raise TypeError(f"transforms must be a name, a list of transforms or a callable; got {spec!r}")


def _thresholds(steps: int, thresholds: Sequence[int] | None) -> tuple[int, ...]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if thresholds is None:
        return (steps,)
    ts = sorted({int(t) for t in thresholds})
    bad = [t for t in ts if not 1 <= t <= steps]
    if bad:
        raise ValueError(f"thresholds must lie in 1..steps ({steps}); got {bad}")
    if not ts or ts[-1] != steps:
        ts.append(steps)
    return tuple(ts)


# ------------------------------------------------------------------------ the forward


class _RedirectedReLUGrad(torch.autograd.Function):
    """Identity forward on a ReLU's output; backward lets through gradient that would
    raise a dead unit (Lucid's redirected ReLU), for images where the plain ReLU
    gradient is zero everywhere."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, upper: float) -> torch.Tensor:
        ctx.save_for_backward(out)
        ctx.upper = upper
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        # Gradients here are of the loss (minus the objective): grad > 0 pushes down.
        dead_low = out <= 0
        dead_high = out >= ctx.upper
        relu_grad = grad.masked_fill(dead_low | dead_high, 0.0)
        redirected = grad.masked_fill((dead_low & (grad > 0)) | (dead_high & (grad < 0)), 0.0)
        passes = relu_grad.flatten(1).norm(dim=1) > 0
        shape = (-1,) + (1,) * (grad.ndim - 1)
        return torch.where(passes.view(shape), relu_grad, redirected), None


class _Forward:
    """The model with hooks on the objective's layers; ``__call__(x)`` returns a reader
    of this forward's activations."""

    def __init__(
        self, net: nn.Module, objective: Objective, output: OutputKey | None = None
    ) -> None:
        self.net = net
        self.output = output
        self.output_key: OutputKey | None = None
        self.names = [n for n in objective.layers if n not in (INPUT, OUTPUT)]
        self.full = OUTPUT in objective.layers or not self.names
        self.refs: list[LayerRef] = find_layers(net, self.names) if self.names else []
        self.modules = {r.name: r.module for r in self.refs}
        self.needed: dict[str, int] | None = None
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.pending: set[str] = set()
        self.redirect = False
        self.tracing = False

    def _plan(self, x: torch.Tensor) -> None:
        if self.full:
            return
        self.tracing = True  # our hooks stay out of the shape trace
        try:
            expected = _expected_calls(self.net, x, self.modules)
        finally:
            self.tracing = False
        needed: dict[str, int] = {}
        for name in self.modules:
            calls = [r.call for r in self.refs if r.name == name]
            if None in calls:
                needed[name] = expected[name]
            else:
                needed[name] = max(c for c in calls if c is not None) + 1
            needed[name] = max(needed[name], 1)
        self.needed = needed

    @contextlib.contextmanager
    def hooked(self, redirect_relu: bool) -> Iterator[_Forward]:
        handles = []

        def make_hook(name: str) -> Any:
            def hook(_m: nn.Module, _inp: Any, out: Any) -> Any:
                if self.tracing:
                    return None
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"layer {name!r} returns {type(out).__name__}, not a tensor: use one "
                        "of its submodules (`convlens layers MODEL` lists them)"
                    )
                got = self.outputs[name]
                last = False
                if self.needed is not None and len(got) + 1 >= self.needed[name]:
                    self.pending.discard(name)
                    last = not self.pending
                # A later in-place op (ReLU(inplace=True)) must not change what we read:
                # copy, unless the forward stops right here.
                got.append(out if last else out.clone())
                if last:
                    raise _StopForward

            return hook

        def relu_hook(m: nn.Module, _inp: Any, out: Any) -> Any:
            if (
                self.redirect
                and not self.tracing
                and isinstance(out, torch.Tensor)
                and out.requires_grad
            ):
                upper = 6.0 if isinstance(m, nn.ReLU6) else float("inf")
                return _RedirectedReLUGrad.apply(out, upper)
            return None

        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_hook(make_hook(name)))
            if redirect_relu:
                for m in self.net.modules():
                    if isinstance(m, (nn.ReLU, nn.ReLU6)):
                        handles.append(m.register_forward_hook(relu_hook))
            yield self
        finally:
            for h in handles:
                h.remove()

    def __call__(self, x: torch.Tensor, image: torch.Tensor) -> Callable[[str], torch.Tensor]:
        if self.needed is None and not self.full:
            self._plan(x)
        self.outputs = {n: [] for n in self.modules}
        self.pending = set(self.modules)
        output: Any = None
        if self.full:
            output = self.net(x)
        else:
            with contextlib.suppress(_StopForward):
                output = self.net(x)
        return self._reader(self.outputs, output, image)

    def _reader(
        self, outputs: dict[str, list[torch.Tensor]], output: Any, image: torch.Tensor
    ) -> Callable[[str], torch.Tensor]:
        """``acts(name)``: the input image, the model's output, or a layer's output (its
        last call, or ``layer#k``'s), in float32."""

        def acts(name: str) -> torch.Tensor:
            if name == INPUT:
                return image
            if name == OUTPUT:
                value, self.output_key = select_output(output, self.output, what="class_logit")
                return value.float()
            base, _, call = name.partition("#")
            got = outputs.get(base)
            if not got:
                raise ValueError(
                    f"layer {base!r} did not run during the forward (it is registered but "
                    "never called): choose another layer"
                )
            k = int(call) if call else len(got) - 1
            if k >= len(got):
                raise ValueError(f"layer {base!r} runs {len(got)} time(s); {name!r} does not exist")
            return got[k].float()  # objectives compute in float32 (a no-op for float32)

        return acts


class _CompiledForward(_Forward):
    """:class:`_Forward` through ``torch.compile``: the model (a private copy) traced with
    torch.fx, its graph cut after the last layer the objective reads, and that graph
    compiled. No hooks run, so nothing stops a compiled graph half way."""

    def __init__(
        self, net: nn.Module, objective: Objective, output: OutputKey | None = None
    ) -> None:
        from convlens.analysis._incremental import Unsupported, trace_model

        super().__init__(net, objective, output)
        try:
            traced = trace_model(net, cached=False)
        except Unsupported as err:
            raise ConvlensError(f"compile=True: {err}; use compile=False") from None
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in traced.graph.nodes:
            if node.op == "output":
                break
            env[node] = graph.node_copy(node, lambda n: env[n])
        self.keys: list[str] = []
        outs: list[Any] = []
        for ref in self.refs:
            nodes = traced.module_outputs.get(ref.name, [])
            if not nodes:
                raise ConvlensError(
                    f"compile=True: layer {ref.name!r} does not appear in the traced graph; "
                    "use compile=False"
                )
            for k, node in enumerate(nodes):
                self.keys.append(f"{ref.name}#{k}")
                outs.append(env[node])
        if self.full:
            last = next(n for n in traced.graph.nodes if n.op == "output")
            outs.append(torch.fx.map_arg(last.args[0], lambda n: env[n]))
        graph.output(tuple(outs))
        self.module = torch.fx.GraphModule(net, graph)
        self.module.graph.eliminate_dead_code()  # what runs after the deepest layer
        self.module.recompile()
        self.compiled = torch.compile(self.module, dynamic=False)

    @contextlib.contextmanager
    def hooked(self, redirect_relu: bool) -> Iterator[_Forward]:
        if redirect_relu:
            raise ConvlensError("compile=True runs no hooks: use redirect_relu=0")
        yield self

    def __call__(self, x: torch.Tensor, image: torch.Tensor) -> Callable[[str], torch.Tensor]:
        got = self.compiled(x)
        n_layers = len(self.keys)
        by_key = dict(zip(self.keys, got[:n_layers]))
        outputs: dict[str, list[torch.Tensor]] = {}
        for key, t in by_key.items():
            outputs.setdefault(key.partition("#")[0], []).append(t)
        output = got[n_layers] if self.full else None
        return self._reader(outputs, output, image)


class _Pipeline:
    """[0, 1] image -> (transforms) -> upsample -> normalise -> the model's dtype ->
    channels-last. Everything before the cast is float32 (the image's parameters are)."""

    def __init__(
        self,
        normalize: Callable[[torch.Tensor], torch.Tensor],
        upsample_to: int | None,
        channels_last: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.normalize = normalize
        self.upsample_to = upsample_to
        self.channels_last = channels_last
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.upsample_to
        if s is not None and (x.shape[-2] < s or x.shape[-1] < s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=True)
        x = self.normalize(x)
        if x.dtype != self.dtype and x.is_floating_point():
            x = x.to(self.dtype)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _default_size(bundle: Any) -> int:
    """The model's own input size when a bundle knows it and it is below 128, else 128."""
    if bundle is not None and 0 < int(bundle.input_size) < 128:
        return int(bundle.input_size)
    return 128


def _upsample_size(upsample: bool | int | None, bundle: Any, size: tuple[int, int]) -> int | None:
    if upsample is None or upsample is False:
        return None
    if upsample is True:
        if bundle is None:
            return None  # a bare module has no known input size
        target = int(bundle.input_size)
    else:
        target = int(upsample)
    return target if min(size) < target else None


def _fold_checked(
    net: nn.Module,
    obj: Objective,
    example: torch.Tensor,
    channels_last: bool,
    output: OutputKey | None = None,
) -> tuple[nn.Module, int]:
    """``(copy with BatchNorms folded, how many)`` when the copy gives the same outputs
    at every layer the objective reads; else ``(net, 0)``."""
    from convlens.analysis.featurevis._fold import fold_batchnorm

    keep = {name.partition("#")[0] for name in obj.layers}
    got = fold_batchnorm(net, example, keep)
    if got is None:
        return net, 0
    clone, folded = got
    if channels_last:
        clone.to(memory_format=torch.channels_last)
    a, b = _Forward(net, obj, output), _Forward(clone, obj, output)
    # float32 round-off, or that of a half type (folding rounds the fused weights once)
    tol = 2e-2 if example.dtype in HALF_TYPES else 1e-4
    with a.hooked(False), b.hooked(False), torch.no_grad():
        ra, rb = a(example, example), b(example, example)
        for name in obj.layers:
            if name == INPUT:
                continue
            ta, tb = ra(name).float(), rb(name).float()
            scale = float(ta.abs().max()) + 1e-6
            if ta.shape != tb.shape or float((ta - tb).abs().max()) > tol * scale:
                return net, 0
    return clone, folded


def _values(obj: Objective, acts: Callable[[str], torch.Tensor], n: int) -> torch.Tensor:
    v = obj(acts).float()  # a half-precision model's values, summed in float32
    if v.ndim == 0:
        v = v.expand(n)
    if v.shape != (n,):
        raise ValueError(
            f"objective {obj} gave shape {list(v.shape)}, expected one value per image ({n})"
        )
    return v


# ------------------------------------------------------------------------ public


def score(
    model: Any,
    objective: Objective | str,
    images: torch.Tensor,
    *,
    preprocess: PreprocessArg = "auto",
    upsample: bool | int | None = True,
    device: DeviceLike | None = None,
    output: OutputKey | None = None,
) -> torch.Tensor:
    """The objective of each image (``[N, C, H, W]`` in ``[0, 1]``, ``C`` the model's input
    channels), without transforms: how :func:`render` measures its results, usable on any
    tool's images. ``output``: as for :func:`render`.

    Example:
        >>> b = convlens.load_model("efficientnet_lite0")
        >>> score(b, "blocks.4:0-1", torch.rand(2, 3, 224, 224)).shape
        torch.Size([2])
    """
    net, bundle = _model_and_bundle(model)
    obj = parse(objective)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError("images must be a tensor [N, C, H, W] in [0, 1]")
    if images.shape[0] < obj.min_batch:
        raise ValueError(f"objective {obj} needs at least {obj.min_batch} images")
    channels = input_channels(net, bundle)
    if images.shape[1] != channels:
        raise ValueError(
            f"images have {images.shape[1]} channel(s) but the model takes {channels}: "
            f"pass [N, {channels}, H, W]"
        )
    dev = resolve_device(device) if device is not None else model_device(net)
    if device is not None:
        net.to(dev)
    dtype = model_dtype(net)
    normalize, _ = _normalizer(preprocess, bundle, channels)
    pipe = _Pipeline(
        normalize,
        _upsample_size(upsample, bundle, (images.shape[-2], images.shape[-1])),
        True,
        dtype,
    )
    fwd = _Forward(net, obj, output)
    img = images.to(dev, torch.float32)
    with fwd.hooked(False), evaluating(net), torch.no_grad(), dtype_support(dtype, dev):
        acts = fwd(pipe(img), img)
        return _values(obj, acts, img.shape[0]).detach().cpu()


def _check_channel(
    net: nn.Module, obj: Objective, channels: int, hw: tuple[int, int], dtype: torch.dtype
) -> None:
    """A parsed spec's largest channel against the layer's count, from one trace of one
    image (on the meta device when the model allows): ``"layer:0-100000"`` is refused
    before 100001 images are allocated, not in the first forward."""
    from convlens.models.layers import trace_calls

    if obj.max_channel is None:
        return
    layer, top = obj.max_channel
    base, _, call = layer.partition("#")
    if base not in dict(net.named_modules()):
        return  # the forward names an unknown layer
    try:
        got = trace_calls(net, (1, channels, *hw), [base], dtype=dtype)[base]
    except Exception:  # the model cannot run at this size: the render will say why
        return
    k = int(call) if call.isdigit() else len(got) - 1
    shape = got[k] if 0 <= k < len(got) else None
    if shape is None or len(shape) < 2:
        return
    c = shape[1]
    if top >= c:
        raise ValueError(
            f"channel {top} of layer {layer!r} does not exist: it has {c} channels (0-{c - 1})"
        )


def _check_fits(
    net: nn.Module,
    obj: Objective,
    size: int | tuple[int, int],
    n: int,
    snapshots: int,
    steps: int,
    channels: int,
    dtype: torch.dtype,
    dev: torch.device,
    upsample: bool | int | None,
    bundle: Any,
) -> None:
    """Refuse, before anything is allocated, a ``size``, ``batch`` or ``steps`` whose
    render cannot fit: at least the convolution outputs up to the objective's deepest
    layer for every image, the snapshots and the per-step trace, against the free memory.
    """
    from convlens._memory import activation_bytes, available_memory, format_bytes, may_exceed
    from convlens.errors import ResourceError

    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(h, w) < 1 or n < 1:
        return  # ImageParam names it
    if n > 64:  # a small batch meets the forward's own check at no cost
        _check_channel(net, obj, channels, (min(h, 224), min(w, 224)), dtype)
    up = _upsample_size(upsample, bundle, (h, w)) or 0
    modules = dict(net.named_modules())
    layers: list[str | None] = [n for n in obj.layers if n.partition("#")[0] in modules]
    if not obj.layers or any(n.partition("#")[0] in (INPUT, OUTPUT) for n in obj.layers):
        layers.append(None)  # the whole model
    if not layers:
        return  # an unknown layer: the forward names it

    def need(hh: int, ww: int, rows: int) -> float:
        side_h, side_w = max(hh + 24, up), max(ww + 24, up)
        act = max(
            activation_bytes(net, (channels, side_h, side_w), dtype, until=layer)
            for layer in layers
        )
        return rows * (act + 4.0 * channels * hh * ww * (snapshots + 1)) + 4.0 * steps * rows

    free = available_memory(dev)
    side_h, side_w = max(h + 24, up), max(w + 24, up)
    if not may_exceed(4.0 * n * channels * side_h * side_w, free, 4.0 * steps * n):
        return
    total = need(h, w, n)
    if total <= free:
        return
    trace = 4.0 * steps * n  # the per-step values of every image
    if need(8, 8, n) - trace > free:
        culprit, fix = f"batch {n}", f"use batch <= {max(1, int(free // (total / n)))}"
    elif trace > free / 2:
        culprit, fix = f"steps {steps}", f"use steps <= {int(free / 2 // (4.0 * n))}"
    else:
        lo, hi = 8, max(h, w) - 1
        while lo < hi:  # the largest side that fits
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if need(min(h, mid), min(w, mid), n) <= free else (lo, mid - 1)
        culprit, fix = f"size {max(h, w)}", f"use size <= {lo} (or a smaller batch)"
    where = "this machine" if dev.type == "cpu" else str(dev)
    raise ResourceError(
        f"{culprit}: rendering {n} image(s) of {h}x{w} px for {steps} steps needs at least "
        f"{format_bytes(total)}; {where} has {format_bytes(free)} available: {fix}"
    )


def render(
    model: Any,
    objective: Objective | str,
    *,
    size: int | tuple[int, int] | None = None,
    steps: int = 512,
    lr: float | None = None,
    batch: int | None = None,
    seed: int = 0,
    transforms: Any = "standard",
    preprocess: PreprocessArg = "auto",
    thresholds: Sequence[int] | None = None,
    fft: bool = True,
    decorrelate: bool = True,
    redirect_relu: int = 0,
    upsample: bool | int | None = True,
    param: ImageParam | None = None,
    channels_last: bool = True,
    fold_bn: bool = True,
    device: DeviceLike | None = None,
    progress: bool | None = None,
    output: OutputKey | None = None,
    precision: str = "auto",
    schedule: str | Schedule = DEFAULT_SCHEDULE,
    compile: bool = False,
) -> RenderResult:
    """Images that maximise ``objective`` for ``model`` (activation maximization).

    ``model``: a :class:`~convlens.models.zoo.ModelBundle` (its normalisation is used) or
    a bare ``nn.Module`` (ImageNet normalisation unless ``preprocess`` says otherwise).
    ``objective``: an :class:`~.objectives.Objective` or the shorthand ``"layer:3"``,
    ``"layer:0-9"`` (one channel per batch image), ``"layer:3@7,7"`` (a neuron).
    ``size``: the image side (or ``(h, w)``); by default the bundle's input size when it is
    smaller than 128 (a 32 px CIFAR network renders at 32), else 128. Images smaller than
    a bundle's input size are upsampled to it after the transforms, as Lucent does
    (``upsample=False`` turns that off, an int sets the size; a bare module is not
    upsampled unless given one). ``batch``: images to render (default: what the
    objective needs, else 1).
    ``steps``: Adam's iterations. ``schedule``: how the learning rate moves over them
    (``"cosine"``, the default: Adam with betas 0.5/0.9, a 5% warm-up to a peak of 0.3 and
    a cosine decay to 0.03, which passes in 128 steps what Lucid's ``"constant"`` 0.05
    reaches in 256; ``"constant"``
    reproduces earlier renders; or a :class:`~.schedule.Schedule`); ``lr`` overrides the
    schedule's peak. ``precision``: the model's forward and backward under autocast
    (``"auto"``, the default: bfloat16 on a CPU with AVX-512 BF16 or AMX and on CUDA with
    compute capability 8.0+, float16 with loss scaling on older CUDA, else float32;
    ``"float32"``, ``"bfloat16"``, ``"float16"``); the image's parameters, Adam and the
    objective stay float32, and ``values`` are measured in float32. ``compile``: run the
    forward and backward through ``torch.compile`` (the model traced with torch.fx and cut
    after the objective's deepest layer; layer objectives, no ``redirect_relu``); off by
    default: measured on a 2-core CPU it is slower than eager, also after its compile
    time (see ``benchmarks/README.md``). ``seed``: the starting image
    and every transform draw. ``transforms``: ``"standard"`` (Lucid's set, fused),
    ``"none"``, or a list of transforms. ``thresholds``: step counts at which to keep a
    snapshot and measure the objective. ``fft``/``decorrelate``: the parameterization
    (or pass your own ``param``). ``redirect_relu``: for this many first steps, ReLU
    gradients are redirected as in Lucid, so units that start dead can still be raised.
    ``fold_bn``: run a private copy of the model with each eval-mode BatchNorm folded
    into the convolution before it (the same outputs, less work; checked on one input
    against the model, which is used as it is when they differ). ``device``: ``None``
    runs where the model is; otherwise the model is moved there.

    Any model form: the images have as many channels as the model takes (a bundle's
    normalisation says, else the first convolution's ``in_channels``; colour
    decorrelation applies to 3 only; a bare module gets ImageNet's normalisation, averaged
    for a channel it has no value for). A float16 / bfloat16 model gets the image cast to
    its dtype for the forward; the image's parameters, Adam and the objective stay
    float32 (``settings["dtype"]`` is the model's). A model that returns a dict, tuple or
    dataclass has ``output:N`` / ``class_logit`` read the tensor named by ``output`` (by
    default the only 2-d one). ``torch.compile`` is unwrapped; a TorchScript module takes
    ``output:N`` objectives only (layers need hooks). The model's own hooks run when the
    model itself runs; a BatchNorm-folded copy (``fold_bn``) carries none of them.

    Example:
        >>> b = convlens.load_model("efficientnet_lite0")
        >>> r = render(b, "blocks.4:0-9", size=224, steps=64)
        >>> r.images.shape, r.final_values.shape
        (torch.Size([10, 3, 224, 224]), torch.Size([10]))
    """
    net, bundle = _model_and_bundle(model)
    obj = parse(objective)
    ts = _thresholds(steps, thresholds)
    if redirect_relu > 0 and is_scripted(net):
        raise ConvlensError(
            "redirect_relu needs forward hooks on the ReLUs, which a TorchScript module "
            "cannot take: pass the eager nn.Module you scripted, or redirect_relu=0"
        )
    channels = input_channels(net, bundle)
    if size is None:
        size = _default_size(bundle)
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    sched = get_schedule(schedule)
    peak = float(sched.lr if lr is None else lr)
    if param is not None:
        n = param.batch
    else:
        n = int(batch) if batch is not None else max(1, obj.min_batch)
    if n < max(1, obj.min_batch):
        raise ValueError(
            f"objective {obj} targets {obj.min_batch} batch images but batch is {n}: "
            f"use batch={obj.min_batch} (or leave it out)"
        )
    dev = resolve_device(device) if device is not None else model_device(net)
    if device is not None:
        net.to(dev)
    dtype = model_dtype(net)
    mp = MixedPrecision(precision, dev, dtype)
    normalize, norm_text = _normalizer(preprocess, bundle, channels)
    transform, transform_text = _transforms(transforms)
    gen = torch.Generator().manual_seed(int(seed))  # CPU: the same draws on every device
    if param is None:
        _check_fits(net, obj, size, n, len(ts), ts[-1], channels, dtype, dev, upsample, bundle)
        param = ImageParam(
            size, batch=n, fft=fft, decorrelate=decorrelate, generator=gen, channels=channels
        )
    elif param.image_channels != channels:
        raise ValueError(
            f"param makes {param.image_channels}-channel images but the model takes "
            f"{channels}: ImageParam(..., channels={channels})"
        )
    param = param.to(dev)
    hw = (param.height, param.width)
    pipe = _Pipeline(normalize, _upsample_size(upsample, bundle, hw), channels_last, dtype)
    params = list(param.parameters())
    opt = torch.optim.Adam(params, lr=peak, betas=sched.betas)

    from convlens._progress import tqdm

    snapshots: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    times: list[float] = []
    trace = torch.zeros(ts[-1], n)
    elapsed = 0.0
    with contextlib.ExitStack() as stack:
        stack.enter_context(dtype_support(dtype, dev))
        stack.enter_context(evaluating(net))
        stack.enter_context(_frozen(net))
        run_net, folded = net, 0
        if fold_bn and not is_scripted(net):
            start = torch.rand(1, channels, *hw, generator=torch.Generator().manual_seed(0))
            example = pipe(start)
            run_net, folded = _fold_checked(net, obj, example.to(dev), channels_last, output)
        if compile:
            if redirect_relu > 0:
                raise ConvlensError("compile=True runs no hooks: use redirect_relu=0")
            fwd: _Forward = _CompiledForward(run_net, obj, output)
        else:
            fwd = _Forward(run_net, obj, output)
        stack.enter_context(fwd.hooked(redirect_relu > 0))
        stack.enter_context(keep_heap())
        bar = tqdm(range(ts[-1]), desc="render", unit="step", disable=_no_bar(progress))
        t0 = time.perf_counter()
        for step in bar:
            fwd.redirect = step < redirect_relu
            for group in opt.param_groups:
                group["lr"] = sched.rate(step, ts[-1], peak)
            opt.zero_grad(set_to_none=True)
            image = param()
            x = pipe(transform(image, gen))
            with mp.autocast():
                acts = fwd(x, image)
            v = _values(obj, acts, n)
            loss = -v.sum()
            if not torch.isfinite(loss):
                raise ConvlensError(
                    f"the objective became {float(loss.detach())} at step {step + 1}: "
                    f"lower lr (now {peak}) or check the objective"
                )
            if mp.backward(loss, params):
                opt.step()
            trace[step] = v.detach().cpu()
            if step + 1 in ts:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                elapsed += time.perf_counter() - t0
                times.append(elapsed)
                with torch.no_grad():
                    img = param().detach()
                    fwd.redirect = False
                    values.append(_values(obj, fwd(pipe(img), img), n).detach().cpu())
                snapshots.append(img.cpu())
                bar.set_postfix(objective=f"{float(values[-1].mean()):.3g}")
                t0 = time.perf_counter()
    settings = {
        "model": bundle.description if bundle is not None else type(net).__name__,
        "objective": str(obj),
        "size": list(hw),
        "steps": ts[-1],
        "lr": peak,
        "schedule": sched.describe(peak),
        **mp.settings(),
        "batch": n,
        "seed": seed,
        "transforms": transform_text,
        "preprocess": norm_text,
        "upsample_to": pipe.upsample_to,
        "fft": param.fft,
        "decorrelate": param.decorrelate,
        "redirect_relu": redirect_relu,
        "folded_batchnorms": folded,
        "compiled": bool(compile),
        "optimizer": "Adam",
        "device": str(dev),
        "channels": channels,
        "dtype": dtype_name(dtype),
        **({"output": fwd.output_key} if fwd.output_key is not None else {}),
    }
    snaps = torch.stack(snapshots)
    return RenderResult(
        images=snaps[-1][:, : param.image_channels].clone(),
        values=torch.stack(values),
        thresholds=ts,
        snapshots=snaps,
        times=tuple(times),
        trace=trace,
        objective=str(obj),
        settings=settings,
        labels=_labels(obj, n),
    )


def _labels(obj: Objective, n: int) -> list[str]:
    if obj.labels is not None and len(obj.labels) == n:
        return list(obj.labels)
    text = str(obj)
    if n == 1:
        return [text]
    head = list(obj.labels or [])
    return head + [f"{text} #{i}" for i in range(len(head), n)]


def _no_bar(progress: bool | None) -> bool | None:
    # None: tqdm decides (no bar when not a terminal); False: never; True: always.
    return None if progress is None else not progress


# The course renders the first 10 channels of InceptionV1's mixed4a; the same depth
# (about the middle of the network) in the other families.
_COURSE_LAYERS: tuple[tuple[str, str], ...] = (
    ("mixed4a", "mixed4a"),  # inceptionv1, the course's layer
    ("inception4a", "inception4a"),  # torchvision googlenet
    ("blocks.4", "blocks.4"),  # efficientnet (timm layout)
    ("layer3", "layer3"),  # resnet
    ("features.8", "features.8"),  # vgg-like
    ("bn3", "bn3"),  # the course's SimpleCNN
)


def featurevis_layer(model: Any) -> str:
    """The layer to visualise by default: the course's ``mixed4a`` for InceptionV1, the
    same depth in other families (``blocks.4``, ``inception4a``, ``layer3``), else the
    middle convolution.

    Example:
        >>> featurevis_layer(convlens.load_model("efficientnet_lite0"))
        'blocks.4'
    """
    net, _ = _model_and_bundle(model)
    names = {n for n, _ in net.named_modules()}
    for needed, layer in _COURSE_LAYERS:
        if needed in names:
            return layer
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no Conv2d layer: name the layer to visualise")
    return convs[len(convs) // 2]


def default_objective(model: Any, channels: int = 10) -> str:
    """``"<featurevis_layer>:0-9"``: the first ``channels`` channels, one per image.

    Example:
        >>> default_objective(convlens.load_model("efficientnet_lite0"))
        'blocks.4:0-9'
    """
    return f"{featurevis_layer(model)}:0-{channels - 1}"
