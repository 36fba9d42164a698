"""The tour: the course's Segment 1 and Segment 2 end to end, as one report.

``tour(out="tour/")`` (CLI: ``convlens tour``) runs each section in the course's order,
writes its figures as PNG files and its numbers into ``DIR/sections/<id>.json``, then
assembles ``DIR/report.json`` and the self-contained ``DIR/report.html``
(:mod:`convlens.report`). Sections:

1. ``tensor``: the image as a tensor (channels figure, shape and value range);
2. ``filters``: filter selectivity on synthetic images;
3. ``data``: a sample batch with its labels;
4. ``training``: SimpleCNN trained on the data (curves, accuracy, per-class accuracy,
   confusion matrix);
5. ``conv1``: the first layer's filters before and after training;
6. ``depth``: activations by depth (mean maps, the conv1 feature-map grid);
7. ``spatial``: the spatial experiment (a box blacked out; ``inside_fraction`` per layer)
   and the whole sensitivity map of the top class beside it;
8. ``pretrained``: a pretrained model (top-5, early vs deep feature maps);
9. ``featurevis``: feature visualization of the first 10 channels of the course's layer;
10. ``microscope``: the trained SimpleCNN's ``bn3`` under :func:`convlens.microscope` on the
    validation data: a compact grid here and the full site in ``DIR/microscope/``;
11. ``atlas``: the activation atlas of the same ``bn3`` (:func:`convlens.atlas`): the grid
    of icons here, class atlases of every class and the pages in ``DIR/atlas/``;
12. ``summary``: the course's questions with the numbers found.

Every finished section is cached in ``DIR`` (its JSON is written last, atomically), so a
run that was interrupted picks up where it stopped; ``force=True`` recomputes. A section
that cannot run (no weights offline, no dataset) says what is missing and the exact
command that fixes it, and the tour goes on.

Defaults are the course's setup (Imagenette 160, 8 epochs, resnet18, inceptionv1 for
Segment 2), which downloads data and weights once. ``quick=True`` is the embedded offline
version: the drawn shapes dataset, the bundled sample photo, ``efficientnet_lite0`` for
the pretrained and feature-visualization sections, few epochs and steps.

Example:
    >>> report = convlens.tour(quick=True, out="tour/")
    >>> report  # PosixPath('tour/report.html')
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from convlens._io import folder_lock, versions, write_error, write_json
from convlens.device import DeviceLike, resolve_device
from convlens.errors import ConvlensError, FolderLockedError, WriteError

__all__ = ["SECTIONS", "TourConfig", "tour"]

#: Section ids in the course's order, with their titles.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("tensor", "1. The image as a tensor"),
    ("filters", "2. What a filter matches"),
    ("data", "3. The data"),
    ("training", "4. Training"),
    ("conv1", "5. First-layer filters before and after training"),
    ("depth", "6. Activations by depth"),
    ("spatial", "7. Does it know where things are?"),
    ("pretrained", "8. A pretrained model"),
    ("featurevis", "9. Feature visualization"),
    ("microscope", "10. Microscope: every unit of the trained network"),
    ("atlas", "11. Activation atlas: everything the layer represents"),
    ("summary", "12. Summary"),
)
_FORMAT = 3  # bump when a section's JSON changes meaning: old caches are recomputed


@dataclass
class TourConfig:
    """Everything that decides a tour's numbers (saved in ``report.json``)."""

    quick: bool = False
    data: str = "imagenette"
    model: str = "resnet18"
    vis_model: str = "inceptionv1"
    images: list[str] = field(default_factory=list)
    epochs: int = 8
    train_per_class: int | None = None  # shapes only
    vis_steps: int = 256
    vis_size: int = 128
    vis_channels: int = 10
    micro_steps: int = 128
    micro_channels: int | None = None  # None: every channel of the layer
    atlas_grid: int = 12
    atlas_steps: int = 128
    atlas_size: int = 64
    box: tuple[int, int, int, int] = (30, 90, 40, 110)
    attr_steps: int = 64  # integrated gradients in the "where" section
    faith_steps: int = 50  # deletion curve points
    sanity_methods: tuple[str, ...] = (
        "saliency",
        "integrated_gradients",
        "guided_backprop",
        "gradcam",
    )
    sanity_steps: int = 16  # integrated gradients in the sanity check
    seed: int = 0

    @classmethod
    def make(
        cls,
        *,
        quick: bool = False,
        data: str | None = None,
        model: str | None = None,
        images: Sequence[str] | None = None,
        epochs: int | None = None,
        steps: int | None = None,
        seed: int = 0,
    ) -> TourConfig:
        """The course's setup, or the quick offline one, with any of it overridden."""
        if quick:
            cfg = cls(
                quick=True,
                data="shapes",
                model="efficientnet_lite0",
                vis_model="efficientnet_lite0",
                epochs=3,
                train_per_class=300,
                vis_steps=48,
                vis_size=128,
                micro_steps=32,
                micro_channels=16,
                atlas_grid=8,
                atlas_steps=32,
                attr_steps=16,
                faith_steps=25,
                sanity_steps=8,
            )
        else:
            cfg = cls()
        if data is not None:
            cfg.data = data
        if model is not None:
            cfg.model = model
            cfg.vis_model = model
        if images:
            cfg.images = list(images)
        if epochs is not None:
            if epochs < 1:
                raise ValueError(f"epochs must be at least 1, got {epochs}")
            cfg.epochs = epochs
        if steps is not None:
            if steps < 1:
                raise ValueError(f"steps must be at least 1, got {steps}")
            cfg.vis_steps = steps
            cfg.micro_steps = steps
            cfg.atlas_steps = steps
        cfg.seed = seed
        return cfg


