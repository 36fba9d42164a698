"""Pretrained weight files: where each is cached, fetching it, and clear offline errors.

Files land where their own library puts them, so a file downloaded by convlens is found
by torchvision or timm and vice versa:

- torchvision weights, and timm weights given by URL: ``torch.hub`` checkpoints,
  ``$TORCH_HOME/hub/checkpoints/<file>`` (``~/.cache/torch`` by default), downloaded with
  ``torch.hub.download_url_to_file`` and checked against the hash in the file name;
- timm weights on the Hugging Face Hub: its cache (``$HF_HOME/hub``), downloaded with
  ``huggingface_hub.hf_hub_download``.

Before downloading, one TCP connection to the host (or its proxy) is opened with a short
timeout, so an offline machine gets a one-line :class:`convlens.ModelLoadError` at once
(which file, where it would be cached, how to get it) instead of minutes of retries and
a long urllib traceback. Every ``.pt``/``.pth``/``.bin`` file is read with
``torch.load(weights_only=True)``; ``.safetensors`` with safetensors.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from convlens.errors import ModelLoadError

__all__ = [
    "CONNECT_TIMEOUT",
    "WeightsSource",
    "hf_source",
    "read_weights",
    "url_source",
]

#: Seconds to wait for a TCP connection to a weights host before calling it offline.
CONNECT_TIMEOUT: float = 10.0

OFFLINE_HINT = (
    "or use weights=None (CLI: --weights none) for random init, or model "
    "'efficientnet_lite0', whose ImageNet weights are installed with convlens"
)


def _unreachable(url: str, timeout: float) -> str | None:
    """``None`` when a TCP connection to ``url``'s host (or its proxy) opens; otherwise
    why not, in a few words."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None  # file:// and the like: the downloader reports its own errors
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if p.hostname:
            host, port = p.hostname, p.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as e:
        return f"cannot resolve host {host!r} ({e.strerror or e})"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout:g} s"
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e.strerror or e})"


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@dataclass(frozen=True)
class WeightsSource:
    """Where one model's pretrained weights come from and where they are cached.

    ``url`` is what a download fetches; ``cache`` is the file (torch hub) or the repo
    folder (Hugging Face Hub) it lands in. Build one with :func:`url_source` or
    :func:`hf_source`.

    Example:
        >>> src = url_source("https://download.pytorch.org/models/resnet18-f37072fd.pth", "resnet18")
        >>> src.cached() is None or src.cached().name
        'resnet18-f37072fd.pth'
    """

    what: str
    url: str
    cache: Path
    repo_id: str | None = None
    filenames: tuple[str, ...] = ()
    revision: str | None = None

    @property
    def file_name(self) -> str:
        """The weight file's name (the first candidate on the Hub)."""
        return self.filenames[0] if self.repo_id else self.cache.name

    def cached(self) -> Path | None:
        """The weight file when it is on disk, else ``None``. Never touches the network."""
        if self.repo_id is None:
            return self.cache if self.cache.is_file() else None
        from huggingface_hub import try_to_load_from_cache

        for name in self.filenames:
            hit = try_to_load_from_cache(self.repo_id, name, revision=self.revision)
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
        return None

    def missing_error(self, reason: str) -> ModelLoadError:
        """The error for weights that are not on disk and could not be downloaded."""
        if self.repo_id is None:
            where = f"{self.cache} does not exist"
            fix = "Connect to the internet once (the file is cached afterwards) or copy it there"
        else:
            where = f"{self.file_name} is not in the Hugging Face cache {self.cache}"
            fix = "Connect to the internet once (the file is cached afterwards; HF_HOME moves it)"
        return ModelLoadError(
            f"no weights for {self.what} on disk: {where}, and downloading it from "
            f"{self.url} failed ({reason}). {fix}, {OFFLINE_HINT}"
        )

    def fetch(self, *, progress: bool = True, timeout: float = CONNECT_TIMEOUT) -> Path:
        """The weight file, downloading it into the cache first when it is not on disk.

        Raises :class:`convlens.ModelLoadError` (one line: the file, the cache, the fix)
        when it cannot be downloaded.
        """
        hit = self.cached()
        if hit is not None:
            return hit
        if self.repo_id is not None:
            from huggingface_hub import constants

            if constants.HF_HUB_OFFLINE:
                raise self.missing_error("HF_HUB_OFFLINE is set")
        why = _unreachable(self.url, timeout)
        if why is not None:
            raise self.missing_error(why)
        if self.repo_id is None:
            return self._download_url(progress)
        return self._download_hf(self.repo_id)

    def _download_url(self, progress: bool) -> Path:
        match = torch.hub.HASH_REGEX.search(self.cache.name)
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        try:  # writes a temp file beside the target and renames it: atomic
            torch.hub.download_url_to_file(
                self.url, str(self.cache), match.group(1) if match else None, progress=progress
            )
        except RuntimeError as e:
            if "hash" in str(e):
                raise ModelLoadError(
                    f"the download of {self.url} for {self.what} is damaged ({e}); "
                    "nothing was cached: try again"
                ) from None
            raise self.missing_error(_reason(e)) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise self.missing_error(_reason(e)) from None
        return self.cache

    def _download_hf(self, repo_id: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        for name in self.filenames:
            try:
                return Path(hf_hub_download(repo_id, name, revision=self.revision))
            except EntryNotFoundError:
                continue  # try the next candidate (model.safetensors, then pytorch_model.bin)
            except Exception as e:  # network, HTTP and cache errors all end the same way
                raise self.missing_error(_reason(e)) from None
        raise ModelLoadError(
            f"the Hugging Face repo {repo_id} holds none of {', '.join(self.filenames)} "
            f"for {self.what}: pick other weights"
        )


def url_source(url: str, what: str) -> WeightsSource:
    """A weight file downloaded from ``url`` into ``torch.hub``'s checkpoint cache.

    Example:
        >>> url_source("https://download.pytorch.org/models/resnet18-f37072fd.pth", "resnet18").cache
        PosixPath('/home/me/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth')
    """
    name = os.path.basename(urlsplit(url).path)
    if not name:
        raise ModelLoadError(f"weights URL {url!r} for {what} names no file")
    return WeightsSource(what, url, Path(torch.hub.get_dir()) / "checkpoints" / name)


def hf_source(hub_id: str, what: str, filename: str | None = None) -> WeightsSource:
    """Weights in a Hugging Face Hub repo (``"timm/resnet18.a1_in1k"``, optionally
    ``@revision``): ``model.safetensors``, else ``pytorch_model.bin``, unless ``filename``.

    Example:
        >>> hf_source("timm/resnet18.a1_in1k", "timm:resnet18").url
        'https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors'
    """
    from huggingface_hub import constants

    repo_id, _, revision = hub_id.partition("@")
    names = (filename,) if filename else ("model.safetensors", "pytorch_model.bin")
    url = f"{constants.ENDPOINT}/{repo_id}/resolve/{revision or 'main'}/{names[0]}"
    cache = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return WeightsSource(what, url, cache, repo_id, names, revision or None)


def read_weights(path: str | os.PathLike[str]) -> Any:
    """A weight file's contents: safetensors as a state dict, anything else only through
    ``torch.load(weights_only=True)`` (tensors and plain containers; no code runs).

    Example:
        >>> state = read_weights("~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth")
    """
    p = Path(path).expanduser()
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p), device="cpu")
        return torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"weights file {str(p)!r} does not exist") from None
    except Exception as e:  # a refused pickle, a truncated file, a damaged header
        raise ModelLoadError(
            f"cannot read weights {str(p)!r} with weights_only=True ({_reason(e)}): "
            "delete the file to download it again"
        ) from None
