"""Dataset examples: ``convlens.dataset_examples`` against its floors, side by side.

Three measurements on Imagenette's validation JPEGs (``../shared/data/imagenette2-224.tar``,
only the val split is extracted, once, into ``benchmarks/results/imagenette2-224/``):

1. **The pass against its floor.** ``--images`` val images preprocessed once with the
   bundle's ``preprocess`` and held as a list of ``[3, 224, 224]`` tensors. The floor: the
   same batches (``torch.stack`` of the same tensors, a short last batch padded as
   ``dataset_examples`` pads it) through a bare forward that a hook on the deepest
   requested layer ends by raising (caught); eval, ``no_grad``. Against it:
   ``dataset_examples(bundle, tensors, layers, k=9, batch_size=32, progress=False)``.
   resnet18 (random init: timing only) ``layer2,layer4``; efficientnet_lite0 (its
   pretrained weights) ``blocks.4``. One warm-up each, then ``--rounds`` rounds with the
   order of the two alternating; medians.
2. **Peak memory against the naive approach** (hooks that keep every map of the requested
   layers, ``torch.cat`` per layer and ``topk`` at the end), resnet18 ``layer2,layer4``, at
   ``--mem-images`` images read from the folder (the same loader for both), at ``--mem-px``
   (default 112: the bundle's resize 256 / crop 224 scaled to 128 / 112, which keeps the
   run short; 224 takes about 4x the time). Each run is a fresh subprocess: peak resident
   set size during the run minus the resident size just before it, after imports, the model
   and a warm-up forward (``VmHWM`` after a reset through ``/proc/self/clear_refs``). At the
   first count the same loop keeping nothing is measured too (the floor). Ours is checked
   against the naive: equal scores, and indices equal to a stable sort of its scores.
3. **The whole pass with decoding** (``dataset_examples`` on a folder of ``--cmd-images``
   val JPEGs, what ``convlens examples`` runs), efficientnet_lite0 ``blocks.4``, against
   (i) decoding + preprocessing alone (the same loader, ``make_source(folder,
   bundle.preprocess).load(i)`` on the same number of threads) and (ii) the forward floor
   alone on the same images, preprocessed beforehand. With ``--cli``, for context, the
   CLI itself once in a subprocess (start-up, model load and its figure included).

    python benchmarks/examples.py [--device auto|cpu|cuda] [--rounds 3] [--quick] [--cli]

Without the archive the script says so and exits 0. Results: ``results/examples.json``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import convlens
from _machine import cpu_name
from convlens._io import versions, write_json
from convlens.analysis._sources import make_source
from convlens.device import resolve_device
from convlens.models.layers import trace_calls

HERE = Path(__file__).resolve().parent
ARCHIVE = HERE.parent.parent / "shared" / "data" / "imagenette2-224.tar"
CACHE = HERE / "results" / "imagenette2-224"
VAL_PREFIX = "imagenette2-224/val/"
K, BATCH = 9, 32
# (model, load_model kwargs, layers, the deepest of them: where the floor stops)
PASS_CASES: list[tuple[str, dict[str, Any], list[str], str]] = [
    ("resnet18", {"weights": None}, ["layer2", "layer4"], "layer4"),
    ("efficientnet_lite0", {}, ["blocks.4"], "blocks.4"),
]
MEM_CASE = PASS_CASES[0]
CMD_CASE = PASS_CASES[1]


class _Stop(Exception):
    """Raised by the floor's hook on the deepest layer."""


# ------------------------------------------------------------------------- data


