"""The tour's report: one self-contained HTML file built from ``report.json`` and PNGs.

``convlens.tour`` computes each section, writes its figures as PNG files and the numbers
into ``DIR/report.json``; this package turns that folder into ``DIR/report.html``, and
``convlens report DIR`` rebuilds it from an earlier run without recomputing anything.

The contract, ``DIR/report.json``::

    {
      "title": "convlens tour",                  # str, the page's <h1>
      "subtitle": "...",                         # str, under the title
      "created": "2025-01-01T12:00:00+00:00",    # ISO time, shown as is
      "settings": {"quick": true, ...},          # shown in the footer
      "versions": {"convlens": "0.1.0", ...},    # shown in the footer
      "seed": 0,                                 # shown in the footer
      "sections": [
        {
          "id": "tensor",                        # anchor; sanitised to [A-Za-z0-9_-]
          "title": "The image as a tensor",      # the section's <h2> and its entry in the contents
          "status": "done",                      # "done" | "missing" | "failed"
          "intro": "A paragraph of plain text.", # blank lines start new paragraphs
          "figures": [{"file": "tensor_channels.png", "caption": "..."}],  # file relative to DIR
          "tables": [{"caption": "...", "columns": ["layer", "inside_fraction"],
                      "rows": [["bn1", 0.91], ["layer4", 0.42]]}],
          "numbers": {"shape": [3, 224, 224], "min": 0.0},  # shown as a definition list
          "notes": ["plain text lines"],
          "links": [{"href": "microscope/index.html", "text": "the full site"}],  # relative to DIR
          "missing": {"reason": "why it could not run",      # status missing/failed only
                      "fix": "convlens tour --data imagenette --out tour/"}
        }
      ]
    }

Every key but ``sections`` may be absent; so may every key of a section but ``title``
(``id`` defaults to the title). All text is plain text: every string is HTML-escaped, so a
class name like ``<script>`` shows as written. Numbers are formatted for reading (floats
to 4 significant digits, integers with thousands separators, ``null`` as a dash).

The HTML embeds each figure as a base64 ``data:`` URI (PNG or JPEG, at most 32 MB each;
a file that is absent, unreadable, outside DIR or not an image shows as a visible
"figure missing: NAME" box), uses inline CSS only, has no JavaScript, and forbids every
network request with a Content-Security-Policy. It prints cleanly.

The activation atlas's pages come from :func:`write_atlas_site` (``convlens.report.atlas``),
which turns ``OUT/atlas.json`` into static pages beside the atlas's images, in the
microscope site's style.

Example:
    >>> from convlens.report import write_report
    >>> write_report("tour/")  # PosixPath('tour/report.html')
"""

from __future__ import annotations

from convlens.report._html import (
    REPORT_HTML,
    REPORT_JSON,
    format_value,
    load_report,
    render_html,
    write_report,
)
from convlens.report.atlas import write_atlas_site

__all__ = [
    "REPORT_HTML",
    "REPORT_JSON",
    "format_value",
    "load_report",
    "render_html",
    "write_atlas_site",
    "write_report",
]
