"""Downloads that resume and verify, and archive extraction that cannot escape its folder.

``download`` streams a URL to ``dest + ".part"``, resumes a partial file with an HTTP
``Range`` request, checks the byte count and sha256, and renames onto ``dest`` only when
both match. ``safe_extract`` checks every member of a tar archive before it writes
anything, extracts into a temporary folder beside ``dest`` and renames it into place only
when complete. Every failure raises :class:`convlens.DatasetError` with one line naming
the URL or archive, the reason and the fix.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import secrets
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any

from convlens._io import atomic_open, write_json
from convlens.errors import DatasetError

__all__ = [
    "EXTRACTED_MARKER",
    "convlens_home",
    "download",
    "safe_extract",
    "sha256_file",
]

#: Written into a folder by :func:`safe_extract` as its last step: the extraction is complete.
EXTRACTED_MARKER = ".convlens-extracted.json"
_SCHEMES = ("http", "https", "file")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_MAX_LINK_DEPTH = 40


def convlens_home() -> Path:
    """The folder convlens caches downloads in: ``$CONVLENS_HOME``, else ``~/.cache/convlens``.

    The folder is created on demand.

    Example:
        >>> convlens_home()
        PosixPath('/home/me/.cache/convlens')
    """
    env = os.environ.get("CONVLENS_HOME")
    home = Path(env).expanduser() if env else Path.home() / ".cache" / "convlens"
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(
            f"cannot create the convlens cache folder {str(home)!r}: {e.strerror or e}; "
            "set CONVLENS_HOME to a writable folder"
        ) from None
    return home


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The sha256 of a file as lowercase hex.

    Example:
        >>> sha256_file("imagenette2-160.tgz")
        '64d0c4859f35a461889e0147755a999a48b49bf38a7e0f9bd27003f10db02fe5'
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verified(path: Path, sha256: str | None, size: int | None) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    return sha256 is None or sha256_file(path) == sha256


def _network_error(url: str, reason: str, part: Path) -> DatasetError:
    keep = (
        f"; the partial file {str(part)!r} is kept and the next call resumes it"
        if part.exists() and part.stat().st_size
        else ""
    )
    return DatasetError(
        f"cannot download {url}: {reason}; check the network or the URL and run again{keep}"
    )


def _reason(e: BaseException) -> str:
    """A short reason for a network failure, without urllib's nesting."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return _reason(e.reason) if isinstance(e.reason, BaseException) else str(e.reason)
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(e, ConnectionResetError):
        return "the connection was reset"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _size_error(url: str, server: int, size: int) -> DatasetError:
    return DatasetError(
        f"cannot download {url}: the server's file has {server:,} bytes, expected {size:,}; "
        "the file changed on the server or the expected size is wrong"
    )


