"""Image folders read exactly as ``torchvision.datasets.ImageFolder(root, allow_empty=True)``
reads them, field by field (classes, class_to_idx, sample paths and targets in order), by
every reader convlens has (:func:`scan_image_folder`, :class:`ImageFolderData`, a
``--data`` folder's :class:`Source`); what torchvision is silent about is said in notes;
a symlink loop ends; a flat folder stays an unlabelled set; the CLI prints the notes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from _cli import assert_ok, run
from convlens.analysis._sources import make_source
from convlens.data import ImageFolderData
from convlens.data.folder import IMAGE_EXTENSIONS, scan_image_folder
from convlens.errors import DatasetError

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")


def _png(path: Path, seed: int = 0, size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".ppm": "PPM", ".bmp": "BMP"}.get(
        path.suffix.lower(), "PNG"
    )
    Image.fromarray(arr).save(path, format=fmt)


def _tree(root: Path, *, loop: bool = True) -> Path:
    """Every case at once: a nested class (the issue's ``class/sub/img.png``, two levels
    and a name order where '/' and '-' sort differently), an empty class, a hidden class,
    upper-case extensions, files that are not images (a .txt, a .gif torchvision does not
    read, a file with no extension), an image directly in the root, and a symlink loop."""
    _png(root / "cat" / "a.png", 1)
    _png(root / "cat" / "B.JPG", 2)
    _png(root / "cat" / "notes.txt.png", 3)
    (root / "cat" / "notes.txt").write_text("not an image")
    _png(root / "cat" / "anim.gif", 4)
    _png(root / "dog" / "sub" / "x.png", 5)  # only one level down: the lost class
    _png(root / "dog" / "sub" / "deeper" / "y.PNG", 6)
    _png(root / "dog" / "sub-2" / "z.jpeg", 7)
    _png(root / "dog" / "w.ppm", 8)
    (root / "dog" / "README").write_text("about dogs")
    (root / "empty").mkdir()
    (root / "empty" / "sub").mkdir()
    _png(root / ".hidden" / "h.png", 9)
    _png(root / "Zebra" / "q.Png", 10)  # upper case sorts first
    _png(root / "stray.png", 11)  # outside any class folder
    if loop:
        os.symlink("..", root / "dog" / "sub" / "loop")  # dog/sub/loop -> dog
    return root


def _torchvision(root: Path) -> tuple[list[str], dict[str, int], list[tuple[str, int]]]:
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(root), allow_empty=True)
    return ds.classes, ds.class_to_idx, [(str(p), int(t)) for p, t in ds.samples]


def _through_loop(path: str) -> bool:
    return f"{os.sep}loop{os.sep}" in path


@needs_symlinks
def test_scan_matches_torchvision_field_by_field(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    classes, class_to_idx, samples = _torchvision(root)
    scan = scan_image_folder(root)
    assert scan.labelled
    assert scan.classes == classes == [".hidden", "Zebra", "cat", "dog", "empty"]
    assert scan.class_to_idx == class_to_idx
    ours = [(str(p), t) for p, t in scan.samples]
    # torchvision walks the loop ~40 levels deep, listing dog/sub's images at each level;
    # convlens stops at the loop: everything else is the same, in the same order.
    assert len(samples) > len(ours) + 30
    assert ours == [s for s in samples if not _through_loop(s[0])]
    names = [Path(p).relative_to(root).as_posix() for p, _ in ours]
    assert names == [
        ".hidden/h.png",
        "Zebra/q.Png",
        "cat/B.JPG",
        "cat/a.png",
        "cat/notes.txt.png",
        "dog/w.ppm",  # walked folders sorted as strings: dog < dog/sub < dog/sub-2 <
        "dog/sub/x.png",  # dog/sub/deeper ('-' sorts before '/')
        "dog/sub-2/z.jpeg",
        "dog/sub/deeper/y.PNG",
    ]


def test_without_a_loop_equal_to_torchvision_exactly(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", loop=False)
    classes, class_to_idx, samples = _torchvision(root)
    scan = scan_image_folder(root)
    assert (scan.classes, scan.class_to_idx) == (classes, class_to_idx)
    assert [(str(p), t) for p, t in scan.samples] == samples
    assert set(IMAGE_EXTENSIONS) == set(__import__("torchvision").datasets.folder.IMG_EXTENSIONS)


@needs_symlinks
def test_the_notes_name_what_torchvision_is_silent_about(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data")
    notes = scan_image_folder(root).notes
    text = "\n".join(notes)
    empty = [n for n in notes if "'empty'" in n]
    assert len(empty) == 1 and "index 4" in empty[0] and "allow_empty" in empty[0]
    hidden = [n for n in notes if "'.hidden'" in n]
    assert len(hidden) == 1 and "index 0" in hidden[0]
    # notes.txt, anim.gif, README: three files skipped, each kind counted
    other = [n for n in notes if "not images" in n]
    assert len(other) == 1
    assert other[0].startswith("3 file(s)")
    for kind in ("1 .gif", "1 .txt", "1 without extension"):
        assert kind in other[0], other[0]
    assert "1 image(s) directly in" in text  # stray.png
    loops = [n for n in notes if "symlink loop" in n]
    assert len(loops) == 1 and str(root / "dog" / "sub" / "loop") in loops[0]


@needs_symlinks
def test_loops_end_even_when_they_cross_class_folders(tmp_path: Path) -> None:
    """``a/up -> ..`` and ``b/up -> ..``: the walk from a reaches b through the root and
    stops where a folder would be its own ancestor; it ends, fast."""
    root = tmp_path / "data"
    _png(root / "a" / "1.png", 1)
    _png(root / "b" / "2.png", 2)
    os.symlink("..", root / "a" / "up")
    os.symlink("..", root / "b" / "up")
    t0 = time.perf_counter()
    scan = scan_image_folder(root)
    assert time.perf_counter() - t0 < 5
    names = [Path(p).relative_to(root).as_posix() for p, _ in scan.samples]
    # a/up is the root seen from a: its b is a new folder there (as torchvision lists
    # it); nothing repeats without end
    assert names[0] == "a/1.png" and "a/up/b/2.png" in names and names[-1] == "b/up/a/1.png"
    assert len(names) == len(set(names)) == 4
    assert any("symlink loop" in n for n in scan.notes)


def test_image_folder_data_reads_nested_classes_like_torchvision(tmp_path: Path) -> None:
    """The issue's repro: ``val/<class>/<sub>/img.png`` was one class lost, silently."""
    root = tmp_path / "set"
    for split in ("train", "val"):
        for i in range(3):
            _png(root / split / "flat_class" / f"{i}.png", i)
            _png(root / split / "nested_class" / "sub" / f"{i}.png", 10 + i)
    (root / "val" / "nested_class" / "notes.txt").write_text("x")
    data = ImageFolderData(root, "val", train=False)
    classes, class_to_idx, samples = _torchvision(root / "val")
    assert data.class_ids == classes == ["flat_class", "nested_class"]
    assert data.class_to_idx == class_to_idx
    assert [(str(p), t) for p, t in data.samples] == samples
    assert len(data) == 6 and data.targets == [0, 0, 0, 1, 1, 1]
    assert any("1 file(s)" in n and ".txt" in n for n in data.notes)
    x, y = data[3]
    assert y == 1 and x.shape == (3, 128, 128)
    # the notes reach the dataset-wide pass's source
    src = make_source(data, None)
    assert src.notes == data.notes


