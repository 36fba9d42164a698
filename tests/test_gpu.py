"""CUDA paths: results on the GPU match the CPU. Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch
import torchvision
from click.testing import CliRunner

import convlens
from convlens.analysis.filters import filter_responses, test_images
from convlens.cli import main
from convlens.device import resolve_device

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_cuda")]


def test_auto_picks_cuda():
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_filters_on_cuda_match_cpu():
    imgs = test_images()
    torch.testing.assert_close(filter_responses(imgs, device="cuda"), filter_responses(imgs))


def test_occlude_and_list_layers_on_cuda_match_cpu():
    bundle = convlens.load_model("resnet18", weights=None, device="cuda")
    assert next(bundle.model.parameters()).is_cuda
    x = bundle.preprocess(convlens.sample_image())
    layers = ["bn1", "layer2", "layer4"]
    gpu = convlens.occlude(bundle.model, x, (30, 90, 40, 110), layers)
    cpu_model = convlens.load_model("resnet18", weights=None, device="cpu").model
    cpu = convlens.occlude(cpu_model, x, (30, 90, 40, 110), layers)
    for k in layers:
        assert gpu.inside_fraction[k] == pytest.approx(cpu.inside_fraction[k], abs=1e-4)
        torch.testing.assert_close(gpu.layers[k].diff, cpu.layers[k].diff, atol=1e-4, rtol=1e-4)
    infos = {i.name: i for i in convlens.list_layers(bundle.model)}
    assert infos["layer4"].output_shape == (1, 512, 7, 7)


def test_cli_runs_on_cuda(tmp_path):
    r = CliRunner().invoke(
        main,
        [
            "occlude",
            "--model",
            "resnet18",
            "--weights",
            "none",
            "--layers",
            "bn1,layer4",
            "--device",
            "cuda",
            "--out",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    assert '"device": "cuda"' in (tmp_path / "occlusion.json").read_text()


def test_capture_stop_early_on_cuda_and_outputs_survive_inplace_ops():
    model = torchvision.models.resnet18().cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    a = convlens.capture(model, x, ["bn1", "layer2"])
    b = convlens.capture(model, x, ["bn1", "layer2"], stop_early=False)
    assert a["bn1"].min() < 0  # the in-place ReLU after bn1 did not reach the copy
    for k in a:
        assert a[k].device.type == "cpu"
        torch.testing.assert_close(a[k], b[k])


def test_dataset_examples_on_cuda_match_cpu_and_keep_the_state_there(monkeypatch):
    from convlens.analysis import examples as ex

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 64, 64, generator=g), i % 4) for i in range(70)]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    cpu = convlens.dataset_examples(
        model, data, ["layer2", "fc"], k=5, batch_size=16, device="cpu", progress=False
    )
    devices = []
    real_add = ex.RunningChannels.add

    def spy(self, scores, *args, **kwargs):
        devices.append((scores.device.type, self.t["top_scores"].device.type))
        return real_add(self, scores, *args, **kwargs)

    monkeypatch.setattr(ex.RunningChannels, "add", spy)
    gpu = convlens.dataset_examples(
        model, data, ["layer2", "fc"], k=5, batch_size=16, device="cuda", progress=False
    )
    assert devices and all(d == ("cuda", "cuda") for d in devices)  # no host copy per batch
    assert gpu.settings["device"].startswith("cuda")
    for layer in ("layer2", "fc"):
        for ch in gpu.channels(layer)[:32]:
            a, b = gpu.top(layer, ch), cpu.top(layer, ch)
            assert [e.score for e in a] == pytest.approx([e.score for e in b], rel=1e-4, abs=1e-4)
            assert gpu.stats(layer, ch).mean == pytest.approx(
                cpu.stats(layer, ch).mean, rel=1e-4, abs=1e-5
            )


def test_microscope_on_cuda_matches_cpu_and_its_batches(tmp_path):
    """The whole microscope on CUDA: the same channels, examples and statistics as on the
    CPU (renders are optimisations, so their values agree only roughly across devices),
    and byte-identical images for two batch sizes on the GPU."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "analysis"))
    from _examples_fixtures import tiny_data, tiny_model

    def run(out, device, batch):
        return convlens.microscope(
            tiny_model(),
            tiny_data(n=21),
            ["conv1", "conv2"],
            out=out,
            channels="0-2",
            k=3,
            steps=6,
            size=16,
            diversity=2,
            batch=batch,
            device=device,
            progress=False,
        )

    gpu = run(tmp_path / "gpu", "cuda", 2)
    gpu3 = run(tmp_path / "gpu3", "cuda", 3)
    cpu = run(tmp_path / "cpu", "cpu", 2)
    a, b = (json.loads((d / "microscope.json").read_text()) for d in (gpu, cpu))
    assert a["settings"]["device"].startswith("cuda")
    for la, lb in zip(a["layers"], b["layers"]):
        for ua, ub in zip(la["units"], lb["units"]):
            assert [e["index"] for e in ua["top"]] == [e["index"] for e in ub["top"]]
            assert ua["stats"]["mean"] == pytest.approx(ub["stats"]["mean"], rel=1e-4)
            assert ua["renders"]["channel"]["value"] == pytest.approx(
                ub["renders"]["channel"]["value"], rel=0.2, abs=0.05
            )

    def pngs(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("r-*/*.png")}

    assert pngs(gpu) and pngs(gpu) == pngs(gpu3)


@pytest.mark.parametrize(
    "method", ["saliency", "integrated_gradients", "guided_backprop", "gradcam", "scorecam"]
)
def test_attribution_on_cuda_matches_cpu(method):
    torch.manual_seed(0)
    cpu_model = torchvision.models.resnet18().eval()
    gpu_model = torchvision.models.resnet18()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model = gpu_model.cuda().eval()
    x = torch.randn(2, 3, 64, 64)
    cpu = convlens.attribute(cpu_model, x, [3, 7], method=method, steps=8)
    gpu = convlens.attribute(gpu_model, x, [3, 7], method=method, steps=8, device="cuda")
    assert gpu.settings["device"].startswith("cuda") and gpu.map.device.type == "cpu"
    scale = float(cpu.map.abs().max())
    assert float((gpu.map - cpu.map).abs().max()) <= 1e-3 * scale
    torch.testing.assert_close(gpu.score, cpu.score, rtol=1e-4, atol=1e-4)
    assert all(p.grad is None for p in gpu_model.parameters())


@pytest.mark.parametrize("precision", ["auto", "float16", "bfloat16"])
def test_renders_under_autocast_on_cuda(precision):
    """precision on CUDA: auto is bfloat16 from compute capability 8.0 (float16 with loss
    scaling before), the objective rises, the seed contract holds and the values are the
    float32 objective of the final images (score on the CPU agrees)."""
    from convlens.analysis.featurevis import render, score

    if precision == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 8, 3, stride=2, padding=1),
    ).eval()
    kw = dict(size=32, steps=24, thresholds=(1, 24), progress=False, precision=precision)
    a = render(net, "3:0-3", device="cuda", **kw)
    b = render(net, "3:0-3", device="cuda", **kw)
    want = {"float16": "float16", "bfloat16": "bfloat16"}.get(precision)
    if want is None:
        major = torch.cuda.get_device_capability()[0]
        want = "bfloat16" if major >= 8 else "float16"
    assert a.settings["precision"] == want
    assert torch.equal(a.images, b.images)
    assert bool((a.values[-1] > a.values[0]).all())
    cpu = score(net.cpu(), "3:0-3", a.images, device="cpu")
    torch.testing.assert_close(a.final_values, cpu, atol=1e-3, rtol=1e-3)
