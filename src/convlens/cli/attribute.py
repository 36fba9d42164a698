"""``convlens attribute``: which pixels a prediction or a unit depends on, per image, by
several attribution methods side by side, with their faithfulness and a sanity check."""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click
import torch

from convlens.cli._group import (
    MODEL_HELP,
    BadInput,
    _device_option,
    _handle_errors,
    _load_bundle,
    _load_input,
    _model_options,
    _note,
    _out_option,
    _output_option,
    _safe_name,
    _versions,
    _wrote,
    main,
)
from convlens.cli.examples import _examples_data

#: What ``attribution.json`` holds: its layout's name and version.
FORMAT = "convlens-attribute/1"
DEFAULT_METHODS = "integrated_gradients,gradcam"
METRICS: tuple[Literal["deletion"], Literal["insertion"]] = ("deletion", "insertion")

# One image to attribute: (index, model input [C, H, W], true class or None, what it is).
Item = tuple[int, torch.Tensor, str | None, str]


def _parse_methods(spec: str) -> list[str]:
    """``--methods``: comma-separated names, or ``all`` (every method convlens has)."""
    from convlens.analysis.attribution import METHODS

    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        return list(METHODS)
    if not names:
        raise BadInput(f"--methods is empty: give comma-separated names of {', '.join(METHODS)}")
    for name in names:
        if name not in METHODS:
            near = difflib.get_close_matches(name, METHODS, n=2, cutoff=0.5)
            hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
            raise BadInput(
                f"--methods: unknown method {name!r}{hint}; use all or some of {', '.join(METHODS)}"
            )
    if len(set(names)) != len(names):
        raise BadInput(f"--methods {spec!r} names a method twice: list each once")
    return names


def _parse_batch(value: str) -> int | str:
    if value == "auto":
        return "auto"
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise BadInput(f"--batch {value!r}: a positive integer or auto")


def _check_target(spec: str) -> Any:
    """``--target``: ``top`` (each image's top-1 class: ``None`` for the API) or a spec the
    API parses (a bad one fails before any model is loaded)."""
    from convlens.analysis.attribution._core import parse_targets

    if spec == "top":
        return None
    try:
        parse_targets(spec, 1)
    except (TypeError, ValueError) as e:
        raise BadInput(f"--target {spec!r}: {str(e).splitlines()[0]}") from None
    return spec


def _check_layers(bundle: Any, methods: list[str], layer: str | None) -> None:
    """An unknown ``--layer`` (the closest names) or a CAM method on a model without a
    convolution fail here, before any image is read."""
    from convlens.analysis.attribution import CAM_METHODS
    from convlens.analysis.attribution.cam import default_cam_layer
    from convlens.models.layers import find_layers, unwrap

    cams = [m for m in methods if m in CAM_METHODS]
    if layer is not None and not cams:
        raise BadInput(
            f"--layer chooses the layer of the CAM methods ({', '.join(CAM_METHODS)}); none "
            "is in --methods"
        )
    if not cams:
        return
    net = unwrap(bundle.model)
    if layer is not None:
        find_layers(net, [layer])  # LayerNotFoundError: the closest names
        return
    try:
        default_cam_layer(net)
    except ValueError as e:
        raise BadInput(f"--methods {cams[0]}: {e}") from None


def _stems(names: list[str], indices: list[int], by_index: bool) -> dict[int, str]:
    """A file stem per image: its file's stem (made safe), after its global index when
    ``by_index`` (a dataset, so ranks never collide) or when two images share a stem."""
    from urllib.parse import urlparse

    plain = [_safe_name(Path(urlparse(n).path).stem or "image") for n in names]
    width = max(4, len(str(max(indices, default=0))))
    numbered = by_index or len(set(plain)) != len(plain)
    return {i: f"{i:0{width}d}_{s}" if numbered else s for i, s in zip(indices, plain, strict=True)}


