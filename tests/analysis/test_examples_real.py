"""Dataset examples on real Imagenette val JPEGs (../shared/data, when present) with the
pretrained EfficientNet-Lite0: the pass agrees with capturing every map."""

from __future__ import annotations

import pytest
import torch

import convlens
from convlens.analysis.examples import crops, dataset_examples
from convlens.data import imagenette

pytestmark = pytest.mark.slow


def test_lite0_blocks4_on_real_val_images(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLENS_HOME", str(tmp_path))
    _, val = imagenette(shared_data / "imagenette2-224.tar", progress=False)
    sub = val.subset(range(0, len(val), 40))  # 99 images over all ten classes
    bundle = convlens.load_model("efficientnet_lite0")
    r = dataset_examples(bundle, sub, ["blocks.4"], k=5, batch_size=16, progress=False)
    assert r.length == len(sub) == 99 and not r.skipped
    assert r.classes == val.classes
    x = torch.stack([bundle.preprocess(convlens.load_image(p)) for p, _ in sub.samples])
    maps = convlens.capture(bundle.model, x, ["blocks.4"])["blocks.4"]
    scores = maps.flatten(2).amax(2)  # [N, C]
    for ch in range(0, maps.shape[1], 7):
        top = r.top("blocks.4", ch)
        want = torch.argsort(-scores[:, ch], stable=True)[:5].tolist()
        assert [e.index for e in top][:1] == want[:1]
        assert [e.score for e in top] == pytest.approx(
            scores[want, ch].tolist(), rel=1e-4, abs=1e-4
        )
        assert top[0].label == sub.samples[top[0].index][1]
        st = r.stats("blocks.4", ch)
        assert st.mean == pytest.approx(float(scores[:, ch].double().mean()), rel=1e-4)
        assert st.active == pytest.approx(float((maps[:, ch] > 0).double().mean()), abs=1e-3)
    cs = crops(r, sub, "blocks.4", 0)
    assert len(cs) == 5 and cs[0].full.shape == (3, 224, 224)
    sel = r.selectivity("blocks.4", 0)
    assert sel.top_class is not None and len(sel.class_means) == 10
