"""Objectives for feature visualization: what a render maximises.

An :class:`Objective` maps the activations of one forward pass to a value **per batch
image** (a ``[N]`` tensor); the render maximises their sum and reports each image's value.
Objectives are maximised, as in Lucid: activations count up, and the penalties
(:func:`total_variation`, :func:`l1`, :func:`l2`) are positive measures that you subtract.
They compose with ``+``, ``-``, ``*`` and ``/`` by numbers, and ``sum``::

    obj = channel("mixed4a", 3) - 1e-3 * total_variation()
    obj = sum(channel("blocks.4", c, batch=i) for i, c in enumerate(range(10)))

``batch=i`` targets one image of the batch (its value is 0 on the others); without it, a
term applies to every image. :func:`parse` reads the string shorthand the CLI takes:
``"layer:3"`` (a channel), ``"layer:0-9"`` (channels 0..9, one per batch image),
``"layer:1,5,7"`` (the same for a list), ``"layer:3@7,7"`` (the neuron of channel 3 at
row 7, column 7), and ``"output:208"`` (the model's output 208: a class logit).

Example:
    >>> obj = parse("mixed4a:0-9")
    >>> obj.layers, obj.min_batch
    (('mixed4a',), 10)
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "INPUT",
    "OUTPUT",
    "Activations",
    "Objective",
    "channel",
    "class_logit",
    "deepdream",
    "direction",
    "direction_neuron",
    "diversity",
    "l1",
    "l2",
    "neuron",
    "parse",
    "total_variation",
]

#: Pseudo layer names: the image being optimised (before transforms, in ``[0, 1]``) and
#: the model's own output (the logits of a classifier).
INPUT = "<input>"
OUTPUT = "<output>"


#: What an objective reads: ``acts(name)`` is a layer's output for the current batch
#: (``INPUT`` the image, ``OUTPUT`` the model's output).
Activations = Callable[[str], torch.Tensor]


ValueFn = Callable[[Activations], torch.Tensor]


class Objective:
    """A value per batch image to maximise, built from layer activations.

    ``fn(acts) -> [N]``; ``layers`` names what it reads; ``min_batch`` is the smallest
    batch it can run on (one more than the largest ``batch=`` index it targets);
    ``description`` is how it prints.

    Example:
        >>> obj = 2 * channel("layer3", 0) - channel("layer3", 1) / 4
        >>> print(obj)
        2 * channel(layer3, 0) - channel(layer3, 1) / 4
    """

    def __init__(
        self,
        fn: ValueFn,
        layers: Sequence[str] = (),
        *,
        description: str = "objective",
        min_batch: int = 0,
        _prec: int = 3,
    ) -> None:
        self.fn = fn
        self.layers: tuple[str, ...] = tuple(dict.fromkeys(layers))
        self.description = description
        self.min_batch = int(min_batch)
        #: a short label per batch image, set by :func:`parse` for ``"layer:0-9"``
        self.labels: list[str] | None = None
        #: ``(layer, largest channel)`` a :func:`parse`\ d spec reads, checked against the
        #: layer before a render allocates anything
        self.max_channel: tuple[str, int] | None = None
        self._prec = _prec  # 1: a sum, 2: a product, 3: an atom (for parentheses)

    def __call__(self, acts: Activations) -> torch.Tensor:
        return self.fn(acts)

    def __repr__(self) -> str:
        return self.description

    # -- algebra ---------------------------------------------------------------------

    def _wrap(self, prec: int) -> str:
        return f"({self.description})" if self._prec < prec else self.description

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, numbers.Real):
            if other == 0:  # sum() starts from 0
                return self
            c = float(other)
            return Objective(
                lambda a: self.fn(a) + c,
                self.layers,
                description=f"{self.description} + {c:g}",
                min_batch=self.min_batch,
                _prec=1,
            )
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(
            lambda a: self.fn(a) + other.fn(a),
            self.layers + other.layers,
            description=f"{self.description} + {other._wrap(2)}",
            min_batch=max(self.min_batch, other.min_batch),
            _prec=1,
        )

    def __radd__(self, other: float) -> Objective:
        return self.__add__(other)

    def __neg__(self) -> Objective:
        return Objective(
            lambda a: -self.fn(a),
            self.layers,
            description=f"-{self._wrap(3)}",
            min_batch=self.min_batch,
            _prec=2,
        )

    def __sub__(self, other: Objective | float) -> Objective:
        if isinstance(other, numbers.Real):
            return self + (-float(other))
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(
            lambda a: self.fn(a) - other.fn(a),
            self.layers + other.layers,
            description=f"{self.description} - {other._wrap(2)}",
            min_batch=max(self.min_batch, other.min_batch),
            _prec=1,
        )

    def __rsub__(self, other: float) -> Objective:
        return (-self) + other

    def __mul__(self, other: float) -> Objective:
        if isinstance(other, Objective):
            raise TypeError(
                "objectives multiply by numbers only (2 * obj); to combine two, add them"
            )
        if not isinstance(other, numbers.Real):
            return NotImplemented
        c = float(other)
        return Objective(
            lambda a: self.fn(a) * c,
            self.layers,
            description=f"{c:g} * {self._wrap(2)}",
            min_batch=self.min_batch,
            _prec=2,
        )

    def __rmul__(self, other: float) -> Objective:
        return self.__mul__(other)

    def __truediv__(self, other: float) -> Objective:
        if not isinstance(other, numbers.Real) or isinstance(other, bool):
            raise TypeError("objectives divide by numbers only (obj / 2)")
        if other == 0:
            raise ZeroDivisionError("an objective divided by 0")
        c = float(other)
        return Objective(
            lambda a: self.fn(a) / c,
            self.layers,
            description=f"{self._wrap(2)} / {c:g}",
            min_batch=self.min_batch,
            _prec=2,
        )


# ------------------------------------------------------------------------ helpers


def _check_batch(batch: int | None) -> int:
    if batch is None:
        return 0
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch selects one image by its index (an int >= 0), got {batch!r}")
    return batch + 1


def _only(values: torch.Tensor, batch: int | None) -> torch.Tensor:
    """``values`` ([N]) where ``batch`` is None; else zeros except at ``batch``."""
    if batch is None:
        return values
    if batch >= values.shape[0]:
        raise ValueError(
            f"the objective targets batch image {batch} but the render has "
            f"{values.shape[0]} image(s): render with batch >= {batch + 1}"
        )
    mask = torch.zeros_like(values)
    mask[batch] = 1.0
    return values * mask


def _channel_of(t: torch.Tensor, layer: str, n: int) -> torch.Tensor:
    if t.ndim < 2:
        raise ValueError(f"layer {layer!r} gives a {t.ndim}-d output; channels need [N, C, ...]")
    c = t.shape[1]
    if not -c <= n < c:
        raise ValueError(
            f"channel {n} of layer {layer!r} does not exist: it has {c} channels (0-{c - 1})"
        )
    return t[:, n]


def _tag(batch: int | None) -> str:
    return "" if batch is None else f", batch={batch}"


def _layer_arg(layer: str) -> str:
    if not isinstance(layer, str) or not layer.strip():
        raise TypeError(f"layer is a module name such as 'mixed4a', got {layer!r}")
    return layer.strip()


# ------------------------------------------------------------------------ objectives


def channel(layer: str, n: int, batch: int | None = None) -> Objective:
    """The mean activation of channel ``n`` of ``layer`` (over its spatial positions).

    Example:
        >>> channel("mixed4a", 3, batch=1).min_batch
        2
    """
    layer = _layer_arg(layer)

    def fn(acts: Activations) -> torch.Tensor:
        t = _channel_of(acts(layer), layer, n)
        return _only(t.flatten(1).mean(1) if t.ndim > 1 else t, batch)

    return Objective(
        fn,
        [layer],
        description=f"channel({layer}, {n}{_tag(batch)})",
        min_batch=_check_batch(batch),
    )


def neuron(
    layer: str,
    n: int,
    x: int | None = None,
    y: int | None = None,
    batch: int | None = None,
) -> Objective:
    """The activation of channel ``n`` of ``layer`` at one position: row ``y``, column
    ``x`` (by default the centre, ``H // 2, W // 2``, also on non-square maps).

    Example:
        >>> print(neuron("mixed4a", 3))
        neuron(mixed4a, 3)
    """
    layer = _layer_arg(layer)

    def fn(acts: Activations) -> torch.Tensor:
        t = _channel_of(acts(layer), layer, n)
        if t.ndim != 3:
            raise ValueError(f"neuron needs a spatial layer ([N, C, H, W]); {layer!r} is not")
        h, w = t.shape[-2:]
        yy = h // 2 if y is None else y
        xx = w // 2 if x is None else x
        if not (0 <= yy < h and 0 <= xx < w):
            raise ValueError(
                f"neuron at row {yy}, column {xx} is outside the {h}x{w} map of layer "
                f"{layer!r} at this image size: pick y in 0..{h - 1}, x in 0..{w - 1}"
            )
        return _only(t[:, yy, xx], batch)

    where = "" if x is None and y is None else f" @ y={y}, x={x}"
    return Objective(
        fn,
        [layer],
        description=f"neuron({layer}, {n}{where}{_tag(batch)})",
        min_batch=_check_batch(batch),
    )


def deepdream(layer: str, batch: int | None = None) -> Objective:
    """The mean squared activation of the whole layer (DeepDream).

    Example:
        >>> print(deepdream("mixed4a"))
        deepdream(mixed4a)
    """
    layer = _layer_arg(layer)

    def fn(acts: Activations) -> torch.Tensor:
        t = acts(layer)
        return _only(t.flatten(1).pow(2).mean(1), batch)

    return Objective(
        fn, [layer], description=f"deepdream({layer}{_tag(batch)})", min_batch=_check_batch(batch)
    )


def direction(
    layer: str, vector: torch.Tensor | Sequence[float], batch: int | None = None
) -> Objective:
    """The cosine similarity between ``layer``'s activation vector at each position and
    ``vector`` (length = the layer's channels), averaged over positions.

    Example:
        >>> print(direction("mixed4a", torch.ones(508)))
        direction(mixed4a, 508-d)
    """
    layer = _layer_arg(layer)
    vec = torch.as_tensor(vector, dtype=torch.float32).flatten()

    def fn(acts: Activations) -> torch.Tensor:
        t = acts(layer)
        if t.ndim < 2 or t.shape[1] != vec.numel():
            raise ValueError(
                f"direction has {vec.numel()} entries but layer {layer!r} has "
                f"{t.shape[1] if t.ndim > 1 else 1} channels"
            )
        v = vec.to(t.device, t.dtype).view(1, -1, *([1] * (t.ndim - 2)))
        return _only(F.cosine_similarity(t, v, dim=1).flatten(1).mean(1), batch)

    return Objective(
        fn,
        [layer],
        description=f"direction({layer}, {vec.numel()}-d{_tag(batch)})",
        min_batch=_check_batch(batch),
    )


def direction_neuron(
    layer: str,
    vector: torch.Tensor | Sequence[float],
    batch: int | None = None,
    *,
    cossim_pow: float = 4.0,
) -> Objective:
    """Lucid's atlas objective at the centre position of ``layer``: the activation
    vector ``h`` there against ``vector`` ``v`` as ``(h . v/|v|) * max(cos(h, v), 0.1) **
    cossim_pow`` (the dot product, sharpened towards the direction). The activation
    atlas renders each cell's direction with it.

    Example:
        >>> print(direction_neuron("mixed4a", torch.ones(508)))
        direction_neuron(mixed4a, 508-d)
    """
    from convlens.analysis.atlas import direction_value

    layer = _layer_arg(layer)
    vec = torch.as_tensor(vector, dtype=torch.float32).flatten()

    def fn(acts: Activations) -> torch.Tensor:
        t = acts(layer)
        if t.ndim < 2 or t.shape[1] != vec.numel():
            raise ValueError(
                f"direction_neuron has {vec.numel()} entries but layer {layer!r} has "
                f"{t.shape[1] if t.ndim > 1 else 1} channels"
            )
        h = t[:, :, t.shape[2] // 2, t.shape[3] // 2] if t.ndim == 4 else t
        v = vec.to(h.device).expand(h.shape[0], -1)
        return _only(direction_value(h.float(), v, cossim_pow), batch)

    return Objective(
        fn,
        [layer],
        description=f"direction_neuron({layer}, {vec.numel()}-d{_tag(batch)})",
        min_batch=_check_batch(batch),
    )


def class_logit(n: int, batch: int | None = None) -> Objective:
    """Output ``n`` of the model (the logit of class ``n`` for a classifier). The whole
    forward runs. For a model whose output is already a softmax, maximise its logits layer
    with :func:`channel` instead.

    Example:
        >>> print(class_logit(208))
        class_logit(208)
    """

    def fn(acts: Activations) -> torch.Tensor:
        out = acts(OUTPUT)
        if out.ndim != 2:
            raise ValueError(
                f"class_logit needs a model whose output is [N, classes]; this one gives "
                f"{list(out.shape)}: use channel(layer, n) on a layer instead"
            )
        return _only(_channel_of(out, "the model output", n), batch)

    return Objective(
        fn, [OUTPUT], description=f"class_logit({n}{_tag(batch)})", min_batch=_check_batch(batch)
    )


def diversity(layer: str) -> Objective:
    """Lucid's diversity term: minus the cosine similarity of each image's Gram matrix of
    ``layer`` to the other images' (summed over the others, divided by the batch size).
    Add it, weighted, to an objective to make a batch's images differ.

    Example:
        >>> obj = channel("mixed4a", 97) + 1e2 * diversity("mixed4a")
    """
    layer = _layer_arg(layer)

    def fn(acts: Activations) -> torch.Tensor:
        t = acts(layer)
        n, c = t.shape[:2]
        flat = t.reshape(n, c, -1)
        grams = flat @ flat.transpose(1, 2)
        grams = F.normalize(grams.reshape(n, -1), dim=1, eps=1e-10)
        sim = grams @ grams.T
        return -(sim.sum(1) - sim.diagonal()) / n

    return Objective(fn, [layer], description=f"diversity({layer})")


def _image_or_layer(acts: Activations, layer: str | None) -> torch.Tensor:
    return acts(INPUT if layer is None else layer)


def total_variation(layer: str | None = None) -> Objective:
    """The sum of absolute differences between neighbouring pixels of the image (or of
    ``layer``), per image: subtract it to smooth (``obj - 1e-3 * total_variation()``).

    Example:
        >>> print(total_variation())
        total_variation(input)
    """

    def fn(acts: Activations) -> torch.Tensor:
        t = _image_or_layer(acts, layer)
        dy = (t[..., 1:, :] - t[..., :-1, :]).abs().flatten(1).sum(1)
        dx = (t[..., :, 1:] - t[..., :, :-1]).abs().flatten(1).sum(1)
        return dy + dx

    name = layer or "input"
    return Objective(fn, [layer or INPUT], description=f"total_variation({name})")


def l1(layer: str | None = None, constant: float = 0.0, batch: int | None = None) -> Objective:
    """``sum |x - constant|`` over the image (or ``layer``), per image: a penalty to
    subtract.

    Example:
        >>> print(l1(constant=0.5))
        l1(input, 0.5)
    """

    def fn(acts: Activations) -> torch.Tensor:
        t = _image_or_layer(acts, layer)
        return _only((t - constant).abs().flatten(1).sum(1), batch)

    name = layer or "input"
    return Objective(
        fn,
        [layer or INPUT],
        description=f"l1({name}, {constant:g}{_tag(batch)})",
        min_batch=_check_batch(batch),
    )


def l2(
    layer: str | None = None,
    constant: float = 0.0,
    epsilon: float = 1e-6,
    batch: int | None = None,
) -> Objective:
    """``sqrt(epsilon + sum (x - constant)^2)`` over the image (or ``layer``), per image:
    a penalty to subtract.

    Example:
        >>> print(l2())
        l2(input, 0)
    """

    def fn(acts: Activations) -> torch.Tensor:
        t = _image_or_layer(acts, layer)
        return _only(torch.sqrt(epsilon + (t - constant).pow(2).flatten(1).sum(1)), batch)

    name = layer or "input"
    return Objective(
        fn,
        [layer or INPUT],
        description=f"l2({name}, {constant:g}{_tag(batch)})",
        min_batch=_check_batch(batch),
    )


# ------------------------------------------------------------------------ shorthand

_SPEC_RE = re.compile(r"^(?P<layer>[^:@]+):(?P<chans>[0-9,\s\-]+)(?:@(?P<y>\d+),(?P<x>\d+))?$")
_SPEC_HELP = (
    "objectives are 'layer:3' (a channel), 'layer:0-9' or 'layer:1,5,7' (one channel per "
    "batch image), 'layer:3@7,7' (the neuron at row 7, column 7) or 'output:208' (a class "
    "logit)"
)


def _channels(text: str, spec: str) -> list[int]:
    out: list[int] = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            lo_s, _, hi_s = part.partition("-")
            if not lo_s.isdigit() or not hi_s.isdigit() or int(hi_s) < int(lo_s):
                raise ValueError(f"bad channel range {part!r} in {spec!r}: {_SPEC_HELP}")
            out.extend(range(int(lo_s), int(hi_s) + 1))
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f"bad channel {part!r} in {spec!r}: {_SPEC_HELP}")
    if not out:
        raise ValueError(f"no channel in {spec!r}: {_SPEC_HELP}")
    return out


def parse(spec: str | Objective) -> Objective:
    """An :class:`Objective` from the string shorthand (an Objective passes through).

    One channel applies to every image of the batch; several (``"layer:0-9"``) put channel
    ``k``-th on batch image ``k``.

    Example:
        >>> print(parse("blocks.4:0-2,5"))
        channel(blocks.4, 0-2,5, one per image)
        >>> print(parse("mixed4a:3@7,5"))
        neuron(mixed4a, 3 @ y=7, x=5)
    """
    if isinstance(spec, Objective):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"an objective is an Objective or a string, got {type(spec).__name__}")
    m = _SPEC_RE.match(spec.strip())
    if not m:
        raise ValueError(f"cannot read objective {spec!r}: {_SPEC_HELP}")
    layer = m.group("layer").strip()
    chans = _channels(m.group("chans"), spec)
    if m.group("y") is not None:
        if len(chans) != 1:
            raise ValueError(f"{spec!r}: a neuron (@y,x) takes one channel, not {len(chans)}")
        obj = neuron(layer, chans[0], x=int(m.group("x")), y=int(m.group("y")))
        obj.max_channel = (layer, chans[0])
        return obj

    def make(c: int, b: int | None) -> Objective:
        return class_logit(c, batch=b) if layer == "output" else channel(layer, c, batch=b)

    if len(chans) == 1:
        one = make(chans[0], None)
        one.max_channel = None if layer == "output" else (layer, chans[0])
        return one
    # the sum p0 + p1 + ... evaluated left to right in one loop: the same numbers as
    # sum(parts), without nesting one closure (and one description) per channel, which
    # grew quadratically and passed Python's recursion limit near 1000 channels
    parts = [make(c, i) for i, c in enumerate(chans)]

    def summed(acts: Activations) -> torch.Tensor:
        v = parts[0].fn(acts)
        for p in parts[1:]:
            v = v + p.fn(acts)
        return v

    total = Objective(summed, parts[0].layers, min_batch=len(chans), _prec=1)
    total.max_channel = None if layer == "output" else (layer, max(chans))
    what = "class_logit(" if layer == "output" else f"channel({layer}, "
    total.description = f"{what}{_compact(chans)}, one per image)"
    total._prec = 3
    total.labels = [f"{layer}:{c}" for c in chans]
    return total


def _compact(chans: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    start = prev = chans[0]
    for c in [*chans[1:], None]:
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(parts)
