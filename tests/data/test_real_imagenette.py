"""On the real Imagenette (../shared/data), when present: the decoded cache and the batch
loader agree with the course's PIL pipeline, grayscale and CMYK JPEGs included."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from convlens.data import BatchLoader, decode_cache, imagenette

pytestmark = pytest.mark.slow


def test_val_cache_equals_course_pipeline_on_real_jpegs(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path))
    train, val = imagenette(shared_data / "imagenette2-224.tar", progress=False)
    assert train.classes[:2] == ["tench", "English springer"] and len(val) == 3925
    odd = [i for i, (p, _) in enumerate(val.samples) if Image.open(p).mode != "RGB"]
    assert odd, "the real val set has grayscale/CMYK images"
    picks = sorted(set(odd[:20] + list(range(0, len(val), 400))))
    sub = val.subset(picks)
    cache = decode_cache(sub, progress=False)
    x, y = next(iter(BatchLoader(cache, sub.spec, batch_size=len(sub), train=False)))
    for k in range(len(sub)):
        ref, label = sub[k]
        torch.testing.assert_close(x[k], ref, atol=1e-5, rtol=0)
        assert int(y[k]) == label
