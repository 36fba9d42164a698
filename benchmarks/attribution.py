"""Attribution on resnet18: convlens's ``attribute`` vs Captum and pytorch-grad-cam, side by side.

resnet18 (random init, seed 0, eval; ``convlens.load_model("resnet18", weights=None)``,
its BatchNorms given random statistics so that it is not positively homogeneous),
8 images of 224 px (crops of the bundled sample photo at 8 offsets, every other one
flipped, resnet18's normalisation), each image's own top-1 class as the target, the CAM
family on ``layer4``. Pairs, each convlens method against the tool's own call:

- Captum 0.9.0: ``Saliency`` (``abs=False``, the signed gradient), ``IntegratedGradients``
  (Gauss-Legendre, ``n_steps=50``, zero baseline) at its default ``internal_batch_size``
  (all 400 rows in one batch) and at the best one of a small sweep, ``GuidedBackprop``,
  ``LayerGradCam`` (``relu_attributions=False``: signed, at the layer's resolution).
  These are unscaled, as convlens's default is: agreement = max |diff|.
- pytorch-grad-cam 1.5.7: ``GradCAM``, ``GradCAMPlusPlus``, ``LayerCAM``, ``ScoreCAM``
  (its default batch of 16 masked images). Its maps are clipped at 0 and min-max scaled
  per image, bilinearly resized with OpenCV: agreement = Spearman rank correlation with
  convlens's ``normalize=True`` map (per image; the mean and the minimum over images),
  and the max |diff| of the two [0, 1] maps.
  Where this CPU runs bfloat16 in hardware (AVX-512 BF16 or AMX), Score-CAM is also
  timed with ``precision="auto"`` (its masked forwards under bfloat16 autocast) against
  the same pytorch-grad-cam call, its agreement measured the same way.

Also: integrated gradients at equal delta (each tool at the fewest steps, of a grid, that
bring every image's completeness error ``|sum(attr) - (f(x) - f(0))|`` to at most Captum's
at 50 steps, relative to ``|f(x) - f(0)|``), both tools' deltas; Grad-CAM against one plain
forward plus backward of the model (``loss.backward()``, weight gradients included, as
training does; and to the input only); Score-CAM against pytorch-grad-cam's.

Timing: every method runs once as a warm-up (its output gives the agreement numbers), then
once per round (a call under a second several times, up to ``--max-repeat``), methods
interleaved round by round so drift and other load hit all alike. Speed-up = baseline /
convlens (> 1: convlens is faster), from the median wall time, the fastest wall time, and
the median CPU time (user + system, all threads) of the calls: on a shared machine other
processes only ever slow a call down, so the fastest call and the CPU time are the steadier
figures there (the load average is recorded at the start, after each round and at the end).
Memory: each call's peak resident set size above the resident size just before it
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each call), in this process.
Captum's default ``internal_batch_size`` puts all ``N x steps`` rows through the model at
once; its peak is predicted from the sweep (linear in rows) and the call is skipped, with
the reason printed, when it would go over ``--memory-cap-gib``; then Captum's default is
also timed on the largest number of images that fits, against convlens on the same images.

The anchors live only in the benchmark environment (never convlens dependencies):

    bash benchmarks/setup_lucent_env.sh
    .venv-bench/bin/python benchmarks/attribution.py [--rounds 3] [--quick]
    .venv-bench/bin/python benchmarks/attribution.py --profile scorecam   # where time goes
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's ScoreCAM bar, per image

import argparse
import copy
import cProfile
import io
import pstats
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import convlens
from _machine import cpu_name
from convlens._io import versions, write_json
from convlens.device import resolve_precision
from convlens.models.forms import dtype_name

warnings.filterwarnings("ignore", category=UserWarning, module="captum")
warnings.filterwarnings("ignore", category=FutureWarning)

LAYER = "layer4"
#: Two deltas within 1% of each other count as equal (the tools sum in different precisions).
DELTA_RTOL = 0.01
Fn = Callable[[], Any]


# ----------------------------------------------------------------------------- set-up


def _setup(n: int) -> tuple[convlens.ModelBundle, nn.Module, torch.Tensor, list[int]]:
    """The model, ``n`` normalised 224 px images and each image's top-1 class."""
    torch.manual_seed(0)
    bundle = convlens.load_model("resnet18", weights=None, progress=False)
    model = bundle.model.eval()
    # A freshly initialised resnet18 is positively homogeneous (no conv bias, BatchNorms at
    # weight 1, bias 0, mean 0, var 1), so f(a x) = a f(x) up to the fc bias: integrated
    # gradients from the zero baseline would be exact at any number of steps. Random
    # BatchNorm statistics and affines (seeded) make it as non-linear as a trained one.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                k = mod.num_features
                bn: Any = mod
                bn.running_mean.copy_(torch.randn(k, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(k, generator=gen) * 0.5 + 0.75)
                bn.weight.copy_(torch.rand(k, generator=gen) * 0.5 + 0.75)
                bn.bias.copy_(torch.randn(k, generator=gen) * 0.1)
    img = convlens.sample_image()  # [3, 600, 512] in [0, 1]
    img = F.interpolate(img[None], size=(300, 256), mode="bilinear", antialias=True)[0]
    crops = []
    for i in range(n):
        top, left = (i * 11) % 77, (i * 5) % 33
        c = img[:, top : top + 224, left : left + 224]
        crops.append(c.flip(-1) if i % 2 else c)
    mean, std = bundle.normalize
    x = (torch.stack(crops) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        targets = model(x).argmax(1).tolist()
    return bundle, model, x.contiguous(), targets


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _meminfo_mib(field: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/meminfo")


#: CPU seconds (user + system, all threads) of the last :func:`_measure` call.
LAST_CPU: list[float] = [0.0]


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure(fn: Fn) -> tuple[Any, float, float]:
    """Run ``fn`` once: (its result, seconds, peak resident MiB above the resident before);
    its CPU seconds (user + system) are left in ``LAST_CPU[0]``."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_mib("VmRSS")
    except OSError:
        before = float("nan")
    c = _cpu_s()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    LAST_CPU[0] = _cpu_s() - c
    extra = _status_mib("VmHWM") - before if before == before else float("nan")
    return out, seconds, extra


# ----------------------------------------------------------------------------- baselines


def _captum_saliency(model: nn.Module, x: torch.Tensor, t: list[int]) -> torch.Tensor:
    from captum.attr import Saliency

    return Saliency(model).attribute(x, target=t, abs=False).detach()


def _captum_ig(
    model: nn.Module, x: torch.Tensor, t: list[int], steps: int, ibs: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    from captum.attr import IntegratedGradients

    attr, delta = IntegratedGradients(model).attribute(
        x,
        baselines=torch.zeros_like(x),
        target=t,
        n_steps=steps,
        internal_batch_size=ibs,
        return_convergence_delta=True,
    )
    return attr.detach(), delta.detach()


def _captum_gbp(model: nn.Module, x: torch.Tensor, t: list[int]) -> torch.Tensor:
    from captum.attr import GuidedBackprop

    return GuidedBackprop(model).attribute(x, target=t).detach()


def _captum_gradcam(model: nn.Module, x: torch.Tensor, t: list[int]) -> torch.Tensor:
    from captum.attr import LayerGradCam

    m: Any = model
    out = LayerGradCam(model, m.layer4).attribute(x, target=t, relu_attributions=False)
    return out.detach()[:, 0]  # [N, h, w]


def _pgc(
    name: str, model: nn.Module, x: torch.Tensor, t: list[int], batch: int | None = None
) -> torch.Tensor:
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = {
        "GradCAM": pgc.GradCAM,
        "GradCAMPlusPlus": pgc.GradCAMPlusPlus,
        "LayerCAM": pgc.LayerCAM,
        "ScoreCAM": pgc.ScoreCAM,
    }[name]
    m: Any = model
    try:
        with cls(model=model, target_layers=[m.layer4[-1]]) as cam:
            if batch is not None:
                cam.batch_size = batch
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in t])
    finally:
        model.zero_grad(set_to_none=True)  # it leaves weight gradients behind
    return torch.from_numpy(out)


def _floor_fwd_bwd(model: nn.Module, x: torch.Tensor, t: list[int]) -> None:
    """One plain forward plus ``loss.backward()`` (weight gradients included)."""
    out = model(x)
    out.gather(1, torch.tensor(t)[:, None]).sum().backward()
    model.zero_grad(set_to_none=True)


def _floor_input_grad(model: nn.Module, x: torch.Tensor, t: list[int]) -> None:
    """One forward plus the backward to the input only (weights frozen)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        torch.autograd.grad(out.gather(1, torch.tensor(t)[:, None]).sum(), xi)
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def _floor_forward(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


# ----------------------------------------------------------------------------- convlens


def _convlens(bundle: Any, x: torch.Tensor, t: list[int], method: str, **kw: Any) -> Any:
    return convlens.attribute(bundle, x, t, method=method, **kw)


def _bind(fn: Callable[..., Any], *args: Any, **kw: Any) -> Fn:
    """``fn`` with its arguments, called with none."""
    return lambda: fn(*args, **kw)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Spearman rank correlation per image (average ranks for ties, as scipy does)."""
    from scipy.stats import spearmanr

    out = []
    for i in range(a.shape[0]):
        r = spearmanr(a[i].flatten().double().numpy(), b[i].flatten().double().numpy())[0]
        out.append(float(r))
    return out


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` over the whole batch."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def _rel_delta(delta: torch.Tensor, gap: torch.Tensor) -> float:
    """Largest |delta| over images, relative to |f(x) - f(baseline)|."""
    return float((delta.abs().double() / gap.abs().double().clamp_min(1e-12)).max())


# ----------------------------------------------------------------------------- profile


def _profile(bundle: Any, x: torch.Tensor, t: list[int], method: str, out: Path, kw: Any) -> None:
    """Where a convlens method's time goes: cProfile (Python) and torch.profiler (ops)."""
    from torch.profiler import ProfilerActivity, profile

    _convlens(bundle, x, t, method, **kw)  # warm-up
    pr = cProfile.Profile()
    pr.enable()
    t0 = time.perf_counter()
    _convlens(bundle, x, t, method, **kw)
    wall = time.perf_counter() - t0
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(40)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        _convlens(bundle, x, t, method, **kw)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    shapes = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=20
    )
    text = (
        f"convlens.attribute(method={method!r}, {kw}) on {tuple(x.shape)}: {wall:.3f} s "
        f"(under cProfile)\n\n== cProfile, cumulative\n{s.getvalue()}\n"
        f"== torch.profiler, self CPU time\n{table}\n== by input shape\n{shapes}\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"attribution_profile_{method}.txt"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="integrated gradients' steps")
    ap.add_argument(
        "--ibs", default="16,40,80,200", help="Captum internal_batch_size sweep (rows per batch)"
    )
    ap.add_argument(
        "--delta-grid",
        default="16,32,64,100",
        help="steps tried for integrated gradients at equal delta",
    )
    ap.add_argument(
        "--scorecam-rounds",
        type=int,
        default=2,
        help="timed rounds for the Score-CAM pair (each call is thousands of forwards)",
    )
    ap.add_argument("--memory-cap-gib", type=float, default=18.0)
    ap.add_argument(
        "--max-repeat", type=int, default=5, help="most calls of a cheap method per round"
    )
    ap.add_argument(
        "--no-f64", dest="f64", action="store_false", help="skip the float64 references"
    )
    ap.add_argument("--quick", action="store_true", help="1 image, 8 steps, 1 round: a smoke run")
    ap.add_argument("--baselines-only", action="store_true", help="time Captum/grad-cam only")
    ap.add_argument("--skip", default="", help="comma-separated pairs to leave out, e.g. scorecam")
    ap.add_argument("--profile", metavar="METHOD", help="profile one convlens method and exit")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.quick:
        args.images, args.steps, args.rounds = 1, 8, 1
        args.ibs, args.delta_grid = "2,4", "4,16"

    import captum
    import pytorch_grad_cam  # noqa: F401

    n, steps = args.images, args.steps
    bundle, model, x, t = _setup(n)
    if args.profile:
        kw: dict[str, Any] = {"layer": LAYER} if "cam" in args.profile else {}
        if args.profile == "integrated_gradients":
            kw["steps"] = steps
        _profile(bundle, x, t, args.profile, args.out, kw)
        return
    skip = set(filter(None, args.skip.split(",")))
    load_start = os.getloadavg()
    print(
        f"resnet18 (random init), {n}x3x224x224, targets {t}, CPU {cpu_name()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, captum "
        f"{captum.__version__}, grad-cam 1.5.7, load average {load_start[0]:.2f}"
    )
    with torch.no_grad():
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, torch.tensor(t)[:, None])[:, 0]

    # -- Captum IG: the internal_batch_size sweep (one call each), memory per row
    sweep: dict[int, dict[str, float]] = {}
    predicted_default = 0.0  # MiB Captum's default IG is expected to take (checked per call)
    sweep_out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if "ig" not in skip:
        for ibs in [int(v) for v in args.ibs.split(",")]:
            (a, d), sec, mib = _measure(_bind(_captum_ig, model, x, t, steps, ibs))
            n_rows = max(1, ibs // n) * n
            sweep[ibs] = {"seconds": sec, "peak_extra_mib": mib, "rows": n_rows}
            sweep_out[ibs] = (a, d)
            print(
                f"  captum IG internal_batch_size={ibs} ({n_rows} rows): {sec:.2f} s, +{mib:.0f} MiB"
            )
        best_ibs = min(sweep, key=lambda k: sweep[k]["seconds"])
        # linear fit of the peak in rows, for the default (all n * steps rows at once)
        rows_all = n * steps
        xs = np.array([v["rows"] for v in sweep.values()], dtype=float)
        ys = np.array([v["peak_extra_mib"] for v in sweep.values()], dtype=float)
        slope, icpt = np.polyfit(xs, ys, 1) if len(set(xs)) > 1 else (ys[0] / xs[0], 0.0)
        # conservative: the larger of the fit and the worst peak per row, times the rows
        predicted = float(max(icpt + slope * rows_all, float((ys / xs).max()) * rows_all))
        slope = max(float(slope), float((ys / xs).max()))
        headroom = min(
            args.memory_cap_gib * 1024 - _status_mib("VmRSS"),
            _meminfo_mib("MemAvailable") - 2048,  # others' memory on a shared machine
        )
        default_fits = predicted <= headroom
        predicted_default = predicted if default_fits and n > 1 else 0.0
        fit_images = max(1, min(n, int((headroom - icpt) / max(slope, 1e-9) // steps)))
        print(
            f"  captum IG default (internal_batch_size=None, {rows_all} rows at once): "
            f"predicted peak +{predicted / 1024:.1f} GiB ({slope:.1f} MiB per row) against "
            f"{headroom / 1024:.1f} GiB of headroom under the {args.memory_cap_gib:g} GiB cap: "
            + (
                "runs"
                if default_fits
                else f"SKIPPED at {n} images; timed on {fit_images} image(s) instead"
            )
        )

    # -- the methods, each a zero-argument call; pairs say who is compared with whom
    methods: dict[str, Fn] = {}
    pairs: list[dict[str, Any]] = []

    def pair(name: str, base: str, ours: str, how: str, **extra: Any) -> None:
        pairs.append({"pair": name, "baseline": base, "convlens": ours, "how": how, **extra})

    if "floor" not in skip:
        methods["plain forward (no_grad)"] = lambda: _floor_forward(model, x)
        methods["plain forward + loss.backward()"] = lambda: _floor_fwd_bwd(model, x, t)
        methods["plain forward + backward to the input"] = lambda: _floor_input_grad(model, x, t)
    if "saliency" not in skip:
        methods["captum Saliency(abs=False)"] = lambda: _captum_saliency(model, x, t)
        if not args.baselines_only:
            methods["convlens saliency"] = lambda: _convlens(bundle, x, t, "saliency")
        pair("saliency", "captum Saliency(abs=False)", "convlens saliency", "pixels")
    if "ig" not in skip:
        methods[f"captum IG ibs={best_ibs} (best)"] = lambda: _captum_ig(
            model, x, t, steps, best_ibs
        )
        if default_fits:
            methods["captum IG ibs=None (default)"] = lambda: _captum_ig(model, x, t, steps, None)
        else:
            xk, tk = x[:fit_images], t[:fit_images]
            methods[f"captum IG ibs=None (default), {fit_images} img"] = lambda: _captum_ig(
                model, xk, tk, steps, None
            )
            if not args.baselines_only:
                methods[f"convlens integrated_gradients, {fit_images} img"] = lambda: _convlens(
                    bundle, xk, tk, "integrated_gradients", steps=steps
                )
        if not args.baselines_only:
            methods["convlens integrated_gradients"] = lambda: _convlens(
                bundle, x, t, "integrated_gradients", steps=steps
            )
        pair(
            f"integrated gradients, {steps} steps vs best ibs",
            f"captum IG ibs={best_ibs} (best)",
            "convlens integrated_gradients",
            "ig",
        )
        if default_fits:
            pair(
                f"integrated gradients, {steps} steps vs default ibs",
                "captum IG ibs=None (default)",
                "convlens integrated_gradients",
                "ig",
            )
        else:
            pair(
                f"integrated gradients, {steps} steps vs default ibs ({fit_images} img)",
                f"captum IG ibs=None (default), {fit_images} img",
                f"convlens integrated_gradients, {fit_images} img",
                "ig",
            )
    if "gbp" not in skip:
        methods["captum GuidedBackprop"] = lambda: _captum_gbp(model, x, t)
        if not args.baselines_only:
            methods["convlens guided_backprop"] = lambda: _convlens(bundle, x, t, "guided_backprop")
        pair("guided backprop", "captum GuidedBackprop", "convlens guided_backprop", "pixels")
    cams = [
        ("gradcam", "GradCAM", "Grad-CAM"),
        ("gradcam_pp", "GradCAMPlusPlus", "Grad-CAM++"),
        ("layercam", "LayerCAM", "LayerCAM"),
        ("scorecam", "ScoreCAM", "Score-CAM"),
    ]
    if "gradcam" not in skip:
        methods["captum LayerGradCam"] = lambda: _captum_gradcam(model, x, t)
        if not args.baselines_only:
            methods["convlens gradcam"] = lambda: _convlens(bundle, x, t, "gradcam", layer=LAYER)
        pair("Grad-CAM (layer map)", "captum LayerGradCam", "convlens gradcam", "layer_map")
    for mine, theirs, label in cams:
        if mine in skip:
            continue
        methods[f"grad-cam {theirs}"] = _bind(_pgc, theirs, model, x, t)
        if not args.baselines_only:
            methods[f"convlens {mine} normalize=True"] = _bind(
                _convlens, bundle, x, t, mine, layer=LAYER, normalize=True
            )
        pair(label, f"grad-cam {theirs}", f"convlens {mine} normalize=True", "rank")
        auto = dtype_name(resolve_precision("auto", torch.device("cpu")))
        if mine == "scorecam" and auto != "float32" and not args.baselines_only:
            # the masked forwards under autocast where this CPU runs bfloat16 in hardware
            methods[f"convlens scorecam normalize=True precision=auto ({auto})"] = _bind(
                _convlens, bundle, x, t, mine, layer=LAYER, normalize=True, precision="auto"
            )
            pair(
                f"{label}, precision=auto ({auto})",
                f"grad-cam {theirs}",
                f"convlens scorecam normalize=True precision=auto ({auto})",
                "rank",
            )

    # -- warm-up, and the outputs for the agreement numbers
    outputs: dict[str, Any] = {}
    times: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    peak: dict[str, float] = {}
    repeat: dict[str, int] = {}
    for name, fn in methods.items():
        if name.startswith("captum IG ibs=") and name.endswith("(best)"):
            outputs[name] = sweep_out[best_ibs]  # the sweep's call was its warm-up
            peak[name] = sweep[best_ibs]["peak_extra_mib"]
            repeat[name] = 1
            continue
        outputs[name], sec, mib = _measure(fn)
        peak[name] = mib
        # calls under a second run several times a round: more samples where they are cheap
        repeat[name] = max(1, min(args.max_repeat, int(1.0 / max(sec, 1e-3))))
        print(f"  warm-up {name}: {sec:.2f} s, +{mib:.0f} MiB")
    for r in range(args.rounds):
        for name, fn in methods.items():
            if "scorecam" in name.lower() and r >= args.scorecam_rounds:
                continue
            need = predicted_default if "(default)" in name else 0.0
            if need and _meminfo_mib("MemAvailable") - 2048 < need:
                print(f"  round {r + 1}: {name} skipped, {need / 1024:.1f} GiB not free now")
                continue
            for _ in range(repeat[name]):
                _, sec, mib = _measure(fn)
                times[name].append(sec)
                cpu[name].append(LAST_CPU[0])
                peak[name] = max(peak[name], mib)
        print(f"  round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.2f})")
    nan = float("nan")
    med = {k: statistics.median(v) if v else nan for k, v in times.items()}
    fast = {k: min(v) if v else nan for k, v in times.items()}
    cpu_med = {k: statistics.median(v) if v else nan for k, v in cpu.items()}

    # -- integrated gradients at equal delta: the fewest steps (of the grid) for each tool
    equal_delta: dict[str, Any] = {}
    if "ig" not in skip and sweep_out:
        target_rel = _rel_delta(sweep_out[best_ibs][1], gap)
        grid = sorted({int(v) for v in args.delta_grid.split(",")} | {steps})
        found: dict[str, Any] = {}
        tools: dict[str, Callable[[int], torch.Tensor]] = {
            "captum": lambda k: _captum_ig(model, x, t, k, best_ibs)[1]
        }
        main_name = {"captum": f"captum IG ibs={best_ibs} (best)"}
        if not args.baselines_only:
            tools["convlens"] = lambda k: (
                _convlens(bundle, x, t, "integrated_gradients", steps=k).delta
            )
            main_name["convlens"] = "convlens integrated_gradients"
        for tool, run in tools.items():
            tried: dict[int, float] = {}
            for k in grid:
                if k == steps:
                    out = outputs[main_name[tool]]
                    d = out[1] if tool == "captum" else out.delta
                else:
                    d = run(k)
                tried[k] = _rel_delta(d, gap)
                if tried[k] <= target_rel * (1 + DELTA_RTOL):
                    break
            ok = [k for k, v in tried.items() if v <= target_rel * (1 + DELTA_RTOL)]
            found[tool] = {"steps": ok[0] if ok else None, "rel_delta_by_steps": tried}
            if ok:
                found[tool]["rel_delta"] = tried[ok[0]]
            print(
                f"  IG equal delta, {tool}: " + ", ".join(f"{k}: {v:.2e}" for k, v in tried.items())
            )
        for tool, v in found.items():
            if v["steps"] == steps:  # the main rounds timed it already
                v["seconds"] = times[main_name[tool]]
        todo = [k for k, v in found.items() if v["steps"] and "seconds" not in v]
        for k in todo:
            found[k]["seconds"] = []
        for _ in range(args.rounds if todo else 0):
            for tool in todo:
                _, sec, _ = _measure(_bind(tools[tool], found[tool]["steps"]))
                found[tool]["seconds"].append(sec)
                found[tool]["cpu_s"].append(LAST_CPU[0])
        for tool, v in found.items():
            if v["steps"] == steps:
                v["cpu_s"] = cpu[main_name[tool]]
        for k in todo:
            found[k]["cpu_s"] = []
        for v in found.values():
            if v.get("seconds"):
                v["median_s"] = statistics.median(v["seconds"])
                v["fastest_s"] = min(v["seconds"])
        equal_delta = {"target_rel_delta": target_rel, "grid": grid, "tools": found}

    # -- float64 references (Captum's call on a float64 copy of the model): float32 round-off
    #    and max-pool ties decide some gradients, so both tools are also measured against it
    ref64: dict[str, torch.Tensor] = {}
    if args.f64:
        m64 = copy.deepcopy(model).double()
        x64 = x.double()
        if "saliency" not in skip:
            ref64["saliency"] = _captum_saliency(m64, x64, t)
        if "gbp" not in skip:
            ref64["guided backprop"] = _captum_gbp(m64, x64, t)
        if "gradcam" not in skip:
            ref64["Grad-CAM (layer map)"] = _captum_gradcam(m64, x64, t)
        if "ig" not in skip:
            k64 = min(n, 2)
            ref64["ig"] = _captum_ig(m64, x64[:k64], t[:k64], steps, k64 * 10)[0]
        del m64

    # -- agreement
    rows: list[dict[str, Any]] = []
    for p in pairs:
        base, ours = outputs[p["baseline"]], outputs.get(p["convlens"])
        row: dict[str, Any] = dict(p)
        row["baseline_s"] = med[p["baseline"]]
        row["baseline_fastest_s"] = fast[p["baseline"]]
        row["baseline_cpu_s"] = cpu_med[p["baseline"]]
        row["baseline_peak_extra_mib"] = peak[p["baseline"]]
        if ours is not None:
            row["convlens_s"] = med[p["convlens"]]
            row["convlens_fastest_s"] = fast[p["convlens"]]
            row["convlens_cpu_s"] = cpu_med[p["convlens"]]
            row["speedup_fastest"] = fast[p["baseline"]] / fast[p["convlens"]]
            row["speedup_cpu"] = cpu_med[p["baseline"]] / cpu_med[p["convlens"]]
            row["convlens_peak_extra_mib"] = peak[p["convlens"]]
            row["speedup"] = med[p["baseline"]] / med[p["convlens"]]
            if p["how"] == "pixels":
                ref = base
                row["max_abs_diff"] = float((ours.pixels - ref).abs().max())
                row["ref_max_abs"] = float(ref.abs().max())
                row["map_max_abs_diff"] = float((ours.map - ref.sum(1)).abs().max())
                row["rel_l2"] = _rel_l2(ours.pixels, ref)
                if p["pair"] in ref64:
                    r64 = ref64[p["pair"]]
                    row["f64_convlens_max_abs_diff"] = float(
                        (ours.pixels.double() - r64).abs().max()
                    )
                    row["f64_baseline_max_abs_diff"] = float((ref.double() - r64).abs().max())
            elif p["how"] == "ig":
                a, d = base
                row["max_abs_diff"] = float((ours.pixels - a).abs().max())
                row["ref_max_abs"] = float(a.abs().max())
                row["rel_l2"] = _rel_l2(ours.pixels, a)
                row["captum_rel_delta"] = _rel_delta(d, gap)
                if "ig" in ref64:
                    r64, k64 = ref64["ig"], len(ref64["ig"])
                    if ours.pixels.shape[0] >= k64 and a.shape[0] >= k64:
                        row["f64_images"] = k64
                        row["f64_convlens_max_abs_diff"] = float(
                            (ours.pixels[:k64].double() - r64).abs().max()
                        )
                        row["f64_baseline_max_abs_diff"] = float(
                            (a[:k64].double() - r64).abs().max()
                        )
                row["captum_delta"] = d.tolist()
                if ours.delta is not None:
                    row["convlens_rel_delta"] = _rel_delta(ours.delta, gap)
                    row["convlens_delta"] = ours.delta.tolist()
            elif p["how"] == "layer_map":
                row["max_abs_diff"] = float((ours.layer_map - base).abs().max())
                row["ref_max_abs"] = float(base.abs().max())
                row["rel_l2"] = _rel_l2(ours.layer_map, base)
                if p["pair"] in ref64:
                    r64 = ref64[p["pair"]]
                    row["f64_convlens_max_abs_diff"] = float(
                        (ours.layer_map.double() - r64).abs().max()
                    )
                    row["f64_baseline_max_abs_diff"] = float((base.double() - r64).abs().max())
            else:  # rank: pytorch-grad-cam's [0, 1] display maps
                rho = _spearman(ours.map, base)
                row["spearman"] = rho
                row["spearman_mean"] = statistics.fmean(rho)
                row["spearman_min"] = min(rho)
                row["max_abs_diff"] = float((ours.map - base).abs().max())
        rows.append(row)

    # -- Grad-CAM against the floors
    floors: dict[str, Any] = {}
    if "floor" not in skip and not args.baselines_only:
        for ours in ("convlens gradcam", "convlens gradcam normalize=True"):
            if ours in med:
                fb, fi = "plain forward + loss.backward()", "plain forward + backward to the input"
                floors[ours] = {
                    "over_fwd_bwd": med[ours] / med[fb],
                    "over_fwd_input_grad": med[ours] / med[fi],
                    "over_forward": med[ours] / med["plain forward (no_grad)"],
                    "over_fwd_bwd_fastest": fast[ours] / fast[fb],
                    "over_fwd_bwd_cpu": cpu_med[ours] / cpu_med[fb],
                }

    # -- the table
    print(
        f"\n{args.rounds} rounds (calls under 1 s repeated, up to {args.max_repeat}x a round); "
        "speed-up = baseline / convlens (> 1: convlens faster), by the median wall time, the "
        "fastest wall time, and the median CPU time (user + system) of the calls"
    )
    head = (
        f"{'pair':<44} {'base s':>8} {'ours s':>8} {'median':>7} {'fastest':>7} {'CPU':>7}"
        f"  {'base fastest':>12} {'ours fastest':>12}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        if "speedup" not in row:
            print(f"{row['pair']:<44} {row['baseline_s']:>8.3f}")
            continue
        print(
            f"{row['pair']:<44} {row['baseline_s']:>8.3f} {row['convlens_s']:>8.3f} "
            f"{row['speedup']:>6.2f}x {row['speedup_fastest']:>6.2f}x {row['speedup_cpu']:>6.2f}x"
            f"  {row['baseline_fastest_s']:>12.3f} {row['convlens_fastest_s']:>12.3f}"
        )
    print("\nagreement")
    for row in rows:
        if "spearman_mean" in row:
            agree = (
                f"Spearman mean {row['spearman_mean']:.4f} min {row['spearman_min']:.4f}, "
                f"max|diff| {row['max_abs_diff']:.2e}"
            )
        elif "max_abs_diff" in row:
            agree = (
                f"max|diff| {row['max_abs_diff']:.2e} (of max {row['ref_max_abs']:.2e}), "
                f"rel L2 {row['rel_l2']:.1e}"
            )
            if "f64_convlens_max_abs_diff" in row:
                agree += (
                    f"; vs float64: convlens {row['f64_convlens_max_abs_diff']:.1e}, "
                    f"baseline {row['f64_baseline_max_abs_diff']:.1e}"
                )
            if "captum_rel_delta" in row:
                agree += (
                    f"; rel delta captum {row['captum_rel_delta']:.2e}"
                    f" convlens {row.get('convlens_rel_delta', float('nan')):.2e}"
                )
        else:
            agree = "-"
        print(f"  {row['pair']:<44} {agree}")
    print("\nall methods (calls, median s, fastest s, median CPU s, peak +MiB):")
    for k in methods:
        print(
            f"  {k:<52} {len(times[k]):>3} {med[k]:>8.3f} {fast[k]:>8.3f} {cpu_med[k]:>8.3f}"
            f"  +{peak[k]:>6.0f} MiB"
        )
    if sweep:
        print(
            "captum IG sweep: "
            + ", ".join(f"ibs={k}: {v['seconds']:.2f} s" for k, v in sweep.items())
        )
    if equal_delta:
        print(
            f"IG at equal delta (every image's |delta|/|f(x)-f(0)| <= "
            f"{equal_delta['target_rel_delta']:.2e}, Captum's at {steps} steps):"
        )
        for tool, v in equal_delta["tools"].items():
            print(
                f"  {tool:<9} {v['steps']} steps, rel delta {v.get('rel_delta', float('nan')):.2e}, "
                f"median {v.get('median_s', float('nan')):.3f} s, fastest "
                f"{v.get('fastest_s', float('nan')):.3f} s"
            )
        tl = equal_delta["tools"]
        if "median_s" in tl.get("captum", {}) and "median_s" in tl.get("convlens", {}):
            ca, co = tl["captum"], tl["convlens"]
            equal_delta["speedup"] = ca["median_s"] / co["median_s"]
            equal_delta["speedup_fastest"] = ca["fastest_s"] / co["fastest_s"]
            equal_delta["speedup_cpu"] = statistics.median(ca["cpu_s"]) / statistics.median(
                co["cpu_s"]
            )
            print(
                f"  speed-up at equal delta: {equal_delta['speedup']:.2f}x (median), "
                f"{equal_delta['speedup_fastest']:.2f}x (fastest), "
                f"{equal_delta['speedup_cpu']:.2f}x (CPU)"
            )
    for k, v in floors.items():
        print(
            f"{k}: {v['over_fwd_bwd']:.2f}x one forward + loss.backward() (target <= 1.2; "
            f"fastest {v['over_fwd_bwd_fastest']:.2f}x, CPU {v['over_fwd_bwd_cpu']:.2f}x), "
            f"{v['over_fwd_input_grad']:.2f}x forward + input backward, "
            f"{v['over_forward']:.2f}x a no_grad forward"
        )
    report: dict[str, Any] = {
        "model": "resnet18 (random init, seed 0; random BatchNorm statistics, seed 1)",
        "input": f"{n} crops of the sample image, resnet18 normalisation, 3x224x224",
        "targets": t,
        "layer": LAYER,
        "steps": steps,
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "rounds": args.rounds,
        "scorecam_rounds": min(args.rounds, args.scorecam_rounds),
        "quick": args.quick,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "captum_ig_sweep": sweep,
        "seconds": times,
        "cpu_seconds": cpu,
        "median_s": med,
        "fastest_s": fast,
        "median_cpu_s": cpu_med,
        "repeats_per_round": repeat,
        "peak_extra_mib": peak,
        "pairs": rows,
        "ig_equal_delta": equal_delta,
        "gradcam_over_floor": floors,
    }
    if sweep:
        report["captum_ig_default"] = {
            "rows": n * steps,
            "predicted_peak_extra_mib": predicted,
            "mib_per_row": slope,
            "headroom_mib": headroom,
            "ran_at_full_batch": default_fits,
            "images_timed": n if default_fits else fit_images,
        }
    stem = "attribution_quick" if args.quick else "attribution"
    path = write_json(args.out / f"{stem}.json", report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
