"""The model registry: every spec form, pretrained weights on and off line, the shipped
EfficientNet-Lite0 mapping, and torch.load's weights_only guard. No test uses the network:
downloads are pointed at 127.0.0.1 (a closed port, or a server run by the test) and the
torch / Hugging Face caches are temporary folders (fixtures in conftest.py)."""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from pathlib import Path

import pytest
import torch
from _local_http import closed_port
from safetensors.torch import save_file

import convlens
from _cli import run
from convlens import ModelLoadError, load_model
from convlens.models import efficientnet_lite0 as lite0
from convlens.models import list_models, save_checkpoint
from convlens.models.weights import read_weights
from convlens.models.zoo import LITE0_PREPROCESS, build_architecture, default_layers

# ---------------------------------------------------------------- helpers


def resnet18_member():
    from torchvision.models import ResNet18_Weights

    return ResNet18_Weights.IMAGENET1K_V1


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- each spec form


def test_simple_cnn_has_no_published_weights() -> None:
    b = load_model("simple_cnn")
    assert isinstance(b.model, convlens.SimpleCNN) and not b.pretrained
    assert "random init" in b.description and "no published weights" in b.info["note"]
    assert _same_weights(b.model, load_model("simple_cnn", weights=None).model)
    with pytest.raises(ModelLoadError, match="no published weights"):
        load_model("simple_cnn", weights="IMAGENET1K_V1")


def test_torchvision_name_with_random_init() -> None:
    b = load_model("resnet18", weights=None, seed=4)
    assert type(b.model).__module__.startswith("torchvision")
    assert not b.pretrained and b.weights is None and "note" not in b.info
    assert b.description == "resnet18 (random init, seed 4: not trained)"
    assert b.labels is not None and b.labels[0] == "tench" and len(b.labels) == 1000
    assert (b.input_size, b.preprocess.resize) == (224, 256)
    assert b.normalize == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert not b.model.training


def test_timm_name_with_random_init() -> None:
    b = load_model("timm:resnet18", weights=None, seed=1)
    assert type(b.model).__module__.startswith("timm") and not b.pretrained
    assert b.name == "timm:resnet18" and "random init" in b.description
    # timm's pretrained config: 224 px, crop 0.95, bicubic
    assert (b.input_size, b.preprocess.resize, b.preprocess.interpolation) == (224, 235, "bicubic")
    assert b.labels is not None and b.labels[652] == "military uniform"
    assert default_layers(b) == ["layer1", "layer4"]
    again = load_model("timm:resnet18", weights=None, seed=1)
    assert _same_weights(b.model, again.model)
    assert not _same_weights(b.model, load_model("timm:resnet18", weights=None, seed=2).model)


def test_efficientnet_lite0_is_pretrained_offline(no_network: None) -> None:
    b = load_model("efficientnet_lite0")
    assert b.pretrained and b.weights == "efficientnet-lite0-57934424.pth"
    assert b.description.startswith("efficientnet_lite0 (ImageNet weights from ")
    assert lite0.PACKAGE in b.description and "random" not in b.description
    assert type(b.model).__name__ == "EfficientNet" and not b.model.training
    assert b.preprocess == LITE0_PREPROCESS
    assert (b.preprocess.resize, b.preprocess.crop, b.preprocess.interpolation) == (
        256,
        224,
        "bicubic",
    )
    assert b.normalize == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert b.labels is not None and len(b.labels) == 1000 and b.labels[652] == "military uniform"
    assert default_layers(b) == ["blocks.1", "blocks.5"]
    r = load_model("efficientnet_lite0", weights=None)
    assert not r.pretrained and "random init" in r.description
    assert not _same_weights(b.model, r.model)
    with pytest.raises(ModelLoadError, match="one set of weights"):
        load_model("efficientnet_lite0", weights="in1k")


def test_safetensors_checkpoint_of_a_timm_model(tmp_path: Path) -> None:
    model = build_architecture("timm:resnet18", 5, seed=2).eval()
    path = save_checkpoint(
        model, tmp_path / "t.safetensors", arch="timm:resnet18", classes=list("vwxyz")
    )
    b = load_model(path)
    assert b.arch == "timm:resnet18" and b.labels == list("vwxyz") and b.pretrained
    assert b.description.startswith("t.safetensors (checkpoint ")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(b.model(x), model(x), rtol=0, atol=0)


