"""A synthetic tour folder: report.json, a PIL PNG, a matplotlib PNG, a JPEG, one missing section.

Imported by the report tests (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

EVIL = "<script>alert(1)</script>"
# Unescaped, this would be a broken image that logs an error in the browser.
EVIL_IMG = "<img src=x onerror=console.error('xss')>"


def _matplotlib_png(path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global figure state

    fig = Figure(figsize=(4, 2.5), dpi=50)
    ax = fig.subplots()
    ax.plot([2.3, 1.4, 0.9, 0.7], label="train")
    ax.plot([2.1, 1.5, 1.1, 1.0], label="val")
    ax.legend()
    fig.savefig(path)


def synthetic_report(folder: Path) -> dict[str, Any]:
    """Write a small tour-shaped folder; return the report.json document."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((64, 96, 3), dtype=np.uint8)
    rgb[..., 0] = np.linspace(0, 255, 96, dtype=np.uint8)[None, :]
    rgb[..., 1] = np.linspace(0, 255, 64, dtype=np.uint8)[:, None]
    rgb[..., 2] = 128
    Image.fromarray(rgb).save(folder / "tensor_channels.png")
    Image.fromarray(rgb).save(folder / "photo.jpg", quality=85)
    _matplotlib_png(folder / "training_curves.png")
    doc: dict[str, Any] = {
        "title": "convlens tour",
        "subtitle": "simple_cnn on shapes, a synthetic report for tests",
        "created": "2025-01-01T12:00:00+00:00",
        "settings": {"quick": True, "data": "shapes", "epochs": 2, "lr": 0.001},
        "versions": {"convlens": "0.1.0", "torch": "2.x"},
        "seed": 0,
        "sections": [
            {
                "id": "tensor",
                "title": "The image as a tensor",
                "status": "done",
                "intro": "A colour image is three grids of numbers.\n\nOne per channel.",
                "figures": [
                    {"file": "tensor_channels.png", "caption": "red, green and blue"},
                    {"file": "photo.jpg", "caption": "the photo as a JPEG"},
                ],
                "numbers": {"shape": [3, 64, 96], "min": 0.0, "max": 1.0},
            },
            {
                "id": "training",
                "title": f"Training {EVIL_IMG}",
                "status": "done",
                "figures": [
                    {"file": "training_curves.png", "caption": "loss per epoch"},
                    {"file": "gone.png", "caption": "a figure whose file was deleted"},
                ],
                "tables": [
                    {
                        "caption": "per-class accuracy",
                        "columns": ["class", "accuracy"],
                        "rows": [["circle", 0.912345], [EVIL, 0.5], [EVIL_IMG, 1.0]],
                    }
                ],
                "notes": ["two epochs only: --quick"],
            },
            {
                "id": "pretrained",
                "title": "A pretrained model",
                "status": "missing",
                "intro": "Top-5 of a pretrained network.",
                "missing": {
                    "reason": "resnet18's weights are not on disk and there is no network",
                    "fix": "convlens tour --model resnet18 --out tour/",
                },
            },
        ],
    }
    (folder / "report.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return doc
