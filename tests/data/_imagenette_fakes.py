"""Test helpers: a tiny Imagenette-shaped archive and a local HTTP server with Range support.

Imported by test_download.py and test_imagenette_root.py (pytest puts this folder on
sys.path). Nothing here touches the network beyond 127.0.0.1.
"""

from __future__ import annotations

import io
import re
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from PIL import Image

from convlens.data._imagenette import WNID_TO_NAME


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(
        buf, format="JPEG"
    )
    return buf.getvalue()


def make_tree(parent: Path, top: str = "imagenette2-160", per_class: int = 2) -> Path:
    """``parent/top/{train,val}/<wnid>/<i>.JPEG`` plus ``noisy_imagenette.csv``."""
    root = parent / top
    n = 0
    for split in ("train", "val"):
        for wnid in WNID_TO_NAME:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(n))
                n += 1
    (root / "noisy_imagenette.csv").write_text("path,noisy_labels_0\n")
    return root


def make_archive(tree: Path, out: Path) -> Path:
    """Archive ``tree`` (as its own top folder) into ``out``: ``.tgz`` gzip, ``.tar`` plain."""
    mode = "w:gz" if out.name.endswith((".tgz", ".tar.gz")) else "w"
    with tarfile.open(out, mode) as tar:
        tar.add(tree, arcname=tree.name)
    return out


def imagenette_archive(tmp: Path, name: str = "imagenette2-160.tgz") -> Path:
    """A small Imagenette-shaped archive ``tmp/name`` (10 wnids x 2 JPEGs per split)."""
    top = name.split(".")[0]
    src = tmp / f"src-{name}"
    src.mkdir(parents=True)
    return make_archive(make_tree(src, top), tmp / name)


class _Server(HTTPServer):
    state: FileServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out or hung up is part of the test, not an error


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 5  # seconds a connection may stay silent: no test can hang on the server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        st = self.server.state
        rng = self.headers.get("Range")
        st.requests.append({"path": self.path, "range": rng})
        first = len(st.requests) == 1
        if st.delay:
            time.sleep(st.delay)
        data = st.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not st.ignore_range:
            start = int(m[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if st.cut_after is not None and first:  # promise everything, send a part, hang up
            self.wfile.write(body[: st.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class FileServer:
    """Serve ``files`` (name -> bytes) on 127.0.0.1 in a thread; a context manager.

    ``requests`` records each GET (path, Range header). ``cut_after=N`` makes the first
    response stop after N body bytes; ``ignore_range`` answers every request with 200;
    ``delay`` sleeps before answering.
    """

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.files: dict[str, bytes] = dict(files or {})
        self.requests: list[dict[str, str | None]] = []
        self.cut_after: int | None = None
        self.ignore_range = False
        self.delay = 0.0

    def url(self, name: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def __enter__(self) -> FileServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.state = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
