"""Training on CUDA: the same code path, batches moved to the GPU. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from convlens.data import shapes
from convlens.models.zoo import build_architecture
from convlens.train import evaluate, train

pytestmark = pytest.mark.gpu


def test_train_and_evaluate_on_cuda(tmp_path, monkeypatch, exact_cuda):
    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path))
    train_ds, val_ds = shapes(train_per_class=30, val_per_class=8, progress=False)
    model = build_architecture("simple_cnn", 10, seed=0)
    r = train(
        model,
        train_ds,
        val_ds,
        epochs=8,
        lr=5e-3,
        device="cuda",
        out=tmp_path / "run",
        progress=False,
    )
    assert next(r.model.parameters()).is_cuda
    assert r.val_accuracy > 0.3
    cpu_model = build_architecture("simple_cnn", 10, seed=0)
    cpu_model.load_state_dict({k: v.cpu() for k, v in r.model.state_dict().items()})
    a = evaluate(r.model, val_ds, device="cuda")
    b = evaluate(cpu_model, val_ds, device="cpu")
    assert abs(a.accuracy - b.accuracy) <= 1 / len(val_ds)  # at most one borderline image
    assert torch.equal(a.labels, b.labels)
