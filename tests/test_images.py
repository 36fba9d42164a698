"""convlens.images: load_image from every source, mode conversions, errors, URLs, sample."""

from __future__ import annotations

import functools
import http.server
import io
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens import ImageLoadError, load_image, sample_image
from convlens.errors import ConvlensError
from convlens.images import image_summary, sample_image_path

# A 2x3 (H x W) image with six distinct colours.
COLOURS = np.array(
    [
        [[255, 0, 0], [0, 255, 0], [0, 0, 255]],
        [[10, 20, 30], [128, 64, 200], [255, 255, 255]],
    ],
    dtype=np.uint8,
)
EXPECTED = torch.from_numpy(COLOURS.astype(np.float32) / 255.0).permute(2, 0, 1)


def _png_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


@pytest.fixture
def png_path(tmp_path: Path) -> Path:
    p = tmp_path / "colours.png"
    Image.fromarray(COLOURS, "RGB").save(p)
    return p


def _assert_image_tensor(x: torch.Tensor, h: int, w: int) -> None:
    assert isinstance(x, torch.Tensor)
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (3, h, w)
    assert float(x.min()) >= 0.0
    assert float(x.max()) <= 1.0


# ---------------------------------------------------------------- source types


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: str(p), id="str"),
        pytest.param(lambda p: p, id="pathlib"),
        pytest.param(lambda p: p.read_bytes(), id="bytes"),
        pytest.param(lambda p: bytearray(p.read_bytes()), id="bytearray"),
        pytest.param(lambda p: Image.open(p), id="pil"),
        pytest.param(lambda p: COLOURS.copy(), id="numpy-uint8-hwc"),
    ],
)
def test_every_source_gives_exact_pixels(png_path: Path, make) -> None:
    x = load_image(make(png_path))
    _assert_image_tensor(x, 2, 3)
    torch.testing.assert_close(x, EXPECTED, rtol=0, atol=1e-7)


def test_numpy_hw_uint8_becomes_three_equal_channels() -> None:
    a = np.array([[0, 51], [102, 255]], dtype=np.uint8)
    x = load_image(a)
    _assert_image_tensor(x, 2, 2)
    want = torch.tensor([[0.0, 0.2], [0.4, 1.0]])
    for c in range(3):
        torch.testing.assert_close(x[c], want, rtol=0, atol=1e-6)


def test_numpy_float_in_unit_range_is_kept() -> None:
    a = np.array([[[0.0, 0.25, 1.0], [0.5, 0.75, 0.125]]], dtype=np.float64)  # 1x2x3
    x = load_image(a)
    _assert_image_tensor(x, 1, 2)
    torch.testing.assert_close(x, torch.from_numpy(a).float().permute(2, 0, 1))


def test_numpy_uint16_scaled_by_65535() -> None:
    a = np.array([[0, 65535, 32768]], dtype=np.uint16)
    x = load_image(a)
    _assert_image_tensor(x, 1, 3)
    torch.testing.assert_close(x[1, 0], torch.tensor([0.0, 1.0, 32768 / 65535]))