def test_pt_state_dict_with_arch_efficientnet_lite0(tmp_path: Path) -> None:
    pretrained = load_model("efficientnet_lite0").model
    torch.save(pretrained.state_dict(), tmp_path / "lite.pth")
    b = load_model(tmp_path / "lite.pth", arch="efficientnet_lite0")
    assert b.arch == "efficientnet_lite0" and b.preprocess == LITE0_PREPROCESS
    assert b.labels is not None and b.labels[652] == "military uniform"  # 1000 outputs
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(b.model(x), pretrained(x), rtol=0, atol=0)


def test_pt_state_dict_head_size_is_read_from_the_file(tmp_path: Path) -> None:
    model = build_architecture("timm:resnet18", 7, seed=3)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "r.pt")
    b = load_model(tmp_path / "r.pt", arch="timm:resnet18")
    assert b.model.fc.out_features == 7 and b.labels is None  # not ImageNet's 1000
    assert _same_weights(b.model, model)


def test_checkpoint_with_weights_none_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(
        build_architecture("simple_cnn"), tmp_path / "m.safetensors", arch="simple_cnn"
    )
    with pytest.raises(ModelLoadError, match="weights=None"):
        load_model(path, weights=None)


def test_registry_name_wins_over_a_folder_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    assert load_model("resnet18", weights=None).arch == "resnet18"


# ---------------------------------------------------------------- bad specs and weights


@pytest.mark.parametrize(
    ("spec", "weights", "fragments"),
    [
        ("resnet81", "default", ["unknown model 'resnet81'", "resnet18"]),
        ("convnext_atto", None, ["timm:convnext_atto"]),  # a timm model without the prefix
        ("timm:resnet81", None, ["unknown timm model", "timm:resnet18"]),
        ("resnet18", "IMAGENET1K_V9", ["no weights 'IMAGENET1K_V9'", "IMAGENET1K_V1"]),
        ("timm:resnet18", "nope", ["no pretrained weights 'resnet18.nope'", "a1_in1k"]),
        ("timm:resnet18.a1_in1k", "tv_in1k", ["names weights 'a1_in1k' already"]),
        ("", "default", ["no model given"]),
    ],
)
def test_bad_specs_say_the_fix(spec: str, weights: str | None, fragments: list[str]) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(spec, weights=weights)
    for f in fragments:
        assert f in str(info.value)


def test_weights_argument_type_is_checked() -> None:
    with pytest.raises(TypeError, match="'default'"):
        load_model("resnet18", weights=3)  # type: ignore[arg-type]


def test_torchvision_weights_enum_member_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    member = resnet18_member()
    monkeypatch.setattr(
        member.value, "url", f"http://127.0.0.1:{closed_port()}/resnet18-f37072fd.pth"
    )
    assert load_model("resnet18", weights="none").weights is None
    with pytest.raises(ModelLoadError, match=r"resnet18 \(ResNet18_Weights.IMAGENET1K_V1\)"):
        load_model("resnet18", weights=member)  # type: ignore[arg-type]


# ---------------------------------------------------------------- EfficientNet-Lite0 mapping


def _shipped_state() -> dict[str, torch.Tensor]:
    state = read_weights(lite0.weights_file())
    assert isinstance(state, dict)
    return state


