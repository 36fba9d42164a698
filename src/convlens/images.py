"""Images as tensors: load from anything, the bundled sample image, channel views.

Every loader returns ``float32 [3, H, W]`` in ``[0, 1]``, the layout torchvision models
expect before normalisation (``channels=1``: ``[1, H, W]`` greyscale, for greyscale
networks). Failures raise :class:`convlens.ImageLoadError` naming the
source and the reason.
"""

from __future__ import annotations

import importlib.util
import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from convlens.errors import ImageLoadError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageSource",
    "image_summary",
    "load_image",
    "sample_image",
    "sample_image_path",
    "to_grayscale",
]

ImageSource = str | os.PathLike | bytes | bytearray | Image.Image | np.ndarray

#: Refuse images with more pixels than this (decompression bombs). PIL's own default.
DEFAULT_MAX_PIXELS: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
#: Seconds to wait for a URL, and the most bytes read from one.
URL_TIMEOUT: float = 20.0
URL_MAX_BYTES: int = 64 * 1024 * 1024


def _describe(src: object) -> str:
    if isinstance(src, (str, os.PathLike)):
        return repr(os.fspath(src))
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    if isinstance(src, Image.Image):
        return f"<PIL image {src.mode} {src.width}x{src.height}>"
    if isinstance(src, np.ndarray):
        return f"<array {src.dtype} {tuple(src.shape)}>"
    return f"<{type(src).__name__}>"


