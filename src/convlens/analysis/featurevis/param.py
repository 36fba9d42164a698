"""Image parameterizations for feature visualization.

An :class:`ImageParam` is an ``nn.Module`` whose parameters are the thing optimised and
whose forward returns the image ``[N, C, H, W]`` in ``[0, 1]``:

- ``fft=True``: the image is the orthonormal inverse real FFT of a spectrum scaled by
  ``1 / max(f, 1 / max(h, w)) ** decay`` (f the spatial frequency in cycles per pixel), and
  divided by 4 as Lucid does, so gradient steps favour low frequencies; ``fft=False`` keeps
  one parameter per pixel.
- ``decorrelate=True``: the three channels are mixed by the square root of ImageNet's
  colour covariance (the matrix Lucid uses), normalised by its largest column norm, before
  a sigmoid maps them into ``[0, 1]``.
- ``alpha=True`` adds a sigmoid alpha channel after the image's.
- ``channels``: 3 (RGB) by default; 1 for a greyscale network, 4 or more for a
  multi-channel one (colour decorrelation applies to 3 channels only).

Every draw takes a ``torch.Generator``, so a seed gives the same starting image on the
same device.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["COLOR_CORRELATION_SVD_SQRT", "ImageParam", "fft_scale", "spectrum_freqs"]

#: Square root of ImageNet's RGB colour covariance, as Lucid uses it.
COLOR_CORRELATION_SVD_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]]
)
_MAGIC = 4.0  # Lucid divides the inverse FFT by 4


def _color_matrix() -> torch.Tensor:
    m = COLOR_CORRELATION_SVD_SQRT
    return m / m.norm(dim=0).max()


def spectrum_freqs(h: int, w: int) -> torch.Tensor:
    """``[h, w // 2 + 1]`` magnitudes of the 2-D frequencies of a real FFT (cycles/pixel).

    Example:
        >>> spectrum_freqs(4, 4)[0].tolist()
        [0.0, 0.25, 0.5]
    """
    fy = torch.fft.fftfreq(h).abs()[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def fft_scale(h: int, w: int, decay: float = 1.0) -> torch.Tensor:
    """The 1/f spectrum scale ``1 / max(f, 1 / max(h, w)) ** decay``, ``[h, w // 2 + 1]``.

    Example:
        >>> fft_scale(4, 4).shape
        torch.Size([4, 3])
    """
    return 1.0 / spectrum_freqs(h, w).clamp(min=1.0 / max(h, w)) ** decay


class ImageParam(nn.Module):
    """A batch of ``batch`` images of ``size`` (an int or ``(h, w)``) with ``channels``
    channels (plus alpha with ``alpha=True``) to optimise.

    ``channels`` is the total, alpha included; ``image_channels`` the image's own.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> p = ImageParam(128, batch=10, generator=g)
        >>> p().shape, float(p().min()) >= 0
        (torch.Size([10, 3, 128, 128]), True)
    """

    scale: torch.Tensor
    color: torch.Tensor

    def __init__(
        self,
        size: int | tuple[int, int],
        batch: int = 1,
        *,
        fft: bool = True,
        decorrelate: bool = True,
        alpha: bool = False,
        sd: float = 0.01,
        decay: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        channels: int = 3,
    ) -> None:
        super().__init__()
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if h < 1 or w < 1 or batch < 1:
            raise ValueError(f"size and batch must be positive, got size {size}, batch {batch}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        self.height, self.width, self.batch = h, w, batch
        self.image_channels = channels
        self.channels = channels + (1 if alpha else 0)
        # colour decorrelation is ImageNet's RGB covariance: for 3 channels only
        self.fft, self.decorrelate, self.alpha = fft, decorrelate and channels == 3, alpha
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if fft:
            shape: tuple[int, ...] = (batch, self.channels, h, w // 2 + 1, 2)
        else:
            shape = (batch, self.channels, h, w)
        init = torch.randn(shape, generator=generator, device=gen_device) * sd
        self.raw = nn.Parameter(init.to(device) if device is not None else init)
        self.register_buffer("scale", fft_scale(h, w, decay).to(self.raw.device), persistent=False)
        self.register_buffer("color", _color_matrix().to(self.raw.device), persistent=False)

    def pre_activation(self) -> torch.Tensor:
        """The image before colour mixing and sigmoid, ``[N, C, H, W]``."""
        if not self.fft:
            return self.raw
        spectrum = torch.view_as_complex(self.raw) * self.scale
        return torch.fft.irfft2(spectrum, s=(self.height, self.width), norm="ortho") / _MAGIC

    def forward(self) -> torch.Tensor:
        x = self.pre_activation()
        if self.decorrelate:
            rgb, rest = x[:, :3], x[:, 3:]
            x = torch.cat([torch.einsum("nchw,dc->ndhw", rgb, self.color), rest], dim=1)
        return torch.sigmoid(x)

    @torch.no_grad()
    def set_image(self, image: torch.Tensor, eps: float = 1e-4) -> ImageParam:
        """Set the parameters so that ``forward()`` returns ``image`` (``[N, C, H, W]`` or
        ``[C, H, W]`` in ``(0, 1)``; values are clamped to ``[eps, 1 - eps]``).

        Example:
            >>> p = ImageParam(64).set_image(torch.full((3, 64, 64), 0.25))
            >>> float((p() - 0.25).abs().max()) < 1e-4
            True
        """
        img = image if image.ndim == 4 else image.unsqueeze(0)
        if tuple(img.shape[1:]) != (self.channels, self.height, self.width):
            raise ValueError(
                f"image must be [{self.channels}, {self.height}, {self.width}], got "
                f"{list(img.shape[1:])}"
            )
        x = torch.logit(img.to(self.raw.device, torch.float32).clamp(eps, 1 - eps))
        x = x.expand(self.batch, -1, -1, -1).clone()
        if self.decorrelate:
            x[:, :3] = torch.einsum("nchw,dc->ndhw", x[:, :3], torch.linalg.inv(self.color))
        if self.fft:
            spectrum = torch.fft.rfft2(x * _MAGIC, norm="ortho") / self.scale
            self.raw.copy_(torch.view_as_real(spectrum))
        else:
            self.raw.copy_(x)
        return self

    def extra_repr(self) -> str:
        return (
            f"batch={self.batch}, size=({self.height}, {self.width}), channels={self.channels}, "
            f"fft={self.fft}, decorrelate={self.decorrelate}"
        )