def _val_folder(archive: Path, cache: Path) -> Path:
    """The val split of the archive, extracted once (only its members) into ``cache/val``."""
    val = cache / "val"
    if (val / ".complete").is_file():
        return val
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".extract-"))
    try:
        t0 = time.perf_counter()
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(VAL_PREFIX)]
            tar.extractall(tmp, members=members, filter="data")
        if val.exists():
            shutil.rmtree(val)
        (tmp / VAL_PREFIX.rstrip("/")).rename(val)
        (val / ".complete").write_text(f"{len(members)} members of {archive.name}\n")
        print(
            f"extracted {len(members)} val members into {val} in {time.perf_counter() - t0:.1f} s"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return val


def _subset(val: Path, n: int) -> Path:
    """A folder of symbolic links to ``n`` val images, spread evenly over the classes (the
    first files of each class, in sorted order); the whole val folder when ``n`` covers it."""
    classes = sorted(d for d in val.iterdir() if d.is_dir())
    files = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() == ".jpeg") for d in classes}
    total = sum(len(v) for v in files.values())
    if n >= total:
        return val
    out = val.parent / f"val-{n}"
    if (out / ".complete").is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    share = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    for d, m in zip(classes, share):
        (out / d.name).mkdir(parents=True)
        for p in files[d.name][:m]:
            (out / d.name / p.name).symlink_to(p.resolve())
    (out / ".complete").write_text(f"{n} images\n")
    return out


def _workers() -> int:
    return min(8, os.cpu_count() or 1)  # dataset_examples' default


def _decode(folder: Path, preprocess: Any, keep: bool) -> list[torch.Tensor]:
    """Every image of ``folder`` through the pass's own loader, on its number of threads."""
    src = make_source(folder, preprocess)
    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        out = []
        for x, _, _ in pool.map(src.load, range(len(src))):
            if keep:
                out.append(x)
        return out


# ----------------------------------------------------------------------- timing


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _batches(xs: Sequence[torch.Tensor], bs: int) -> list[list[torch.Tensor]]:
    """Batches of ``bs`` rows, a short last one padded with copies of its last image."""
    out = []
    for i in range(0, len(xs), bs):
        b = list(xs[i : i + bs])
        out.append(b + [b[-1]] * (bs - len(b)))
    return out


def _floor(model: nn.Module, deepest: str, xs: Sequence[torch.Tensor], dev: torch.device) -> None:
    """The least work the pass can do: stack each batch, forward it up to ``deepest``."""

    def stop(_m: nn.Module, _i: Any, _o: Any) -> None:
        raise _Stop

    h = model.get_submodule(deepest).register_forward_hook(stop)
    try:
        with torch.no_grad():
            for b in _batches(xs, BATCH):
                with contextlib.suppress(_Stop):
                    model(torch.stack(b).to(dev))
    finally:
        h.remove()
    _sync(dev)


def _ours(bundle: Any, data: Any, layers: list[str], dev: torch.device, **kw: Any) -> Any:
    r = convlens.dataset_examples(
        bundle, data, layers, k=K, batch_size=BATCH, device=dev, progress=False, **kw
    )
    _sync(dev)
    return r


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _interleaved(
    methods: dict[str, Callable[[], object]],
    rounds: int,
    label: str,
    warmup: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """A warm-up (by default one run of each), then ``rounds`` rounds, the order rotated
    each round."""
    if warmup is not None:
        warmup()
    else:
        for fn in methods.values():
            fn()
    names = list(methods)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]  # two methods: a, b then b, a
        for name in order:
            times[name].append(_timed(methods[name]))
        print(
            f"  {label}: round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names)
        )
    return times


def _part_pass(args: argparse.Namespace, val: Path, dev: torch.device) -> dict[str, Any]:
    folder = _subset(val, args.images)
    out: dict[str, Any] = {"images": args.images, "folder": str(folder), "cases": {}}
    for name, kw, layers, deepest in PASS_CASES:
        bundle = convlens.load_model(name, **kw)
        model = bundle.model.to(dev).eval()
        t = time.perf_counter()
        xs = _decode(folder, bundle.preprocess, keep=True)[: args.images]
        print(
            f"{name}: {len(xs)} images decoded and preprocessed in {time.perf_counter() - t:.1f} s"
        )
        methods: dict[str, Callable[[], object]] = {
            "floor": functools.partial(_floor, model, deepest, xs, dev),
            "dataset_examples": functools.partial(_ours, bundle, xs, layers, dev),
        }
        times = _interleaved(methods, args.rounds, f"{name} {','.join(layers)}")
        med = {k: statistics.median(v) for k, v in times.items()}
        out["cases"][f"{name} {','.join(layers)}"] = {
            "model": bundle.description,
            "layers": layers,
            "floor_stops_at": deepest,
            "seconds": times,
            "median_s": med,
            "images_per_s": {k: len(xs) / v for k, v in med.items()},
            "ratio": med["dataset_examples"] / med["floor"],
        }
        del xs
    return out


