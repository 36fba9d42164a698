"""Train a model the course's way (or faster), with checkpoints after every epoch.

``train(model, train_data, val_data)`` runs the course's recipe by default: Adam at
1e-3, cross-entropy, batch 64, 8 epochs, ``RandomResizedCrop`` + flip for training and
``Resize`` + ``CenterCrop`` for validation. The ``"fast"`` recipe trades the constant
learning rate for one-cycle Adam up to 1e-2, progressive resizing (half, three quarters,
then full crop size) and label smoothing 0.1.

Data comes from the decoded cache (:mod:`convlens.data.cache`) through
:class:`convlens.data.BatchLoader` (``pipeline="fast"``), or from PIL decoding in
DataLoader workers exactly as the course does (``pipeline="course"``).

After each epoch ``out/`` gets ``model.safetensors`` + ``model.json`` (architecture,
classes, config, history, versions) and ``training_state.pt`` (optimizer, scheduler and
RNG state), each written atomically; ``resume=True`` continues from the last complete
epoch and ends with the same weights as an uninterrupted run (bit for bit on the CPU).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convlens._io import atomic_open, versions, write_json
from convlens.data.cache import DecodedImages, decode_cache
from convlens.data.folder import ImageFolderData
from convlens.data.loader import BatchLoader, epoch_generator
from convlens.device import DeviceLike, resolve_device
from convlens.errors import ConvlensError
from convlens.models.checkpoint import checkpoint_paths, read_checkpoint, save_checkpoint
from convlens.models.layers import evaluating, unwrap

__all__ = [
    "RECIPES",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "sample_predictions",
    "train",
]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run's numbers."""

    epochs: int = 8
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    recipe: str = "course"
    schedule: str = "constant"  # or "onecycle" (peak ``lr``)
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    sizes: tuple[float, ...] = (1.0,)  # crop size per stage, as a fraction of the spec's crop
    pipeline: str = "fast"  # or "course": PIL decoding in DataLoader workers
    workers: int = 2  # DataLoader workers for pipeline="course"
    channels_last: bool = True  # NHWC: 1.35x faster SimpleCNN steps on a 2-core CPU
    validate: str = "every"  # or "last": one validation pass at the end

    def crop_for(self, epoch: int, crop: int) -> int:
        """Crop side for ``epoch`` (progressive resizing over equal stages), a multiple of 8."""
        stage = min(len(self.sizes) - 1, epoch * len(self.sizes) // max(self.epochs, 1))
        return max(8, round(crop * self.sizes[stage] / 8) * 8)


#: ``course``: the course's recipe. ``fast``: one-cycle Adam to 1e-2, progressive
#: resizing 1/2 -> 3/4 -> 1 of the crop in three equal stages, label smoothing 0.1, one
#: validation at the end; 10 epochs (71.6% on Imagenette in 5.3 min on 2 CPU cores; 4
#: epochs give 63.6% in 2.1 min: see benchmarks/README.md).
RECIPES: dict[str, TrainConfig] = {
    "course": TrainConfig(),
    "fast": TrainConfig(
        epochs=10,
        lr=1e-2,
        recipe="fast",
        schedule="onecycle",
        label_smoothing=0.1,
        sizes=(0.5, 0.75, 1.0),
        validate="last",
    ),
}


@dataclass(frozen=True)
class EvalResult:
    """Accuracy, loss, per-class accuracy and confusion matrix (rows: true class)."""

    accuracy: float
    loss: float
    per_class_accuracy: list[float]
    confusion: torch.Tensor  # [K, K] counts
    predictions: torch.Tensor  # [N]
    labels: torch.Tensor  # [N]
    seconds: float = 0.0

    def __repr__(self) -> str:
        return (
            f"EvalResult(accuracy={self.accuracy:.4g}, loss={self.loss:.4g}, "
            f"images={self.labels.numel()}, classes={len(self.per_class_accuracy)})"
        )

    def _repr_html_(self) -> str:
        from convlens._notebook import eval_result

        return eval_result(self)

    def to_dict(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        names = list(classes) if classes else [str(i) for i in range(len(self.per_class_accuracy))]
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "per_class_accuracy": dict(zip(names, self.per_class_accuracy)),
            "confusion": self.confusion.tolist(),
            "count": int(self.labels.numel()),
        }


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced: the model, the history and the final evaluation.

    Example:
        >>> r = convlens.train(convlens.SimpleCNN(10), train, val, epochs=3)
        >>> r.val_accuracy, r.history[-1]["train_loss"], r.final.per_class_accuracy
    """

    model: nn.Module = field(repr=False)
    history: list[dict[str, Any]]
    final: EvalResult | None
    classes: list[str]
    config: TrainConfig
    conv1_before: torch.Tensor | None = field(default=None, repr=False)
    conv1_after: torch.Tensor | None = field(default=None, repr=False)
    out: Path | None = None
    train_seconds: float = 0.0
    images_per_s: float = 0.0

    @property
    def val_accuracy(self) -> float | None:
        return self.final.accuracy if self.final is not None else None

    def __repr__(self) -> str:
        acc = "-" if self.val_accuracy is None else f"{self.val_accuracy:.4g}"
        return (
            f"TrainResult(val_accuracy={acc}, epochs={len(self.history)}, "
            f"classes={len(self.classes)}, seconds={self.train_seconds:.3g}, out={self.out})"
        )

    def _repr_html_(self) -> str:
        from convlens._notebook import train_result

        return train_result(self)

    def metrics(self) -> dict[str, Any]:
        """The numbers of ``metrics.json``."""
        return {
            "val_accuracy": self.val_accuracy,
            "per_class_accuracy": (
                dict(zip(self.classes, self.final.per_class_accuracy)) if self.final else None
            ),
            "confusion": self.final.confusion.tolist() if self.final else None,
            "classes": self.classes,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "images_per_s": self.images_per_s,
            "config": asdict(self.config),
            "versions": versions(),
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write ``metrics.json`` into ``out_dir``."""
        return write_json(Path(out_dir) / "metrics.json", self.metrics())


def _criterion(label_smoothing: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=label_smoothing)


def _val_batches(
    data: ImageFolderData | DecodedImages,
    spec_owner: ImageFolderData | None,
    batch_size: int,
    device: torch.device,
    memory_format: torch.memory_format,
    pipeline: str,
    workers: int,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, DecodedImages):
        if spec_owner is None:
            raise ValueError("a decoded cache needs its dataset for the transform spec")
        return BatchLoader(
            data,
            spec_owner.spec,
            batch_size=batch_size,
            train=False,
            device=device,
            memory_format=memory_format,
        )
    if pipeline == "course":
        loader = torch.utils.data.DataLoader(
            data, batch_size=batch_size, shuffle=False, num_workers=workers
        )
        return (
            (x.to(device).contiguous(memory_format=memory_format), y.to(device)) for x, y in loader
        )
    return _val_batches(
        decode_cache(data), data, batch_size, device, memory_format, pipeline, workers
    )


def evaluate(
    model: nn.Module,
    data: ImageFolderData | DecodedImages,
    *,
    batch_size: int = 256,
    device: DeviceLike | None = None,
    num_classes: int | None = None,
    label_smoothing: float = 0.0,
    pipeline: str = "fast",
    dataset: ImageFolderData | None = None,
    workers: int = 2,
) -> EvalResult:
    """Accuracy, mean loss, per-class accuracy and confusion matrix of ``model`` on ``data``
    (a validation :class:`ImageFolderData`, or its decoded cache with ``dataset``).
    The model's train/eval flags are restored afterwards.

    Example:
        >>> r = evaluate(model, val)
        >>> round(r.accuracy, 3), r.confusion.shape
        (0.912, torch.Size([10, 10]))
    """
    model = unwrap(model)
    dev = (
        resolve_device(device)
        if device is not None
        else next((p.device for p in model.parameters()), torch.device("cpu"))
    )
    model.to(dev)
    owner = data if isinstance(data, ImageFolderData) else dataset
    k = num_classes or (len(owner.classes) if owner is not None else None)
    fmt = (
        torch.channels_last
        if pipeline == "fast" and _is_channels_last(model)
        else torch.contiguous_format
    )
    preds: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    loss_sum, n = 0.0, 0
    start = time.perf_counter()
    with evaluating(model), torch.no_grad():
        for x, y in _val_batches(data, owner, batch_size, dev, fmt, pipeline, workers):
            logits = model(x)
            loss_sum += float(
                F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
            )
            n += y.numel()
            preds.append(logits.argmax(1).cpu())
            labels.append(y.cpu())
    if n == 0:
        raise ValueError("no validation images")
    p, t = torch.cat(preds), torch.cat(labels)
    k = k or int(max(p.max(), t.max()) + 1)
    confusion = torch.bincount(t * k + p, minlength=k * k).view(k, k)
    per_class = [
        float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() > 0 else float("nan")
        for i in range(k)
    ]
    return EvalResult(
        accuracy=float((p == t).float().mean()),
        loss=loss_sum / n,
        per_class_accuracy=per_class,
        confusion=confusion,
        predictions=p,
        labels=t,
        seconds=time.perf_counter() - start,
    )


def _is_channels_last(model: nn.Module) -> bool:
    for p in model.parameters():
        if p.ndim == 4:
            return (
                bool(p.is_contiguous(memory_format=torch.channels_last)) and not p.is_contiguous()
            )
    return False


def _first_conv(model: nn.Module) -> nn.Conv2d | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    return None


def _save_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_open(path, "wb") as fh:
        fh.write(buf.getvalue())


class ResumeError(ConvlensError, ValueError):
    """A run cannot be resumed from the given folder."""


def _resolve_config(recipe: str, overrides: dict[str, Any]) -> TrainConfig:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    cfg = RECIPES[recipe]
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "sizes" in changes:
        changes["sizes"] = tuple(changes["sizes"])
    cfg = replace(cfg, **changes)
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {cfg.batch_size}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be positive, got {cfg.lr}")
    if cfg.pipeline not in ("fast", "course"):
        raise ValueError(f"pipeline must be 'fast' or 'course', got {cfg.pipeline!r}")
    if cfg.schedule not in ("constant", "onecycle"):
        raise ValueError(f"schedule must be 'constant' or 'onecycle', got {cfg.schedule!r}")
    if cfg.validate not in ("every", "last"):
        raise ValueError(f"validate must be 'every' or 'last', got {cfg.validate!r}")
    return cfg


def _check_batch_memory(model: nn.Module, data: Any, batch_size: int, dev: torch.device) -> None:
    """Refuse, before the cache is decoded, a batch whose forward and backward cannot fit:
    at least every convolution's output for each row, against the free memory."""
    from convlens._memory import activation_bytes, available_memory, format_bytes, may_exceed
    from convlens.errors import ResourceError

    spec = getattr(data, "spec", None)
    if spec is None:
        return
    rows = min(batch_size, len(data))
    shape = (3, int(spec.crop), int(spec.crop))
    free = available_memory(dev)
    if not may_exceed(4.0 * rows * math.prod(shape), free):
        return
    per_row = activation_bytes(model, shape) + 4.0 * math.prod(shape)
    if rows * per_row > free:
        where = "this machine" if dev.type == "cpu" else str(dev)
        raise ResourceError(
            f"batch size {batch_size}: a training batch of {rows} crops of {shape[1]} px "
            f"needs at least {format_bytes(rows * per_row)}; {where} has "
            f"{format_bytes(free)} available: use batch size <= {max(1, int(free // per_row))}"
        )


def train(
    model: nn.Module,
    train_data: ImageFolderData,
    val_data: ImageFolderData | None = None,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    recipe: str = "course",
    device: DeviceLike = "auto",
    pipeline: str | None = None,
    label_smoothing: float | None = None,
    validate: str | None = None,
    channels_last: bool | None = None,
    arch: str = "simple_cnn",
    progress: bool = True,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    strict: bool = False,
) -> TrainResult:
    """Train ``model`` on ``train_data``; evaluate on ``val_data``; checkpoint into ``out``.

    The course's recipe by default (``recipe="course"``); ``recipe="fast"`` for the
    time-to-accuracy preset. Keyword arguments override the recipe. ``callbacks`` are
    called with each epoch's history row. The model's train/eval flags are restored.

    Example:
        >>> train_ds, val_ds = convlens.data.shapes()
        >>> r = train(SimpleCNN(10), train_ds, val_ds, epochs=5, out="runs/shapes")
        >>> r.val_accuracy > 0.85
        True
    """
    cfg = _resolve_config(
        recipe,
        {
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "pipeline": pipeline,
            "label_smoothing": label_smoothing,
            "validate": validate,
            "channels_last": channels_last,
        },
    )
    model = unwrap(model)
    dev = resolve_device(device)
    classes = list(train_data.classes)
    if val_data is not None and list(val_data.classes) != classes:
        raise ValueError("train and val data have different classes")
    out_dir = Path(out) if out is not None else None
    if resume and out_dir is None:
        raise ValueError("resume=True needs out= (the folder of the run to continue)")
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    _check_batch_memory(model, train_data, cfg.batch_size, dev)

    train_cache = (
        decode_cache(train_data, strict=strict, progress=progress)
        if cfg.pipeline == "fast"
        else None
    )
    val_cache = (
        decode_cache(val_data, strict=strict, progress=progress)
        if cfg.pipeline == "fast" and val_data is not None
        else None
    )
    n_train = len(train_cache) if train_cache is not None else len(train_data)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch
        )
    criterion = _criterion(cfg.label_smoothing)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    conv = _first_conv(model)
    conv1_before = conv.weight.detach().cpu().clone() if conv is not None else None
    if resume and out_dir is not None:
        start_epoch, history, conv1_before = _load_resume(out_dir, model, opt, sched, cfg, dev)
    elif out_dir is not None and conv1_before is not None:
        from safetensors.torch import save

        with atomic_open(out_dir / "conv1_before.safetensors", "wb") as fh:
            fh.write(save({"weight": conv1_before.contiguous()}))

    torch.manual_seed(cfg.seed)  # anything the model draws itself (dropout)
    from convlens._progress import tqdm

    flags = [(m, m.training) for m in model.modules()]
    final: EvalResult | None = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            crop = cfg.crop_for(epoch, train_data.spec.crop)
            model.train()
            batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
            if train_cache is not None:
                batches = BatchLoader(
                    train_cache,
                    train_data.spec,
                    batch_size=cfg.batch_size,
                    train=True,
                    seed=cfg.seed,
                    epoch=epoch,
                    crop=crop,
                    device=dev,
                    memory_format=fmt,
                )
            else:
                ds = train_data
                if crop != train_data.spec.crop:
                    ds = train_data.subset(range(len(train_data)))
                    ds.transform = train_data.spec.train_transform(crop)
                loader = torch.utils.data.DataLoader(
                    ds,
                    batch_size=cfg.batch_size,
                    shuffle=True,
                    num_workers=cfg.workers,
                    generator=epoch_generator(cfg.seed, epoch),
                    drop_last=False,
                    persistent_workers=False,
                )
                batches = ((x.to(dev).contiguous(memory_format=fmt), y.to(dev)) for x, y in loader)
            t0 = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            bar = tqdm(
                batches,
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="batch",
                disable=not progress,
                leave=False,
            )
            for x, y in bar:
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                loss = criterion(logits, y)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                loss_sum += float(loss.detach()) * y.numel()
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += y.numel()
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
            bar.close()
            train_s = time.perf_counter() - t0
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
                "seconds": train_s,
                "images_per_s": seen / train_s if train_s > 0 else None,
                "crop": crop,
                "lr": opt.param_groups[0]["lr"],
            }
            last = epoch == cfg.epochs - 1
            if val_data is not None and (cfg.validate == "every" or last):
                ev = evaluate(
                    model,
                    val_cache if val_cache is not None else val_data,
                    batch_size=256,
                    device=dev,
                    num_classes=len(classes),
                    label_smoothing=0.0,
                    pipeline=cfg.pipeline,
                    dataset=val_data,
                    workers=cfg.workers,
                )
                row.update(val_loss=ev.loss, val_accuracy=ev.accuracy, val_seconds=ev.seconds)
                if last:
                    final = ev
            history.append(row)
            if out_dir is not None:
                _checkpoint(
                    out_dir, model, opt, sched, cfg, history, classes, arch, train_data, epoch
                )
            for cb in callbacks:
                cb(dict(row))
            if progress:
                acc = f", val acc {row['val_accuracy']:.1%}" if "val_accuracy" in row else ""
                tqdm.write(
                    f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.3f}{acc} "
                    f"({train_s:.1f} s, {row['images_per_s']:.0f} img/s)"
                )
    finally:
        for m, was in flags:
            m.training = was
    if final is None and val_data is not None and start_epoch >= cfg.epochs:
        final = evaluate(
            model,
            val_cache if val_cache is not None else val_data,
            device=dev,
            num_classes=len(classes),
            pipeline=cfg.pipeline,
            dataset=val_data,
        )
    conv_after = conv.weight.detach().cpu().clone() if conv is not None else None
    train_s = sum(float(r["seconds"]) for r in history)
    images = sum(float(r["seconds"]) * float(r["images_per_s"] or 0) for r in history)
    if cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    result = TrainResult(
        model=model,
        history=history,
        final=final,
        classes=classes,
        config=cfg,
        conv1_before=conv1_before,
        conv1_after=conv_after,
        out=out_dir,
        train_seconds=train_s,
        images_per_s=images / train_s if train_s > 0 else 0.0,
    )
    if out_dir is not None:
        result.save(out_dir)
    return result


