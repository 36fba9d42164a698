from __future__ import annotations

import pytest
import torch

from convlens import ModelLoadError, load_model
from convlens.models import SimpleCNN, read_checkpoint, save_checkpoint
from convlens.models.zoo import Preprocess, build_architecture, default_layers


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_seeded_random_init_is_reproducible_and_leaves_global_rng():
    state = torch.random.get_rng_state()
    a = load_model("resnet18", weights=None, seed=1).model
    assert torch.equal(state, torch.random.get_rng_state())
    b = load_model("resnet18", weights=None, seed=1).model
    c = load_model("resnet18", weights=None, seed=2).model
    assert _same_weights(a, b) and not _same_weights(a, c)


def test_bundle_fields_for_torchvision_and_simple_cnn():
    b = load_model("resnet18", weights=None)
    assert not b.model.training and b.input_size == 224 and not b.pretrained
    assert b.labels is not None and len(b.labels) == 1000
    assert "random init" in b.description
    s = load_model("simple_cnn")
    assert isinstance(s.model, SimpleCNN) and s.input_size == 128
    assert s.normalize == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_unknown_model_suggests():
    with pytest.raises(ModelLoadError, match="resnet18"):
        load_model("resnet81")
    assert issubclass(ModelLoadError, ValueError)


def test_preprocess_resizes_crops_and_normalizes():
    pre = Preprocess(resize=8, crop=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = pre(torch.full((3, 16, 32), 0.75))
    assert x.shape == (3, 4, 4)
    torch.testing.assert_close(x, torch.ones(3, 4, 4))  # (0.75 - 0.5) / 0.25
    torch.testing.assert_close(pre.unnormalize(x), torch.full((3, 4, 4), 0.75))
    with pytest.raises(ValueError):
        pre(torch.rand(16, 16))


def test_safetensors_checkpoint_round_trip(tmp_path):
    model = build_architecture("simple_cnn", 4, seed=3).eval()
    model.bn1.running_mean.fill_(0.25)
    path = save_checkpoint(
        model, tmp_path / "m.safetensors", arch="simple_cnn", classes=list("abcd")
    )
    assert (tmp_path / "m.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    b = load_model(path)
    assert b.labels == ["a", "b", "c", "d"] and b.pretrained and b.arch == "simple_cnn"
    assert _same_weights(model, b.model)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b.model(x), model(x))
    assert load_model(tmp_path / "m.json").arch == "simple_cnn"  # the sidecar names it too


def test_pt_state_dict_with_arch(tmp_path):
    model = build_architecture("resnet18", 7, seed=5)
    torch.save(model.state_dict(), tmp_path / "r.pt")
    b = load_model(tmp_path / "r.pt", arch="resnet18")
    assert _same_weights(model, b.model) and b.model.fc.out_features == 7
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(tmp_path / "r.pt")  # resnet keys: cannot guess
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_model(tmp_path / "r.pt", arch="resnet34")


def test_pt_file_with_pickled_objects_is_refused(tmp_path):
    torch.save({"model": SimpleCNN()}, tmp_path / "whole.pt")  # a pickled module, not tensors
    with pytest.raises(ModelLoadError, match="weights_only"):
        read_checkpoint(tmp_path / "whole.pt")


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(tmp_path / "bad.safetensors")


def test_default_layers():
    assert default_layers(load_model("resnet18", weights=None)) == ["layer1", "layer4"]
    assert default_layers(load_model("simple_cnn")) == ["bn1", "bn3"]
    assert default_layers(load_model("googlenet", weights=None)) == ["inception3a", "inception4e"]
    vgg = load_model("vgg11", weights=None).model
    assert default_layers(vgg) == ["features.0", "features.18"]
