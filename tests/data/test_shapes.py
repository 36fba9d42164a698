from __future__ import annotations

import hashlib

import numpy as np
import pytest

from convlens.data import SHAPE_CLASSES, shapes
from convlens.data._shapes import draw_shape, generate_shapes


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_draw_is_deterministic_and_seed_dependent():
    a = np.asarray(draw_shape(3, seed=11))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, np.asarray(draw_shape(3, seed=11)))
    assert not np.array_equal(a, np.asarray(draw_shape(3, seed=12)))
    assert not np.array_equal(a, np.asarray(draw_shape(4, seed=11)))
    with pytest.raises(ValueError):
        draw_shape(10, seed=0)


def test_generate_same_seed_same_files_and_layout(tmp_path):
    a = generate_shapes(tmp_path / "a", train_per_class=3, val_per_class=2, seed=5, progress=False)
    b = generate_shapes(tmp_path / "b", train_per_class=3, val_per_class=2, seed=5, progress=False)
    c = generate_shapes(tmp_path / "c", train_per_class=3, val_per_class=2, seed=6, progress=False)
    assert _digest(a) == _digest(b) != _digest(c)
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(
        n.replace(" ", "_") for n in SHAPE_CLASSES
    )
    assert len(list((a / "val").rglob("*.png"))) == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_generate_is_idempotent_and_refuses_other_settings(tmp_path):
    root = generate_shapes(tmp_path / "s", train_per_class=2, val_per_class=1, progress=False)
    mtime = (root / "shapes.json").stat().st_mtime_ns
    generate_shapes(root, train_per_class=2, val_per_class=1, progress=False)
    assert (root / "shapes.json").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="other settings"):
        generate_shapes(root, train_per_class=3, val_per_class=1, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_shapes(tmp_path / "busy", progress=False)


def test_shapes_datasets_have_class_order_and_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path))
    train, val = shapes(train_per_class=2, val_per_class=1, progress=False)
    assert train.classes == list(SHAPE_CLASSES) == val.classes
    assert len(train) == 20 and len(val) == 10
    for path, label in train.samples:
        assert path.parent.name == SHAPE_CLASSES[label].replace(" ", "_")
    x, y = val[0]
    assert x.shape == (3, 64, 64) and y == 0
    assert str(tmp_path) in str(train.root)
