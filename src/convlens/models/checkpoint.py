"""Model checkpoints: weights as safetensors plus a JSON sidecar that says how to rebuild.

``save_checkpoint(model, "run/model.safetensors", arch="simple_cnn")`` writes
``model.safetensors`` and ``model.json`` (``{"arch", "num_classes", "classes", ...}``), each
atomically. ``.pt``/``.pth`` state dicts are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convlens._io import atomic_open, write_json
from convlens.errors import ModelLoadError

__all__ = ["CHECKPOINT_FORMAT", "checkpoint_paths", "read_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "convlens-checkpoint/1"


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(weights, sidecar)`` for a checkpoint file, its sidecar, or a folder holding
    ``model.safetensors``."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    return p, p.with_suffix(".json")


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: str,
    classes: Sequence[str] | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights (safetensors) and a sidecar JSON, both atomically.

    Example:
        >>> save_checkpoint(SimpleCNN(), "out/model.safetensors", arch="simple_cnn")
        PosixPath('out/model.safetensors')
    """
    from safetensors.torch import save

    weights, sidecar = checkpoint_paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    num_classes = getattr(model, "num_classes", None)
    info: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "num_classes": num_classes,
        "classes": list(classes) if classes is not None else None,
        **(meta or {}),
    }
    with atomic_open(weights, "wb") as fh:
        fh.write(save(state, metadata={"format": CHECKPOINT_FORMAT, "arch": arch}))
    write_json(sidecar, info)
    return weights


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint's state dict and sidecar info (``{}`` when there is none).

    Safetensors files are read with their sidecar; ``.pt``/``.pth`` files only with
    ``torch.load(weights_only=True)`` (no code runs), accepting a bare state dict or one
    under ``"state_dict"`` / ``"model"``.

    Example:
        >>> state, info = read_checkpoint("run/model.safetensors")
        >>> info.get("arch"), len(state)
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"checkpoint {str(p)!r} does not exist")
    if p.suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refusing non-tensor objects, or a corrupt file
            raise ModelLoadError(
                f"cannot read {str(p)!r} as a state dict with weights_only=True: "
                f"{str(e).splitlines()[0]}"
            ) from None
        info: dict[str, Any] = {}
        if isinstance(obj, dict) and isinstance(obj.get("state_dict", obj.get("model")), dict):
            info = {k: v for k, v in obj.items() if k in ("arch", "num_classes", "classes")}
            obj = obj.get("state_dict", obj.get("model"))
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelLoadError(
                f"{str(p)!r} does not hold a state dict (name -> tensor): save "
                "model.state_dict(), not the model object"
            )
        return dict(obj), info
    weights, sidecar = checkpoint_paths(p)
    if not weights.exists():
        raise ModelLoadError(f"no weights file {str(weights)!r} for checkpoint {str(p)!r}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"corrupt checkpoint {str(weights)!r}: {e}") from None
    info = {}
    if sidecar.exists():
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"corrupt checkpoint sidecar {str(sidecar)!r}: {e}") from None
    return state, info
