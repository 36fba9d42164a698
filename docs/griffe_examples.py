"""A griffe extension for the API reference: convlens's docstrings head their doctests
``Example:`` (singular), which Google style reads as an admonition of Markdown; this
renames the heading to ``Examples:`` so the ``>>>`` lines render as code."""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        doc = getattr(obj, "docstring", None)
        if doc is not None and "Example:" in doc.value:
            doc.value = _HEADING.sub(r"\1Examples:", doc.value)
