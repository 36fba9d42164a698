"""Any model a user brings (issue 14): compiled, scripted, half precision, 1 or 4 input
channels, carrying hooks of its own, returning dicts, tuples, lists, namedtuples or
dataclasses.

The matrix runs every form through capture, occlude, sensitivity, render, classify and
list_layers and checks that the result equals the plain eager float32 model's (to bfloat16
round-off for bfloat16), or is the one-line error for what cannot work; and that after
every call the model's hooks, training flags and requires_grad flags are what they were.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import convlens
from convlens.analysis.featurevis import render
from convlens.analysis.featurevis._fold import fold_batchnorm, structural_copy
from convlens.errors import ConvlensError
from convlens.models import ModelBundle, Preprocess, unwrap
from convlens.models.forms import hooks_aside, select_output

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning"),
    pytest.mark.filterwarnings("ignore:convlens.sensitivity. a TorchScript module"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one CPU thread is faster than two, and much faster than two on a CPU
    shared with other work (OpenMP threads waiting on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SIZE = 16
CLASS = 1
BOX = (2, 10, 3, 12)
HALF_TOL = 4e-2  # bfloat16 keeps 8 bits of mantissa: 2^-8 = 0.4% per op, a few ops deep


class Net(nn.Module):
    """conv-bn-relu twice, global pooling, a linear head: 5 classes."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))

    def forward(self, x: torch.Tensor) -> Any:
        return self.fc(self.pool(self.features(x)).flatten(1))


class DictNet(Net):
    def forward(self, x: torch.Tensor) -> Any:
        f = self.features(x)
        return {"features": f, "logits": self.fc(self.pool(f).flatten(1))}


class TupleNet(Net):
    def forward(self, x: torch.Tensor) -> Any:
        f = self.features(x)
        return f, self.fc(self.pool(f).flatten(1))


class ListNet(Net):
    def forward(self, x: torch.Tensor) -> Any:
        f = self.features(x)
        return [self.fc(self.pool(f).flatten(1)), f]


NamedOut = namedtuple("NamedOut", ["features", "logits"])


class NamedNet(Net):
    def forward(self, x: torch.Tensor) -> Any:
        f = self.features(x)
        return NamedOut(f, self.fc(self.pool(f).flatten(1)))


@dataclasses.dataclass
class DataOut:
    logits: torch.Tensor
    features: torch.Tensor


class DataNet(Net):
    def forward(self, x: torch.Tensor) -> Any:
        f = self.features(x)
        return DataOut(self.fc(self.pool(f).flatten(1)), f)


class TwoHeads(Net):
    """Two [N, classes] outputs: which one is the class target has to be said."""

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.fc(self.pool(self.features(x)).flatten(1))
        return {"main": logits, "aux": -logits}


def seeded(net: Net, seed: int = 0) -> Net:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


class SaveFeatures:
    """fast.ai's pattern (and what Lucent's render_vis leaves on every module): a hook
    object that keeps the layer's last output, autograd history and all."""

    def __init__(self, module: nn.Module) -> None:
        self.features: torch.Tensor | None = None
        self.calls = 0
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, inp: Any, out: torch.Tensor) -> None:
        self.features = out
        self.calls += 1


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls += 1


def add_user_hooks(net: nn.Module) -> dict[str, Any]:
    """Every kind of hook a user may have on a model, left holding autograd history."""
    hooks: dict[str, Any] = {"conv2": SaveFeatures(net.conv2), "fc": SaveFeatures(net.fc)}
    pre, with_kwargs, always = Counter(), Counter(), Counter()
    net.conv1.register_forward_pre_hook(pre)
    net.bn2.register_forward_hook(with_kwargs, with_kwargs=True)
    net.relu2.register_forward_hook(always, always_call=True)
    hooks.update(pre=pre, with_kwargs=with_kwargs, always=always)
    training = net.training  # (no BatchNorm statistics updated)
    net.eval()(torch.rand(2, 3, SIZE, SIZE, requires_grad=True))  # the hooks now hold a graph
    net.train(training)
    assert hooks["fc"].features.grad_fn is not None
    return hooks


