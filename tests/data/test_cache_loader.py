from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from convlens import DatasetError
from convlens.data import BatchLoader, ImageFolderData, TransformSpec, decode_cache
from convlens.data.loader import epoch_generator, random_resized_crop_params


def _folder(tmp_path, n_per_class=3, sizes=((40, 52), (48, 48), (36, 60))):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n_per_class):
                h, w = sizes[i % len(sizes)]
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return tmp_path


SPEC = TransformSpec(crop=32, resize=36)


def test_val_cache_equals_the_course_pil_pipeline(tmp_path):
    root = _folder(tmp_path / "d")
    val = ImageFolderData(root, "val", train=False, spec=SPEC)
    cache = decode_cache(val, cache_dir=tmp_path / "cache", progress=False)
    assert len(cache) == 6 and cache.array.shape == (6, 3, 32, 32)
    xs, ys = next(iter(BatchLoader(cache, SPEC, batch_size=6, train=False)))
    for i in range(6):
        x_course, y_course = val[i]  # PIL Resize + CenterCrop + ToTensor + Normalize
        torch.testing.assert_close(xs[i], x_course, atol=1e-5, rtol=0)
        assert int(ys[i]) == y_course


def test_full_cache_holds_decoded_pixels_and_is_reused(tmp_path):
    root = _folder(tmp_path / "d")
    train = ImageFolderData(root, "train", train=True, spec=SPEC)
    cache = decode_cache(train, cache_dir=tmp_path / "cache", progress=False)
    first = np.asarray(Image.open(train.samples[0][0]).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(cache.image(0), first)
    assert cache.sizes.tolist()[:3] == [[40, 52], [48, 48], [36, 60]]
    again = decode_cache(train, cache_dir=tmp_path / "cache", progress=False)
    assert again.path == cache.path  # same key: reused
    # touching a file changes its mtime, so the key, so the cache
    p = train.samples[0][0]
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert decode_cache(train, cache_dir=tmp_path / "cache", progress=False).path != cache.path


def test_unreadable_images_are_skipped_with_a_warning_or_raise_when_strict(tmp_path):
    root = _folder(tmp_path / "d")
    bad = root / "train" / "b" / "zz_broken.png"
    bad.write_bytes(b"not a png at all")
    train = ImageFolderData(root, "train", train=True, spec=SPEC)
    with pytest.warns(UserWarning, match=r"zz_broken\.png"):
        cache = decode_cache(train, cache_dir=tmp_path / "c1", progress=False)
    assert len(cache) == len(train) - 1
    assert list(cache.labels) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DatasetError, match=r"zz_broken\.png"):
        decode_cache(train, cache_dir=tmp_path / "c2", strict=True, progress=False)
    assert not list((tmp_path / "c2").iterdir())  # nothing half-built left


def test_crop_params_follow_torchvision_distribution():
    n = 4000
    H, W = 160, 213
    g = torch.Generator().manual_seed(0)
    ours = random_resized_crop_params(
        torch.full((n,), H), torch.full((n,), W), (0.08, 1.0), (3 / 4, 4 / 3), g
    ).double()
    torch.manual_seed(0)
    ref = torch.tensor(
        [
            RandomResizedCrop.get_params(torch.empty(3, H, W), [0.08, 1.0], [3 / 4, 4 / 3])
            for _ in range(n)
        ],
        dtype=torch.float64,
    )
    for t in (ours, ref):  # inside the image
        assert (t[:, 0] >= 0).all() and (t[:, 1] >= 0).all()
        assert (t[:, 0] + t[:, 2] <= H).all() and (t[:, 1] + t[:, 3] <= W).all()

    def stats(t):
        area = t[:, 2] * t[:, 3] / (H * W)
        aspect = torch.log(t[:, 3] / t[:, 2])
        return torch.stack(
            [
                area.mean(),
                area.std(),
                aspect.mean(),
                aspect.std(),
                (t[:, 0] / H).mean(),
                (t[:, 1] / W).mean(),
            ]
        )

    torch.testing.assert_close(stats(ours), stats(ref), atol=0.02, rtol=0)