def _checkpoint(
    out_dir: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    cfg: TrainConfig,
    history: list[dict[str, Any]],
    classes: list[str],
    arch: str,
    data: ImageFolderData,
    epoch: int,
) -> None:
    """Optimizer state first, then the weights, then the sidecar: the sidecar's epoch is
    the commit point, so a crash between the files is detected on resume."""
    _save_state(
        out_dir / "training_state.pt",
        {
            "epoch": epoch,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "torch_rng": torch.get_rng_state(),
        },
    )
    spec = data.spec
    save_checkpoint(
        model,
        out_dir / "model.safetensors",
        arch=arch,
        classes=classes,
        meta={
            "epoch": epoch + 1,
            "config": asdict(cfg),
            "history": history,
            "preprocess": {
                "resize": spec.resize,
                "crop": spec.crop,
                "mean": list(spec.mean),
                "std": list(spec.std),
            },
            "dataset": data.name,
            "versions": versions(),
        },
    )


def _load_resume(
    out_dir: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    cfg: TrainConfig,
    dev: torch.device,
) -> tuple[int, list[dict[str, Any]], torch.Tensor | None]:
    weights, sidecar = checkpoint_paths(out_dir)
    state_path = out_dir / "training_state.pt"
    if not (weights.exists() and sidecar.exists() and state_path.exists()):
        raise ResumeError(
            f"nothing to resume in {str(out_dir)!r} (no complete epoch): run without --resume"
        )
    state, info = read_checkpoint(weights)
    saved_cfg = info.get("config", {})
    for key in ("seed", "batch_size", "recipe", "schedule", "lr", "pipeline"):
        if key in saved_cfg and saved_cfg[key] != getattr(cfg, key):
            raise ResumeError(
                f"{str(out_dir)!r} was trained with {key}={saved_cfg[key]!r}, not "
                f"{getattr(cfg, key)!r}: resume with the same settings or use a new --out"
            )
    train_state = torch.load(state_path, map_location="cpu", weights_only=True)
    epoch = int(info.get("epoch", 0))
    if int(train_state["epoch"]) + 1 != epoch:
        raise ResumeError(
            f"{str(out_dir)!r}: weights are from epoch {epoch} but the optimizer state from "
            f"epoch {int(train_state['epoch']) + 1} (interrupted while saving): start again"
        )
    model.load_state_dict(state)
    model.to(dev)
    opt.load_state_dict(train_state["optimizer"])
    if sched is not None and train_state.get("scheduler") is not None:
        sched.load_state_dict(train_state["scheduler"])
    torch.set_rng_state(train_state["torch_rng"])
    before = None
    bpath = out_dir / "conv1_before.safetensors"
    if bpath.exists():
        from safetensors.torch import load_file

        before = load_file(str(bpath))["weight"]
    history = list(info.get("history", []))
    return epoch, history, before


