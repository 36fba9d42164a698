"""download() and safe_extract() against a local HTTP server and hand-made archives."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _imagenette_fakes import FileServer, imagenette_archive

from convlens.data._imagenette import WNID_TO_NAME
from convlens.data.download import (
    EXTRACTED_MARKER,
    convlens_home,
    download,
    safe_extract,
    sha256_file,
)
from convlens.errors import DatasetError


@pytest.fixture
def server(archive: Path) -> Iterator[FileServer]:
    with FileServer({"imagenette2-160.tgz": archive.read_bytes()}) as s:
        yield s


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- home


def test_convlens_home_respects_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path / "custom" / "cache"))
    home = convlens_home()
    assert home == tmp_path / "custom" / "cache"
    assert home.is_dir()


def test_convlens_home_default_is_under_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVLENS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert convlens_home() == tmp_path / "user" / ".cache" / "convlens"
    assert (tmp_path / "user" / ".cache" / "convlens").is_dir()


# --------------------------------------------------------------------------- download


def test_download_verifies_and_extracts(server: FileServer, archive: Path, tmp_path: Path) -> None:
    data = archive.read_bytes()
    dest = tmp_path / "dl" / "imagenette2-160.tgz"
    out = download(
        server.url("imagenette2-160.tgz"),
        dest,
        sha256=_sha(data),
        size=len(data),
        progress=False,
        chunk=1000,
    )
    assert out == dest
    assert dest.read_bytes() == data
    assert not dest.with_name(dest.name + ".part").exists()
    assert dest.with_name(dest.name + ".sha256").read_text() == f"{_sha(data)}  {dest.name}\n"
    assert server.requests == [{"path": "/imagenette2-160.tgz", "range": None}]

    extracted = safe_extract(dest, tmp_path / "dl" / "imagenette2-160")
    root = extracted / "imagenette2-160"
    assert sorted(p.name for p in root.iterdir()) == ["noisy_imagenette.csv", "train", "val"]
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(WNID_TO_NAME)
        for wnid in WNID_TO_NAME:
            assert len(list((root / split / wnid).glob("*.JPEG"))) == 2
    assert (extracted / EXTRACTED_MARKER).is_file()
    assert not [p for p in extracted.parent.iterdir() if ".tmp-" in p.name]


def test_download_with_progress_bar_and_content_length_only(
    server: FileServer, archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = download(server.url("imagenette2-160.tgz"), tmp_path / "a.tgz", progress=True)
    assert dest.read_bytes() == archive.read_bytes()
    err = capsys.readouterr()
    assert "not pinned" in err.out + err.err  # the unpinned sha256 is printed


def test_interrupted_download_resumes_with_range(
    server: FileServer, archive: Path, tmp_path: Path
) -> None:
    data = archive.read_bytes()
    cut = len(data) // 3
    server.cut_after = cut
    dest = tmp_path / "x.tgz"
    part = tmp_path / "x.tgz.part"
    url = server.url("imagenette2-160.tgz")
    with pytest.raises(DatasetError, match="resumes") as info:
        download(url, dest, sha256=_sha(data), progress=False, chunk=512)
    assert "\n" not in str(info.value)
    assert f"{cut:,} of {len(data):,} bytes" in str(info.value)
    assert part.read_bytes() == data[:cut]
    assert not dest.exists()

    download(url, dest, sha256=_sha(data), progress=False, chunk=512)
    assert dest.read_bytes() == data
    assert not part.exists()
    assert [r["range"] for r in server.requests] == [None, f"bytes={cut}-"]


def test_server_ignoring_range_restarts_from_zero(
    server: FileServer, archive: Path, tmp_path: Path
) -> None:
    data = archive.read_bytes()
    server.ignore_range = True
    dest = tmp_path / "x.tgz"
    (tmp_path / "x.tgz.part").write_bytes(b"garbage!" * 100)
    download(server.url("imagenette2-160.tgz"), dest, sha256=_sha(data), progress=False)
    assert dest.read_bytes() == data
    assert server.requests[0]["range"] == "bytes=800-"  # asked to resume, got a 200


def test_complete_part_answered_416_is_verified(
    server: FileServer, archive: Path, tmp_path: Path
) -> None:
    data = archive.read_bytes()
    dest = tmp_path / "x.tgz"
    (tmp_path / "x.tgz.part").write_bytes(data)
    download(server.url("imagenette2-160.tgz"), dest, sha256=_sha(data), progress=False)
    assert dest.read_bytes() == data
    assert server.requests == [{"path": "/imagenette2-160.tgz", "range": f"bytes={len(data)}-"}]


def test_part_longer_than_the_file_starts_over(
    server: FileServer, archive: Path, tmp_path: Path
) -> None:
    data = archive.read_bytes()
    dest = tmp_path / "x.tgz"
    (tmp_path / "x.tgz.part").write_bytes(data + b"extra")
    download(server.url("imagenette2-160.tgz"), dest, progress=False)
    assert dest.read_bytes() == data
    assert [r["range"] for r in server.requests] == [f"bytes={len(data) + 5}-", None]


def test_complete_part_with_known_size_needs_no_request(
    server: FileServer, archive: Path, tmp_path: Path
) -> None:
    data = archive.read_bytes()
    (tmp_path / "x.tgz.part").write_bytes(data)
    url = server.url("imagenette2-160.tgz")
    download(url, tmp_path / "x.tgz", sha256=_sha(data), size=len(data), progress=False)
    assert server.requests == []


def test_wrong_checksum_deletes_the_part(server: FileServer, archive: Path, tmp_path: Path) -> None:
    data = archive.read_bytes()
    dest = tmp_path / "x.tgz"
    url = server.url("imagenette2-160.tgz")
    with pytest.raises(DatasetError) as info:
        download(url, dest, sha256="0" * 64, progress=False)
    msg = str(info.value)
    assert url in msg and "0" * 64 in msg and _sha(data) in msg and "run again" in msg
    assert "\n" not in msg
    assert not dest.exists()
    assert not (tmp_path / "x.tgz.part").exists()


def test_wrong_size_is_refused(server: FileServer, archive: Path, tmp_path: Path) -> None:
    size = archive.stat().st_size + 10
    with pytest.raises(DatasetError, match="expected"):
        download(server.url("imagenette2-160.tgz"), tmp_path / "x.tgz", size=size, progress=False)
    assert not (tmp_path / "x.tgz").exists()


def test_idempotent_second_call_makes_no_request(
    server: FileServer, archive: Path, tmp_path: Path
) -> None:
    data = archive.read_bytes()
    url, dest = server.url("imagenette2-160.tgz"), tmp_path / "x.tgz"
    for _ in range(2):
        download(url, dest, sha256=_sha(data), size=len(data), progress=False)
    download(url, dest, progress=False)  # nothing to verify against: existence is enough
    assert len(server.requests) == 1


def test_corrupt_dest_is_downloaded_again(
    server: FileServer, archive: Path, tmp_path: Path
) -> None:
    data = archive.read_bytes()
    dest = tmp_path / "x.tgz"
    dest.write_bytes(b"not the archive")
    download(server.url("imagenette2-160.tgz"), dest, sha256=_sha(data), progress=False)
    assert dest.read_bytes() == data


def test_connection_refused_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/imagenette2-160.tgz"
    with pytest.raises(DatasetError) as info:
        download(url, tmp_path / "x.tgz", progress=False, timeout=5)
    msg = str(info.value)
    assert url in msg and "connection refused" in msg
    assert "\n" not in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not (tmp_path / "x.tgz").exists()


def test_http_error_names_the_status(server: FileServer, tmp_path: Path) -> None:
    url = server.url("missing.tgz")
    with pytest.raises(DatasetError, match="HTTP 404") as info:
        download(url, tmp_path / "x.tgz", progress=False)
    assert url in str(info.value)


def test_timeout_keeps_the_part(server: FileServer, archive: Path, tmp_path: Path) -> None:
    server.delay = 0.5
    (tmp_path / "x.tgz.part").write_bytes(archive.read_bytes()[:100])
    with pytest.raises(DatasetError, match="timed out") as info:
        download(server.url("imagenette2-160.tgz"), tmp_path / "x.tgz", progress=False, timeout=0.1)
    assert "resumes" in str(info.value)
    assert (tmp_path / "x.tgz.part").stat().st_size == 100


def test_file_url(archive: Path, tmp_path: Path) -> None:
    dest = download(archive.as_uri(), tmp_path / "copy.tgz", progress=False)
    assert dest.read_bytes() == archive.read_bytes()


@pytest.mark.parametrize("url", ["ftp://example.org/x.tgz", "/just/a/path.tgz", "data:,hi"])
def test_only_http_https_file(url: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="only http, https and file"):
        download(url, tmp_path / "x.tgz", progress=False)


def test_sha256_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    assert sha256_file(tmp_path / "f", chunk=7) == _sha(b"abc" * 1000)


# --------------------------------------------------------------------------- safe_extract


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"") -> tuple:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = link
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    return ti, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _hostile(path: Path, *members: tuple) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(*_info("good/", tarfile.DIRTYPE))
        tar.addfile(*_info("good/fine.txt", data=b"fine"))
        for m in members:
            tar.addfile(*m)
    return path


def _hostile_cases(outside: Path) -> dict[str, list[tuple]]:
    return {
        "dotdot": [_info("../evil", data=b"evil")],
        "dotdot-deep": [_info("good/../../evil", data=b"evil")],
        "absolute": [_info(str(outside / "abs-evil"), data=b"evil")],
        "symlink-up": [_info("good/link", tarfile.SYMTYPE, "../../outside")],
        "symlink-absolute": [_info("link", tarfile.SYMTYPE, "/etc/passwd")],
        "symlink-chain": [  # each looks harmless alone; together they lead out
            _info("d", tarfile.SYMTYPE, "."),
            _info("x", tarfile.SYMTYPE, "d/.."),
            _info("x/evil", data=b"evil"),
        ],
        "symlink-then-write": [
            _info("up", tarfile.SYMTYPE, ".."),
            _info("up/evil", data=b"evil"),
        ],
        "hardlink-up": [_info("hl", tarfile.LNKTYPE, "../outside/x")],
        "hardlink-absolute": [_info("hl", tarfile.LNKTYPE, "/etc/passwd")],
        "char-device": [_info("dev", tarfile.CHRTYPE)],
        "fifo": [_info("fifo", tarfile.FIFOTYPE)],
    }


@pytest.mark.parametrize("case", sorted(_hostile_cases(Path("/x"))))
def test_hostile_archive_is_refused_before_writing(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("precious")
    archive = _hostile(tmp_path / "hostile.tgz", *_hostile_cases(outside)[case])
    work = tmp_path / "work"
    work.mkdir()
    extracted: list[str] = []
    real_extract = tarfile.TarFile.extract

    def spy(self: tarfile.TarFile, member: tarfile.TarInfo, *a: object, **k: object) -> None:
        extracted.append(member.name)
        real_extract(self, member, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(tarfile.TarFile, "extract", spy)
    with pytest.raises(DatasetError, match="unsafe") as info:
        safe_extract(archive, work / "out")
    msg = str(info.value)
    assert "hostile.tgz" in msg and "\n" not in msg
    assert extracted == []  # checked every member before extracting any
    assert list(work.iterdir()) == []  # no dest, no temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.tgz", "outside", "work"]
    assert sorted(p.name for p in outside.iterdir()) == ["x"]
    assert (outside / "x").read_text() == "precious"


def test_links_inside_the_archive_are_fine(tmp_path: Path) -> None:
    archive = _hostile(
        tmp_path / "links.tgz",
        _info("good/sub/", tarfile.DIRTYPE),
        _info("good/sub/rel", tarfile.SYMTYPE, "../fine.txt"),
        _info("good/hard", tarfile.LNKTYPE, "good/fine.txt"),
    )
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "good" / "sub" / "rel").read_text() == "fine"
    assert (out / "good" / "hard").read_text() == "fine"


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.95])
def test_truncated_archive_leaves_nothing(archive: Path, tmp_path: Path, fraction: float) -> None:
    data = archive.read_bytes()
    bad = tmp_path / "truncated.tgz"
    bad.write_bytes(data[: int(len(data) * fraction)])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(DatasetError, match="truncated or corrupt") as info:
        safe_extract(bad, work / "out")
    assert "truncated.tgz" in str(info.value) and "\n" not in str(info.value)
    assert list(work.iterdir()) == []


def test_corrupt_archive(tmp_path: Path) -> None:
    bad = tmp_path / "noise.tgz"
    bad.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DatasetError, match=r"noise\.tgz"):
        safe_extract(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_plain_tar_and_existing_dest(tmp_path: Path) -> None:
    archive = imagenette_archive(tmp_path / "made", "imagenette2-160.tar")
    out = safe_extract(archive, tmp_path / "out")
    assert (out / "imagenette2-160" / "train" / "n01440764").is_dir()
    with pytest.raises(DatasetError, match="already exists"):
        safe_extract(archive, out)
    with pytest.raises(DatasetError, match="no such file"):
        safe_extract(tmp_path / "missing.tar", tmp_path / "out2")