def test_image_folder_data_keeps_an_empty_class_index(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _png(root / "val" / "a" / "1.png", 1)
    (root / "val" / "b").mkdir()
    _png(root / "val" / "c" / "1.png", 2)
    data = ImageFolderData(root, "val", train=False)
    assert data.class_ids == ["a", "b", "c"] and data.targets == [0, 2]
    assert any("'b'" in n and "index 1" in n for n in data.notes)


def test_a_folder_source_is_torchvisions_with_notes(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", loop=False)
    _, _, samples = _torchvision(root)
    src = make_source(root, None)
    assert src.classes == [".hidden", "Zebra", "cat", "dog", "empty"]
    assert [(src.path(i), src.load(i)[1]) for i in range(len(src))] == samples
    assert any("'empty'" in n for n in src.notes)


def test_a_flat_folder_stays_an_unlabelled_set(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for i, name in enumerate(["b.png", "a.JPG", "c.jpeg"]):
        _png(root / name, i)
    (root / "list.csv").write_text("a,b")
    (root / "thumbs").mkdir()  # a sub-folder with no images does not make classes
    scan = scan_image_folder(root)
    assert not scan.labelled and scan.classes == []
    assert [(p.name, t) for p, t in scan.samples] == [
        ("a.JPG", None),
        ("b.png", None),
        ("c.jpeg", None),
    ]
    assert any("1 file(s)" in n and ".csv" in n for n in scan.notes)
    src = make_source(root, None)
    assert src.classes is None and len(src) == 3
    assert [src.load(i)[1] for i in range(3)] == [None, None, None]
    with pytest.raises(DatasetError, match="sub-folder of images per class"):
        scan_image_folder(root, flat=False)


def test_a_folder_without_images_is_one_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "nothing"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"has no images \(\.jpg"):
        scan_image_folder(root)
    with pytest.raises(DatasetError, match="no folder"):
        scan_image_folder(tmp_path / "missing")


def test_examples_cli_reads_nested_classes_and_prints_the_notes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(3):
        _png(root / "flat" / f"{i}.png", i, size=32)
        _png(root / "nested" / "sub" / f"{i}.png", 10 + i, size=32)
    (root / "empty").mkdir()
    (root / "flat" / "notes.txt").write_text("x")
    out = tmp_path / "out"
    r = run(
        "examples", "--model", "simple_cnn", "--device", "cpu", "--quiet",
        "--data", str(root), "--layers", "conv1", "--k", "2", "--out", str(out),
    )  # fmt: skip
    assert_ok(r)
    import json

    doc = json.loads((out / "examples.json").read_text())
    assert doc["dataset"]["classes"] == ["empty", "flat", "nested"]
    assert doc["dataset"]["length"] == 6
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("convlens: note:")]
    assert any("'empty'" in n and "index 0" in n for n in notes), r.stderr
    assert any("1 file(s)" in n and ".txt" in n for n in notes), r.stderr


def test_train_and_attribute_print_the_scans_notes(tmp_path: Path) -> None:
    root = tmp_path / "set"
    for split in ("train", "val"):
        for i in range(2):
            _png(root / split / "a" / f"{i}.png", i, size=32)
            _png(root / split / "b" / "deep" / f"{i}.png", 10 + i, size=32)
        (root / split / "c").mkdir()
    (root / "train" / "a" / "notes.txt").write_text("x")
    r = run(
        "train", "--data", str(root), "--epochs", "1", "--device", "cpu", "--quiet",
        "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert_ok(r)
    assert "3 classes" in r.stdout  # a, b (nested), c (empty, its index kept)
    assert "'c'" in r.stderr and "index 2" in r.stderr and "1 .txt" in r.stderr
    r = run(
        "attribute", "--model", "simple_cnn", "--device", "cpu", "--data", str(root / "val"),
        "--methods", "saliency", "--out", str(tmp_path / "at"),
    )  # fmt: skip
    assert_ok(r)
    assert "class folder 'c'" in r.stderr and "index 2" in r.stderr
