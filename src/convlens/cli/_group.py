"""The ``convlens`` command line. It only parses arguments, calls the API and writes files.

Every command takes ``--out DIR`` and ``--device auto|cpu|cuda|mps``, prints what it wrote,
and exits with status 2 and a one-line reason on bad input.

This module holds the click group ``main`` and what more than one command shares: the
``--out``, ``--device``, ``--weights``/``--arch``/``--seed`` and ``--output`` options, the
one-line error handling, the notes shown at the end, and loading a model or an image. Each
command family lives in its own module of this package, which registers its commands on
``main`` with ``@main.command(NAME)``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import torch

from convlens import __version__
from convlens._io import versions
from convlens.errors import ConvlensError, Preempted

F = TypeVar("F", bound=Callable[..., Any])

DEVICE_CHOICES = click.Choice(["auto", "cpu", "cuda", "mps"], case_sensitive=False)


class BadInput(click.ClickException):
    """A one-line error, exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"convlens: error: {self.format_message()}", err=True)


def _handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)
            _show_notes()
            return result
        except Preempted as e:  # SIGTERM or Ctrl-C, the work so far saved
            ctx = click.get_current_context(silent=True)
            add, drop = ctx.meta.get(_RESUME, ((), ("--force",))) if ctx else ((), ())
            click.echo(f"convlens: {e}; resume with: {_resume_command(add, drop)}", err=True)
            sys.exit(e.exit_status)
        except (ConvlensError, ValueError, TypeError, KeyError, FileNotFoundError) as e:
            msg = (
                str(e)
                if not isinstance(e, KeyError) or isinstance(e, ConvlensError)
                else str(e.args[0])
            )
            raise BadInput(msg.splitlines()[0] if msg else type(e).__name__) from None
        except OSError as e:  # a full disk or a read-only folder outside atomic_open
            from convlens._io import write_error

            wrapped = write_error(e, e.filename if e.filename is not None else "a file")
            if wrapped is None:
                raise
            raise BadInput(str(wrapped)) from None

    return wrapper  # type: ignore[return-value]


#: click context key: the flags the command that resumes adds and drops
_RESUME = "convlens.resume"


