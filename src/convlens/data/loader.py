"""Batches of augmented tensors from the decoded cache: the course's augmentation, applied
to tensors in the training process instead of to PIL images in worker processes.

The random parameters follow torchvision's ``RandomResizedCrop.get_params`` (ten tries
at an area in ``scale`` and a log-uniform aspect ratio in ``ratio``, then a centre-crop
fallback) and ``RandomHorizontalFlip``, drawn for the whole batch from one
``torch.Generator`` seeded by ``(seed, epoch)``: an epoch's batches are a function of the
seed and the epoch alone, which is what makes resuming exact.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convlens.data.cache import DecodedImages
from convlens.data.folder import TransformSpec

__all__ = ["BatchLoader", "epoch_generator", "random_resized_crop_params"]


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator for one epoch's shuffling and augmentation."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 7919 + 17)


def random_resized_crop_params(
    heights: torch.Tensor,
    widths: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    tries: int = 10,
) -> torch.Tensor:
    """``[N, 4]`` crops ``(top, left, h, w)`` for images of the given sizes, distributed as
    torchvision's ``RandomResizedCrop.get_params``, vectorised over the batch.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_resized_crop_params(torch.tensor([160]), torch.tensor([213]), (0.08, 1), (3/4, 4/3), g).shape
        torch.Size([1, 4])
    """
    n = heights.numel()
    H = heights.double().view(n, 1)
    W = widths.double().view(n, 1)
    area = H * W
    target = area * torch.empty(n, tries, dtype=torch.float64).uniform_(*scale, generator=generator)
    log_r = torch.empty(n, tries, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
    first = torch.where(ok.any(1), ok.double().argmax(1), torch.full((n,), -1, dtype=torch.long))
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    out = torch.empty(n, 4, dtype=torch.long)
    hv, wv = heights.long(), widths.long()
    for k in range(n):
        Hk, Wk = int(hv[k]), int(wv[k])
        t = int(first[k])
        if t >= 0:
            hk, wk = int(h[k, t]), int(w[k, t])
            top = int(u[k, 0] * (Hk - hk + 1))
            left = int(u[k, 1] * (Wk - wk + 1))
        else:  # torchvision's fallback: the largest centred crop with a ratio in range
            in_ratio = Wk / Hk
            if in_ratio < min(ratio):
                wk, hk = Wk, round(Wk / min(ratio))
            elif in_ratio > max(ratio):
                hk, wk = Hk, round(Hk * max(ratio))
            else:
                wk, hk = Wk, Hk
            top, left = (Hk - hk) // 2, (Wk - wk) // 2
        out[k] = torch.tensor([top, left, hk, wk])
    return out


class BatchLoader:
    """Iterate ``(x, y)`` batches from a :class:`DecodedImages` cache.

    ``train=True``: shuffled, random resized crops of side ``crop`` (default
    ``spec.crop``) and horizontal flips; ``train=False``: the cached centre crops in order.
    ``x`` is normalised float32 ``[B, 3, crop, crop]`` on ``device``. With ``prefetch > 0``
    a background thread prepares up to that many batches ahead while the model computes
    (same batches, same order: one thread draws them all). Off by default: on a 2-core CPU
    it gained nothing (the thread competes with the model for the same cores).

    Example:
        >>> for x, y in BatchLoader(cache, spec, batch_size=64, train=True, seed=0, epoch=0):
        ...     loss = criterion(model(x), y)
    """

    def __init__(
        self,
        images: DecodedImages,
        spec: TransformSpec,
        *,
        batch_size: int = 64,
        train: bool,
        seed: int = 0,
        epoch: int = 0,
        crop: int | None = None,
        device: torch.device | str = "cpu",
        memory_format: torch.memory_format = torch.contiguous_format,
        prefetch: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.images = images
        self.spec = spec
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.epoch = epoch
        self.crop = crop or spec.crop
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.prefetch = prefetch
        self._mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0
        self._labels = torch.from_numpy(np.asarray(images.labels, dtype=np.int64))

    def __len__(self) -> int:
        return math.ceil(len(self.images) / self.batch_size)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.sub_(self._mean).div_(self._std)  # x is this batch's own buffer
        x = x.contiguous(memory_format=self.memory_format)
        return x.to(self.device, non_blocking=True)

    def _train_batch(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        sizes = torch.from_numpy(np.asarray(self.images.sizes[idx.numpy()], dtype=np.int64))
        boxes = random_resized_crop_params(
            sizes[:, 0], sizes[:, 1], self.spec.scale, self.spec.ratio, g
        )
        flips = torch.rand(len(idx), generator=g) < self.spec.flip
        c = self.crop
        out = torch.empty(len(idx), 3, c, c)
        for k, i in enumerate(idx.tolist()):
            top, left, h, w = (int(v) for v in boxes[k])
            patch = torch.from_numpy(self.images.image(i)[:, top : top + h, left : left + w])
            patch = patch.unsqueeze(0).float()
            if (h, w) != (c, c):
                patch = F.interpolate(
                    patch, size=(c, c), mode="bilinear", antialias=True, align_corners=False
                )
            out[k] = patch[0]
        if bool(flips.any()):
            out[flips] = out[flips].flip(-1)
        return out.clamp_(0.0, 255.0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.prefetch <= 0:
            yield from self._batches()
            return
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        end = object()

        def produce() -> None:
            try:
                for item in self._batches():
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(end)
            except BaseException as e:  # handed to the consumer, raised there
                q.put(_Failed(e))

        worker = threading.Thread(target=produce, name="convlens-batches", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            worker.join(timeout=10)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        g: torch.Generator | None = None
        if self.train:
            g = epoch_generator(self.seed, self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            if g is not None:
                x = self._train_batch(idx, g)
            else:
                x = torch.from_numpy(np.ascontiguousarray(self.images.array[idx.numpy()])).float()
            yield self._normalize(x), self._labels[idx].to(self.device, non_blocking=True)
