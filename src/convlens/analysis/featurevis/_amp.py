"""Mixed precision for renders: the model's forward and backward under autocast, while the
image's parameters, Adam's state, the objective and the recorded values stay float32.

float16 gradients underflow where bfloat16's do not (float16 has 5 exponent bits), so a
float16 render scales the loss dynamically, as ``torch.amp.GradScaler`` does: the loss is
multiplied by ``scale`` before the backward, the image's gradients divided by it after; a
step whose gradients are not finite is skipped and the scale halved; the scale doubles
after ``growth`` finite steps in a row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from convlens.device import PRECISIONS, resolve_precision
from convlens.errors import ConvlensError
from convlens.models.forms import dtype_name

__all__ = ["MixedPrecision"]


class MixedPrecision:
    """What ``precision=`` means for one render on ``dev``, for a model whose parameters
    are ``model_dtype``.

    A float32 model runs under autocast in the resolved dtype (``"auto"``: bfloat16 where
    the device is fast at it, float16 on older CUDA, else float32; see
    :func:`convlens.device.resolve_precision`). A model that is already float16 or
    bfloat16 runs in its own dtype whatever ``precision`` says (``name`` is its dtype).

    Example:
        >>> mp = MixedPrecision("float32", torch.device("cpu"))
        >>> mp.name, mp.enabled
        ('float32', False)
    """

    def __init__(
        self,
        precision: str,
        dev: torch.device,
        model_dtype: torch.dtype = torch.float32,
        growth: int = 200,
    ) -> None:
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.requested = precision
        self.dev = dev
        if model_dtype != torch.float32:
            self.dtype = model_dtype
            self.enabled = False
        else:
            self.dtype = resolve_precision(precision, dev)
            self.enabled = self.dtype != torch.float32
        if self.enabled:
            try:
                with torch.autocast(dev.type, dtype=self.dtype):
                    pass
            except (RuntimeError, ValueError) as err:
                raise ConvlensError(
                    f"precision {precision!r} ({dtype_name(self.dtype)}) cannot run on "
                    f"{dev}: {str(err).splitlines()[0]}; use precision='float32'"
                ) from None
        self.scaling = self.enabled and self.dtype == torch.float16
        self.scale = 2.0**16 if self.scaling else 1.0
        self.growth = growth
        self.good = 0
        self.skipped = 0

    @property
    def name(self) -> str:
        """``"float32"``, ``"bfloat16"`` or ``"float16"``: what the forward computes in."""
        return dtype_name(self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The context the model's forward runs in (nothing for float32)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.dev.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, params: Iterable[torch.Tensor]) -> bool:
        """``loss.backward()``, with loss scaling for float16; ``False`` when the step must
        be skipped (float16 gradients overflowed; the scale was halved)."""
        if not self.scaling:
            loss.backward()
            return True
        (loss * self.scale).backward()
        grads = [p.grad for p in params if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in grads)
        if not finite:
            for g in grads:
                g.zero_()
            self.scale /= 2.0
            self.good = 0
            self.skipped += 1
            return False
        inv = 1.0 / self.scale
        for g in grads:
            g.mul_(inv)
        self.good += 1
        if self.good >= self.growth:
            self.scale *= 2.0
            self.good = 0
        return True

    def settings(self) -> dict[str, object]:
        """What a render records: the precision asked for and what ran."""
        out: dict[str, object] = {"precision": self.name, "precision_requested": self.requested}
        if self.scaling:
            out["loss_scaling"] = "dynamic"
        return out
