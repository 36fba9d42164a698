"""Exceptions raised by convlens.

Every error names what went wrong and how to fix it, so a notebook user never has to
read a traceback from deep inside torch.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConvlensError",
    "ConvlensWarning",
    "DatasetError",
    "FolderLockedError",
    "ImageLoadError",
    "LayerNotFoundError",
    "ModelLoadError",
    "Preempted",
    "ReportError",
    "ResourceError",
    "WriteError",
]


class ConvlensError(Exception):
    """Base class of the errors convlens raises on purpose.

    Example:
        >>> try:
        ...     convlens.load_model("no_such_model")
        ... except convlens.ConvlensError as e:
        ...     print(str(e).splitlines()[0])
    """


class ConvlensWarning(UserWarning):
    """A note about files convlens chose not to use: a checkpoint or a resumable file it
    ignored (and why), a stale lock it took over. The command line prints each as one
    ``convlens: note:`` line; in Python it is a warning like any other.

    Example:
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     dataset_examples(..., checkpoint="truncated.ckpt")
        >>> seen[0].category is ConvlensWarning
        True
    """


class ImageLoadError(ConvlensError, ValueError):
    """An image could not be loaded. The message names the source and the reason.

    Example:
        >>> try:
        ...     load_image("missing.jpg")
        ... except ImageLoadError as e:
        ...     print(e)  # cannot load image 'missing.jpg': no such file
    """

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot load image {source}: {reason}")


class LayerNotFoundError(ConvlensError, KeyError):
    """A layer name is not a module of the model. The message lists the closest names.

    Example:
        >>> capture(model, x, ["layer5"])  # LayerNotFoundError: no layer 'layer5' ... did you mean 'layer4'?
    """

    def __init__(self, name: str, suggestions: list[str], hint: str = "") -> None:
        self.name = name
        self.suggestions = suggestions
        msg = f"no layer {name!r} in the model"
        if suggestions:
            msg += "; closest names: " + ", ".join(repr(s) for s in suggestions)
        msg += hint or "; `convlens layers MODEL` or convlens.list_layers(model) lists them all"
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return self.message


class ModelLoadError(ConvlensError, ValueError):
    """A model spec could not be resolved or its weights could not be loaded.

    Example:
        >>> load_model("resnet81")  # ModelLoadError: unknown model 'resnet81'; closest: 'resnet18', ...
    """


class DatasetError(ConvlensError, ValueError):
    """A dataset could not be downloaded, verified, extracted or read.

    Example:
        >>> imagenette("broken.tgz")  # DatasetError: 'broken.tgz' is truncated ...
    """


class ReportError(ConvlensError, ValueError):
    """A report could not be built: its folder, ``report.json`` or a section is unusable.

    Example:
        >>> write_report("tour/")  # ReportError: no report.json in 'tour/'; run `convlens tour --out tour/` ...
    """


class CheckpointError(ConvlensError, ValueError):
    """A checkpoint or a resumable file cannot be used (truncated, corrupt, another format,
    other settings, another world size) and the run was told not to start over
    (``strict=True``, ``--strict``), or cannot start over without losing work.

    Example:
        >>> dataset_examples(..., checkpoint="out/examples.ckpt", strict=True)
        CheckpointError: the checkpoint 'out/examples.ckpt' is truncated or corrupt (...)
    """


class WriteError(ConvlensError, OSError):
    """A file could not be written: the disk is full, failed, or the folder is read-only.
    The previous file at that path is intact (every write is atomic). ``errno`` and
    ``filename`` are the failing call's.

    Example:
        >>> write_json("/full/disk/x.json", {})
        WriteError: cannot write '/full/disk/x.json': no space left on device (ENOSPC); ...
    """

    def __init__(self, message: str, errno: int | None, filename: str) -> None:
        super().__init__(errno, message, filename)
        self.message = message

    def __str__(self) -> str:  # OSError would print "[Errno 28] ..."
        return self.message


class FolderLockedError(ConvlensError, RuntimeError):
    """Another live run is writing the output folder. The message names it (pid, host,
    start time, command) and its lock file.

    Example:
        >>> with folder_lock("site/", "microscope"):  # while another run holds it
        ...     pass
        FolderLockedError: 'site/' is being written by another convlens run (pid 4242 ...
    """


class ResourceError(ConvlensError, ValueError):
    """A setting asks for more than the machine or the layer holds (an image size, a
    batch, a channel); raised before anything is allocated, with the estimate, the limit
    and the value that fits.

    Example:
        >>> microscope(model, "photos/", ["blocks.4"], out="site", size=100000)
        ResourceError: --size 100000: an image of 100000 px ... needs ~120 GB; this machine has 23 GB available: use --size <= 3400
    """


class Preempted(BaseException):
    """A long pass stopped on SIGTERM (a cluster's preemption, torchrun's shutdown) or
    Ctrl-C (SIGINT), at a batch boundary, after writing its checkpoint: running it again
    with the same checkpoint (``convlens examples --resume``, a rerun of ``microscope``)
    continues where it stopped. ``signum`` is the signal; ``exit_status`` is what a shell
    reports for it (143 for SIGTERM, 130 for SIGINT), the command line's exit status.

    Like ``KeyboardInterrupt`` it is not an ``Exception`` (nor a :class:`ConvlensError`),
    so no ``except Exception`` on the way out (a skipped image, a failed section) can
    swallow the request to stop.

    Example:
        >>> try:
        ...     dataset_examples(model, "photos/", ["layer4"], checkpoint="run.ckpt")
        ... except Preempted as e:
        ...     print(e)  # stopped by SIGINT: the checkpoint 'run.ckpt' holds 12 of 40 batches
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        import signal

        self.signum = int(signum)
        self.exit_status = 128 + self.signum
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        super().__init__(f"stopped by {name}" + (f": {detail}" if detail else ""))