def sample_predictions(
    model: nn.Module,
    val_data: ImageFolderData,
    n: int = 12,
    *,
    device: DeviceLike | None = None,
) -> tuple[torch.Tensor, list[int], list[int]]:
    """``n`` validation images spread over the classes (``[n, 3, c, c]`` in [0, 1]), their
    true classes and the model's predictions, for :func:`convlens.plot.predictions`.

    Example:
        >>> imgs, true, pred = sample_predictions(result.model, val, n=12)
    """
    model = unwrap(model)
    cache = decode_cache(val_data, mode="val", progress=False)
    labels = np.asarray(cache.labels)
    per_class = [np.flatnonzero(labels == k) for k in range(len(val_data.classes))]
    order: list[int] = []
    depth = 0
    while len(order) < min(n, len(cache)):
        added = False
        for idx in per_class:
            if depth < len(idx) and len(order) < n:
                order.append(int(idx[depth]))
                added = True
        if not added:
            break
        depth += 1
    images = torch.from_numpy(np.ascontiguousarray(cache.array[order])).float() / 255.0
    mean = torch.tensor(val_data.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(val_data.spec.std).view(1, 3, 1, 1)
    dev = (
        resolve_device(device)
        if device is not None
        else next((p.device for p in model.parameters()), torch.device("cpu"))
    )
    with evaluating(model), torch.no_grad():
        pred = model(((images - mean) / std).to(dev)).argmax(1).cpu().tolist()
    return images, [int(labels[i]) for i in order], [int(v) for v in pred]
