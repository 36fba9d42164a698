"""The ``convlens`` command line. It only parses arguments, calls the API and writes files.

Every command takes ``--out DIR`` and ``--device auto|cpu|cuda|mps``, prints what it wrote,
and exits with status 2 and a one-line reason on bad input.

A package: the click group ``main`` and the options and helpers the commands share are in
``_group.py``; each command family is one module (``models.py`` holds ``layers`` and
``models``, ``occlude.py`` holds ``occlude`` and ``sensitivity``, the others are named after
their command). A module registers its commands with ``@main.command(NAME)``; importing it
below is what adds them to ``convlens``. ``convlens --help`` lists the commands in
alphabetical order, whatever the order of the imports.
"""

from __future__ import annotations

# Imported for their @main.command registrations.
from convlens.cli import (  # noqa: F401
    activations,
    atlas,
    attribute,
    classify,
    examples,
    filters,
    microscope,
    models,
    occlude,
    report,
    tour,
    train,
    visualize,
)
from convlens.cli._group import main

__all__ = ["main"]
