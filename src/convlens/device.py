"""Device selection shared by every command and compute function, and the reduced
precision a device runs fast (:func:`resolve_precision`)."""

from __future__ import annotations

import functools

import torch

__all__ = [
    "PRECISIONS",
    "DeviceLike",
    "cpu_has_fast_bfloat16",
    "resolve_device",
    "resolve_precision",
]

#: the names ``precision=`` / ``--precision`` accept
PRECISIONS = ("auto", "float32", "bfloat16", "float16")

DeviceLike = str | torch.device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: DeviceLike | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:1" | "mps"`` into a usable ``torch.device``.

    ``"auto"`` (and ``None``) picks CUDA when it is there, then Apple's MPS, then the CPU,
    as the course does. Asking for a device that is not available raises ``ValueError``
    with the fix.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = "auto" if device is None else str(device).strip().lower()
        if name == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if _mps_available():
                return torch.device("mps")
            return torch.device("cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ValueError(
                f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
            ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!s} requested but CUDA is not available here: "
                "use --device cpu (or 'auto', which falls back to the CPU)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!s} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) exist"
            )
    elif dev.type == "mps" and not _mps_available():
        raise ValueError(
            f"device {device!s} requested but MPS is not available here: use --device cpu"
        )
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}: use 'auto', 'cpu', 'cuda' or 'mps'")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 matrix products in hardware (AVX-512 BF16 or AMX,
    from ``/proc/cpuinfo``'s flags; ``False`` where they cannot be read).

    Example:
        >>> isinstance(cpu_has_fast_bfloat16(), bool)
        True
    """
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for ``precision`` on ``device``: ``"float32"``, ``"bfloat16"``
    and ``"float16"`` as named; ``"auto"`` picks bfloat16 where the device runs it fast (a
    CPU with AVX-512 BF16 or AMX, CUDA with compute capability 8.0 or more), float16 on
    older CUDA, float32 elsewhere (MPS included).

    Example:
        >>> resolve_precision("float32", torch.device("cpu"))
        torch.float32
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            precision
        ]
    if device.type == "cuda":
        major, _minor = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "cpu" and cpu_has_fast_bfloat16():
        return torch.bfloat16
    return torch.float32
