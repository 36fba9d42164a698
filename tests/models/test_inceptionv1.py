"""InceptionV1 (Lucid's/Lucent's ``inception5h``): the published weights layout loads
strictly, the named layers and their shapes, any input size, the input mapping, and the
registry entry with its download path. No test uses the network: weights are random
tensors with the published keys and shapes, served from 127.0.0.1."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _local_http import closed_port
from click.testing import CliRunner
from torch import nn

import convlens
from convlens import ModelLoadError, capture, load_model
from convlens.models import default_layers, list_models
from convlens.models import inceptionv1 as iv1
from convlens.models.inceptionv1 import Concat, InceptionV1, RedirectedReLU, inception5h_labels
from convlens.models.zoo import build_architecture

# The published state dict (Lucent 0.1.8 lucent/modelzoo/inceptionv1, ProGamerGov's
# inception5h.pth): every conv is "<layer>_pre_relu_conv" with (out, in, kernel).
# fmt: off
_CONVS = {
    "conv2d0": (64, 3, 7), "conv2d1": (64, 64, 1), "conv2d2": (192, 64, 3),
    "mixed3a_1x1": (64, 192, 1), "mixed3a_3x3_bottleneck": (96, 192, 1),
    "mixed3a_5x5_bottleneck": (16, 192, 1), "mixed3a_pool_reduce": (32, 192, 1),
    "mixed3a_3x3": (128, 96, 3), "mixed3a_5x5": (32, 16, 5),
    "mixed3b_1x1": (128, 256, 1), "mixed3b_3x3_bottleneck": (128, 256, 1),
    "mixed3b_5x5_bottleneck": (32, 256, 1), "mixed3b_pool_reduce": (64, 256, 1),
    "mixed3b_3x3": (192, 128, 3), "mixed3b_5x5": (96, 32, 5),
    "mixed4a_1x1": (192, 480, 1), "mixed4a_3x3_bottleneck": (96, 480, 1),
    "mixed4a_5x5_bottleneck": (16, 480, 1), "mixed4a_pool_reduce": (64, 480, 1),
    "mixed4a_3x3": (204, 96, 3), "mixed4a_5x5": (48, 16, 5),
    "mixed4b_1x1": (160, 508, 1), "mixed4b_3x3_bottleneck": (112, 508, 1),
    "mixed4b_5x5_bottleneck": (24, 508, 1), "mixed4b_pool_reduce": (64, 508, 1),
    "mixed4b_3x3": (224, 112, 3), "mixed4b_5x5": (64, 24, 5),
    "mixed4c_1x1": (128, 512, 1), "mixed4c_3x3_bottleneck": (128, 512, 1),
    "mixed4c_5x5_bottleneck": (24, 512, 1), "mixed4c_pool_reduce": (64, 512, 1),
    "mixed4c_3x3": (256, 128, 3), "mixed4c_5x5": (64, 24, 5),
    "mixed4d_1x1": (112, 512, 1), "mixed4d_3x3_bottleneck": (144, 512, 1),
    "mixed4d_5x5_bottleneck": (32, 512, 1), "mixed4d_pool_reduce": (64, 512, 1),
    "mixed4d_3x3": (288, 144, 3), "mixed4d_5x5": (64, 32, 5),
    "mixed4e_1x1": (256, 528, 1), "mixed4e_3x3_bottleneck": (160, 528, 1),
    "mixed4e_5x5_bottleneck": (32, 528, 1), "mixed4e_pool_reduce": (128, 528, 1),
    "mixed4e_3x3": (320, 160, 3), "mixed4e_5x5": (128, 32, 5),
    "mixed5a_1x1": (256, 832, 1), "mixed5a_3x3_bottleneck": (160, 832, 1),
    "mixed5a_5x5_bottleneck": (48, 832, 1), "mixed5a_pool_reduce": (128, 832, 1),
    "mixed5a_3x3": (320, 160, 3), "mixed5a_5x5": (128, 48, 5),
    "mixed5b_1x1": (384, 832, 1), "mixed5b_3x3_bottleneck": (192, 832, 1),
    "mixed5b_5x5_bottleneck": (48, 832, 1), "mixed5b_pool_reduce": (128, 832, 1),
    "mixed5b_3x3": (384, 192, 3), "mixed5b_5x5": (128, 48, 5),
}
# fmt: on
PUBLISHED: dict[str, tuple[int, ...]] = {
    **{f"{n}_pre_relu_conv.weight": (o, i, k, k) for n, (o, i, k) in _CONVS.items()},
    **{f"{n}_pre_relu_conv.bias": (o,) for n, (o, _, _) in _CONVS.items()},
    "softmax2_pre_activation_matmul.weight": (1008, 1024),
    "softmax2_pre_activation_matmul.bias": (1008,),
}

# Output shapes at 224 px (without the batch dimension).
SHAPES_224: dict[str, tuple[int, ...]] = {
    "conv2d0": (64, 112, 112),
    "maxpool0": (64, 56, 56),
    "localresponsenorm0": (64, 56, 56),
    "conv2d1": (64, 56, 56),
    "conv2d2": (192, 56, 56),
    "localresponsenorm1": (192, 56, 56),
    "maxpool1": (192, 28, 28),
    "mixed3a": (256, 28, 28),
    "mixed3b": (480, 28, 28),
    "maxpool4": (480, 14, 14),
    "mixed4a": (508, 14, 14),
    "mixed4b": (512, 14, 14),
    "mixed4c": (512, 14, 14),
    "mixed4d": (528, 14, 14),
    "mixed4e": (832, 14, 14),
    "maxpool10": (832, 7, 7),
    "mixed5a": (832, 7, 7),
    "mixed5b": (1024, 7, 7),
    "avgpool0": (1024, 1, 1),
    "softmax2_pre_activation_matmul": (1008,),
    "softmax2": (1008,),
}


def published_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the published keys and shapes (He-scaled, so the
    activations stay finite and alive)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in PUBLISHED.items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        scale = (2 / fan_in) ** 0.5 if len(shape) == 4 else 1e-3 if len(shape) == 2 else 0.1
        state[key] = torch.randn(shape, generator=g) * scale
    return state


def pixels(n: int = 1, size: int = 224, seed: int = 0) -> torch.Tensor:
    """A batch in the model's input space: [0, 1] pixels mapped with x * 255 - 117."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 255 - 117


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- the architecture