def _summary(entries: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per method over the images: mean score, the largest |delta|, the mean AUCs."""
    out: dict[str, Any] = {}
    for m in methods:
        rows = [e["methods"][m] for e in entries]
        s: dict[str, Any] = {"images": len(rows)}
        if rows:
            s["mean_score"] = sum(r["score"] for r in rows) / len(rows)
        deltas = [abs(r["delta"]) for r in rows if r.get("delta") is not None]
        if deltas:
            s["max_abs_delta"] = max(deltas)
            s["mean_abs_delta"] = sum(deltas) / len(deltas)
        for metric in METRICS:
            f = [r["faithfulness"][metric] for r in rows if "faithfulness" in r]
            if f:
                s[f"{metric}_auc"] = sum(v["auc"] for v in f) / len(f)
                s[f"{metric}_random_auc"] = sum(v["random_auc"] for v in f) / len(f)
        out[m] = s
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _method_line(m: str, r: dict[str, Any]) -> str:
    label = f" ({r['label']})" if r.get("label") else ""
    parts = [f"{m:<22} target {r['target']}{label}, score {_fmt(r['score'])}"]
    if r.get("delta") is not None:
        parts.append(f"delta {r['delta']:.2g} at {r['steps']} steps")
    for metric, f in r.get("faithfulness", {}).items():
        parts.append(f"{metric} AUC {f['auc']:.3f} (random {f['random_auc']:.3f})")
    return ", ".join(parts)


@main.command("attribute")
@click.option(
    "--model", "model_spec", default="efficientnet_lite0", show_default=True, help=MODEL_HELP
)
@click.option(
    "--image",
    "images",
    multiple=True,
    help="Image path or URL; more may follow it (--image a.jpg b.jpg). Give --image or --data.",
)
@click.argument("more_images", nargs=-1, metavar="[IMG]...")
@click.option(
    "--data",
    "data_spec",
    default=None,
    help="A whole dataset instead of --image: shapes (offline), imagenette (downloaded once), "
    "a folder (class sub-folders, a flat folder of images, or train/ and val/), or an "
    "Imagenette .tgz/.tar; sharded over the processes under torchrun.",
)
@click.option(
    "--split",
    type=click.Choice(["train", "val"]),
    default="val",
    show_default=True,
    help="With --data: the split of shapes, imagenette or a train/ + val/ folder.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Only the first N images (of --data, or of --image).",
)
@click.option(
    "--target",
    default="top",
    show_default=True,
    help="top (each image's top-1 class), a class index (258), layer:channel (the mean of "
    "a channel: a unit's attribution) or layer:channel@y,x (one neuron).",
)
@click.option(
    "--methods",
    default=DEFAULT_METHODS,
    show_default=True,
    help="Comma-separated: saliency, input_x_gradient, integrated_gradients, "
    "guided_backprop, gradcam, gradcam_pp, layercam, scorecam, occlusion; or all.",
)
@click.option(
    "--layer",
    default=None,
    help="The layer of the CAM methods (default: the model's last convolutional block).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Integrated gradients' quadrature points (Gauss-Legendre).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=None,
    help="SmoothGrad: average the pixel-space methods over N noisy copies.",
)
@click.option(
    "--baseline",
    type=click.Choice(["zero", "blur", "uniform", "black"]),
    default="zero",
    show_default=True,
    help="Integrated gradients' baseline; zero = 0 after normalisation (the mean colour).",
)
@_output_option
@click.option(
    "--sanity",
    "run_sanity",
    is_flag=True,
    help="Adebayo's randomization test on the first image: sanity.png and its numbers.",
)
@click.option(
    "--faithfulness",
    "run_faithfulness",
    is_flag=True,
    help="Deletion and insertion curves' AUCs (and a random order's), in the titles and JSON.",
)
@click.option(
    "--scale",
    type=click.Choice(["figure", "method"]),
    default="figure",
    show_default=True,
    help="Colour scale of the figures' maps: one symmetric scale for all (figure), or one "
    "per method (methods have different units).",
)
@click.option(
    "--batch",
    default="auto",
    show_default=True,
    help="Rows per forward (images x steps x samples), or auto (from free memory).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Score-CAM's masked forwards under autocast (auto: bfloat16 where the device runs it "
    "fast); every other method computes in float32.",
)
@_out_option(Path("out/attribution"), "attribution.json, a figure per image and maps/ go here.")
@_model_options
@_device_option
@_handle_errors
def attribute_cmd(
    model_spec: str,
    images: tuple[str, ...],
    more_images: tuple[str, ...],
    data_spec: str | None,
    split: str,
    limit: int | None,
    target: str,
    methods: str,
    layer: str | None,
    steps: int,
    samples: int | None,
    baseline: str,
    output: str | None,
    run_sanity: bool,
    run_faithfulness: bool,
    scale: str,
    batch: str,
    precision: str,
    out: Path,
    weights: str,
    arch: str | None,
    seed: int,
    device: str,
) -> None:
    """Attribution: which pixels each image's target depends on, by each method.

    Per image: IMAGE.png (the image, then every method's signed map on one shared scale,
    with the deletion/insertion AUCs under --faithfulness) and maps/IMAGE/ (each method's
    saved Attribution); attribution.json holds the targets, scores, integrated gradients'
    completeness deltas, the AUCs, the settings and versions. --seed also seeds SmoothGrad
    noise, the uniform baseline and the random order of --faithfulness.

    With --data it runs over a whole dataset, unchanged under torchrun: each rank takes the
    images range(rank, N, world) and writes their files, rank 0 writes attribution.json.
    """
    import warnings

    import torch.distributed as dist

    from convlens import distributed
    from convlens.device import resolve_device

    sources = [*images, *more_images]
    if sources and data_spec is not None:
        raise BadInput("give --image or --data, not both")
    if not sources and data_spec is None:
        raise BadInput("nothing to attribute: give --image IMG [IMG ...] or --data DATASET")
    names = _parse_methods(methods)
    spec = _check_target(target)
    rows = _parse_batch(batch)
    t0 = time.perf_counter()
    dev = distributed.local_device(resolve_device(device))
    owned = not (dist.is_available() and dist.is_initialized())
    ctx = distributed.context(dev)
    try:
        with distributed.main_first(ctx):  # downloads, drawn datasets
            bundle = _load_bundle(model_spec, weights, arch, seed, dev)
            _check_layers(bundle, names, layer)
            if data_spec is not None:
                from convlens.analysis._sources import make_source

                data = _examples_data(data_spec, split, progress=ctx.is_main)
                source = make_source(data, bundle.preprocess, split=split)
        if data_spec is not None:
            n = min(len(source), limit or len(source))
            classes = source.classes
            load: Callable[[int], Item] = _dataset_loader(source, classes)
            where = {
                "data": data_spec,
                "dataset": source.name,
                "split": split,
                "length": len(source),
                "count": n,
            }
            paths = [source.path(i) or f"item {i}" for i in range(n)]
        else:
            todo = sources[:limit] if limit else sources
            n = len(todo)
            load = _image_loader(bundle, todo)
            where = {"images": todo, "count": n}
            paths = todo
        stems = _stems(paths, list(range(n)), by_index=data_spec is not None)
        kw: dict[str, Any] = {
            "steps": steps,
            "samples": samples,
            "baseline": baseline,
            "layer": layer,
            "output": output,
            "batch": rows,
            "seed": seed,
            "scale": scale,
            "precision": precision,
        }
        mine = distributed.shard(n, ctx.rank, ctx.world)
        entries: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        from convlens._progress import tqdm

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet = not ctx.is_main or n < 2
            bar = tqdm(mine, desc="attribute", unit="image", disable=True if quiet else None)
            for i in bar if ctx.is_main else mine:
                try:
                    item = load(i)
                except _Unreadable as bad:
                    skipped.append({"index": i, "path": bad.path, "reason": bad.reason})
                    continue
                entries.append(
                    _attribute_image(bundle, item, stems[i], names, spec, kw, run_faithfulness, out)
                )
            bar.close()
        messages = sorted(_notes_of(caught))
        parts = distributed.all_gather_objects((entries, skipped, messages))
        if not ctx.is_main:
            return
        entries = sorted((e for p in parts for e in p[0]), key=lambda e: e["index"])
        skipped = sorted((s for p in parts for s in p[1]), key=lambda s: s["index"])
        for msg in sorted({m for p in parts for m in p[2]}):
            _note(msg)
        if data_spec is not None:
            for msg in source.notes:  # what the folder scan skipped or kept
                _note(msg)
        if not entries:
            raise BadInput(f"no image could be read ({len(skipped)} tried)")
        method_settings = entries[0]["settings"]
        for e in entries:
            e.pop("settings")
        written: list[Path] = []
        sanity_doc = None
        if run_sanity:
            sanity_doc, path = _run_sanity(bundle, load, entries[0], names, kw, out)
            written.append(path)
        seconds = time.perf_counter() - t0
        doc = {
            "format": FORMAT,
            "model": bundle.description,
            "pretrained": bundle.pretrained,
            "methods": names,
            "source": {**where, "skipped": skipped},
            "images": entries,
            "summary": _summary(entries, names),
            "sanity": sanity_doc,
            "settings": {
                "target": target,
                "methods": {m: method_settings[m] for m in names},
                "layer": layer,
                "steps": steps,
                "samples": samples,
                "baseline": baseline,
                "output": output,
                "batch": rows,
                "seed": seed,
                "scale": scale,
                "precision": precision,
                "faithfulness": run_faithfulness,
                "sanity": run_sanity,
                "world_size": ctx.world,
                "seconds": seconds,
            },
            "versions": _versions(dev),
        }
        from convlens._io import write_json

        _report(bundle, entries, names, skipped, ctx.world, dev, seconds, data_spec is not None)
        if skipped:
            first = skipped[0]
            _note(
                f"{len(skipped)} unreadable image(s) skipped, listed in attribution.json "
                f"(first: {first['path']}: {first['reason']})"
            )
        written.insert(0, write_json(out / "attribution.json", doc))
        if data_spec is None:
            written += [out / e["figure"] for e in entries]
        _wrote(written)
        if data_spec is not None:
            click.echo(
                f"wrote {len(entries)} figure(s) {out}/<index>_<name>.png and their maps in "
                f"{out / 'maps'}/"
            )
    finally:
        if owned and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _notes_of(caught: list[Any]) -> set[str]:
    """convlens's warnings become notes (``convlens.attribute: `` dropped), each once;
    anything else is shown as the warning it is."""
    import re
    import warnings

    notes = set()
    for w in caught:
        text = str(w.message)
        if text.startswith("convlens."):
            notes.add(re.sub(r"^convlens\.[a-z_]+: ", "", text))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return notes


class _Unreadable(Exception):
    def __init__(self, path: str | None, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


def _dataset_loader(source: Any, classes: list[str] | None) -> Callable[[int], Item]:
    from convlens.analysis._sources import LoadFailure

    def load(i: int) -> Item:
        try:
            x, label, path = source.load(i)
        except LoadFailure as e:
            raise _Unreadable(e.path or f"item {e.index}", e.reason) from None
        true = classes[label] if classes is not None and label is not None else None
        return i, x, true, path or f"item {i}"

    return load


def _image_loader(bundle: Any, todo: list[str]) -> Callable[[int], Item]:
    def load(i: int) -> Item:
        x, name = _load_input(bundle, todo[i])
        return i, x, None, name

    return load


def _attribute_image(
    bundle: Any,
    item: Item,
    stem: str,
    methods: list[str],
    target: Any,
    kw: dict[str, Any],
    run_faithfulness: bool,
    out: Path,
) -> dict[str, Any]:
    """Every method's map of one image, their faithfulness, its figure and saved maps; the
    image's entry of ``attribution.json`` (with its methods' settings under ``settings``)."""
    from convlens.analysis.attribution import CAM_METHODS, attribute
    from convlens.analysis.attribution.faithfulness import faithfulness
    from convlens.analysis.attribution.gradients import PIXEL_METHODS
    from convlens.plot import attribution as plot_attribution
    from convlens.plot import save_figure

    index, x, true, name = item
    results = []
    faith: dict[str, list[Any]] = {}
    per_method: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    fixed = target
    for m in methods:
        args: dict[str, Any] = {"output": kw["output"], "batch": kw["batch"], "seed": kw["seed"]}
        if m == "integrated_gradients":
            args.update(steps=kw["steps"], baseline=kw["baseline"])
        if m in PIXEL_METHODS and kw["samples"]:
            args["samples"] = kw["samples"]
        if m in CAM_METHODS and kw["layer"] is not None:
            args["layer"] = kw["layer"]
        if m == "scorecam":
            args["precision"] = kw["precision"]
        a = attribute(bundle, x, fixed, method=m, **args)
        fixed = list(a.target)  # every method explains the same target (top: the first's)
        results.append(a)
        r: dict[str, Any] = {
            "target": a.target[0],
            "label": a.labels[0] if a.labels else None,
            "score": float(a.score[0]),
        }
        if a.delta is not None:
            r["delta"] = float(a.delta[0])
            r["steps"] = a.steps
        if a.layer is not None:
            r["layer"] = a.layer
        if run_faithfulness:
            faith[m] = []
            r["faithfulness"] = {}
            for metric in METRICS:
                f = faithfulness(bundle, x, a, metric=metric, batch=kw["batch"], seed=kw["seed"])
                faith[m].append(f)
                r["faithfulness"][metric] = {
                    "auc": float(f.auc[0]),
                    "random_auc": float(f.random_auc[0]),
                }
        r["seconds"] = a.seconds
        per_method[m] = r
        settings[m] = a.settings
        a.save(out / "maps" / stem, name=m)
    title = f"{stem} ({true})" if true else stem
    fig = plot_attribution(results, faithfulness=faith or None, scale=kw["scale"], titles=[title])
    save_figure(fig, out / f"{stem}.png")
    return {
        "index": index,
        "image": name,
        "class": true,
        "figure": f"{stem}.png",
        "maps": f"maps/{stem}",
        "methods": per_method,
        "settings": settings,
    }


def _run_sanity(
    bundle: Any,
    load: Callable[[int], Item],
    first: dict[str, Any],
    methods: list[str],
    kw: dict[str, Any],
    out: Path,
) -> tuple[dict[str, Any], Path]:
    """Adebayo's randomization test on the first image, for the target it was given."""
    from convlens.analysis.attribution.sanity import sanity
    from convlens.plot import sanity as plot_sanity
    from convlens.plot import save_figure

    _, x, _, _ = load(first["index"])
    target = first["methods"][methods[0]]["target"]
    result = sanity(
        bundle,
        x,
        [target],
        methods=methods,
        steps=kw["steps"],
        output=kw["output"],
        batch=kw["batch"],
        seed=kw["seed"],
        layer=kw["layer"],
        baseline=kw["baseline"],
        samples=kw["samples"],
    )
    doc = result.to_dict()
    doc.pop("versions", None)
    last = {m: doc["abs_correlation"][m]["mean"][-1] for m in methods}
    click.echo(
        f"sanity (the first image only, {first['image']}): |map| rank correlation after "
        f"randomizing all {len(result.units)} units: "
        + ", ".join(f"{m} {'n/a' if v is None else f'{v:.3g}'}" for m, v in last.items())
    )
    doc = {"image": first["image"], "index": first["index"], **doc}
    return doc, save_figure(plot_sanity(result), out / "sanity.png")


def _report(
    bundle: Any,
    entries: list[dict[str, Any]],
    methods: list[str],
    skipped: list[dict[str, Any]],
    world: int,
    dev: torch.device,
    seconds: float,
    dataset: bool,
) -> None:
    click.echo(
        f"{bundle.description}: {len(entries)} image(s)"
        + (f", {len(skipped)} skipped" if skipped else "")
        + f", {', '.join(methods)}, {seconds:.1f} s, {world} process(es), {dev}"
    )
    if not dataset:
        for e in entries:
            click.echo(f"{e['image']}")
            for m in methods:
                click.echo(f"  {_method_line(m, e['methods'][m])}")
        return
    for m, s in _summary(entries, methods).items():
        parts = [f"{m:<22} mean score {_fmt(s['mean_score'])}"]
        if "max_abs_delta" in s:
            parts.append(f"max |delta| {s['max_abs_delta']:.2g}")
        for metric in METRICS:
            if f"{metric}_auc" in s:
                parts.append(
                    f"mean {metric} AUC {s[f'{metric}_auc']:.3f} "
                    f"(random {s[f'{metric}_random_auc']:.3f})"
                )
        click.echo(", ".join(parts))