# ---------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    model: nn.Module
    ref: nn.Module  # the plain eager float32 model that gives the same numbers
    x: torch.Tensor  # the form's input
    x_ref: torch.Tensor  # the reference's input
    mean: tuple[float, ...]
    std: tuple[float, ...]
    output: Any = None  # output= for class targets
    tol: float = 1e-5
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # function -> message
    class_objective: bool = False  # render "output:1" (the output is not one tensor)
    hooks: dict[str, Any] | None = None
    image: torch.Tensor | None = None  # classify's [C, H, W] image in [0, 1]
    image_ref: torch.Tensor | None = None
    mean_ref: tuple[float, ...] = (0.4, 0.5, 0.6)  # the reference's normalisation
    std_ref: tuple[float, ...] = (0.25, 0.3, 0.2)
    # render optimises images of the model's channels, which no RGB reference can match:
    # they must have those channels and raise the objective
    own_render: bool = False


MEAN3, STD3 = (0.4, 0.5, 0.6), (0.25, 0.3, 0.2)


def _x(c: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(c, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _img(c: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.rand(c, 20, 24, generator=torch.Generator().manual_seed(seed))


def _plain(cls: type[Net] = Net, **kw: Any) -> Case:
    return Case(seeded(cls()), seeded(Net()), _x(), _x(), MEAN3, STD3, **kw)


NO_HOOKS = "needs forward hooks, which a TorchScript module"


def _scripted(how: str) -> Case:
    net = seeded(Net()).eval()  # a trace bakes in the mode it was traced in
    mod = torch.jit.script(net) if how == "script" else torch.jit.trace(net, _x()[None])
    return Case(
        mod,
        seeded(Net()),
        _x(),
        _x(),
        MEAN3,
        STD3,
        errors={"capture": NO_HOOKS, "occlude": NO_HOOKS, "render": NO_HOOKS},
    )


def _one_channel() -> Case:
    # A greyscale net equals an RGB net whose first filters are a third of it on each
    # channel, fed the grey image on all three.
    net = seeded(Net(in_channels=1))
    ref = seeded(Net())
    with torch.no_grad():
        ref.load_state_dict(
            {k: v for k, v in net.state_dict().items() if k != "conv1.weight"}, strict=False
        )
        ref.conv1.weight.copy_(net.conv1.weight.expand(-1, 3, -1, -1) / 3)
    x, rgb = _x(1), _img(3)  # classify makes an RGB image grey for a greyscale bundle
    grey = convlens.images.to_grayscale(rgb).expand(3, -1, -1).clone()
    return Case(net, ref, x, x.expand(3, -1, -1).clone(), (0.45,), (0.25,),
                image=rgb, image_ref=grey, mean_ref=(0.45,) * 3, std_ref=(0.25,) * 3,
                own_render=True)  # fmt: skip


def _four_channels() -> Case:
    # A 4-channel net whose 4th input channel has zero weights equals the RGB net.
    net = seeded(Net(in_channels=4))
    with torch.no_grad():
        net.conv1.weight[:, 3] = 0
    ref = seeded(Net())
    with torch.no_grad():
        ref.load_state_dict(
            {k: v for k, v in net.state_dict().items() if k != "conv1.weight"}, strict=False
        )
        ref.conv1.weight.copy_(net.conv1.weight[:, :3])
    x, img = _x(4), _img(4)
    return Case(net, ref, x, x[:3].clone(), (*MEAN3, 0.5), (*STD3, 0.3),
                image=img, image_ref=img[:3].clone(), own_render=True)  # fmt: skip


def _with_hooks() -> Case:
    case = _plain()
    case.hooks = add_user_hooks(case.model)
    return case


#: Every run of compiled code (whichever model compiled it: dynamo may reuse the code
#: of another instance of the same class). Convlens must run the original module.
COMPILED_RUNS: list[int] = []


def counting_backend(gm: torch.fx.GraphModule, inputs: Any) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        COMPILED_RUNS.append(1)
        return gm.forward(*args)

    return run


def _compiled(wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> Case:
    return dataclasses.replace(
        _plain(), model=torch.compile(wrap(seeded(Net())), backend=counting_backend)
    )


FORMS: dict[str, Callable[[], Case]] = {
    "eager": _plain,
    "compiled": _compiled,
    "compiled DataParallel": lambda: _compiled(nn.DataParallel),
    "script": lambda: _scripted("script"),
    "trace": lambda: _scripted("trace"),
    "bfloat16": lambda: dataclasses.replace(
        _plain(), model=seeded(Net()).to(torch.bfloat16), tol=HALF_TOL
    ),
    "user hooks": _with_hooks,
    "dict output": lambda: _plain(DictNet, class_objective=True),
    "tuple output": lambda: _plain(TupleNet, class_objective=True),
    "list output": lambda: _plain(ListNet, class_objective=True),
    "namedtuple output": lambda: _plain(NamedNet, class_objective=True, output="logits"),
    "dataclass output": lambda: _plain(DataNet, class_objective=True),
    "two heads, output='main'": lambda: _plain(TwoHeads, class_objective=True, output="main"),
    "two heads, no output=": lambda: _plain(
        TwoHeads,
        class_objective=True,
        errors={
            "sensitivity": "returns a dict {'main': [1, 5], 'aux': [1, 5]} (2 2-d tensors): "
            "choose one with output=KEY",
            "classify": "choose one with output=KEY",
            "render": "choose one with output=KEY",
        },
    ),
    "1 channel": _one_channel,
    "4 channels": _four_channels,
}


# ---------------------------------------------------------------------------- state


def _hook_tables(m: nn.Module) -> tuple[Any, ...]:
    names = [n for n in vars(m) if "hooks" in n and isinstance(vars(m)[n], dict)]
    return tuple((n, tuple((k, id(v)) for k, v in vars(m)[n].items())) for n in sorted(names))


def original(model: nn.Module) -> nn.Module:
    """The user's module inside torch.compile / DataParallel (independent of convlens's
    unwrap, which is under test)."""
    while hasattr(model, "_orig_mod") or isinstance(model, nn.DataParallel):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def state_of(model: nn.Module) -> dict[str, Any]:
    """Everything a call must leave as it was: every module's hooks (the same objects,
    in the same order), training flags and every parameter's requires_grad."""
    net = original(model)
    modules = list(net.modules())
    return {
        "hooks": []
        if isinstance(net, torch.jit.ScriptModule)
        else [_hook_tables(m) for m in modules],
        "training": [m.training for m in modules],
        "requires_grad": [p.requires_grad for p in net.parameters()],
    }


def prepare(model: nn.Module) -> None:
    """A state worth restoring: training mode except one BatchNorm, one frozen weight."""
    net = original(model)
    net.train()
    dict(net.named_modules())["bn1"].eval()
    next(iter(net.parameters())).requires_grad_(False)


# ---------------------------------------------------------------------------- calls


def bundle_of(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> ModelBundle:
    pre = Preprocess(resize=SIZE, crop=SIZE, mean=mean, std=std)
    return ModelBundle(model=model, name="net", arch="net", preprocess=pre, pretrained=True)


def run_capture(model: nn.Module, case: Case, ref: bool) -> Any:
    return convlens.capture(model, case.x_ref if ref else case.x, ["conv1", "bn2", "fc"])


def run_occlude(model: nn.Module, case: Case, ref: bool) -> Any:
    mean, std = (case.mean_ref, case.std_ref) if ref else (case.mean, case.std)
    r = convlens.occlude(model, case.x_ref if ref else case.x, BOX, ["bn1", "relu2"],
                         fill="black", mean=mean, std=std)  # fmt: skip
    diffs = [r.layers[k].diff for k in r.layers]
    return {"diff": diffs, "inside": list(r.inside_fraction.values()),
            "settings": r.settings}  # fmt: skip


def run_sensitivity(model: nn.Module, case: Case, ref: bool) -> Any:
    mean, std = (case.mean_ref, case.std_ref) if ref else (case.mean, case.std)
    r = convlens.sensitivity(model, case.x_ref if ref else case.x, CLASS, window=8, stride=4,
                             fill="black", mean=mean, std=std, progress=False,
                             output=None if ref else case.output)  # fmt: skip
    return {"map": r.map, "score": torch.tensor(r.score), "settings": r.settings}


def run_render(model: nn.Module, case: Case, ref: bool) -> Any:
    objective = f"output:{CLASS}" if case.class_objective else "bn2:0"
    r = render(model, objective, size=SIZE, steps=6, transforms="none", thresholds=(1,),
               preprocess=None, progress=False, output=None if ref else case.output)  # fmt: skip
    return {"images": r.images, "values": r.values, "settings": r.settings}


def run_classify(model: nn.Module, case: Case, ref: bool) -> Any:
    image = (case.image_ref if ref else case.image) if case.image is not None else _img()
    mean, std = (case.mean_ref, case.std_ref) if ref else (case.mean, case.std)
    if len(mean) == 1 and ref is False:
        assert image.shape[0] == 3  # a greyscale bundle takes RGB and makes it grey
    preds = convlens.classify(bundle_of(model, mean, std), image, k=3,
                              output=None if ref else case.output)  # fmt: skip
    return {"index": [p.index for p in preds], "p": torch.tensor([p.probability for p in preds])}


def run_list_layers(model: nn.Module, case: Case, ref: bool) -> Any:
    c = (case.x_ref if ref else case.x).shape[0]
    infos = convlens.list_layers(model, (1, c, SIZE, SIZE))
    out: dict[str, Any] = {"names": [(i.name, i.type) for i in infos]}
    if all(i.measured for i in infos):  # a TorchScript module's are names only
        out["shapes"] = [(i.output_shape, i.calls) for i in infos]
    return out


CALLS: dict[str, Callable[[nn.Module, Case, bool], Any]] = {
    "capture": run_capture,
    "occlude": run_occlude,
    "sensitivity": run_sensitivity,
    "render": run_render,
    "classify": run_classify,
    "list_layers": run_list_layers,
}


def assert_same(got: Any, want: Any, tol: float, where: str = "") -> None:
    if isinstance(want, dict):
        for k in want:
            if k != "settings":
                assert k in got, f"{where}: no {k!r}"
                assert_same(got[k], want[k], tol, f"{where}.{k}")
    elif isinstance(want, (list, tuple)) and not isinstance(want, str):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, tol, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        g, w = got.float(), want.float()
        assert g.shape == w.shape, where
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * scale, msg=where)
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=tol, abs_tol=tol) or (got != got and want != want)
    else:
        assert got == want, where


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_gives_the_eager_models_numbers_or_one_line(form: str, call: str) -> None:
    case = FORMS[form]()
    prepare(case.model)
    before = state_of(case.model)
    compiled_runs = len(COMPILED_RUNS)
    expected_error = case.errors.get(call)
    if expected_error is not None:
        with pytest.raises((ConvlensError, ValueError)) as info:
            CALLS[call](case.model, case, False)
        message = str(info.value)
        assert "\n" not in message and expected_error in message
        if form.startswith(("script", "trace")):
            assert "pass the eager nn.Module" in message
    elif call == "render" and case.own_render:
        got = CALLS[call](case.model, case, False)
        c = case.x.shape[0]
        assert got["images"].shape == (1, c, SIZE, SIZE) and got["settings"]["channels"] == c
        assert float(got["values"][-1, 0]) > float(got["values"][0, 0])
    else:
        got = CALLS[call](case.model, case, False)
        want = CALLS[call](case.ref, case, True)
        if form.startswith(("script", "trace")) and call == "list_layers":
            assert "shapes" not in got  # no hooks, so no shapes: listed by name and type
            del want["shapes"]
        assert_same(got, want, case.tol, call)
        if form == "bfloat16" and call in ("occlude", "sensitivity", "render"):
            assert got["settings"]["dtype"] == "bfloat16"
    # hooks, training flags, requires_grad: exactly as before, also after an error
    assert state_of(case.model) == before
    # a compiled model runs as its original module: no compiled code ran
    assert len(COMPILED_RUNS) == compiled_runs
    if case.hooks is not None:
        for h in ("conv2", "fc"):
            feats = case.hooks[h].features  # never a meta tensor or an fx proxy
            assert isinstance(feats, torch.Tensor) and feats.device.type == "cpu"


# ---------------------------------------------------------------------------- forms


def test_scripted_models_take_class_objectives_and_classify():
    case = FORMS["script"]()
    got = render(case.model, "output:1", size=SIZE, steps=4, transforms="none",
                 preprocess=None, progress=False,
                 precision="float32")  # fmt: skip
    want = render(case.ref, "output:1", size=SIZE, steps=4, transforms="none",
                  preprocess=None, progress=False,
                  precision="float32")  # fmt: skip
    torch.testing.assert_close(got.images, want.images, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="TorchScript module cannot be traced"):
        r = convlens.sensitivity(case.model, case.x, 1, window=8, stride=4, progress=False)
    assert r.method == "naive"
    with pytest.raises(ConvlensError, match="redirect_relu"):
        render(case.model, "output:1", size=SIZE, steps=1, redirect_relu=1, progress=False)


def test_unwrap_reaches_the_original_module_through_any_nesting():
    net = seeded(Net()).eval()
    compiled = torch.compile(net)  # the default backend (inductor), as a user compiles
    assert unwrap(compiled) is net
    x = _x()
    torch.testing.assert_close(
        convlens.capture(compiled, x, ["bn2"])["bn2"], convlens.capture(net, x, ["bn2"])["bn2"]
    )
    assert unwrap(nn.DataParallel(torch.compile(net))) is net
    assert unwrap(torch.compile(nn.DataParallel(net))) is net
    names = [i.name for i in convlens.list_layers(torch.compile(net), (1, 3, SIZE, SIZE))]
    assert names[:2] == ["conv1", "bn1"] and not any("_orig_mod" in n for n in names)


class FFTNet(nn.Module):
    """A global-filter layer (FFT): torch has no CPU bfloat16 kernel for it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.fft.rfft2(self.conv(x)).abs()
        return self.fc(y.mean((2, 3)))


def test_a_dtype_without_a_kernel_is_one_line():
    net = FFTNet().to(torch.bfloat16)
    with pytest.raises(ConvlensError) as info:
        convlens.capture(net, torch.rand(3, 12, 12), ["fc"])
    msg = str(info.value)
    assert "\n" not in msg and "no cpu kernel for bfloat16" in msg and "model.float()" in msg
    with pytest.raises(ConvlensError, match="no cpu kernel for bfloat16"):
        convlens.classify(bundle_of(net, MEAN3, STD3), torch.rand(3, 12, 12))
    with pytest.raises(ConvlensError, match="no cpu kernel for bfloat16"):
        render(net, "output:0", size=12, steps=1, progress=False)
    assert all(not m._forward_hooks for m in net.modules())
    convlens.capture(net.float(), torch.rand(3, 12, 12), ["fc"])  # the fix works


def test_render_keeps_its_parameters_in_float32_for_a_bfloat16_model():
    net = seeded(Net()).to(torch.bfloat16)
    seen: list[torch.dtype] = []
    net.conv1.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].dtype))
    r = render(net, "bn2:0", size=SIZE, steps=3, progress=False)
    assert r.images.dtype == torch.float32 and r.values.dtype == torch.float32
    assert r.settings["dtype"] == "bfloat16" and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())


# ---------------------------------------------------------------------------- outputs


def test_select_output_names_what_the_model_returns():
    logits, feats = torch.zeros(2, 5), torch.zeros(2, 8, 4, 4)
    assert select_output({"features": feats, "logits": logits})[1] == "logits"
    assert select_output((feats, logits))[1] == 1
    assert select_output((feats, logits), "1")[1] == 1  # as the CLI gives it
    assert select_output(NamedOut(feats, logits), 1)[1] == "logits"
    assert select_output(DataOut(logits, feats), "logits")[0] is logits
    with pytest.raises(ValueError, match=r"a tuple \(0: \[2, 5\], 1: \[2, 5\]\).*output=KEY"):
        select_output((logits, logits))
    with pytest.raises(ValueError, match=r"output='probs' is not in .*'logits'"):
        select_output({"logits": logits}, "probs")
    with pytest.raises(ValueError, match="returns one tensor"):
        select_output(logits, "logits")
    with pytest.raises(TypeError, match="not a tensor, dict"):
        select_output("text")


def test_incremental_sensitivity_reads_the_named_entry_of_a_dict_output():
    model = seeded(DictNet())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # incremental: no fallback, no warning
        r = convlens.sensitivity(model, _x(), CLASS, window=8, stride=4, progress=False)
    assert r.method == "incremental" and r.settings["output"] == "logits"
    naive = convlens.sensitivity(model, _x(), CLASS, window=8, stride=4, method="naive",
                                 progress=False)  # fmt: skip
    torch.testing.assert_close(r.map, naive.map, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- hooks


def test_folding_a_model_whose_hooks_hold_autograd_history():
    net = seeded(Net()).eval()
    hooks = add_user_hooks(net)
    before = state_of(net)
    folded, n = fold_batchnorm(net, torch.rand(1, 3, SIZE, SIZE))
    assert n == 2 and state_of(net) == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in folded.modules())
    x = torch.rand(2, 3, SIZE, SIZE)
    calls = hooks["fc"].calls
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
    assert hooks["fc"].calls == calls + 1  # the user's model ran its hook; the copy did not
    r = render(net, "bn2:0", size=SIZE, steps=3, progress=False)
    assert r.settings["folded_batchnorms"] == 2 and state_of(net) == before


def test_structural_copy_shares_weights_and_nothing_else():
    net = seeded(Net())
    hooks = add_user_hooks(net)
    net.conv2.last = hooks["conv2"].features  # state of the user's own, with a graph
    twin = structural_copy(net)
    assert twin.conv1.weight.data_ptr() == net.conv1.weight.data_ptr()
    assert twin.conv1.weight is not net.conv1.weight and not twin.conv1.weight.requires_grad
    assert net.conv1.weight.requires_grad
    assert twin.conv2.last.grad_fn is None and net.conv2.last.grad_fn is not None
    twin.eval()
    assert net.training and not twin.training
    assert net.conv2._forward_hooks and not twin.conv2._forward_hooks


def test_user_hooks_run_in_real_forwards_and_never_see_probes():
    net = seeded(Net()).eval()
    hooks = add_user_hooks(net)
    kept = hooks["fc"].features
    pre = hooks["pre"].calls
    # stop_early traces the calls on the meta device first: fc's hook must not see it
    convlens.capture(net, _x(), ["conv1"])
    assert hooks["fc"].features is kept and hooks["pre"].calls == pre + 1
    shapes: list[tuple[int, ...]] = []
    net.conv2.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    r = convlens.sensitivity(net, _x(), CLASS, window=8, stride=4, progress=False)
    assert r.method == "incremental"
    assert shapes and all(s[1:] == (8, SIZE // 2, SIZE // 2) for s in shapes)  # no patches
    with hooks_aside(net):
        assert not net.conv2._forward_hooks
    assert len(net.conv2._forward_hooks) == 2


class Blocky(nn.Module):
    """A hook on a container: torch.fx calls containers (not leaves) while it traces."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean((2, 3)))


def test_incremental_sensitivity_keeps_fx_proxies_from_the_users_hooks():
    net = Blocky().eval()
    seen: list[Any] = []
    net.block.register_forward_hook(lambda m, i, o: seen.append(o.abs().max()))
    r = convlens.sensitivity(net, _x(), 1, window=8, stride=4, progress=False)
    assert r.method == "incremental"
    # the user's hook ran in the real forward only, on real tensors (never an fx Proxy)
    assert seen and all(isinstance(v, torch.Tensor) for v in seen)
    naive = convlens.sensitivity(net, _x(), 1, window=8, stride=4, method="naive",
                                 progress=False)  # fmt: skip
    torch.testing.assert_close(r.map, naive.map, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- channels


@pytest.mark.parametrize("channels", [1, 4])
def test_render_makes_images_of_the_models_channels_that_raise_the_objective(channels):
    net = seeded(Net(in_channels=channels)).eval()
    r = render(net, "bn2:0-1", size=SIZE, steps=12, thresholds=(1,), progress=False)
    assert r.images.shape == (2, channels, SIZE, SIZE)
    assert (r.values[-1] > r.values[0]).all()
    assert r.settings["channels"] == channels and r.settings["decorrelate"] is False
    bundle = bundle_of(net, (0.5,) * channels, (0.25,) * channels)
    b = render(bundle, "bn2:0", steps=2, progress=False)
    assert b.images.shape[1] == channels


def test_a_32px_network_renders_at_32px():
    net = seeded(Net()).eval()
    small = ModelBundle(net, "cifar", "net", Preprocess(resize=32, crop=32))
    r = render(small, "bn2:0", steps=1, progress=False)
    assert r.images.shape[-2:] == (32, 32) and r.settings["upsample_to"] is None
    big = ModelBundle(net, "big", "net", Preprocess(resize=256, crop=224))
    assert render(big, "bn2:0", steps=1, progress=False).settings["size"] == [128, 128]
    assert render(net, "bn2:0", steps=1, progress=False).settings["size"] == [128, 128]


def test_fills_work_per_channel_on_one_and_four_channels():
    for c in (1, 4):
        x = torch.zeros(c, 8, 8)
        mean, std = tuple(0.1 * (i + 1) for i in range(c)), (0.5,) * c
        out = convlens.analysis.occlusion.apply_fill(x, (0, 4, 0, 4), "black", mean=mean, std=std)
        for i in range(c):
            assert torch.allclose(out[i, :4, :4], torch.tensor(-mean[i] / 0.5))
        assert float(out[:, 4:].abs().max()) == 0
    net = seeded(Net(in_channels=1)).eval()
    with pytest.raises(ValueError, match="needs its normalisation"):
        convlens.occlude(net, _x(1), BOX, ["bn1"], fill="black")
    with pytest.raises(ValueError, match="3 and 3 values but the input has 1 channel"):
        convlens.occlude(net, _x(1), BOX, ["bn1"], mean=MEAN3, std=STD3)
    r = convlens.occlude(net, _x(1), BOX, ["bn1"], fill="mean")
    assert r.display_images()[0].shape == (1, SIZE, SIZE)


def test_load_image_and_preprocess_give_one_channel(tmp_path):
    from PIL import Image

    rgb = Image.new("RGB", (10, 8), (200, 100, 50))
    grey = convlens.load_image(rgb, channels=1)
    assert grey.shape == (1, 8, 10)
    want = (rgb.convert("L").getpixel((0, 0))) / 255
    assert abs(float(grey[0, 0, 0]) - want) < 1 / 255
    assert convlens.load_image(rgb).shape == (3, 8, 10)  # the default stays RGB
    path = tmp_path / "l.png"
    Image.new("L", (6, 5), 77).save(path)
    assert torch.equal(convlens.load_image(path, channels=1), torch.full((1, 5, 6), 77 / 255))
    with pytest.raises(ValueError, match="channels is 3"):
        convlens.load_image(rgb, channels=2)
    pre = Preprocess(resize=8, crop=8, mean=(0.5,), std=(0.5,))
    assert pre.channels == 1 and pre(rgb).shape == (1, 8, 8)
    assert pre(torch.rand(3, 9, 9)).shape == (1, 8, 8)


def test_a_greyscale_checkpoint_loads_with_one_channel_preprocessing(tmp_path):
    torch.save(convlens.SimpleCNN(num_classes=4, in_channels=1).state_dict(), tmp_path / "m.pt")
    bundle = convlens.load_model(tmp_path / "m.pt", arch="simple_cnn")
    assert bundle.model.conv1.in_channels == 1 and bundle.preprocess.channels == 1
    assert "1-channel input" in bundle.info["note"]
    x = bundle.preprocess(convlens.sample_image())
    assert x.shape == (1, 128, 128)
    assert len(convlens.classify(bundle, convlens.sample_image(), k=2)) == 2
    r = render(bundle, "bn3:0", size=32, steps=1, progress=False)
    assert r.images.shape[1] == 1
    from _cli import run

    res = run("layers", str(tmp_path / "m.pt"), "--arch", "simple_cnn", "--input-size", "32")
    assert res.exit_code == 0, res.output
    assert "input 1x1x32x32" in res.output and "1x16x32x32" in res.output


# ---------------------------------------------------------------------------- figures


def test_figures_show_one_channel_grey_and_four_as_rgb():
    import convlens.plot as cplot
    from convlens.analysis.featurevis import RenderResult

    for c, ndim in ((1, 2), (4, 3)):
        images = torch.rand(2, c, 8, 8)
        res = RenderResult(images=images, values=torch.zeros(1, 2), thresholds=(1,),
                           snapshots=images[None], times=(0.0,), trace=torch.zeros(1, 2),
                           objective="bn2:0-1", labels=["a", "b"])  # fmt: skip
        fig = cplot.feature_vis(res)
        shown = [ax.images[0] for ax in fig.axes if ax.images]
        assert len(shown) == 2 and all(im.get_array().ndim == ndim for im in shown)
        if c == 1:
            assert all(im.get_cmap().name == "gray" for im in shown)
    net = seeded(Net(in_channels=1)).eval()
    fig = cplot.occlusion(convlens.occlude(net, _x(1), BOX, ["bn1"], mean=(0.5,), std=(0.2,)))
    assert fig.axes[0].images[0].get_cmap().name == "gray"


# ---------------------------------------------------------------------------- CLI


def test_cli_output_option(monkeypatch, tmp_path):
    import convlens.models
    from _cli import run

    model = seeded(TwoHeads()).eval()

    def fake_load(*args: Any, **kwargs: Any) -> ModelBundle:
        return bundle_of(model, (0.5,) * 3, (0.25,) * 3)

    monkeypatch.setattr(convlens.models, "load_model", fake_load)
    r = run("classify", "--model", "simple_cnn", "--out", str(tmp_path))
    assert (
        r.exit_code == 2
        and "choose one with output=KEY (on the command line --output KEY)" in r.stderr
    )
    r = run("classify", "--model", "simple_cnn", "--output", "aux", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    r = run("sensitivity", "--model", "simple_cnn", "--output", "main", "--window", "8",
            "--stride", "8", "--quiet", "--out", str(tmp_path))  # fmt: skip
    assert r.exit_code == 0, r.output
    r = run("visualize", "--model", "simple_cnn", "--objective", "output:1", "--output", "main",
            "--steps", "1", "--size", "16", "--quiet", "--out", str(tmp_path))  # fmt: skip
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.usefixtures("exact_cuda")
def test_float16_on_cuda_matches_float32():
    ref = seeded(Net()).eval()
    half = seeded(Net()).eval().cuda().half()
    x = _x()
    got = convlens.capture(half, x, ["bn2", "fc"])
    want = convlens.capture(ref, x, ["bn2", "fc"])
    for k in want:
        assert got[k].dtype == torch.float16
        torch.testing.assert_close(got[k].float(), want[k], rtol=1e-2, atol=1e-2)
    o = convlens.occlude(half, x, BOX, ["bn2"], mean=MEAN3, std=STD3, fill="black")
    oref = convlens.occlude(ref, x, BOX, ["bn2"], mean=MEAN3, std=STD3, fill="black")
    torch.testing.assert_close(o.layers["bn2"].diff, oref.layers["bn2"].diff, rtol=2e-2, atol=2e-2)
    assert o.settings["dtype"] == "float16"
    s = convlens.sensitivity(half, x, CLASS, window=8, stride=4, progress=False)
    sref = convlens.sensitivity(ref, x, CLASS, window=8, stride=4, progress=False)
    torch.testing.assert_close(s.map, sref.map, rtol=5e-2, atol=5e-2)
    r = render(half, "bn2:0", size=SIZE, steps=6, transforms="none", progress=False)
    rref = render(ref, "bn2:0", size=SIZE, steps=6, transforms="none", progress=False)
    assert r.settings["dtype"] == "float16"
    torch.testing.assert_close(r.images, rref.images, rtol=5e-2, atol=5e-2)
    p = convlens.classify(bundle_of(half, MEAN3, STD3), _img(), k=3)
    pref = convlens.classify(bundle_of(ref, MEAN3, STD3), _img(), k=3)
    assert [a.index for a in p] == [b.index for b in pref]