def test_crop_fallback_matches_torchvision_exactly():
    # a very wide image: no try can fit, both fall back to the same centred crop
    g = torch.Generator().manual_seed(0)
    ours = random_resized_crop_params(
        torch.tensor([10]), torch.tensor([100]), (0.9, 1.0), (3 / 4, 4 / 3), g
    )
    ref = RandomResizedCrop.get_params(torch.empty(3, 10, 100), [0.9, 1.0], [3 / 4, 4 / 3])
    assert ours[0].tolist() == list(ref) == [0, 43, 10, 13]


def test_train_batches_reproducible_per_epoch_and_cover_every_image(tmp_path):
    root = _folder(tmp_path / "d", n_per_class=5)
    train = ImageFolderData(root, "train", train=True, spec=SPEC)
    cache = decode_cache(train, cache_dir=tmp_path / "cache", progress=False)

    def run(epoch):
        xs, ys = zip(*BatchLoader(cache, SPEC, batch_size=4, train=True, seed=3, epoch=epoch))
        return torch.cat(xs), torch.cat(ys)

    x0, y0 = run(0)
    x0b, y0b = run(0)
    x1, _ = run(1)
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert not torch.equal(x0, x1)
    assert x0.shape == (10, 3, 32, 32)
    assert sorted(y0.tolist()) == [0] * 5 + [1] * 5  # each image once per epoch
    mean, std = torch.tensor(SPEC.mean), torch.tensor(SPEC.std)
    pixels = x0 * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # progressive resizing: another crop size from the same loader
    xs, _ = next(iter(BatchLoader(cache, SPEC, batch_size=4, train=True, crop=16)))
    assert xs.shape == (4, 3, 16, 16)


def test_flip_and_crop_are_applied_to_the_right_pixels(tmp_path):
    # one image, crops always the whole image (scale 1, its own ratio), flip always
    d = tmp_path / "d" / "train" / "a"
    d.mkdir(parents=True)
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, :16] = 255  # bright left half
    Image.fromarray(arr).save(d / "x.png")
    spec = TransformSpec(
        crop=32,
        resize=32,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip=1.0,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )
    data = ImageFolderData(tmp_path / "d", "train", train=True, spec=spec)
    cache = decode_cache(data, cache_dir=tmp_path / "cache", progress=False)
    x, _ = next(iter(BatchLoader(cache, spec, batch_size=1, train=True)))
    assert float(x[0, :, :, :16].max()) == 0.0 and float(x[0, :, :, 16:].min()) == 1.0


def test_epoch_generator_depends_on_seed_and_epoch():
    a = torch.rand(3, generator=epoch_generator(0, 0))
    assert torch.equal(a, torch.rand(3, generator=epoch_generator(0, 0)))
    assert not torch.equal(a, torch.rand(3, generator=epoch_generator(0, 1)))
    assert not torch.equal(a, torch.rand(3, generator=epoch_generator(1, 0)))


def test_prefetch_gives_the_same_batches_and_cleans_up(tmp_path, monkeypatch):
    import threading

    root = _folder(tmp_path / "d", n_per_class=5)
    train = ImageFolderData(root, "train", train=True, spec=SPEC)
    cache = decode_cache(train, cache_dir=tmp_path / "cache", progress=False)
    plain = list(BatchLoader(cache, SPEC, batch_size=3, train=True, seed=1, prefetch=0))
    ahead = list(BatchLoader(cache, SPEC, batch_size=3, train=True, seed=1, prefetch=2))
    assert len(plain) == len(ahead) == 4
    for (xa, ya), (xb, yb) in zip(plain, ahead):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # stopping early ends the producer thread
    it = iter(BatchLoader(cache, SPEC, batch_size=1, train=True, prefetch=1))
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "convlens-batches"]

    # an error while preparing a batch reaches the training loop
    def broken(self, idx, g):
        raise RuntimeError("bad batch")

    monkeypatch.setattr(BatchLoader, "_train_batch", broken)
    with pytest.raises(RuntimeError, match="bad batch"):
        list(BatchLoader(cache, SPEC, batch_size=3, train=True, prefetch=2))