def _open(url: str, offset: int, timeout: float) -> Any:
    headers = {"User-Agent": "convlens", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def download(
    url: str,
    dest: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    size: int | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    chunk: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest``, resuming a partial download and verifying the result.

    Bytes stream into ``dest + ".part"`` (with a progress bar unless ``progress=False``).
    An existing ``.part`` is resumed with an HTTP ``Range`` request; a server that ignores
    it makes the download restart from zero. The byte count (``size``, else the
    Content-Length) and, when given, the ``sha256`` are checked before the ``.part`` is
    renamed onto ``dest``. A ``dest`` that already exists and verifies is returned without
    any network access. The sha256 computed is written beside ``dest`` as
    ``dest + ".sha256"`` (``sha256sum -c`` format) so an unpinned hash is recorded.

    Raises :class:`convlens.DatasetError` with one line naming the URL and the reason:
    network failures keep the ``.part`` for the next call to resume; a checksum or size
    mismatch deletes it.

    Example:
        >>> download("https://example.org/data.tgz", "data.tgz", sha256="64d0c4...")
        PosixPath('data.tgz')
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise DatasetError(f"cannot download {url!r}: only http, https and file URLs are supported")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise DatasetError(f"sha256 for {url} must be 64 hex digits, got {sha256!r}")
    if size is not None and size < 0:
        raise DatasetError(f"size for {url} must be >= 0, got {size}")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file() and _verified(dest, sha256, size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    digest = _fetch(url, part, size=size, progress=progress, timeout=timeout, chunk=chunk)
    if sha256 is not None and digest != sha256:
        part.unlink(missing_ok=True)
        raise DatasetError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {digest}; the "
            "download was corrupted or the file changed on the server: run again to "
            "download it afresh, or check the URL and the expected hash"
        )
    os.replace(part, dest)
    with atomic_open(dest.with_name(dest.name + ".sha256"), "w") as fh:
        fh.write(f"{digest}  {dest.name}\n")
    if sha256 is None and progress:
        from convlens._progress import tqdm

        tqdm.write(f"sha256 {digest} {dest.name} (not pinned; recorded in {dest.name}.sha256)")
    return dest


def _fetch(
    url: str, part: Path, *, size: int | None, progress: bool, timeout: float, chunk: int
) -> str:
    """Bring ``part`` to the complete file; return its sha256. Leaves ``part`` on failure."""
    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset > size:  # longer than the whole file: cannot be right
        part.unlink()
        offset = 0
    for _ in range(3):  # at most: a range ignored or refused, then a fresh start
        if size is not None and offset == size:  # complete already: verify, no request
            return sha256_file(part, chunk)
        try:
            resp = _open(url, offset, timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 416 and offset:
                total = _content_range(e.headers.get("Content-Range"))[2]
                if size is not None and total is not None and total != size:
                    part.unlink(missing_ok=True)
                    raise _size_error(url, total, size) from None
                if total is None or total == offset:  # the .part already holds everything
                    _check_count(url, part, size if size is not None else total, offset)
                    return sha256_file(part, chunk)
                part.unlink()  # the .part does not match the file on the server
                offset = 0
                continue
            raise _network_error(url, _reason(e), part) from None
        except (OSError, http.client.HTTPException) as e:
            raise _network_error(url, _reason(e), part) from None
        with resp:
            status = getattr(resp, "status", None) or 200  # file: URLs have no status
            if offset and status == 206:
                start, _, total = _content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    offset = 0  # an unexpected range: start over without one
                    continue
            else:
                offset, total = 0, None  # the whole file: the server ignored the range
            length = resp.headers.get("Content-Length", "")
            if total is None and length.isdigit():
                total = offset + int(length)
            if size is not None and total is not None and total != size:
                part.unlink(missing_ok=True)
                raise _size_error(url, total, size)
            expected = size if size is not None else total
            return _stream(url, resp, part, offset, expected, progress, chunk)
    raise DatasetError(f"cannot download {url}: the server keeps answering with the wrong range")


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    if value:
        if m := _CONTENT_RANGE.match(value.strip()):
            total = None if m[3] == "*" else int(m[3])
            return int(m[1]), int(m[2]), total
        if m := re.match(r"bytes\s+\*/(\d+)", value.strip()):
            return None, None, int(m[1])
    return None, None, None


def _stream(
    url: str,
    resp: IO[bytes],
    part: Path,
    offset: int,
    expected: int | None,
    progress: bool,
    chunk: int,
) -> str:
    from convlens._progress import tqdm

    h = hashlib.sha256()
    if offset:
        with open(part, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    got = offset
    bar = tqdm(
        total=expected,
        initial=offset,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=part.name[: -len(".part")],
        disable=not progress,
        leave=False,
    )
    with bar, open(part, "ab" if offset else "wb") as out:
        while True:
            try:
                block = resp.read(chunk)
            except (OSError, http.client.HTTPException) as e:
                out.flush()
                raise _network_error(url, _reason(e), part) from None
            if not block:
                break
            try:
                out.write(block)
            except OSError as e:
                raise DatasetError(
                    f"cannot write {str(part)!r}: {e.strerror or e}; free some space or "
                    "set CONVLENS_HOME to another folder"
                ) from None
            h.update(block)
            got += len(block)
            bar.update(len(block))
        out.flush()
        os.fsync(out.fileno())
    _check_count(url, part, expected, got)
    return h.hexdigest()


def _check_count(url: str, part: Path, expected: int | None, got: int) -> None:
    """Raise unless ``got`` bytes is the whole file (short: keep ``part``; long: delete it)."""
    if expected is not None and got < expected:
        raise _network_error(
            url, f"the connection closed after {got:,} of {expected:,} bytes", part
        )
    if expected is not None and got > expected:
        part.unlink(missing_ok=True)
        raise DatasetError(
            f"cannot download {url}: got {got:,} bytes, expected {expected:,}; the partial "
            "file was deleted: run again, or check the expected size"
        )


# --------------------------------------------------------------------------- extraction


def _parts(name: str) -> list[str]:
    return [p for p in PurePosixPath(name).parts if p not in ("", ".")]


def _resolve(parts: list[str], links: Mapping[str, str], depth: int = 0) -> list[str] | None:
    """Resolve an archive path through the archive's own symlinks, as the filesystem
    would after extraction. ``None`` when it leaves the extraction root."""
    out: list[str] = []
    for p in parts:
        if p in ("", "."):
            continue
        if p == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(p)
        target = links.get("/".join(out))
        if target is not None:
            if depth >= _MAX_LINK_DEPTH or target.startswith("/"):
                return None
            resolved = _resolve(out[:-1] + _parts(target), links, depth + 1)
            if resolved is None:
                return None
            out = resolved
    return out


def _member_problem(m: tarfile.TarInfo, links: Mapping[str, str]) -> str | None:
    name = m.name
    if name.startswith("/") or PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "path with '..'"
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
        return "device, fifo or other special file"
    if m.issym() or m.islnk():
        target = m.linkname
        if target.startswith("/") or re.match(r"^[A-Za-z]:", target):
            return f"link to the absolute path {target!r}"
        base = _parts(name)[:-1] if m.issym() else []  # hard links are relative to the root
        resolved = _resolve(base + _parts(target), links)
        if resolved is None:
            return f"link to {target!r}, outside the destination"
    parent = _resolve(_parts(name)[:-1], links)  # no writing through a link that leads out
    if parent is None:
        return "path through a link that leads outside the destination"
    return None


def _archive_error(archive: Path, reason: str) -> DatasetError:
    return DatasetError(
        f"cannot extract {str(archive)!r}: {reason}; nothing was extracted. Delete the "
        "archive and download it again, or use a trusted copy"
    )


def safe_extract(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Extract a ``.tar``, ``.tgz`` or ``.tar.gz`` into the new folder ``dest``, safely.

    Every member is checked before anything is written: absolute paths, ``..``
    components, symbolic or hard links that lead outside ``dest`` (followed through the
    archive's own links) and device or fifo members are refused. Members are extracted
    one by one with tarfile's ``"data"`` filter as a second line of defence into
    ``.<name>.tmp-<random>`` beside ``dest``, which is renamed onto ``dest`` only when
    complete, with :data:`EXTRACTED_MARKER` (a JSON record, plus ``info``) written last.

    Raises :class:`convlens.DatasetError` naming the archive and the member or reason
    (truncated, corrupt, hostile, ``dest`` already exists); nothing is left behind.

    Example:
        >>> safe_extract("imagenette2-160.tgz", "datasets/imagenette2-160")
        PosixPath('datasets/imagenette2-160')
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DatasetError(f"cannot extract {str(archive)!r}: no such file")
    if dest.exists() or dest.is_symlink():
        raise DatasetError(
            f"cannot extract {str(archive)!r} into {str(dest)!r}: it already exists; "
            "delete it or choose another folder"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"
    current = "(archive header)"
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            tar.errorlevel = 2
            members = tar.getmembers()
            links = {"/".join(_parts(m.name)): m.linkname for m in members if m.issym()}
            for m in members:
                if problem := _member_problem(m, links):
                    raise _archive_error(archive, f"member {m.name!r} is unsafe: {problem}")
            tmp.mkdir()
            for m in members:
                current = m.name
                tar.extract(m, tmp, filter="data")
        record = {"archive": str(archive.resolve()), "archive_bytes": archive.stat().st_size}
        write_json(tmp / EXTRACTED_MARKER, {**record, "members": len(members), **(info or {})})
        try:
            os.rename(tmp, dest)
        except OSError:
            if (dest / EXTRACTED_MARKER).is_file():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return dest
            raise
    except DatasetError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except tarfile.FilterError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _archive_error(archive, f"member {current!r} is unsafe: {e}") from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = "" if current == "(archive header)" else f" at member {current!r}"
        raise _archive_error(archive, f"truncated or corrupt archive{where} ({e})") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _archive_error(archive, f"{e.strerror or e} at member {current!r}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
