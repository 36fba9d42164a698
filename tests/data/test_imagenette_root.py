"""imagenette_root(): download/extract once into CONVLENS_HOME, local archives, folders."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _imagenette_fakes import FileServer, imagenette_archive, make_archive, make_tree

import convlens.data._imagenette as imagenette_mod  # the module, not the function
from convlens.data._imagenette import (
    IMAGENETTE_CHECKSUMS,
    IMAGENETTE_URLS,
    WNID_TO_NAME,
    imagenette_root,
)
from convlens.data.download import EXTRACTED_MARKER
from convlens.errors import DatasetError

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture
def served(archive: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    """The fake archive served locally as the 160 px Imagenette, with its hash pinned."""
    data = archive.read_bytes()
    with FileServer({"imagenette2-160.tgz": data}) as server:
        monkeypatch.setitem(IMAGENETTE_URLS, 160, server.url("imagenette2-160.tgz"))
        monkeypatch.setitem(
            IMAGENETTE_CHECKSUMS, 160, (len(data), hashlib.sha256(data).hexdigest())
        )
        yield server


def _check_layout(root: Path, per_class: int = 2) -> None:
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(WNID_TO_NAME)
        for wnid in WNID_TO_NAME:
            assert len(list((root / split / wnid).glob("*.JPEG"))) == per_class


def test_constants() -> None:
    assert IMAGENETTE_URLS == {
        160: "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
        320: "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
        "full": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2.tgz",
    }
    assert IMAGENETTE_CHECKSUMS[160] == (
        99_003_388,
        "64d0c4859f35a461889e0147755a999a48b49bf38a7e0f9bd27003f10db02fe5",
    )
    assert len(WNID_TO_NAME) == 10
    assert WNID_TO_NAME["n01440764"] == "tench"
    assert WNID_TO_NAME["n03888257"] == "parachute"


def test_download_extract_then_reuse(served: FileServer, home: Path) -> None:
    root = imagenette_root(progress=False)
    assert root == home / "datasets" / "imagenette2-160" / "imagenette2-160"
    _check_layout(root)
    marker = json.loads((root.parent / EXTRACTED_MARKER).read_text())
    assert marker["sha256"] == IMAGENETTE_CHECKSUMS[160][1]
    assert marker["url"] == IMAGENETTE_URLS[160]
    assert len(served.requests) == 1
    assert not [p for p in (home / "datasets").iterdir() if ".tmp-" in p.name]

    assert imagenette_root(progress=False) == root  # idempotent: no request, no extraction
    assert imagenette_root(download=False) == root
    assert len(served.requests) == 1


def test_interrupted_download_resumes_on_the_next_call(served: FileServer, archive: Path) -> None:
    served.cut_after = 700
    with pytest.raises(DatasetError, match="resumes"):
        imagenette_root(progress=False)
    root = imagenette_root(progress=False)
    _check_layout(root)
    assert [r["range"] for r in served.requests] == [None, "bytes=700-"]


def test_wrong_pinned_checksum_extracts_nothing(
    served: FileServer, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = IMAGENETTE_CHECKSUMS[160][0]
    monkeypatch.setitem(IMAGENETTE_CHECKSUMS, 160, (size, "f" * 64))
    with pytest.raises(DatasetError, match="checksum mismatch"):
        imagenette_root(progress=False)
    assert sorted(p.name for p in (home / "datasets").iterdir()) == []


def test_unpinned_size_records_the_computed_hash(
    archive: Path, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = imagenette_archive(tmp_path / "made320", "imagenette2-320.tgz").read_bytes()
    assert 320 not in IMAGENETTE_CHECKSUMS
    with FileServer({"imagenette2-320.tgz": data}) as server:
        monkeypatch.setitem(IMAGENETTE_URLS, 320, server.url("imagenette2-320.tgz"))
        root = imagenette_root(size="320", progress=False)
    assert root == home / "datasets" / "imagenette2-320" / "imagenette2-320"
    sha = hashlib.sha256(data).hexdigest()
    assert (home / "datasets" / "imagenette2-320.tgz.sha256").read_text().split()[0] == sha
    assert json.loads((root.parent / EXTRACTED_MARKER).read_text())["sha256"] == sha


def test_no_download_and_nothing_on_disk_says_what_to_do(home: Path) -> None:
    with pytest.raises(DatasetError) as info:
        imagenette_root(download=False)
    msg = str(info.value)
    assert "download=True" in msg
    assert str(home / "datasets" / "imagenette2-160.tgz") in msg
    assert str(home / "datasets" / "imagenette2-160") in msg
    assert "\n" not in msg


def test_no_download_uses_an_archive_already_in_the_cache(
    served: FileServer, archive: Path, home: Path
) -> None:
    (home / "datasets").mkdir(parents=True)
    shutil.copy(archive, home / "datasets" / "imagenette2-160.tgz")
    _check_layout(imagenette_root(download=False))
    assert served.requests == []


def test_no_download_refuses_a_wrong_cached_archive(served: FileServer, home: Path) -> None:
    (home / "datasets").mkdir(parents=True)
    (home / "datasets" / "imagenette2-160.tgz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="delete it"):
        imagenette_root(download=False)
    assert served.requests == []


@pytest.mark.parametrize("name", ["imagenette2-224.tar", "imagenette2-224.tgz", "x.tar.gz"])
def test_local_archive_is_extracted_once(
    name: str, tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = imagenette_archive(tmp_path / "made", name)
    stem = name.split(".")[0]
    root = imagenette_root(local)
    assert root == home / "datasets" / stem / stem
    _check_layout(root)
    assert (root / "noisy_imagenette.csv").is_file()

    def no_extract(*a: object, **k: object) -> None:
        raise AssertionError("extracted twice")

    monkeypatch.setattr(imagenette_mod, "safe_extract", no_extract)
    assert imagenette_root(str(local)) == root


def test_same_stem_but_different_archive_is_refused(tmp_path: Path) -> None:
    first = imagenette_archive(tmp_path / "a", "imagenette2-224.tar")
    imagenette_root(first)
    (tmp_path / "b").mkdir()
    other = make_archive(
        make_tree(tmp_path / "b", "imagenette2-224", per_class=3),
        tmp_path / "b" / "imagenette2-224.tar",
    )
    with pytest.raises(DatasetError, match="different archive"):
        imagenette_root(other)


def test_hostile_local_archive_leaves_nothing(tmp_path: Path, home: Path) -> None:
    bad = tmp_path / "imagenette2-160.tgz"
    with tarfile.open(bad, "w:gz") as tar:
        ti = tarfile.TarInfo("imagenette2-160/train/evil")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(ti)
    with pytest.raises(DatasetError, match="unsafe"):
        imagenette_root(bad)
    assert list((home / "datasets").iterdir()) == []


def test_truncated_local_archive_leaves_nothing(archive: Path, tmp_path: Path, home: Path) -> None:
    bad = tmp_path / "imagenette2-160.tgz"
    bad.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DatasetError, match="truncated"):
        imagenette_root(bad)
    assert list((home / "datasets").iterdir()) == []


def test_existing_folder_is_returned_as_is(tmp_path: Path, home: Path) -> None:
    tree = make_tree(tmp_path / "data", "mine")
    assert imagenette_root(tree) == tree
    assert imagenette_root(tree.parent) == tree  # exactly one subfolder with train/ + val/
    assert not (home / "datasets").exists()


def test_folder_with_several_datasets_is_ambiguous(tmp_path: Path) -> None:
    make_tree(tmp_path / "data", "a")
    make_tree(tmp_path / "data", "b")
    with pytest.raises(DatasetError, match=r"several datasets \(a, b\)"):
        imagenette_root(tmp_path / "data")


def test_missing_split_is_named(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "data", "mine")
    shutil.rmtree(tree / "val")
    with pytest.raises(DatasetError, match=r"lacks val/"):
        imagenette_root(tree)


def test_missing_class_is_named(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "data", "mine")
    shutil.rmtree(tree / "val" / "n03000684")
    with pytest.raises(DatasetError, match=r"1 of the 10 .*n03000684 \(chain saw\)") as info:
        imagenette_root(tree)
    assert str(tree / "val") in str(info.value)


def test_empty_class_is_named(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "data", "mine")
    for f in (tree / "train" / "n03445777").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="empty class folders: n03445777"):
        imagenette_root(tree)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown Imagenette size 224"):
        imagenette_root(size=224)
    with pytest.raises(DatasetError, match="no such file or folder"):
        imagenette_root(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="neither a folder nor"):
        imagenette_root(tmp_path / "notes.txt")


@pytest.mark.slow
def test_real_imagenette_224_tar(home: Path) -> None:
    tar = SHARED_DATA / "imagenette2-224.tar"
    if not tar.is_file():
        pytest.skip(f"real data not found at {tar}")
    root = imagenette_root(tar)
    assert root == home / "datasets" / "imagenette2-224" / "imagenette2-224"
    for split, expected in (("train", 9469), ("val", 3925)):
        folders = sorted(p.name for p in (root / split).iterdir())
        assert folders == sorted(WNID_TO_NAME)
        assert len(list((root / split).glob("*/*.JPEG"))) == expected
    assert (root / "noisy_imagenette.csv").is_file()
    assert imagenette_root(tar) == root  # the second call reuses the extraction