def _fetch_url(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "convlens"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read(URL_MAX_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise ImageLoadError(repr(url), f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ImageLoadError(repr(url), f"URL failed: {e.reason}") from None
    except TimeoutError:
        raise ImageLoadError(repr(url), f"no answer within {timeout:g} s") from None
    except OSError as e:
        raise ImageLoadError(repr(url), f"URL failed: {e}") from None
    if len(data) > URL_MAX_BYTES:
        raise ImageLoadError(repr(url), f"larger than {URL_MAX_BYTES // 2**20} MiB")
    return data


def _open_pil(src: ImageSource, name: str, timeout: float) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (bytes, bytearray)):
        return Image.open(io.BytesIO(bytes(src)))
    path = os.fspath(src)  # type: ignore[arg-type]
    if isinstance(path, bytes):
        path = path.decode()
    if path.startswith(("http://", "https://")):
        return Image.open(io.BytesIO(_fetch_url(path, timeout)))
    p = Path(path).expanduser()
    if not p.exists():
        raise ImageLoadError(name, "no such file")
    if p.is_dir():
        raise ImageLoadError(name, "is a directory, not an image file")
    return Image.open(p)


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """Convert any PIL mode to float32 RGB in [0, 1]; alpha is composited on white."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if mode == "F":
            scale = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        gray = np.clip(arr / scale, 0.0, 1.0).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(gray)).unsqueeze(0).expand(3, -1, -1).clone()
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    arr8 = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr8.copy()).permute(2, 0, 1).float().div_(255.0)


def _array_to_tensor(arr: np.ndarray, name: str) -> torch.Tensor:
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageLoadError(
            name,
            "expected an HxW or HxWxC array with C in (1, 3, 4); a CxHxW array needs "
            "arr.transpose(1, 2, 0)",
        )
    if a.dtype == np.uint8:
        x = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        x = a.astype(np.float32) / 65535.0
    elif a.dtype == np.bool_:
        x = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        x = a.astype(np.float32)
        if not np.isfinite(x).all():
            raise ImageLoadError(name, "array holds NaN or infinite values")
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:
            raise ImageLoadError(
                name,
                f"float values span [{lo:.3g}, {hi:.3g}], expected [0, 1] "
                "(pass uint8 0..255, or undo the normalisation first)",
            )
    else:
        raise ImageLoadError(name, f"unsupported dtype {a.dtype}: use uint8, uint16 or float")
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    elif x.shape[2] == 4:  # composite on white
        alpha = x[:, :, 3:4]
        x = x[:, :, :3] * alpha + (1.0 - alpha)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous()


def _resize(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    import torchvision.transforms.v2.functional as TF

    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        out = TF.resize(x, [size], antialias=True)  # shorter side
    else:
        h, w = (int(s) for s in size)
        if h <= 0 or w <= 0:
            raise ValueError(f"size must be positive, got {size}")
        out = TF.resize(x, [h, w], antialias=True)
    return out.clamp_(0.0, 1.0)


#: ITU-R 601-2 luma, the weights of PIL's ``convert("L")`` and torchvision's greyscale.
_LUMA = (0.299, 0.587, 0.114)


def to_grayscale(img: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` (or ``[N, 3, H, W]``) RGB in [0, 1] -> ``[1, H, W]`` luma, as PIL's
    ``convert("L")`` weighs the channels; an image whose channels are equal (a grey image
    loaded as RGB) keeps its values exactly.

    Example:
        >>> to_grayscale(torch.ones(3, 2, 2)).shape
        torch.Size([1, 2, 2])
    """
    c = img.shape[-3]
    if c == 1:
        return img
    if c != 3:
        raise ValueError(f"to_grayscale takes RGB [3, H, W], got {list(img.shape)}")
    r, g, b = img.unbind(-3)
    if torch.equal(r, g) and torch.equal(g, b):
        return r.unsqueeze(-3).clone()
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).clamp(0.0, 1.0).unsqueeze(-3)


def _channels_arg(channels: int) -> int:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels is 3 (RGB) or 1 (greyscale), got {channels!r}")
    return channels


def load_image(
    src: ImageSource,
    size: int | tuple[int, int] | None = None,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    timeout: float = URL_TIMEOUT,
    channels: int = 3,
) -> torch.Tensor:
    """Load an image as a float32 ``[3, H, W]`` tensor in ``[0, 1]`` (``channels=1``:
    ``[1, H, W]`` greyscale, for a greyscale network).

    ``src`` is a path (``str`` or ``pathlib.Path``), an ``http(s)://`` URL (fetched with
    ``timeout`` seconds), encoded bytes, a PIL image, or an ``HxW``/``HxWxC`` numpy array
    (uint8, uint16 or float in [0, 1]). Grayscale, palette, CMYK and 16-bit images become
    RGB; transparency is composited on white; the EXIF orientation is applied.
    ``size=int`` resizes the shorter side (aspect kept), ``size=(H, W)`` resizes exactly.
    ``channels=1`` gives the luma (PIL's ``convert("L")`` weights; a greyscale file keeps
    its values exactly).

    Raises :class:`convlens.ImageLoadError` (a ``ValueError``) naming the source and the
    reason: missing file, not an image, truncated, more than ``max_pixels`` pixels, or a
    failed URL.

    Example:
        >>> img = load_image("dog.jpg", size=224)
        >>> img.shape, img.dtype
        (torch.Size([3, 224, 285]), torch.float32)
    """
    channels = _channels_arg(channels)
    name = _describe(src)
    if isinstance(src, np.ndarray):
        x = _array_to_tensor(src, name)
        x = _resize(x, size) if size is not None else x
        return to_grayscale(x) if channels == 1 else x
    if not isinstance(src, (str, os.PathLike, bytes, bytearray, Image.Image)):
        raise TypeError(
            f"load_image takes a path, URL, bytes, PIL image or numpy array, not "
            f"{type(src).__name__}"
        )
    try:
        img = _open_pil(src, name, timeout)
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageLoadError(
                name,
                f"{img.width}x{img.height} = {img.width * img.height:,} pixels is over "
                f"the limit of {max_pixels:,} (a decompression bomb?); pass max_pixels=None "
                "to allow it",
            )
        img.load()
        img = ImageOps.exif_transpose(img) or img
        x = _pil_to_tensor(img)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image (PIL cannot identify its format)") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(name, f"over the pixel limit (a decompression bomb?): {e}") from None
    except PermissionError:
        raise ImageLoadError(name, "permission denied") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        if "truncated" in msg or "broken data stream" in msg or "unrecognized data stream" in msg:
            raise ImageLoadError(name, f"truncated or corrupt file ({msg})") from None
        raise ImageLoadError(name, f"corrupt or unreadable image ({msg})") from None
    x = _resize(x, size) if size is not None else x
    return to_grayscale(x) if channels == 1 else x


def sample_image_path() -> Path:
    """Path of matplotlib's bundled ``grace_hopper.jpg`` (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise ImageLoadError("'grace_hopper.jpg'", "matplotlib is not installed")
    for root in spec.submodule_search_locations:
        p = Path(root) / "mpl-data" / "sample_data" / "grace_hopper.jpg"
        if p.is_file():
            return p
    raise ImageLoadError("'grace_hopper.jpg'", "matplotlib's sample data is missing")


def sample_image(size: int | tuple[int, int] | None = None, *, channels: int = 3) -> torch.Tensor:
    """The offline default image: Grace Hopper in uniform (512x600), as ``[3, H, W]``
    (``channels=1``: ``[1, H, W]`` greyscale).

    Example:
        >>> sample_image().shape
        torch.Size([3, 600, 512])
    """
    return load_image(sample_image_path(), size=size, channels=channels)


def image_summary(img: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and per-channel value range of an image tensor (the course's first look).

    Example:
        >>> image_summary(sample_image())["shape"]
        [3, 600, 512]
    """
    if img.ndim != 3:
        raise ValueError(f"expected an image [C, H, W], got shape {list(img.shape)}")
    flat = img.detach().float().flatten(1)
    return {
        "shape": list(img.shape),
        "dtype": str(img.dtype).replace("torch.", ""),
        "min": float(flat.min()),
        "max": float(flat.max()),
        "channel_mean": [float(v) for v in flat.mean(1)],
        "channel_min": [float(v) for v in flat.min(1).values],
        "channel_max": [float(v) for v in flat.max(1).values],
    }