def test_lite0_mapping_layer_by_layer() -> None:
    state = _shipped_state()
    model = build_architecture("efficientnet_lite0")  # timm's tf_efficientnet_lite0, random
    target = model.state_dict()
    mapping = lite0.name_mapping(list(state), model)
    assert len(state) == len(target) == 296
    # every tensor of the file lands in exactly one model tensor, of the same shape
    assert None not in mapping.values()
    assert len(set(mapping.values())) == len(mapping)
    assert set(mapping.values()) == set(target)
    for src, dst in mapping.items():
        assert dst is not None
        assert state[src].shape == target[dst].shape, (src, dst)
        assert state[src].dtype == target[dst].dtype, (src, dst)
    # the stage structure: 16 flat blocks become stages of 1, 2, 2, 3, 3, 4, 1
    assert mapping["_conv_stem.weight"] == "conv_stem.weight"
    assert mapping["_bn0.running_var"] == "bn1.running_var"
    assert mapping["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert mapping["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert mapping["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert mapping["_blocks.2._bn2.bias"] == "blocks.1.1.bn3.bias"
    assert mapping["_blocks.10._bn1.running_mean"] == "blocks.4.2.bn2.running_mean"
    assert mapping["_blocks.14._depthwise_conv.weight"] == "blocks.5.3.conv_dw.weight"
    assert mapping["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert mapping["_conv_head.weight"] == "conv_head.weight"
    assert mapping["_bn1.weight"] == "bn2.weight"
    assert mapping["_fc.bias"] == "classifier.bias"
    # and the loaded model holds exactly the file's numbers, tensor by tensor
    loaded = load_model("efficientnet_lite0").model.state_dict()
    for src, dst in mapping.items():
        assert dst is not None
        assert torch.equal(loaded[dst], state[src]), (src, dst)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("extra", r"unexpected keys .*_blocks\.16\._expand_conv\.weight"),
        ("unknown_top", r"unexpected keys .*_stem\.weight"),
        ("missing", r"1 tensor\(s\) of tf_efficientnet_lite0 unset: blocks\.3\.2\.bn2\.bias"),
        ("shape", r"'_blocks\.5\._depthwise_conv\.weight' has shape \[240, 1, 5, 5\]"),
    ],
)
def test_lite0_mapping_fails_loudly(change: str, match: str) -> None:
    state = _shipped_state()
    if change == "extra":
        state["_blocks.16._expand_conv.weight"] = torch.zeros(1)
    elif change == "unknown_top":
        state["_stem.weight"] = torch.zeros(1)
    elif change == "missing":
        del state["_blocks.7._bn1.bias"]
    else:
        state["_blocks.5._depthwise_conv.weight"] = torch.zeros(240, 1, 5, 5)
    with pytest.raises(ModelLoadError, match=match):
        lite0.convert_state_dict(state, build_architecture("efficientnet_lite0"))


def test_lite0_damaged_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lite0, "SHA256", "0" * 64)
    with pytest.raises(ModelLoadError, match=r"damaged.*force-reinstall"):
        load_model("efficientnet_lite0")


# ---------------------------------------------------------------- weights_only