# ----------------------------------------------------------------------- memory


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _naive(
    model: nn.Module,
    folder: Path,
    preprocess: Any,
    layers: list[str],
    deepest: str,
    dev: torch.device,
    keep_maps: bool = True,
) -> dict[str, dict[str, list[Any]]]:
    """What one writes without convlens: keep every map, ``topk`` at the end. Without
    ``keep_maps``: the same loop keeping nothing (the floor of the memory runs)."""
    src = make_source(folder, preprocess)
    if not keep_maps:
        layers = [deepest]
    maps: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    real = {"n": 0}

    def keep(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, o: torch.Tensor) -> None:
            if keep_maps:
                maps[name].append(o.detach()[: real["n"]])
            if name == deepest:
                raise _Stop

        return hook

    hs = [model.get_submodule(n).register_forward_hook(keep(n)) for n in layers]
    try:
        with torch.no_grad(), concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
            for i in range(0, len(src), BATCH):
                xs = [x for x, _, _ in pool.map(src.load, range(i, min(i + BATCH, len(src))))]
                real["n"] = len(xs)
                with contextlib.suppress(_Stop):
                    model(torch.stack(xs + [xs[-1]] * (BATCH - len(xs))).to(dev))
    finally:
        for h in hs:
            h.remove()
    res: dict[str, dict[str, list[Any]]] = {}
    for name in layers if keep_maps else []:
        m = torch.cat(maps[name])  # [N, C, H, W]: every map of the layer, at once
        maps[name].clear()
        scores = m.flatten(2).amax(dim=2)  # [N, C]
        del m
        top = scores.topk(K, dim=0)
        bottom = scores.topk(K, dim=0, largest=False)
        # For the check only: the same order with ties broken by index (a stable sort).
        desc = scores.sort(dim=0, descending=True, stable=True).indices[:K]
        asc = scores.sort(dim=0, stable=True).indices[:K]
        res[name] = {
            "top_index": top.indices.t().tolist(),
            "top_scores": top.values.t().tolist(),
            "bottom_index": bottom.indices.t().tolist(),
            "bottom_scores": bottom.values.t().tolist(),
            "top_index_stable": desc.t().tolist(),
            "bottom_index_stable": asc.t().tolist(),
        }
    return res


def _mem_preprocess(bundle: Any, px: int) -> Any:
    if px == bundle.preprocess.crop:
        return bundle.preprocess
    return dataclasses.replace(bundle.preprocess, resize=round(px * 256 / 224), crop=px)