def test_numpy_rgba_composited_on_white() -> None:
    a = np.array([[[255, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    x = load_image(a)
    _assert_image_tensor(x, 1, 3)
    torch.testing.assert_close(x[:, 0, 0], torch.ones(3))  # fully transparent -> white
    torch.testing.assert_close(x[:, 0, 1], torch.zeros(3))  # opaque black stays black
    torch.testing.assert_close(x[:, 0, 2], torch.full((3,), 1 - 128 / 255), atol=1e-6, rtol=0)


def test_unsupported_source_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="int"):
        load_image(42)  # type: ignore[arg-type]


# ---------------------------------------------------------------- PIL modes


def test_grayscale_l_gives_three_equal_channels(tmp_path: Path) -> None:
    a = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    p = tmp_path / "gray.png"
    Image.fromarray(a, "L").save(p)
    x = load_image(p)
    _assert_image_tensor(x, 2, 2)
    want = torch.from_numpy(a.astype(np.float32) / 255.0)
    for c in range(3):
        torch.testing.assert_close(x[c], want)


def test_palette_image() -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    x = load_image(_png_bytes(p))
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(x[:, 0, 1], torch.tensor([0.0, 0.0, 1.0]))


def test_palette_transparency_composited_on_white() -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # index 0 (black) is transparent
    x = load_image(_png_bytes(p, transparency=0))
    torch.testing.assert_close(x[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(x[:, 0, 1], torch.tensor([0.0, 1.0, 0.0]))


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))
    im.putpixel((1, 0), (0, 0, 0, 128))
    im.putpixel((2, 0), (0, 255, 0, 255))
    p = tmp_path / "rgba.png"
    im.save(p)
    x = load_image(p)
    _assert_image_tensor(x, 1, 3)
    torch.testing.assert_close(x[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(x[:, 0, 1], torch.full((3,), 127 / 255), atol=2 / 255, rtol=0)
    assert abs(float(x[0, 0, 1]) - 0.498) < 0.005
    torch.testing.assert_close(x[:, 0, 2], torch.tensor([0.0, 1.0, 0.0]))


def test_la_composited_on_white() -> None:
    im = Image.new("LA", (3, 1))
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (0, 128))
    im.putpixel((2, 0), (200, 255))
    x = load_image(_png_bytes(im))
    _assert_image_tensor(x, 1, 3)
    torch.testing.assert_close(x[:, 0, 0], torch.ones(3))
    assert abs(float(x[1, 0, 1]) - 0.498) < 0.005
    torch.testing.assert_close(x[:, 0, 2], torch.full((3,), 200 / 255))


def test_cmyk_round_trips_to_rgb() -> None:
    rgb = (200, 100, 50)
    cmyk = Image.new("RGB", (2, 2), rgb).convert("CMYK")
    assert cmyk.mode == "CMYK"
    x = load_image(cmyk)
    _assert_image_tensor(x, 2, 2)
    want = torch.tensor(rgb, dtype=torch.float32) / 255
    torch.testing.assert_close(x[:, 1, 1], want, atol=2 / 255, rtol=0)


def test_sixteen_bit_grayscale_png(tmp_path: Path) -> None:
    a = np.array([[65535, 32768, 0]], dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode.startswith("I")  # really a 16-bit file
    x = load_image(p)
    _assert_image_tensor(x, 1, 3)
    for c in range(3):
        torch.testing.assert_close(x[c, 0], torch.tensor([1.0, 0.5, 0.0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(tmp_path: Path, fmt: str) -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 0))  # W=40, H=20
    im.paste((255, 0, 0), (0, 0, 10, 10))  # red block in the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = tmp_path / f"rotated.{fmt.lower()}"
    im.save(p, format=fmt, exif=exif)
    x = load_image(p)
    assert tuple(x.shape) == (3, 40, 20)  # transposed
    # Clockwise rotation moves the top-left block to the top-right corner.
    assert float(x[0, 2:8, 12:18].mean()) > 0.9
    assert float(x[0, 2:8, 2:8].mean()) < 0.1


def test_no_exif_keeps_shape(png_path: Path) -> None:
    assert tuple(load_image(png_path).shape) == (3, 2, 3)


# ---------------------------------------------------------------- resizing


def test_int_size_resizes_shorter_side_keeping_aspect() -> None:
    a = np.full((20, 40, 3), 128, dtype=np.uint8)
    x = load_image(a, size=10)
    assert tuple(x.shape) == (3, 10, 20)
    torch.testing.assert_close(x, torch.full((3, 10, 20), 128 / 255))  # a flat image stays flat
    tall = load_image(np.zeros((40, 20), dtype=np.uint8), size=10)
    assert tuple(tall.shape) == (3, 20, 10)


def test_tuple_size_is_exact(png_path: Path) -> None:
    x = load_image(png_path, size=(5, 7))
    _assert_image_tensor(x, 5, 7)
    y = load_image(str(png_path), size=(4, 4))
    _assert_image_tensor(y, 4, 4)


@pytest.mark.parametrize("size", [0, -3, (0, 5), (5, -1)])
def test_non_positive_size_is_rejected(size) -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        load_image(np.zeros((4, 4), dtype=np.uint8), size=size)


# ---------------------------------------------------------------- image_summary


def test_image_summary_known_values() -> None:
    img = torch.stack(
        [torch.zeros(2, 2), torch.full((2, 2), 0.5), torch.tensor([[0.0, 1.0], [1.0, 1.0]])]
    )
    s = image_summary(img)
    assert s["shape"] == [3, 2, 2]
    assert s["dtype"] == "float32"
    assert s["min"] == 0.0
    assert s["max"] == 1.0
    assert s["channel_mean"] == pytest.approx([0.0, 0.5, 0.75])
    assert s["channel_min"] == [0.0, 0.5, 0.0]
    assert s["channel_max"] == [0.0, 0.5, 1.0]


def test_image_summary_rejects_non_image() -> None:
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        image_summary(torch.zeros(2, 2))


# ---------------------------------------------------------------- errors


def _load_error(src, **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(src, **kwargs)
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, ConvlensError)
    return err


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "missing.png"
    err = _load_error(p)
    assert str(p) in str(err)
    assert "no such file" in str(err)


def test_directory(tmp_path: Path) -> None:
    err = _load_error(str(tmp_path))
    assert str(tmp_path) in str(err)
    assert "directory" in str(err)


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    err = _load_error(p)
    assert "notes.png" in str(err)
    assert "not an image" in str(err)


def test_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    full = tmp_path / "full.jpg"
    Image.fromarray(noise).save(full, quality=90)
    assert tuple(load_image(full).shape) == (3, 64, 64)  # the intact file is fine
    cut = tmp_path / "cut.jpg"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    err = _load_error(cut)
    assert "cut.jpg" in str(err)
    assert "truncated" in str(err)


def test_over_max_pixels(tmp_path: Path) -> None:
    p = tmp_path / "big.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(p)
    err = _load_error(p, max_pixels=100)
    assert "big.png" in str(err)
    assert "400" in str(err)
    assert "limit of 100" in str(err)
    # The limit is inclusive, and None switches it off.
    assert tuple(load_image(p, max_pixels=400).shape) == (3, 20, 20)
    assert tuple(load_image(p, max_pixels=None).shape) == (3, 20, 20)


def test_over_max_pixels_for_pil_and_bytes(tmp_path: Path) -> None:
    im = Image.new("RGB", (20, 20))
    assert "limit" in str(_load_error(im, max_pixels=100))
    assert "limit" in str(_load_error(_png_bytes(im), max_pixels=100))


@pytest.mark.parametrize(
    "values, reason",
    [
        ([[0.5, 1.5]], "expected [0, 1]"),
        ([[-0.25, 0.5]], "expected [0, 1]"),
        ([[0.5, float("nan")]], "NaN"),
        ([[0.5, float("inf")]], "NaN or infinite"),
    ],
)
def test_float_array_outside_unit_range(values, reason: str) -> None:
    a = np.array(values, dtype=np.float32)
    err = _load_error(a)
    assert "<array float32 (1, 2)>" in str(err)
    assert reason in str(err)


@pytest.mark.parametrize("shape", [(3,), (3, 4, 5), (2, 2, 2), (1, 2, 3, 3)])
def test_wrong_shaped_array(shape) -> None:
    a = np.zeros(shape, dtype=np.uint8)
    err = _load_error(a)
    assert f"<array uint8 {tuple(shape)}>" in str(err)
    assert "HxW or HxWxC" in str(err)


def test_unsupported_array_dtype() -> None:
    err = _load_error(np.zeros((2, 2), dtype=np.int64))
    assert "unsupported dtype int64" in str(err)


# ---------------------------------------------------------------- URLs


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Serve a fresh folder on 127.0.0.1 from a thread; yields (base_url, folder)."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_url_gives_same_tensor_as_file(http_root) -> None:
    base, root = http_root
    p = root / "colours.png"
    Image.fromarray(COLOURS, "RGB").save(p)
    from_url = load_image(f"{base}/colours.png", timeout=5)
    torch.testing.assert_close(from_url, load_image(p), rtol=0, atol=0)
    torch.testing.assert_close(from_url, EXPECTED, rtol=0, atol=1e-7)
    assert tuple(load_image(f"{base}/colours.png", size=(4, 6), timeout=5).shape) == (3, 4, 6)


def test_url_404(http_root) -> None:
    base, _ = http_root
    url = f"{base}/nothing-here.png"
    err = _load_error(url, timeout=5)
    assert repr(url) in str(err)
    assert "404" in str(err)


def test_url_not_an_image(http_root) -> None:
    base, root = http_root
    (root / "page.html").write_text("<html>hello</html>")
    url = f"{base}/page.html"
    err = _load_error(url, timeout=5)
    assert url in str(err)
    assert "not an image" in str(err)


def test_url_closed_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x.png"
    err = _load_error(url, timeout=5)
    assert repr(url) in str(err)
    assert "URL failed" in str(err)


def test_url_that_never_answers_times_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # accepts the connection in the kernel, never replies
        url = f"http://127.0.0.1:{s.getsockname()[1]}/slow.png"
        err = _load_error(url, timeout=0.5)
    assert url in str(err)
    assert "no answer within 0.5 s" in str(err)


# ---------------------------------------------------------------- sample image


def test_sample_image() -> None:
    x = sample_image()
    _assert_image_tensor(x, 600, 512)
    assert float(x.max()) > float(x.min())  # a real photo, not a blank
    assert sample_image_path().name == "grace_hopper.jpg"
    assert tuple(sample_image(size=64).shape) == (3, 75, 64)


def test_sample_image_does_not_import_matplotlib() -> None:
    code = (
        "import convlens, sys; x = convlens.sample_image(); "
        "assert tuple(x.shape) == (3, 600, 512), x.shape; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