class _WritesAFile:
    """Unpickling this calls open(path, "w"): code that creates a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_weights_only_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.pth"
    state = build_architecture("simple_cnn").state_dict()
    torch.save({**state, "payload": _WritesAFile(marker)}, evil)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(evil, arch="simple_cnn")
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        read_weights(evil)
    assert not marker.exists()
    # the payload is real: an unguarded load runs it
    fh = torch.load(evil, weights_only=False)["payload"]
    fh.close()
    assert marker.exists()


# ---------------------------------------------------------------- downloads and offline errors


def _assert_offline_error(e: ModelLoadError, *fragments: str) -> None:
    msg = str(e)
    assert "\n" not in msg
    for f in ["efficientnet_lite0", "weights=None", "Connect to the internet once", *fragments]:
        assert f in msg, (f, msg)
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    text = "".join(traceback.format_exception(e))
    assert "urllib" not in text and "During handling" not in text


def test_torchvision_offline_error(monkeypatch: pytest.MonkeyPatch, caches) -> None:
    member = resnet18_member()
    port = closed_port()
    monkeypatch.setattr(member.value, "url", f"http://127.0.0.1:{port}/resnet18-f37072fd.pth")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("resnet18")
    assert time.monotonic() - start < 10
    cached = caches["torch"] / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    _assert_offline_error(
        info.value, "no weights for resnet18", str(cached), f"127.0.0.1:{port}", "--weights none"
    )
    assert not cached.parent.exists() or not list(cached.parent.iterdir())


def test_timm_offline_error(monkeypatch: pytest.MonkeyPatch, caches) -> None:
    import huggingface_hub.constants as hf

    port = closed_port()
    monkeypatch.setattr(hf, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("timm:resnet18")
    assert time.monotonic() - start < 10  # no minutes of Hub retries
    _assert_offline_error(
        info.value,
        "no weights for timm:resnet18",
        "model.safetensors",
        str(caches["hf"] / "models--timm--resnet18.a1_in1k"),
        f"http://127.0.0.1:{port}/timm/resnet18.a1_in1k/resolve/main/model.safetensors",
    )


def test_offline_error_on_the_command_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    member = resnet18_member()
    monkeypatch.setattr(
        member.value, "url", f"http://127.0.0.1:{closed_port()}/resnet18-f37072fd.pth"
    )
    r = run("classify", "--model", "resnet18", "--out", str(tmp_path / "o"), "--device", "cpu")
    assert r.exit_code == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("convlens: error: no weights for resnet18")
    assert "resnet18-f37072fd.pth" in lines[0] and "--weights none" in lines[0]
    assert not (tmp_path / "o").exists()
    # the analysis commands fall back to a random init (weights=auto), and say so
    r = run("layers", "resnet18", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("resnet18 (random init, seed 0")
    assert r.stderr.splitlines() == [
        "convlens: note: resnet18: pretrained weights are not on disk "
        f"({Path(torch.hub.get_dir()) / 'checkpoints' / 'resnet18-f37072fd.pth'}), so this is a "
        "random init; --weights default (weights='default') downloads them"
    ]


def _serve_resnet18(root: Path, seed: int = 7) -> tuple[torch.nn.Module, str]:
    """A resnet18 state dict under a torch.hub-style name carrying its sha256 prefix."""
    model = build_architecture("resnet18", seed=seed)
    tmp = root / "tmp.pth"
    torch.save(model.state_dict(), tmp)
    name = f"resnet18-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(root / name)
    return model, name


def test_torchvision_download_into_the_torch_cache(
    serve, caches, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, base = serve
    served, name = _serve_resnet18(root)
    member = resnet18_member()
    monkeypatch.setattr(member.value, "url", f"{base}/{name}")
    cached = caches["torch"] / "hub" / "checkpoints" / name
    assert not list_models("resnet18")[0].on_disk
    b = load_model("resnet18", progress=False)
    assert cached.is_file() and b.pretrained and b.weights == "IMAGENET1K_V1"
    assert b.description == "resnet18 (torchvision ResNet18_Weights.IMAGENET1K_V1)"
    assert b.info["file"] == str(cached)
    assert _same_weights(b.model, served)
    assert b.labels == member.meta["categories"]
    entry = list_models("resnet18")[0]
    assert entry.on_disk and entry.location == str(cached) and entry.weights == "IMAGENET1K_V1"
    # now on disk: no network needed, and weights="auto" picks it up
    monkeypatch.setattr(member.value, "url", f"http://127.0.0.1:{closed_port()}/{name}")
    for w in ("default", "auto"):
        again = load_model("resnet18", weights=w)
        assert again.pretrained and _same_weights(again.model, served)


def test_damaged_download_is_not_cached(serve, caches, monkeypatch: pytest.MonkeyPatch) -> None:
    root, base = serve
    _, name = _serve_resnet18(root)
    wrong = "resnet18-00000000.pth"
    (root / name).rename(root / wrong)
    monkeypatch.setattr(resnet18_member().value, "url", f"{base}/{wrong}")
    with pytest.raises(ModelLoadError, match=r"damaged.*nothing was cached"):
        load_model("resnet18", progress=False)
    checkpoints = caches["torch"] / "hub" / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())


def test_http_error_names_the_status(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    _, base = serve
    monkeypatch.setattr(resnet18_member().value, "url", f"{base}/resnet18-f37072fd.pth")
    with pytest.raises(ModelLoadError, match="HTTP 404"):
        load_model("resnet18", progress=False)


def test_timm_weights_from_the_hugging_face_cache(caches, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file already in the Hub cache loads without the network, through timm."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    source = build_architecture("timm:test_efficientnet", seed=5)
    repo = caches["hf"] / "models--timm--test_efficientnet.r160_in1k"
    snapshot = repo / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    save_file(
        {k: v.contiguous() for k, v in source.state_dict().items()}, snapshot / "model.safetensors"
    )
    assert list_models("timm:test_efficientnet.r160_in1k")[0].on_disk
    b = load_model("timm:test_efficientnet")
    assert b.pretrained and b.weights == "r160_in1k"
    assert b.description == "timm:test_efficientnet (timm test_efficientnet.r160_in1k)"
    assert _same_weights(b.model, source)
    assert (b.input_size, b.preprocess.resize) == (160, 168)  # crop 0.95
    assert "state_dict" not in b.model.pretrained_cfg  # no second copy kept alive
    assert load_model("timm:test_efficientnet", weights="auto").pretrained


# ---------------------------------------------------------------- list_models


def test_list_models_says_what_is_on_disk(caches) -> None:
    entries = {m.name: m for m in list_models()}
    assert {"simple_cnn", "efficientnet_lite0", "resnet18", "googlenet", "vgg16"} <= set(entries)
    assert not any(n.startswith("timm:") for n in entries)
    lite = entries["efficientnet_lite0"]
    assert lite.on_disk and lite.location == str(lite0.weights_file())
    r18 = entries["resnet18"]
    assert not r18.on_disk and r18.weights == "IMAGENET1K_V1"
    assert r18.location == str(caches["torch"] / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert entries["simple_cnn"].weights is None
    assert [m.name for m in list_models("resnet1*")] == ["resnet101", "resnet152", "resnet18"]
    timm_entries = {m.name: m for m in list_models("timm:resnet18.*")}
    assert "timm:resnet18.a1_in1k" in timm_entries
    assert not timm_entries["timm:resnet18.a1_in1k"].on_disk
    assert len(list_models(timm=True)) > 1000


def test_models_command(tmp_path: Path) -> None:
    r = run("models", "eff*", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[-1] == f"wrote {tmp_path / 'models.json'}"
    rows = {ln.split()[0]: ln.split() for ln in lines[1:-1]}
    assert rows["efficientnet_lite0"][-1] == "yes"
    assert rows["efficientnet_b0"][1:] == ["torchvision", "IMAGENET1K_V1", "no"]
    data = json.loads((tmp_path / "models.json").read_text())
    assert {m["name"] for m in data["models"]} == set(rows)
    r = run("models", "nothing-like-this")
    assert r.exit_code == 2 and "no model matches" in r.stderr


# ---------------------------------------------------------------- the CLI with every spec form


def test_layers_efficientnet_lite0_offline(no_network: None) -> None:
    r = run("layers", "efficientnet_lite0", "--device", "cpu")
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]
    assert first.startswith("efficientnet_lite0 (ImageNet weights from ")
    assert first.endswith("input 1x3x224x224") and r.stderr == ""
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[2:]}
    assert rows["conv_stem"][1:3] == ["Conv2dSame", "1x32x112x112"]
    assert rows["blocks.1"][2] == "1x24x56x56"
    assert rows["blocks.5"][2] == "1x192x7x7"
    assert rows["classifier"][1:3] == ["Linear", "1x1000"]


def test_occlude_efficientnet_lite0_offline(no_network: None, tmp_path: Path) -> None:
    out = tmp_path / "occ"
    r = run("occlude", "--model", "efficientnet_lite0", "--box", "30,90,40,110",
            "--device", "cpu", "--out", str(out))  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads((out / "occlusion.json").read_text())
    assert data["model"].startswith("efficientnet_lite0 (ImageNet weights from ")
    assert data["input_shape"] == [3, 224, 224]
    layers = data["layers"]
    assert list(layers) == ["blocks.1", "blocks.5"]  # the family's default early/deep pair
    assert layers["blocks.1"]["shape"] == [24, 56, 56]
    assert layers["blocks.5"]["shape"] == [192, 7, 7]
    assert layers["blocks.1"]["inside_fraction"] > 2 * layers["blocks.1"]["area_fraction"]
    assert (out / "occlusion.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("args", "model_prefix"),
    [
        (["--model", "timm:resnet18", "--weights", "none"], "timm:resnet18 (random init"),
        (["--model", "mobilenet_v3_small", "--weights", "none"], "mobilenet_v3_small (random"),
        (["--model", "efficientnet_lite0", "--weights", "none"], "efficientnet_lite0 (random init"),
    ],
)
def test_activations_accepts_registry_specs(
    tmp_path: Path, args: list[str], model_prefix: str
) -> None:
    out = tmp_path / "acts"
    r = run("activations", *args, "--max-maps", "4", "--device", "cpu", "--out", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads((out / "activations.json").read_text())
    assert data["model"].startswith(model_prefix)
    assert len(data["layers"]) == 2


def test_layers_of_pt_checkpoint_with_timm_arch(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save(build_architecture("timm:resnet18", 3).state_dict(), path)
    r = run("layers", str(path), "--arch", "timm:resnet18", "--device", "cpu")
    assert r.exit_code == 0, r.output
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[2:]}
    assert rows["fc"][2] == "1x3"


def test_import_convlens_does_not_import_timm() -> None:
    import subprocess
    import sys

    code = (
        "import sys, convlens, convlens.cli, convlens.models, convlens.classify; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'huggingface_hub')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