def _child(method: str, folder: Path, px: int, threads: int, device: str) -> None:
    """One run of ``method`` in this fresh process; prints one JSON line."""
    torch.set_num_threads(threads)
    dev = resolve_device(device)
    name, kw, layers, deepest = MEM_CASE
    bundle = convlens.load_model(name, **kw)
    model = bundle.model.to(dev).eval()
    prep = _mem_preprocess(bundle, px)
    # Warm-up: oneDNN and the allocator's first blocks.
    _floor(model, deepest, [torch.zeros(3, px, px)] * BATCH, dev)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        how = "VmHWM after clear_refs"
    except OSError:
        how = "ru_maxrss (not reset: includes the set-up)"
    before = _status_mib("VmRSS")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        cuda_before = torch.cuda.memory_allocated(dev)
    t = time.perf_counter()
    if method == "ours":
        r = _ours(bundle, folder, layers, dev, preprocess=prep)
        res = {
            key: {
                "top_index": le.top_index.tolist(),
                "top_scores": le.top_scores.tolist(),
                "bottom_index": le.bottom_index.tolist(),
                "bottom_scores": le.bottom_scores.tolist(),
            }
            for key, le in r.layers.items()
        }
    else:
        res = _naive(model, folder, prep, layers, deepest, dev, keep_maps=method == "naive")
    seconds = time.perf_counter() - t
    if how.startswith("VmHWM"):
        peak = _status_mib("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = {"before_mib": before, "peak_mib": peak, "seconds": seconds, "how": how, "topk": res}
    if dev.type == "cuda":
        out["cuda_extra_mib"] = (torch.cuda.max_memory_allocated(dev) - cuda_before) / 2**20
    print(json.dumps(out))


def _run_child(method: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", method, str(folder), "--mem-px", str(args.mem_px)]
    cmd += ["--threads", str(args.threads), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} child failed:\n{done.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    data["extra_mib"] = data["peak_mib"] - data["before_mib"]
    return data


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Top-k / bottom-k indices of ours (a) against the naive's (b), per layer."""
    out: dict[str, Any] = {}
    for layer in a:
        row: dict[str, Any] = {}
        for which in ("top", "bottom"):
            ia, ib = a[layer][f"{which}_index"], b[layer][f"{which}_index"]
            sa, sb = a[layer][f"{which}_scores"], b[layer][f"{which}_scores"]
            differ = [c for c in range(len(ia)) if ia[c] != ib[c]]
            # A differing order among equal scores is a tie that topk leaves unordered.
            ties = [c for c in differ if sa[c] == sb[c]]
            row[which] = {
                "channels": len(ia),
                "same_indices": len(ia) - len(differ),
                "differ_only_in_ties": len(ties),
                "scores_equal": sa == sb,
                "equal_to_stable_sort": ia == b[layer][f"{which}_index_stable"],
            }
        out[layer] = row
    return out


def _part_memory(args: argparse.Namespace, val: Path) -> dict[str, Any]:
    name, _, layers, _ = MEM_CASE
    out: dict[str, Any] = {"px": args.mem_px, "layers": layers, "runs": {}}
    # Analytic size of what the naive keeps: C*H*W floats per image per layer.
    bundle = convlens.load_model(name, **MEM_CASE[1])
    shapes = trace_calls(bundle.model, (1, 3, args.mem_px, args.mem_px), layers)
    per_image = 0
    for calls in shapes.values():
        first = calls[0]
        assert first is not None
        per_image += 4 * torch.Size(first[1:]).numel()
    out["naive_bytes_per_image"] = per_image
    for n in args.mem_images:
        folder = _subset(val, n)
        count = len(make_source(folder, None))
        runs = {}
        # The floor (the same loop keeping nothing) does not grow with n: measured once.
        first = n == args.mem_images[0]
        for method in ("floor", "ours", "naive") if first else ("ours", "naive"):
            runs[method] = _run_child(method, folder, args)
            got = runs[method]
            print(
                f"  memory, {count} images at {args.mem_px} px: {method} "
                f"+{got['extra_mib']:.0f} MiB, {got['seconds']:.1f} s"
            )
        check = _compare(runs["ours"].pop("topk"), runs["naive"].pop("topk"))
        if "floor" in runs:
            runs["floor"].pop("topk")
        out["runs"][str(count)] = {
            "folder": str(folder),
            **runs,
            "ratio_naive_over_ours": runs["naive"]["extra_mib"]
            / max(runs["ours"]["extra_mib"], 1e-9),
            "maps_kept_mib": count * per_image / 2**20,
            "topk_check": check,
        }
    return out


# ------------------------------------------------------------------ whole pass


def _part_command(args: argparse.Namespace, val: Path, dev: torch.device) -> dict[str, Any]:
    name, kw, layers, deepest = CMD_CASE
    folder = _subset(val, args.cmd_images)
    bundle = convlens.load_model(name, **kw)
    model = bundle.model.to(dev).eval()
    xs = _decode(folder, bundle.preprocess, keep=True)  # for the floor (ii), outside timing
    n = len(xs)
    methods: dict[str, Callable[[], object]] = {
        "dataset_examples on the folder": functools.partial(_ours, bundle, folder, layers, dev),
        "decode + preprocess alone": functools.partial(
            _decode, folder, bundle.preprocess, keep=False
        ),
        "forward floor alone": functools.partial(_floor, model, deepest, xs, dev),
    }
    few = _subset(val, BATCH * 2)

    def warmup() -> None:
        # The JPEGs are in the page cache (read just above); a short pass and a batch of
        # the floor set up the model's kernels (a full warm-up would double the time).
        _ours(bundle, few, layers, dev)
        _floor(model, deepest, xs[:BATCH], dev)

    times = _interleaved(
        methods, args.rounds, f"{name} {','.join(layers)} on {n} JPEGs", warmup=warmup
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {
        "model": bundle.description,
        "layers": layers,
        "images": n,
        "folder": str(folder),
        "workers": _workers(),
        "seconds": times,
        "median_s": med,
        "images_per_s": {k: n / v for k, v in med.items()},
    }
    if args.cli:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "convlens.cli", "examples", "--model", name]
            cmd += ["--data", str(folder), "--layers", ",".join(layers), "--k", str(K)]
            cmd += ["--batch-size", str(BATCH), "--device", str(dev.type), "--out", tmp, "--quiet"]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t
            if done.returncode != 0:
                print(f"  the CLI failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
                out["cli"] = {"failed": done.stderr[-2000:]}
            else:
                ran = json.loads((Path(tmp) / "examples.json").read_text())["settings"]["seconds"]
                out["cli"] = {"command": " ".join(cmd[1:]), "wall_s": wall, "pass_s": ran}
                print(f"  CLI: {wall:.1f} s wall, {ran:.1f} s in the pass (its own clock)")
    return out


# ------------------------------------------------------------------------ main


def _ties(r: dict[str, Any]) -> str:
    n = sum(w["differ_only_in_ties"] for lay in r["topk_check"].values() for w in lay.values())
    return f" ({n} channels' order differs among tied scores only)" if n else ""


def _get(r: dict[str, Any], method: str, key: str, fmt: str) -> str:
    return format(r[method][key], fmt) if method in r else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=256, help="images for the pass vs its floor")
    ap.add_argument(
        "--mem-images",
        default="1000,3925",
        help="image counts for the memory runs (comma-separated)",
    )
    ap.add_argument(
        "--mem-px", type=int, default=112, help="input size of the memory runs (224: 4x the time)"
    )
    ap.add_argument("--cmd-images", type=int, default=1000, help="JPEGs for the whole pass")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--parts", default="1,2,3", help="which measurements to run")
    ap.add_argument(
        "--cli", action="store_true", help="part 3: also time the CLI once (about 1.5 min more)"
    )
    ap.add_argument("--quick", action="store_true", help="a ~1 min smoke run: small sizes, 1 round")
    ap.add_argument("--archive", type=Path, default=ARCHIVE)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], Path(args.child[1]), args.mem_px, args.threads, args.device)
        return
    if args.quick:
        args.rounds, args.images, args.cmd_images = 1, 64, 128
        args.mem_images, args.mem_px, args.cli = "200,600", 112, False
    args.mem_images = [int(v) for v in str(args.mem_images).split(",")]
    parts = {int(p) for p in args.parts.split(",")}

    if not args.archive.is_file():
        print(f"skipped: no {args.archive} (the Imagenette 224 px archive); nothing measured")
        return
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    val = _val_folder(args.archive, CACHE)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    print(
        f"{dev} ({card}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, {_workers()} decoding threads, "
        f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}"
    )
    report: dict[str, Any] = {
        "device": str(dev),
        "card": card,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "decoding_threads": _workers(),
        "versions": versions(),
        "rounds": args.rounds,
        "k": K,
        "batch_size": BATCH,
        "quick": args.quick,
        "load_average_start": load_start,
    }
    if 1 in parts:
        report["pass_vs_floor"] = _part_pass(args, val, dev)
    if 2 in parts:
        report["memory"] = _part_memory(args, val)
    if 3 in parts:
        report["whole_pass"] = _part_command(args, val, dev)
    report["load_average_end"] = os.getloadavg()
    report["total_s"] = time.perf_counter() - t_start

    if "pass_vs_floor" in report:
        p = report["pass_vs_floor"]
        print(
            f"\n1. The pass against its floor: {p['images']} preprocessed images, batch {BATCH}, "
            f"median of {args.rounds}"
        )
        print(f"{'case':<34} {'floor s':>8} {'ours s':>8} {'ours img/s':>10} {'ratio':>7}")
        for key, c in p["cases"].items():
            m = c["median_s"]
            print(
                f"{key:<34} {m['floor']:>8.2f} {m['dataset_examples']:>8.2f} "
                f"{c['images_per_s']['dataset_examples']:>10.1f} {c['ratio']:>6.3f}x"
            )
    if "memory" in report:
        mem = report["memory"]
        print(f"\n2. Peak memory over the pre-run RSS, resnet18 layer2,layer4, {mem['px']} px")
        print(
            f"{'images':>7} {'floor MiB':>10} {'ours MiB':>9} {'naive MiB':>10} {'naive/ours':>11} "
            f"{'maps MiB':>9} {'floor s':>8} {'ours s':>7} {'naive s':>8}  top-k check"
        )
        for n, r in mem["runs"].items():
            ok = all(
                w["same_indices"] + w["differ_only_in_ties"] == w["channels"]
                and w["scores_equal"]
                and w["equal_to_stable_sort"]
                for layer in r["topk_check"].values()
                for w in layer.values()
            )
            r["same_winners"] = ok
            print(
                f"{n:>7} {_get(r, 'floor', 'extra_mib', '.0f'):>10} {r['ours']['extra_mib']:>9.0f} "
                f"{r['naive']['extra_mib']:>10.0f} {r['ratio_naive_over_ours']:>10.1f}x "
                f"{r['maps_kept_mib']:>9.0f} {_get(r, 'floor', 'seconds', '.1f'):>8} "
                f"{r['ours']['seconds']:>7.1f} {r['naive']['seconds']:>8.1f}  "
                + (f"same winners{_ties(r)}" if ok else f"DIFFERENT: {r['topk_check']}")
            )
    if "whole_pass" in report:
        w = report["whole_pass"]
        m = w["median_s"]
        base = m["dataset_examples on the folder"]
        print(
            f"\n3. The whole pass, {w['images']} JPEGs, efficientnet_lite0 blocks.4, "
            f"median of {args.rounds}"
        )
        print(f"{'':<32} {'seconds':>8} {'images/s':>9} {'pass / this':>12}")
        for k, v in m.items():
            print(f"{k:<32} {v:>8.2f} {w['images'] / v:>9.1f} {base / v:>11.2f}x")
        limit = max(("decode + preprocess alone", "forward floor alone"), key=lambda k: m[k])
        both = m["decode + preprocess alone"] + m["forward floor alone"]
        w["limit"] = limit
        w["ratio_to_limit"] = base / m[limit]
        w["ratio_to_sum"] = base / both
        print(
            f"the limit: {limit} ({m[limit]:.2f} s); the pass takes {base / m[limit]:.2f}x "
            f"the limit, {base / both:.2f}x the sum of the two ({both:.2f} s)"
        )
        if "cli" in w and "wall_s" in w["cli"]:
            print(
                f"the CLI, once: {w['cli']['wall_s']:.1f} s wall ({w['cli']['pass_s']:.1f} s pass)"
            )
    print(
        f"\ntotal {report['total_s']:.0f} s; load average at the end "
        f"{report['load_average_end'][0]:.2f}"
    )
    path = write_json(args.out / ("examples-quick.json" if args.quick else "examples.json"), report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
