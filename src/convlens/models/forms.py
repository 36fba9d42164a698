"""The forms a user's model comes in, and what every compute function does about them.

- **Wrappers** (``DataParallel``, ``DistributedDataParallel``, ``torch.compile``'s
  ``OptimizedModule``) are unwrapped by :func:`convlens.models.layers.unwrap`, so layer
  names are the user's and the original eager module is what runs (nothing is compiled).
- **TorchScript** modules cannot take forward hooks: :func:`require_hooks` says so in one
  line; what needs no hooks (a forward, ``named_modules()``) still works.
- **Half precision**: :func:`model_dtype` is the dtype inputs are cast to, and
  :func:`dtype_support` turns torch's "no kernel for this dtype" errors into one line.
- **Inputs of 1 or more than 3 channels**: :func:`input_channels`.
- **Hooks of the user's own**: :func:`hooks_aside` keeps them out of convlens's internal
  probes (shape traces on the meta device, ``torch.fx`` traces, partial recomputations),
  which feed a module things that are not real activations; every real forward of the
  user's module runs them as the user registered them.
- **Outputs that are not one tensor** (a dict, tuple, list, namedtuple or dataclass):
  :func:`select_output` picks the tensor a class target reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from convlens.errors import ConvlensError

__all__ = [
    "HOOK_TABLES",
    "OutputKey",
    "describe_output",
    "dtype_name",
    "dtype_support",
    "hooks_aside",
    "input_channels",
    "is_scripted",
    "model_dtype",
    "pick_output",
    "require_hooks",
    "select_output",
]

#: How ``output=`` names one entry of a model's output: a dict key or attribute name
#: (``"logits"``), or an index (``0``, or ``"0"`` as the command line gives it).
OutputKey = str | int

# Every per-module hook table of torch.nn.Module (forward, pre-forward, backward; the
# ``with_kwargs`` / ``always_called`` sets are keyed by the same hook ids).
HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
HALF_TYPES = (torch.float16, torch.bfloat16)


def is_scripted(model: nn.Module) -> bool:
    """Whether ``model`` is a TorchScript module (``torch.jit.script`` or ``trace``).

    Example:
        >>> is_scripted(torch.jit.script(nn.Conv2d(3, 4, 3))), is_scripted(nn.Conv2d(3, 4, 3))
        (True, False)
    """
    return isinstance(model, torch.jit.ScriptModule)


def require_hooks(model: nn.Module, what: str = "reading a layer") -> None:
    """Raise a one-line :class:`ConvlensError` when ``model`` cannot take forward hooks
    (a TorchScript module), naming the fix.

    Example:
        >>> require_hooks(torch.jit.script(nn.Conv2d(3, 4, 3)), "capture")
        Traceback (most recent call last):
        convlens.errors.ConvlensError: capture needs forward hooks, which a TorchScript ...
    """
    if is_scripted(model):
        raise ConvlensError(
            f"{what} needs forward hooks, which a TorchScript module "
            f"({type(model).__name__}, from torch.jit.script/trace) cannot take: pass the "
            "eager nn.Module you scripted (classify, list_layers and class targets also "
            "work on the scripted one)"
        )


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype inputs are cast to: the model's first floating parameter's (else its first
    floating buffer's, else float32).

    Example:
        >>> model_dtype(nn.Conv2d(3, 4, 3).to(torch.bfloat16))
        torch.bfloat16
    """
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (for settings and JSON)."""
    return str(dtype).removeprefix("torch.")


_NO_KERNEL = re.compile(
    r"not implemented for '(Half|BFloat16)'|Unsupported dtype (Half|BFloat16)"
    r"|Low precision dtypes not supported|(Half|BFloat16)\b.*not (implemented|supported)"
)


@contextlib.contextmanager
def dtype_support(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Inside, an error of torch's for an op that has no kernel for ``dtype`` on ``device``
    (a float16 or bfloat16 model) becomes one :class:`ConvlensError` line with the fix.

    Example:
        >>> with dtype_support(torch.bfloat16, "cpu"):
        ...     y = model(x)   # ConvlensError: torch has no cpu kernel for bfloat16 ...
    """
    try:
        yield
    except (RuntimeError, NotImplementedError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        if dtype not in HALF_TYPES or not _NO_KERNEL.search(str(e)):
            raise
        kind = torch.device(device).type
        elsewhere = " or on a GPU" if kind == "cpu" else ""
        raise ConvlensError(
            f"torch has no {kind} kernel for {dtype_name(dtype)} in one of this model's ops "
            f"({first[:160]}): run the model in float32 (model.float()){elsewhere}"
        ) from None


def input_channels(model: nn.Module, bundle: Any = None) -> int:
    """The number of input channels ``model`` takes: the length of a bundle's
    normalisation, else the first ``Conv2d``'s ``in_channels`` (for a TorchScript module the
    first 4-d weight's), else 3.

    Example:
        >>> input_channels(SimpleCNN(in_channels=1))
        1
    """
    if bundle is not None:
        return len(bundle.preprocess.mean)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    if is_scripted(model):
        for _, p in model.named_parameters():
            if p.ndim == 4:
                return int(p.shape[1])
    return 3


@contextlib.contextmanager
def hooks_aside(model: nn.Module) -> Iterator[None]:
    """Hold every module's own hooks aside inside (each module's hook tables swapped for
    empty ones) and put the very same tables back afterwards, also on error.

    For convlens's internal probes only, which feed modules meta tensors, ``torch.fx``
    proxies or partial patches: the user's hooks must not see those (a hook that keeps a
    layer's output would be left holding a meta tensor). Hooks registered inside go into
    the temporary tables and are gone afterwards.

    Example:
        >>> with hooks_aside(model):
        ...     trace = torch.fx.symbolic_trace(model)
    """
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for m in model.modules():
            state = m.__dict__
            for name in HOOK_TABLES:
                table = state.get(name)
                if table:
                    saved.append((m, name, table))
                    state[name] = type(table)()
        yield
    finally:
        for m, name, table in saved:
            m.__dict__[name] = table


# ---------------------------------------------------------------- outputs


def _entries(out: Any) -> list[tuple[OutputKey, Any]] | None:
    """``(key, value)`` for every entry of a container output; None for anything else."""
    if isinstance(out, Mapping):
        return list(out.items())
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a namedtuple
        return [(str(f), getattr(out, f)) for f in out._fields]
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [(f.name, getattr(out, f.name)) for f in dataclasses.fields(out)]
    logits = getattr(out, "logits", None)  # an output object with a .logits tensor
    if isinstance(logits, torch.Tensor):
        return [("logits", logits)]
    return None


def _kind(out: Any) -> str:
    if isinstance(out, Mapping):
        return "a dict"
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return f"a namedtuple {type(out).__name__}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__}"
    if dataclasses.is_dataclass(out):
        return f"a dataclass {type(out).__name__}"
    return f"a {type(out).__name__}"


def _describe_value(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return "[" + ", ".join(str(s) for s in v.shape) + "]"
    return type(v).__name__


def describe_output(out: Any) -> str:
    """One line saying what a model returned, e.g. ``a dict {'logits': [2, 5], 'features':
    [2, 6, 4, 4]}``.

    Example:
        >>> describe_output((torch.zeros(2, 5), torch.zeros(2, 3)))
        'a tuple (0: [2, 5], 1: [2, 3])'
    """
    if isinstance(out, torch.Tensor):
        return f"a tensor {_describe_value(out)}"
    entries = _entries(out)
    if entries is None:
        return _kind(out)
    inner = ", ".join(f"{k!r}: {_describe_value(v)}" for k, v in entries[:8])
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        inner = ", ".join(f"{k}: {_describe_value(v)}" for k, v in entries[:8])
        more = ", ..." if len(entries) > 8 else ""
        return f"{_kind(out)} ({inner}{more})"
    more = ", ..." if len(entries) > 8 else ""
    return f"{_kind(out)} {{{inner}{more}}}"


def _resolve(entries: list[tuple[OutputKey, Any]], output: OutputKey) -> OutputKey | None:
    keys = [k for k, _ in entries]
    if output in keys:
        return output
    text = str(output).strip()
    for k in keys:
        if str(k) == text:
            return k
    if text.lstrip("-").isdigit():  # an index, also into a namedtuple or a dict's order
        i = int(text)
        if -len(keys) <= i < len(keys):
            return keys[i]
    return None


def select_output(
    out: Any, output: OutputKey | None = None, *, what: str = "a class target"
) -> tuple[torch.Tensor, OutputKey | None]:
    """The tensor of a model's output that ``what`` reads, and the key it was found under
    (``None`` when the output is one tensor).

    ``output`` names it: a dict key or an attribute name (``"logits"``), or an index (an
    int or a digit string) into a tuple, list or namedtuple. Without ``output``: the only
    2-d tensor ``[N, classes]`` when there is exactly one, else the entry named
    ``logits`` when that is 2-d; anything else is a ``ValueError`` in one line that lists
    what the model returns and how to choose.

    Example:
        >>> select_output({"logits": torch.zeros(2, 5), "features": torch.zeros(2, 8, 4, 4)})[1]
        'logits'
    """
    if isinstance(out, torch.Tensor):
        if output is not None:
            raise ValueError(
                f"output={output!r} chooses from a dict, tuple or dataclass, but the model "
                f"returns one tensor {_describe_value(out)}: leave output out"
            )
        return out, None
    entries = _entries(out)
    how = "choose one with output=KEY (on the command line --output KEY)"
    if entries is None:
        raise TypeError(
            f"{what} needs class scores [N, classes], but the model returns "
            f"{describe_output(out)}, not a tensor, dict, tuple, list or dataclass"
        )
    if output is not None:
        key = _resolve(entries, output)
        if key is None:
            raise ValueError(
                f"output={output!r} is not in what the model returns, {describe_output(out)}: {how}"
            )
        value = dict(entries)[key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"output={output!r} is {type(value).__name__}, not a tensor; the model "
                f"returns {describe_output(out)}: {how}"
            )
        return value, key
    two_d = [(k, v) for k, v in entries if isinstance(v, torch.Tensor) and v.ndim == 2]
    if len(two_d) == 1:
        return two_d[0][1], two_d[0][0]
    named = [(k, v) for k, v in two_d if k == "logits"]
    if named:
        return named[0][1], named[0][0]
    found = "no 2-d tensor" if not two_d else f"{len(two_d)} 2-d tensors"
    raise ValueError(
        f"{what} needs one tensor [N, classes], but the model returns "
        f"{describe_output(out)} ({found}): {how}"
    )


def pick_output(structure: Any, key: OutputKey | None) -> Any:
    """The entry ``key`` (as :func:`select_output` returned it) of a structure shaped like
    the model's output (the output itself, or a ``torch.fx`` graph's output argument).

    Example:
        >>> pick_output({"logits": 1, "features": 2}, "logits")
        1
    """
    if key is None:
        return structure
    if isinstance(structure, Mapping):
        return structure[key]
    if isinstance(key, str):
        return getattr(structure, key)
    return structure[key]