def _preemptible(add: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> Callable[[F], F]:
    """A command that SIGTERM (a cluster's preemption, torchrun's shutdown) and Ctrl-C stop
    at a batch boundary, its checkpoint written, or at once outside its loops:
    ``_handle_errors`` then prints one line giving the command that resumes (the one as
    run with the flags ``add`` and without ``drop``: ``--resume`` added, ``--force``
    dropped) and exits with 143 (SIGTERM) or 130 (SIGINT). Put it above
    ``_handle_errors``; the previous handlers are restored when the command ends.

    Example:
        >>> @main.command("examples")
        ... @_preemptible(add=("--resume",))
        ... @_handle_errors
        ... def examples_cmd(...): ...
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from convlens import _signals

            ctx = click.get_current_context(silent=True)
            if ctx is not None:
                ctx.meta[_RESUME] = (add, drop)
            with _signals.handling():
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _resume_command(add: tuple[str, ...], drop: tuple[str, ...]) -> str:
    """The command line as run (torchrun's, read from the agent's ``/proc/PPID/cmdline``,
    when torchrun started this process), with ``add`` and without ``drop``."""
    import os
    import shlex

    ctx = click.get_current_context(silent=True)
    name = ctx.info_name if ctx is not None else None
    args = sys.argv[1:]
    if not args or args[0] != name:  # called in-process (tests): no command line to repeat
        flags = " ".join(add)
        return f"the same `convlens {name}` command" + (f" with {flags}" if flags else "")
    new = [a for a in args if a not in drop] + [f for f in add if f not in args]
    prefix: list[str] | None = None
    if "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
            parent = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        except OSError:
            parent = []
        if len(parent) > len(args) and parent[-len(args) :] == args:
            prefix = parent[: -len(args)]
            if len(prefix) > 1 and Path(prefix[1]).name == "torchrun":
                prefix = ["torchrun", *prefix[2:]]  # python /path/to/torchrun ...
        else:
            return "the same torchrun command" + (f" with {' '.join(add)}" if add else "")
    if prefix is None:
        orig = list(getattr(sys, "orig_argv", sys.argv))
        prefix = orig[: -len(args)] if orig[-len(args) :] == args else ["convlens"]
        if prefix and Path(prefix[-1]).name == "convlens" and "-m" not in prefix:
            prefix = ["convlens"]  # the console script
    return shlex.join([*prefix, *new])


def _note(message: str) -> None:
    """A note for stderr, shown once the command has succeeded (an error stays one line)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        click.echo(f"convlens: note: {message}", err=True)
    else:
        ctx.meta.setdefault("convlens.notes", []).append(message)


def _note_warnings(caught: list[Any], is_main: bool, skip: set[str] | None = None) -> None:
    """Warnings recorded around an API call, as notes: on rank 0 all of them (but those in
    ``skip`` and the per-image ``skipped ...`` ones), on the other ranks only the
    :class:`~convlens.errors.ConvlensWarning` ones (a rank's own checkpoint), printed now
    with the rank, since only rank 0 prints the notes at the end."""
    import os

    from convlens.errors import ConvlensWarning

    seen = set(skip or ())
    for w in caught:
        text = str(w.message)
        if text in seen or text.startswith("skipped "):
            continue
        seen.add(text)
        if is_main:
            _note(text)
        elif issubclass(w.category, ConvlensWarning):
            rank = os.environ.get("RANK", "?")
            click.echo(f"convlens: note (rank {rank}): {text}", err=True)


def _show_notes() -> None:
    ctx = click.get_current_context(silent=True)
    for message in ctx.meta.pop("convlens.notes", []) if ctx is not None else []:
        click.echo(f"convlens: note: {message}", err=True)


def _versions(device: torch.device) -> dict[str, Any]:
    return {**versions(), "device": str(device)}


def _wrote(paths: list[Path]) -> None:
    for p in paths:
        click.echo(f"wrote {p}")


def _layers_arg(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [s.strip() for s in value.split(",") if s.strip()]
    if not names:
        raise BadInput("--layers is empty: give comma-separated layer names, e.g. bn1,layer4")
    return names


def _out_option(default: Path | None, help: str = "Folder for the figures and JSON.") -> Any:
    """The ``--out DIR`` option every command takes."""
    return click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=default,
        show_default=default is not None,
        help=help,
    )


def _device_option(fn: F) -> F:
    return click.option(
        "--device",
        type=DEVICE_CHOICES,
        default="auto",
        show_default=True,
        help="Where to compute; auto picks CUDA when it is there.",
    )(fn)


def _render_options(fn: F) -> F:
    """``--precision`` and ``--schedule``, as every command that renders takes them."""
    return _render_options_for()(fn)


def _render_options_for(schedule: str | None = None, why: str = "") -> Callable[[F], F]:
    """:func:`_render_options` with another default ``schedule`` (``why``: a sentence for
    the help saying why)."""
    from convlens.analysis.featurevis.schedule import DEFAULT_SCHEDULE, SCHEDULES

    def decorate(fn: F) -> F:
        fn = click.option(
            "--schedule",
            type=click.Choice(list(SCHEDULES)),
            default=schedule or DEFAULT_SCHEDULE,
            show_default=True,
            help="The learning rate over the steps: cosine (a warm-up to a peak, then a cosine "
            "decay; reaches a given objective in far fewer steps) or constant (Lucid's 0.05, "
            "the images of earlier versions)." + (f" {why}" if why else ""),
        )(fn)
        return click.option(
            "--precision",
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            default="auto",
            show_default=True,
            help="The model's forward and backward under autocast (auto: bfloat16 on a CPU "
            "with AVX-512 BF16/AMX and on CUDA 8.0+, float16 on older CUDA, else float32); "
            "the image, Adam and the objective stay float32.",
        )(fn)

    return decorate


def _model_options(fn: F) -> F:
    fn = click.option(
        "--seed", type=int, default=0, show_default=True, help="Seed of a random init."
    )(fn)
    fn = click.option("--arch", default=None, help="Architecture of a .pt/.pth state dict.")(fn)
    fn = click.option(
        "--weights",
        default="auto",
        show_default=True,
        help="auto: pretrained when the weights are on disk (efficientnet_lite0 always), "
        "else random init, said in every output; default: pretrained, downloaded if "
        "needed; none: random init; or a named set (IMAGENET1K_V2, a timm tag).",
    )(fn)
    return fn


MODEL_HELP = (
    "simple_cnn, efficientnet_lite0 (pretrained, offline), a torchvision name (resnet18, "
    "googlenet, ...), timm:<name>, or a checkpoint path."
)


def _output_option(fn: F) -> F:
    return click.option(
        "--output",
        "output",
        default=None,
        metavar="KEY",
        help="For a model that returns a dict, tuple or dataclass: the entry holding the "
        "class scores (a key such as logits, an index, or an attribute name). Default: "
        "the only 2-d tensor.",
    )(fn)


def _load_bundle(spec: str, weights: str, arch: str | None, seed: int, device: Any) -> Any:
    """load_model for a command; a fallback to random init is noted on stderr at the end."""
    from convlens.models import load_model

    bundle = load_model(spec, weights=weights, arch=arch, seed=seed, device=device)
    if bundle.info.get("note"):
        _note(bundle.info["note"])
    return bundle


class _Group(click.Group):
    """Turns click's own usage errors into the same one-line message, exit status 2."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
            click.echo(f"convlens: error: {e.format_message()}{where}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("convlens: aborted", err=True)
            sys.exit(130)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="convlens")
def main() -> None:
    """Look inside convolutional networks: filters, activations, spatial information."""


def _load_input(bundle: Any, image: str | None) -> tuple[torch.Tensor, str]:
    from convlens.images import load_image, sample_image, sample_image_path

    if image is None:
        return bundle.preprocess(sample_image()), str(sample_image_path().name)
    return bundle.preprocess(load_image(image)), image


def _safe_name(layer: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in layer)


def _save_png(image: torch.Tensor, path: Path) -> Path:
    """``[C, H, W]`` in [0, 1] as an 8-bit PNG, written atomically: greyscale for one
    channel, RGB of the first 3 otherwise."""
    from PIL import Image

    from convlens._io import atomic_open

    shown = image[:3] if image.shape[0] >= 3 else image[:1]
    arr = (shown.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_open(path, "wb") as fh:
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(fh, format="PNG")
    return path