class Missing(ConvlensError):
    """A section cannot run here: ``reason`` and the ``fix`` (a command)."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(reason)
        self.reason, self.fix = reason, fix


@dataclass
class _Ctx:
    cfg: TourConfig
    out: Path
    device: torch.device
    progress: bool
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict)

    def save(self, fig: Any, name: str) -> dict[str, str]:
        from convlens.plot import save_figure

        save_figure(fig, self.out / name)
        return {"file": name}

    def image(self) -> tuple[torch.Tensor, str]:
        """The first of the user's images (or the bundled photo) and its name."""
        if "image" not in self._cache:
            from convlens.images import load_image, sample_image, sample_image_path

            if self.cfg.images:
                src = self.cfg.images[0]
                self._cache["image"] = (load_image(src), Path(src).name or src)
            else:
                self._cache["image"] = (sample_image(), sample_image_path().name)
        image: tuple[torch.Tensor, str] = self._cache["image"]
        return image

    def datasets(self) -> tuple[Any, Any]:
        if "data" not in self._cache:
            from convlens.data import load_data, shapes

            try:
                if self.cfg.data == "shapes":
                    per = self.cfg.train_per_class or 1500
                    self._cache["data"] = shapes(
                        train_per_class=per,
                        val_per_class=max(20, per // 10),
                        seed=self.cfg.seed,
                        progress=self.progress,
                    )
                else:
                    self._cache["data"] = load_data(self.cfg.data, progress=self.progress)
            except ConvlensError as e:
                raise Missing(
                    f"the dataset {self.cfg.data!r} is not available: {_first_line(e)}",
                    "convlens tour --data shapes  (the offline dataset), or connect to the "
                    f"internet once: convlens train --data {self.cfg.data} --epochs 1",
                ) from None
        pair: tuple[Any, Any] = self._cache["data"]
        return pair

    def trained(self) -> Any:
        """The model the training section trained (from its checkpoint in DIR/train)."""
        if "trained" not in self._cache:
            if self.done.get("training", {}).get("status") != "done":
                raise Missing(
                    "this section needs the trained model, and the training section did not finish",
                    f"convlens tour --out {self.out}  (see the training section)",
                )
            from convlens.models import load_model

            self._cache["trained"] = load_model(self.out / "train", device=self.device)
        return self._cache["trained"]

    def pretrained(self, spec: str) -> Any:
        key = f"pretrained:{spec}"
        if key not in self._cache:
            from convlens.models import load_model

            try:
                self._cache[key] = load_model(spec, weights="default", device=self.device)
            except ConvlensError as e:
                raise Missing(
                    f"no pretrained weights for {spec}: {_first_line(e)}",
                    "connect to the internet once (the weights are cached), or run "
                    "convlens tour --model efficientnet_lite0  (ImageNet weights installed "
                    "with convlens)",
                ) from None
        return self._cache[key]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _r(x: float, digits: int = 4) -> float:
    return float(f"{float(x):.{digits}g}")


# ------------------------------------------------------------------------ sections


def _tensor(ctx: _Ctx) -> dict[str, Any]:
    from convlens.images import image_summary
    from convlens.plot import channels

    img, name = ctx.image()
    s = image_summary(img)
    return {
        "intro": (
            f"{name} becomes a tensor of shape {s['shape']} (channels, height, width) with "
            f"values from {s['min']:.3f} to {s['max']:.3f}. Each channel is one colour's "
            "intensity; together they are the picture."
        ),
        "figures": [ctx.save(channels(img, title=name), "tensor_channels.png")],
        "numbers": {
            "image": name,
            "shape": s["shape"],
            "dtype": s["dtype"],
            "min": _r(s["min"]),
            "max": _r(s["max"]),
            "channel means (R, G, B)": [_r(v) for v in s["channel_mean"]],
        },
    }


def _filters(ctx: _Ctx) -> dict[str, Any]:
    from convlens.analysis.filters import selectivity
    from convlens.plot import filter_grid, kernels

    t = selectivity()
    rows = [[img, *[_r(float(v)) for v in t.peak[i]]] for i, img in enumerate(t.images)]
    best = {img: t.best_kernel(img) for img in t.images}
    return {
        "intro": (
            "Hand-made 3x3 kernels slide over small synthetic images. Each kernel responds "
            "most to the pattern it is shaped like: the table gives each kernel's peak "
            "response on each image."
        ),
        "figures": [
            ctx.save(kernels(), "filters_kernels.png"),
            ctx.save(filter_grid(), "filters_grid.png"),
        ],
        "tables": [
            {
                "caption": "Peak response (away from the zero-padded border)",
                "columns": ["image", *t.kernels],
                "rows": rows,
            }
        ],
        "numbers": {"best kernel per image": best},
    }


def _sample_batch(ds: Any, n: int) -> tuple[torch.Tensor, list[int]]:
    """``n`` training images spread over the classes, at the dataset's crop size."""
    import torchvision.transforms.v2.functional as TF

    from convlens.images import load_image

    by_class: dict[int, list[str]] = {}
    for path, label in ds.samples:
        by_class.setdefault(int(label), []).append(path)
    order: list[tuple[str, int]] = []
    depth = 0
    while len(order) < n and any(depth < len(v) for v in by_class.values()):
        for label in sorted(by_class):
            if depth < len(by_class[label]) and len(order) < n:
                order.append((by_class[label][depth], label))
        depth += 1
    size = int(ds.spec.crop)
    imgs = []
    for path, _ in order:
        x = load_image(path)
        x = TF.resize(x, [size], antialias=True)
        imgs.append(TF.center_crop(x, [size, size]))
    return torch.stack(imgs), [label for _, label in order]


def _data(ctx: _Ctx) -> dict[str, Any]:
    from convlens.plot import sample_batch

    train, val = ctx.datasets()
    imgs, labels = _sample_batch(train, 12)
    fig = sample_batch(imgs, labels, train.classes, title=f"{train.name}: a sample batch")
    counts = [0] * len(train.classes)
    for _, label in train.samples:
        counts[int(label)] += 1
    return {
        "intro": (
            f"{train.name}: {len(train)} training and {len(val)} validation images in "
            f"{len(train.classes)} classes, {train.spec.crop} px crops."
        ),
        "figures": [ctx.save(fig, "data_batch.png")],
        "tables": [
            {
                "caption": "Training images per class",
                "columns": ["class", "images"],
                "rows": [[c, n] for c, n in zip(train.classes, counts)],
            }
        ],
        "numbers": {
            "dataset": train.name,
            "train images": len(train),
            "val images": len(val),
            "classes": len(train.classes),
        },
    }


def _training(ctx: _Ctx) -> dict[str, Any]:
    from convlens.models import SimpleCNN
    from convlens.plot import confusion, curves
    from convlens.train import train

    train_ds, val_ds = ctx.datasets()
    run = ctx.out / "train"
    resume = all(
        (run / f).exists() for f in ("model.safetensors", "model.json", "training_state.pt")
    )
    torch.manual_seed(ctx.cfg.seed)
    model = SimpleCNN(len(train_ds.classes))
    result = train(
        model,
        train_ds,
        val_ds,
        epochs=ctx.cfg.epochs,
        seed=ctx.cfg.seed,
        out=run,
        resume=resume,
        device=ctx.device,
        progress=ctx.progress,
    )
    final = result.final
    if final is None:
        raise ConvlensError("training finished without a validation result")
    per_class = [[c, _r(a)] for c, a in zip(result.classes, final.per_class_accuracy)]
    hist = [
        [
            h.get("epoch"),
            _r(h.get("train_loss", float("nan"))),
            _r(h.get("val_accuracy", float("nan"))),
        ]
        for h in result.history
    ]
    return {
        "intro": (
            f"The course's SimpleCNN ({sum(p.numel() for p in model.parameters()):,} "
            f"parameters) trained for {len(result.history)} epochs with Adam: "
            f"{final.accuracy:.1%} validation accuracy (chance: "
            f"{1 / len(result.classes):.0%})."
        ),
        "figures": [
            ctx.save(
                curves(result.history, title=f"SimpleCNN on {train_ds.name}"), "training_curves.png"
            ),
            ctx.save(confusion(final.confusion, result.classes), "training_confusion.png"),
        ],
        "tables": [
            {
                "caption": "Per-class validation accuracy",
                "columns": ["class", "accuracy"],
                "rows": per_class,
            },
            {
                "caption": "History",
                "columns": ["epoch", "train loss", "val accuracy"],
                "rows": hist,
            },
        ],
        "numbers": {
            "val accuracy": _r(final.accuracy),
            "epochs": len(result.history),
            "train seconds": round(result.train_seconds, 1),
            "images per second": round(result.images_per_s),
        },
    }


def _conv1(ctx: _Ctx) -> dict[str, Any]:
    from safetensors.torch import load_file

    from convlens.plot import filters_before_after

    bundle = ctx.trained()
    before_file = ctx.out / "train" / "conv1_before.safetensors"
    if not before_file.exists():
        raise Missing(
            "the first-layer weights from before training were not saved",
            f"convlens tour --force --out {ctx.out}",
        )
    before = load_file(str(before_file))["weight"]
    after = bundle.model.conv1.weight.detach().cpu()
    change = float((after - before).norm() / before.norm())
    return {
        "intro": (
            "The first layer's 3-channel filters, each shown as a small colour image, at "
            "initialisation and after training. Training moves them by "
            f"{change:.0%} of their initial size."
        ),
        "figures": [ctx.save(filters_before_after(before, after), "conv1_before_after.png")],
        "numbers": {"relative change of conv1 weights": _r(change)},
    }


def _depth(ctx: _Ctx) -> dict[str, Any]:
    from convlens.capture import capture
    from convlens.plot import feature_maps, mean_maps

    bundle = ctx.trained()
    img, name = ctx.image()
    x = bundle.preprocess(img)
    layers = ["bn1", "bn2", "bn3"]
    acts = capture(bundle.model, x, ["conv1", *layers])
    rows = []
    for layer in layers:
        a = acts[layer][0].relu()
        rows.append([layer, list(a.shape), _r(float(a.mean())), _r(float((a > 0).float().mean()))])
    return {
        "intro": (
            f"The trained model's activations for {name}: the channel mean of each "
            "BatchNorm output (after ReLU), shallow to deep, and every feature map of the "
            "first convolution. Resolution falls and channels grow with depth."
        ),
        "figures": [
            ctx.save(mean_maps({k: acts[k] for k in layers}, relu=True), "depth_mean_maps.png"),
            ctx.save(feature_maps(acts["conv1"], title="conv1"), "depth_conv1_maps.png"),
        ],
        "tables": [
            {
                "caption": "Per layer (after ReLU)",
                "columns": ["layer", "shape", "mean activation", "active fraction"],
                "rows": rows,
            }
        ],
    }


def _spatial(ctx: _Ctx) -> dict[str, Any]:
    from convlens.analysis.occlusion import occlude
    from convlens.models.zoo import default_layers
    from convlens.plot import occlusion

    bundle = ctx.pretrained(ctx.cfg.model)
    img, name = ctx.image()
    x = bundle.preprocess(img)
    layers = default_layers(bundle)
    mean, std = bundle.normalize
    r = occlude(
        bundle.model, x, ctx.cfg.box, layers, mean=mean, std=std, model_name=bundle.description
    )
    rows = [[layer, _r(ch.inside_fraction), _r(ch.area_fraction)] for layer, ch in r.layers.items()]
    first, last = layers[0], layers[-1]
    # The whole map: every 32 px window (stride 16), the drop of the top-1 class score.
    from convlens.analysis.sensitivity import sensitivity
    from convlens.plot import sensitivity as sensitivity_figure

    with torch.no_grad():
        top = int(bundle.model(x.unsqueeze(0).to(ctx.device)).argmax(1))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smap = sensitivity(bundle, x, top, window=32, stride=16, progress=False)
    peak = int(smap.map.argmax())
    py, px = divmod(peak, smap.map.shape[1])
    label = bundle.labels[top] if bundle.labels and top < len(bundle.labels) else str(top)
    where = _where_three_ways(ctx, bundle, x, top, smap)
    return {
        "intro": (
            f"A box {ctx.cfg.box} (top, bottom, left, right) of {name} is blacked out and "
            f"{bundle.name}'s activations are compared with the original. inside_fraction "
            "is the share of each layer's change that stays inside the box: early layers "
            f"keep it there ({first}: {r.layers[first].inside_fraction:.2f}), deep layers "
            f"spread it ({last}: {r.layers[last].inside_fraction:.2f}).\n\n"
            f"The whole map (Zeiler and Fergus): a 32 px window slid over every position "
            f"(stride 16), and how much the score of the top class, {label}, drops each "
            "time. Red: hiding that part lowers the score.\n\n"
            "Three ways to ask which pixels the answer depends on: occlusion, integrated "
            "gradients and Grad-CAM, each signed (red raises the score, blue lowers it) on its "
            "own symmetric scale. Deletion AUC: remove the pixels a map ranks first and watch "
            "the class probability fall; lower is more faithful, and a random order is the "
            "bar to beat. The sanity check (Adebayo et al. 2018) re-initialises the model's "
            "layers from the top down: a map that explains the model must change with it "
            "(its rank correlation with the original falls), while a map that stays put "
            "(guided backpropagation, typically) shows the image's edges, not the model."
        ),
        "figures": [
            ctx.save(occlusion(r), "spatial_occlusion.png"),
            ctx.save(sensitivity_figure(smap), "spatial_sensitivity.png"),
            *where["figures"],
        ],
        "tables": [
            {
                "caption": "Where the change goes",
                "columns": ["layer", "inside_fraction", "area_fraction"],
                "rows": rows,
            },
            *where["tables"],
        ],
        "numbers": {
            "model": bundle.description,
            "box": list(ctx.cfg.box),
            "top class": f"{label} ({top})",
            "top class score": _r(smap.score),
            "largest drop": _r(float(smap.map.max())),
            "window with the largest drop (top, left)": [smap.ys[py], smap.xs[px]],
            "sensitivity seconds": round(smap.seconds, 2),
            **where["numbers"],
        },
        "notes": [str(w.message) for w in caught],
    }


def _where_three_ways(
    ctx: _Ctx, bundle: Any, x: torch.Tensor, top: int, smap: Any
) -> dict[str, Any]:
    """Occlusion, integrated gradients and Grad-CAM for the top class, their deletion AUCs,
    and the model-randomization sanity check."""
    from convlens.analysis.attribution import Attribution, attribute
    from convlens.analysis.attribution.faithfulness import faithfulness
    from convlens.analysis.attribution.sanity import sanity
    from convlens.plot import attribution as attribution_figure
    from convlens.plot import sanity as sanity_figure

    steps = ctx.cfg.attr_steps
    occ = Attribution(
        map=smap.attribution.unsqueeze(0).float(),
        score=torch.tensor([smap.score], dtype=torch.float32),
        target=(str(top),),
        method="occlusion",
        input=x.unsqueeze(0).detach().cpu(),
        labels=(bundle.labels[top] if bundle.labels and top < len(bundle.labels) else None,),
        model_name=bundle.description,
        mean=smap.mean,
        std=smap.std,
        settings={"window": list(smap.window), "stride": list(smap.stride)},
    )
    ig = attribute(bundle, x, top, method="integrated_gradients", steps=steps, device=ctx.device)
    cam = attribute(bundle, x, top, method="gradcam", device=ctx.device)
    results = [occ, ig, cam]
    deletion = {
        a.method: faithfulness(
            bundle,
            x.unsqueeze(0),
            a,
            metric="deletion",
            steps=ctx.cfg.faith_steps,
            device=ctx.device,
        )
        for a in results
    }
    check = sanity(
        bundle,
        x.unsqueeze(0),
        top,
        methods=ctx.cfg.sanity_methods,
        steps=ctx.cfg.sanity_steps,
        device=ctx.device,
    )
    last = {m: float(check.correlation[m][-1].mean()) for m in check.methods}
    last_abs = {m: float(check.abs_correlation[m][-1].mean()) for m in check.methods}
    rows = [
        [
            a.method,
            _r(float(deletion[a.method].auc[0])),
            _r(float(deletion[a.method].random_auc[0])),
            _r(float(a.delta[0])) if a.delta is not None else "",
        ]
        for a in results
    ]
    return {
        "figures": [
            ctx.save(
                attribution_figure(results, faithfulness=deletion, scale="method"),
                "spatial_attribution.png",
            ),
            ctx.save(sanity_figure(check), "spatial_sanity.png"),
        ],
        "tables": [
            {
                "caption": "Three maps of the top class: deletion AUC (lower is more faithful) "
                "against a random order",
                "columns": ["method", "deletion AUC", "random order AUC", "IG delta"],
                "rows": rows,
            },
            {
                "caption": "Sanity check: rank correlation with the original map once every "
                f"layer is re-initialised ({len(check.units)} units, top down)",
                "columns": ["method", "Spearman (signed)", "Spearman (|map|)"],
                "rows": [[m, _r(last[m]), _r(last_abs[m])] for m in check.methods],
            },
        ],
        "numbers": {
            "integrated gradients steps": steps,
            "integrated gradients delta": _r(float(ig.delta[0])) if ig.delta is not None else None,
            "grad-cam layer": cam.layer,
            "deletion AUC": {m: _r(float(f.auc[0])) for m, f in deletion.items()},
            "deletion AUC, random order": {
                m: _r(float(f.random_auc[0])) for m, f in deletion.items()
            },
            "sanity: Spearman after all layers randomized": {m: _r(v) for m, v in last.items()},
        },
    }


def _pretrained(ctx: _Ctx) -> dict[str, Any]:
    from convlens.classify import classify
    from convlens.plot import depth_comparison

    bundle = ctx.pretrained(ctx.cfg.model)
    imgs: list[tuple[torch.Tensor, str]] = []
    if ctx.cfg.images:
        from convlens.images import load_image

        imgs = [(load_image(p), Path(p).name or p) for p in ctx.cfg.images]
    else:
        imgs = [ctx.image()]
    tables = []
    top1 = {}
    for img, name in imgs:
        got = classify(bundle, [img], k=5)
        preds: list[Any] = list(got[0])
        tables.append(
            {
                "caption": f"Top 5 for {name}",
                "columns": ["rank", "label", "class index", "probability"],
                "rows": [[i + 1, p.label, p.index, _r(p.probability)] for i, p in enumerate(preds)],
            }
        )
        top1[name] = f"{preds[0].label} ({preds[0].probability:.1%})"
    fig = depth_comparison(bundle, imgs[0][0], device=ctx.device)
    return {
        "intro": (
            f"{bundle.description}. Its five most likely classes for each image, and its "
            "channel-mean activation maps at an early and a deep layer: early maps follow "
            "the image's edges, deep ones mark where the object is, coarsely."
        ),
        "figures": [ctx.save(fig, "pretrained_depth.png")],
        "tables": tables,
        "numbers": {"model": bundle.description, "top-1": top1},
    }


def _featurevis(ctx: _Ctx) -> dict[str, Any]:
    from convlens.analysis.featurevis import featurevis_layer, render
    from convlens.plot import feature_vis

    bundle = ctx.pretrained(ctx.cfg.vis_model)
    layer = featurevis_layer(bundle)
    n = ctx.cfg.vis_channels
    r = render(
        bundle,
        f"{layer}:0-{n - 1}",
        size=ctx.cfg.vis_size,
        steps=ctx.cfg.vis_steps,
        seed=ctx.cfg.seed,
        progress=ctx.progress,
    )
    rows = [[label, _r(float(v))] for label, v in zip(r.labels, r.final_values)]
    return {
        "intro": (
            f"What input makes a unit fire hardest? For each of the first {n} channels of "
            f"{bundle.name}'s {layer}, an image optimised for {ctx.cfg.vis_steps} steps "
            "(1/f Fourier parameterization, decorrelated colour, Lucid's random "
            f"transforms, Adam with the {r.settings['schedule']['name']} learning-rate "
            f"schedule peaking at {r.settings['lr']:g}, the model's forward in "
            f"{r.settings['precision']}) to maximise that channel's mean activation."
        ),
        "figures": [
            ctx.save(feature_vis(r, title=f"{bundle.name} {layer}"), "featurevis_grid.png")
        ],
        "tables": [
            {
                "caption": "Objective reached (mean activation)",
                "columns": ["channel", "objective"],
                "rows": rows,
            }
        ],
        "numbers": {
            "model": bundle.description,
            "layer": layer,
            "steps": ctx.cfg.vis_steps,
            "size": ctx.cfg.vis_size,
            "seconds": round(r.times[-1], 1),
            "schedule": r.settings["schedule"]["name"],
            "precision": r.settings["precision"],
        },
    }


def _microscope(ctx: _Ctx) -> dict[str, Any]:
    from convlens.analysis.featurevis import featurevis_layer
    from convlens.microscope import microscope
    from convlens.plot import microscope_grid

    bundle = ctx.trained()
    _, val = ctx.datasets()
    names = {n for n, _ in bundle.model.named_modules()}
    layer = "bn3" if "bn3" in names else featurevis_layer(bundle)
    n = ctx.cfg.micro_channels
    quick = ctx.cfg.quick
    site = microscope(
        bundle,
        val,
        [layer],
        out=ctx.out / "microscope",
        channels=f"0-{n - 1}" if n else None,
        k=6 if quick else 9,
        steps=ctx.cfg.micro_steps,
        diversity=2 if quick else 4,
        seed=ctx.cfg.seed,
        device=ctx.device,
        progress=ctx.progress,
        title=f"convlens tour: {bundle.name} {layer}",
        settings={"tour": True},
    )
    doc = json.loads((site / "microscope.json").read_text())
    units = doc["layers"][0]["units"]
    rows = []
    for u in units:
        sel = u.get("selectivity") or {}
        rows.append(
            [
                u["channel"],
                _r(u["stats"]["mean"]) if u["stats"]["mean"] is not None else None,
                _r(sel["index"]) if sel.get("index") is not None else None,
                sel.get("top_class"),
            ]
        )
    shown = min(8, len(units))
    return {
        "intro": (
            f"Every channel of the trained {bundle.name}'s {layer} across the "
            f"{doc['dataset']['size']} validation images: its feature visualization "
            "(the channel objective) beside the validation crops that excite it most. "
            f"Below, the first {shown}; the full site, one page per channel with the "
            "neuron, negative and diversity renders, the bottom examples, a histogram "
            "and the class selectivity, is in the microscope folder next to this report."
        ),
        "figures": [
            ctx.save(microscope_grid(site, layer, max_channels=shown), "microscope_grid.png")
        ],
        "tables": [
            {
                "caption": "Per channel: mean score, class selectivity, top class",
                "columns": ["channel", "mean", "selectivity", "top class"],
                "rows": rows,
            }
        ],
        "links": [{"href": "microscope/index.html", "text": f"Open the microscope of {layer}"}],
        "numbers": {
            "layer": layer,
            "channels": len(units),
            "steps": ctx.cfg.micro_steps,
            "seconds": {k: round(float(v), 1) for k, v in doc["stages"].items()},
        },
    }


def _atlas(ctx: _Ctx) -> dict[str, Any]:
    from convlens.analysis.atlas import require_umap
    from convlens.analysis.featurevis import featurevis_layer
    from convlens.atlas import atlas
    from convlens.plot import atlas_grid

    try:
        require_umap()
    except ConvlensError as e:
        raise Missing(str(e), 'pip install "convlens[atlas]"') from None
    bundle = ctx.trained()
    _, val = ctx.datasets()
    names = {n for n, _ in bundle.model.named_modules()}
    layer = "bn3" if "bn3" in names else featurevis_layer(bundle)
    cfg = ctx.cfg
    out = atlas(
        bundle,
        val,
        layer,
        out=ctx.out / "atlas",
        grid=cfg.atlas_grid,
        size=cfg.atlas_size,
        steps=cfg.atlas_steps,
        classes="all",
        seed=cfg.seed,
        device=ctx.device,
        progress=ctx.progress,
        title=f"convlens tour: activation atlas of {bundle.name} {layer}",
    )
    doc = json.loads((out / "atlas.json").read_text())
    lay = doc["layout"]
    main = next(lv for lv in doc["levels"] if lv["grid"] == cfg.atlas_grid)
    rows = [[ca["name"], ca["samples"], len(ca["cells"])] for ca in doc["class_atlases"]]
    figures = [ctx.save(atlas_grid(out), "atlas_grid.png")]
    agree = lay.get("neighbour_agreement")
    chance = lay.get("chance")
    return {
        "intro": (
            f"One activation vector of {layer} at a random position of each of the "
            f"{doc['samples']['images']} validation images, laid out in 2-D by UMAP so that "
            "similar vectors land close; the layout cut into a "
            f"{cfg.atlas_grid} x {cfg.atlas_grid} grid, and each cell's mean vector "
            "(whitened) rendered as a feature visualization. Where a single channel's "
            "render shows one direction of the layer, the atlas shows the directions the "
            "data actually uses. "
            + (
                f"The nearest neighbour of a sample on the map has the same label "
                f"{agree:.0%} of the time (chance {chance:.0%})."
                if agree is not None and chance is not None
                else ""
            )
        ),
        "figures": figures,
        "tables": [
            {
                "caption": "Class atlases: samples the model predicts as the class (with "
                "positive attribution to it), and their cells",
                "columns": ["class", "samples", "cells"],
                "rows": rows,
            }
        ],
        "links": [{"href": "atlas/index.html", "text": f"Open the activation atlas of {layer}"}],
        "numbers": {
            "layer": layer,
            "samples": doc["samples"]["count"],
            "icons": len(main["cells"]),
            "neighbour agreement": agree,
            "chance": chance,
            "seconds": doc["timing"],
        },
    }


def _summary(ctx: _Ctx) -> dict[str, Any]:
    def get(section: str, key: str) -> Any:
        s = ctx.done.get(section, {})
        return s.get("numbers", {}).get(key) if s.get("status") == "done" else None

    def show(v: Any, fmt: str = "{}") -> str:
        return "not run (see its section)" if v is None else fmt.format(v)

    spatial = ctx.done.get("spatial", {})
    inside = ""
    if spatial.get("status") == "done":
        rows = spatial["tables"][0]["rows"]
        inside = ", ".join(f"{r[0]} {r[1]:.2f}" for r in rows)
    fv = ctx.done.get("featurevis", {})
    fv_text = None
    if fv.get("status") == "done":
        vals = [r[1] for r in fv["tables"][0]["rows"]]
        fv_text = f"mean objective {sum(vals) / len(vals):.3g} over {len(vals)} channels"
    best = get("filters", "best kernel per image")
    rows = [
        ["What does a network see?", "a [C, H, W] tensor of numbers", show(get("tensor", "shape"))],
        [
            "What does a filter do?",
            "a kernel responds most to the pattern it is shaped like",
            show(None if best is None else ", ".join(f"{k}: {v}" for k, v in best.items())),
        ],
        [
            "What does a network learn?",
            "SimpleCNN trained on the data",
            show(get("training", "val accuracy"), "val accuracy {:.1%}"),
        ],
        [
            "What does each layer respond to?",
            "fine detail early, coarse, abstract maps deep",
            "see section 6" if ctx.done.get("depth", {}).get("status") == "done" else show(None),
        ],
        [
            "Does it know where things are?",
            "inside_fraction of the change, early vs deep",
            inside or show(None),
        ],
        ["What does a big model see?", "top-1 for the image", show(get("pretrained", "top-1"))],
        ["What input makes a neuron fire?", "feature visualization", show(fv_text)],
        [
            "What does each unit detect across the data?",
            "the microscope: renders beside dataset examples, per channel",
            show(
                None
                if get("microscope", "layer") is None
                else f"{get('microscope', 'channels')} channels of "
                f"{get('microscope', 'layer')}: microscope/index.html"
            ),
        ],
        [
            "What does a whole layer represent?",
            "the activation atlas: sampled vectors laid out by UMAP, each cell rendered",
            show(
                None
                if get("atlas", "layer") is None
                else f"{get('atlas', 'icons')} icons of {get('atlas', 'layer')}; nearest "
                f"neighbours share a label {get('atlas', 'neighbour agreement') or 0:.0%} "
                f"of the time (chance {get('atlas', 'chance') or 0:.0%}): atlas/index.html"
            ),
        ],
    ]
    states = {sid: ctx.done.get(sid, {}).get("status", "not run") for sid, _ in SECTIONS[:-1]}
    return {
        "intro": "The course's questions and what this run found.",
        "tables": [
            {
                "caption": "Summary",
                "columns": ["question", "what we looked at", "found"],
                "rows": rows,
            }
        ],
        "numbers": {"sections": states},
    }


_COMPUTE: dict[str, Callable[[_Ctx], dict[str, Any]]] = {
    "tensor": _tensor,
    "filters": _filters,
    "data": _data,
    "training": _training,
    "conv1": _conv1,
    "depth": _depth,
    "spatial": _spatial,
    "pretrained": _pretrained,
    "featurevis": _featurevis,
    "microscope": _microscope,
    "atlas": _atlas,
    "summary": _summary,
}

# What each section's numbers depend on (a change recomputes it).
_DEPENDS: dict[str, tuple[str, ...]] = {
    "tensor": ("images",),
    "filters": (),
    "data": ("data", "train_per_class", "seed"),
    "training": ("data", "train_per_class", "epochs", "seed"),
    "conv1": ("data", "train_per_class", "epochs", "seed"),
    "depth": ("data", "train_per_class", "epochs", "seed", "images"),
    "spatial": (
        "model",
        "images",
        "box",
        "attr_steps",
        "faith_steps",
        "sanity_methods",
        "sanity_steps",
    ),
    "pretrained": ("model", "images"),
    "featurevis": ("vis_model", "vis_steps", "vis_size", "vis_channels", "seed"),
    "microscope": (
        "data",
        "train_per_class",
        "epochs",
        "seed",
        "quick",
        "micro_steps",
        "micro_channels",
    ),
    "atlas": (
        "data",
        "train_per_class",
        "epochs",
        "seed",
        "quick",
        "atlas_grid",
        "atlas_steps",
        "atlas_size",
    ),
    "summary": ("__always__",),
}


def _key(cfg: TourConfig, sid: str, device: torch.device) -> str:
    d = asdict(cfg)
    parts = {k: d[k] for k in _DEPENDS[sid] if k in d}
    parts["format"] = _FORMAT
    parts["device"] = (
        device.type if sid in ("training", "featurevis", "microscope", "atlas") else None
    )
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_cached(path: Path, key: str) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("key") != key or doc.get("status") != "done":
        return None
    result: dict[str, Any] = doc
    return result


def tour(
    *,
    quick: bool = False,
    data: str | None = None,
    model: str | None = None,
    images: Sequence[str] | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    out: str | os.PathLike[str] = "tour",
    force: bool = False,
    seed: int = 0,
    device: DeviceLike = "auto",
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    only: Sequence[str] | None = None,
    config: TourConfig | None = None,
) -> Path:
    """Run the course end to end and write ``out/report.html`` (returned) and
    ``out/report.json``.

    ``quick``: the embedded offline setup (shapes, the sample photo, efficientnet_lite0,
    few epochs and steps); otherwise the course's (Imagenette 160, 8 epochs, resnet18,
    inceptionv1), downloading once. ``data``: ``"shapes"``, ``"imagenette"`` or a
    folder/archive; ``model``: the pretrained model for Segment 2 (also used for
    feature visualization); ``images``: your images (the first is used where one image
    is shown); ``epochs``, ``steps``: training epochs and feature-visualization steps.
    Finished sections are reused from ``out`` unless ``force``. ``only``: run just these
    section ids (the others are reused from ``out`` when cached, else left out).
    ``config``: a complete :class:`TourConfig` instead of the arguments above.

    Example:
        >>> convlens.tour(quick=True, out="tour/")
        PosixPath('tour/report.html')
    """
    cfg = config or TourConfig.make(
        quick=quick, data=data, model=model, images=images, epochs=epochs, steps=steps, seed=seed
    )
    dev = resolve_device(device)
    out_dir = Path(out)
    with folder_lock(out_dir, "tour"):  # one live run writes out
        return _tour(cfg, dev, out_dir, force, progress, echo, only)


def _tour(
    cfg: TourConfig,
    dev: torch.device,
    out_dir: Path,
    force: bool,
    progress: bool,
    echo: Callable[[str], None] | None,
    only: Sequence[str] | None,
) -> Path:
    (out_dir / "sections").mkdir(parents=True, exist_ok=True)
    say = echo or (lambda s: None)
    ctx = _Ctx(cfg, out_dir, dev, progress)
    wanted = set(only) if only is not None else None
    if wanted is not None and not wanted <= {sid for sid, _ in SECTIONS}:
        raise ValueError(f"unknown sections {sorted(wanted - {s for s, _ in SECTIONS})}")
    if cfg.images:  # a bad image fails now, in one line, not in the middle of the tour
        ctx.image()
    started = time.perf_counter()
    for sid, title in SECTIONS:
        key = _key(cfg, sid, dev)
        path = out_dir / "sections" / f"{sid}.json"
        cached = None if force or sid == "summary" else _load_cached(path, key)
        if cached is not None:
            ctx.done[sid] = cached
            say(f"{title}: cached")
            continue
        if wanted is not None and sid not in wanted and sid != "summary":
            continue
        t0 = time.perf_counter()
        section: dict[str, Any] = {"id": sid, "title": title, "key": key}
        try:
            body = _COMPUTE[sid](ctx)
            section.update(status="done", **body)
        except Missing as e:
            section.update(status="missing", missing={"reason": e.reason, "fix": e.fix})
        except (WriteError, FolderLockedError):
            raise  # a full disk or another run in a folder: not a section's failure
        except (ConvlensError, OSError, ValueError, RuntimeError) as e:
            if isinstance(e, OSError) and write_error(e, e.filename or out_dir) is not None:
                raise  # the same for a write outside atomic_open (a dataset cache)
            section.update(
                status="failed",
                missing={
                    "reason": f"{type(e).__name__}: {_first_line(e)}",
                    "fix": f"convlens tour --force --out {out_dir}  (after fixing the cause)",
                },
            )
        section["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(path, section)
        ctx.done[sid] = section
        say(f"{title}: {section['status']} ({section['seconds']:.1f} s)")
    doc = {
        "title": "convlens tour" + (" (quick, offline)" if cfg.quick else ""),
        "subtitle": "The course's Segment 1 and Segment 2, run end to end",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {**asdict(cfg), "device": str(dev)},
        "versions": versions(),
        "seed": cfg.seed,
        "seconds": round(time.perf_counter() - started, 1),
        "sections": [ctx.done[sid] for sid, _ in SECTIONS if sid in ctx.done],
    }
    write_json(out_dir / "report.json", doc)
    from convlens.report import write_report

    return write_report(out_dir)
