"""Learning-rate schedules for :func:`~.render.render` and the microscope's renders.

Lucid (and Lucent after it) optimise with Adam at a constant 0.05 for 512 steps, a setting
chosen for the look of the images, never tuned for speed. A schedule here is a peak rate,
a linear warm-up over the first ``warmup`` fraction of the steps, a decay to ``final``
times the peak by the last step, and Adam's betas; ``steps`` keeps its meaning (optimisation steps) and the
schedule is stretched over however many the render runs. ``"constant"`` is Lucid's, kept
by name so that earlier renders can be reproduced pixel for pixel.

Example:
    >>> s = get_schedule("constant")
    >>> s.rate(0, 256), s.rate(255, 256)
    (0.05, 0.05)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DEFAULT_SCHEDULE", "SCHEDULES", "Schedule", "get_schedule"]


@dataclass(frozen=True)
class Schedule:
    """``rate(step, steps)``: ``lr`` (the peak) times a linear warm-up from ``lr / 10``
    over the first ``warmup`` fraction of ``steps``, then a decay (``"cosine"``,
    ``"linear"`` or ``"none"``) that reaches ``final * lr`` at the last step; ``betas``:
    Adam's (momentum and second-moment decay).

    Example:
        >>> s = Schedule("mine", lr=0.1, warmup=0.1, decay="cosine", final=0.1)
        >>> round(s.rate(0, 100), 4), round(s.rate(99, 100), 4)
        (0.01, 0.01)
    """

    name: str
    lr: float
    warmup: float = 0.0
    decay: str = "none"
    final: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"a schedule's lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        if self.decay not in ("none", "cosine", "linear"):
            raise ValueError(f"decay is 'none', 'cosine' or 'linear', got {self.decay!r}")
        if not 0.0 <= self.final <= 1.0:
            raise ValueError(f"final is a fraction of the peak in [0, 1], got {self.final!r}")
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Adam's betas lie in [0, 1), got {self.betas!r}")

    def factor(self, step: int, steps: int) -> float:
        """The multiplier of the peak rate at ``step`` (0-based) of ``steps``."""
        warm = round(self.warmup * steps)
        if step < warm:
            return 0.1 + 0.9 * step / warm
        if self.decay == "none":
            return 1.0
        span = max(1, steps - 1 - warm)
        t = min(1.0, (step - warm) / span)
        if self.decay == "linear":
            return 1.0 - (1.0 - self.final) * t
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * t))

    def rate(self, step: int, steps: int, lr: float | None = None) -> float:
        """The learning rate at ``step`` of ``steps``; ``lr`` overrides the peak."""
        return (self.lr if lr is None else float(lr)) * self.factor(step, steps)

    def describe(self, lr: float | None = None) -> dict[str, Any]:
        """The schedule as recorded in a render's ``settings``."""
        d = asdict(self)
        d["betas"] = list(self.betas)
        if lr is not None:
            d["lr"] = float(lr)
        return d


#: the schedules ``schedule=`` / ``--schedule`` accept by name
SCHEDULES: dict[str, Schedule] = {
    # Lucid's and Lucent's: Adam at a constant 0.05
    "constant": Schedule("constant", lr=0.05),
    # measured (benchmarks/README.md, "schedules"): less momentum (Adam's betas 0.5 and
    # 0.9), a 6x larger peak, a 5% warm-up and a cosine decay to a tenth reach 98-110% of
    # the constant schedule's 256-step objective in 96 steps (pretrained efficientnet_lite0,
    # random resnet18, InceptionV1 and SimpleCNN), and pass it in 128
    "cosine": Schedule("cosine", lr=0.3, warmup=0.05, decay="cosine", final=0.1, betas=(0.5, 0.9)),
}

DEFAULT_SCHEDULE = "cosine"


def get_schedule(schedule: str | Schedule) -> Schedule:
    """A :class:`Schedule` from its name (``"cosine"``, the default; ``"constant"``,
    Lucid's) or itself.

    Example:
        >>> get_schedule("cosine").decay
        'cosine'
    """
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str) and schedule in SCHEDULES:
        return SCHEDULES[schedule]
    raise ValueError(
        f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)} or a "
        "convlens.analysis.featurevis.schedule.Schedule"
    )