def test_state_dict_has_exactly_the_published_keys_and_shapes() -> None:
    assert len(PUBLISHED) == 116
    ours = {k: tuple(v.shape) for k, v in InceptionV1().state_dict().items()}
    assert ours == PUBLISHED


def test_published_state_dict_loads_strictly_and_classifies() -> None:
    model = InceptionV1().eval()
    model.load_state_dict(published_state())  # strict by default
    with torch.no_grad():
        y = model(pixels())
    assert y.shape == (1, 1008)
    torch.testing.assert_close(y.sum(dim=1), torch.ones(1))  # the output is softmax2
    assert torch.isfinite(y).all()


def test_named_layers_and_their_shapes_at_224() -> None:
    model = InceptionV1().eval()
    model.load_state_dict(published_state())
    modules = dict(model.named_modules())
    for name in ("conv2d0", "conv2d1", "conv2d2", "mixed4a_3x3", "mixed5b_pool_reduce"):
        assert type(modules[name]) is nn.ReLU, name
    for name in [f"mixed{b}" for b in ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")]:
        assert isinstance(modules[name], Concat), name
    assert isinstance(modules["softmax2"], nn.Softmax)
    assert isinstance(modules["localresponsenorm0"], nn.LocalResponseNorm)
    assert not any("softmax0" in n or "softmax1" in n or "head0" in n for n in modules)
    acts = capture(model, pixels(), list(SHAPES_224))
    assert {k: tuple(v.shape[1:]) for k, v in acts.items()} == SHAPES_224
    for name, a in acts.items():  # alive: no dead layer, nothing infinite
        assert torch.isfinite(a).all() and (a != 0).any(), name
    # Lucent averages mixed5b with a fixed 7x7 window, convlens over the whole map: the
    # same numbers at 224 px, where mixed5b is 7x7
    torch.testing.assert_close(acts["avgpool0"], F.avg_pool2d(acts["mixed5b"], 7))


def test_block_output_is_the_concat_of_its_branches_in_order() -> None:
    model = InceptionV1().eval()
    parts = ["mixed4a_1x1", "mixed4a_3x3", "mixed4a_5x5", "mixed4a_pool_reduce", "mixed4a"]
    acts = capture(model, pixels(size=64), parts)
    torch.testing.assert_close(acts["mixed4a"], torch.cat([acts[p] for p in parts[:4]], dim=1))
    assert [acts[p].shape[1] for p in parts] == [192, 204, 48, 64, 508]
    assert acts["mixed4a"].shape[-2:] == (4, 4)


@pytest.mark.parametrize("size", [iv1.MIN_INPUT_SIZE, 65, 200])
def test_any_input_size_gives_one_row_per_image(size: int) -> None:
    model = InceptionV1().eval()
    with torch.no_grad():
        y = model(pixels(2, size))
    assert y.shape == (2, 1008)
    torch.testing.assert_close(y.sum(dim=1), torch.ones(2))


def test_too_small_or_misshaped_input_says_the_fix() -> None:
    model = InceptionV1().eval()
    with pytest.raises(ValueError, match=f"H, W >= {iv1.MIN_INPUT_SIZE}"):
        model(pixels(1, iv1.MIN_INPUT_SIZE - 1))
    with pytest.raises(ValueError, match=r"x\[None\]"):
        model(pixels()[0])


def test_redirected_relu_changes_gradients_only() -> None:
    plain, redirected = InceptionV1().eval(), InceptionV1(redirected_relu=True).eval()
    redirected.load_state_dict(plain.state_dict())
    relus = [m for m in redirected.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 57 and all(isinstance(m, RedirectedReLU) for m in relus)
    x = pixels(size=iv1.MIN_INPUT_SIZE)
    outs, grads = [], []
    for model in (plain, redirected):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y[0, 3].backward()
        assert xi.grad is not None
        outs.append(y.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)  # same forward
    assert not torch.allclose(grads[0], grads[1])  # different backward
    v = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    RedirectedReLU()(v).sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([0.1, 1.0, 1.0]))


def test_labels() -> None:
    labels = inception5h_labels()
    assert len(labels) == 1008 and labels[0] == "dummy" and labels[1001:] == ["dummy"] * 7
    assert labels[1:4] == ["kit fox", "English setter", "Siberian husky"]
    assert labels[1000] == "dumbbell" and labels[866] == "military uniform"
    assert len(set(labels[1:1001])) == 998  # "crane" and "maillot" name two classes each


# ---------------------------------------------------------------- the registry entry


def test_random_init_from_the_registry() -> None:
    state = torch.random.get_rng_state()
    b = load_model("inceptionv1", weights=None, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert isinstance(b.model, InceptionV1) and not b.model.training and not b.pretrained
    assert b.description == "inceptionv1 (random init, seed 3: not trained)"
    assert b.labels == inception5h_labels() and b.input_size == 224
    assert _same_weights(b.model, load_model("inceptionv1", weights=None, seed=3).model)
    assert not _same_weights(b.model, load_model("inceptionv1", weights=None, seed=4).model)
    assert default_layers(b) == ["mixed3a", "mixed4e"]
    with pytest.raises(ModelLoadError, match="one set of weights"):
        load_model("inceptionv1", weights="IMAGENET1K_V1")


def test_preprocess_is_x_times_255_minus_117() -> None:
    pre = load_model("inceptionv1", weights=None).preprocess
    assert (pre.resize, pre.crop) == (256, 224)
    img = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1))
    expected = img[:, 16:240, 16:240] * 255 - 117
    torch.testing.assert_close(pre(img), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(pre.unnormalize(expected), img[:, 16:240, 16:240], atol=1e-6, rtol=0)


def test_classify_does_not_apply_a_second_softmax() -> None:
    b = load_model("inceptionv1", weights=None)
    b.model.load_state_dict(published_state())
    x = pixels()[0]
    with torch.no_grad():
        probs = b.model(x[None])[0]
    with pytest.warns(UserWarning, match="random init"):
        top = convlens.classify(b, x, k=3, preprocessed=True)
    assert [p.index for p in top] == probs.topk(3).indices.tolist()
    assert top[0].probability == pytest.approx(probs.max().item(), rel=1e-5)
    assert top[0].label == b.labels[top[0].index]


def _assert_one_line(e: ModelLoadError, *fragments: str) -> None:
    msg = str(e)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    text = "".join(traceback.format_exception(e))
    assert "urllib" not in text and "During handling" not in text


def test_offline_default_is_one_line_error_and_auto_falls_back(
    monkeypatch: pytest.MonkeyPatch, caches: dict[str, Path]
) -> None:
    port = closed_port()
    monkeypatch.setattr(iv1, "WEIGHTS_URL", f"http://127.0.0.1:{port}/inception5h.pth")
    cached = caches["torch"] / "hub" / "checkpoints" / "inception5h.pth"
    with pytest.raises(ModelLoadError) as info:
        load_model("inceptionv1")
    _assert_one_line(
        info.value,
        "no weights for inceptionv1",
        str(cached),
        f"127.0.0.1:{port}",
        "Connect to the internet once",
        "--weights none",
    )
    b = load_model("inceptionv1", weights="auto")
    assert not b.pretrained and "not on disk" in b.info["note"] and str(cached) in b.info["note"]
    entry = list_models("inceptionv1")[0]
    assert not entry.on_disk and entry.location == str(cached)


def test_download_into_the_torch_cache_then_offline(
    serve: tuple[Path, str], caches: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, base = serve
    state = published_state(seed=5)
    torch.save(state, root / "inception5h.pth")
    monkeypatch.setattr(iv1, "WEIGHTS_URL", f"{base}/inception5h.pth")
    cached = caches["torch"] / "hub" / "checkpoints" / "inception5h.pth"
    b = load_model("inceptionv1", progress=False)
    assert cached.is_file() and b.pretrained and b.weights == "inception5h.pth"
    assert b.info == {"file": str(cached), "url": f"{base}/inception5h.pth"}
    assert "inception5h" in b.description and "random" not in b.description
    assert all(torch.equal(b.model.state_dict()[k], v) for k, v in state.items())
    assert list_models("inceptionv1")[0].on_disk
    # on disk now: no network needed, and weights="auto" picks it up
    monkeypatch.setattr(iv1, "WEIGHTS_URL", f"http://127.0.0.1:{closed_port()}/inception5h.pth")
    for w in ("default", "auto"):
        again = load_model("inceptionv1", weights=w)
        assert again.pretrained and _same_weights(again.model, b.model)


def test_a_file_that_does_not_fit_is_refused(
    serve: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, base = serve
    state = published_state()
    del state["mixed5b_5x5_pre_relu_conv.bias"]
    torch.save(state, root / "inception5h.pth")
    monkeypatch.setattr(iv1, "WEIGHTS_URL", f"{base}/inception5h.pth")
    with pytest.raises(ModelLoadError, match=r"does not fit inceptionv1.*delete it") as info:
        load_model("inceptionv1", progress=False)
    assert "\n" not in str(info.value)


def test_pt_state_dict_with_arch_inceptionv1(tmp_path: Path) -> None:
    source = build_architecture("inceptionv1", seed=2)
    torch.save(source.state_dict(), tmp_path / "iv1.pt")
    b = load_model(tmp_path / "iv1.pt", arch="inceptionv1")
    assert _same_weights(b.model, source) and b.labels == inception5h_labels()
    assert b.preprocess.mean == (117 / 255,) * 3


def test_models_command_lists_it() -> None:
    from convlens.cli import main

    r = CliRunner().invoke(main, ["models", "inceptionv1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[1].split() == ["inceptionv1", "convlens", "inception5h", "no"]
