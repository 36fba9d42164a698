"""Stage 6, the activation atlas (``atlas=True``): each layer's atlas
(:func:`convlens.atlas`) in its own folder of the site, its top channels linked to the
microscope's unit pages, and the layer's pages linked to it.

Inputs: the model, the data and its preprocessing, ``ctx.dirs`` and ``ctx.units`` (the
dataset pass), the render settings ``seed`` and ``precision`` (the icons keep the atlas's
own steps and schedule, 512 of Lucid's constant 0.05: the microscope's 160 cosine steps
leave the direction objective well short).
Outputs: per layer ``<layer>/atlas/`` (``index.html``, ``atlas.json``, icons, cells, crops,
the samples and layout in its ``cache/``); in the context: ``atlas`` (layer key -> the
atlas's index page, relative to the site), which the pages stage links.
Resume: :func:`convlens.atlas`'s own: the samples and the layout are kept, an icon whose
JSON names the same settings is not rendered again; ``force`` recomputes them. Under
torchrun the atlas's pass is sharded and its icons split over the ranks.

Example:
    >>> atlas_stage.run(ctx)
    >>> ctx.atlas
    {'blocks.4': '0-blocks.4/atlas/index.html'}
"""

from __future__ import annotations

import time

from convlens.microscope._common import Context

#: The atlas's grid in a microscope: Lucid's notebook's 20 x 20 (and 10 x 10 as a zoom level).
GRID = 20
#: The icons' size: Lucid's 80 px.
SIZE = 80


def run(ctx: Context) -> None:
    """Build every layer's atlas (``atlas=True``), or do nothing."""
    s = ctx.settings
    if not s.atlas:
        return
    from convlens.atlas import atlas

    ctx.need("result", "dataset_pass")
    t0 = time.perf_counter()
    for key in ctx.keys:
        folder = ctx.dirs[key]
        have = {u.channel for u in ctx.units if u.layer == key}

        def unit_page(c: int, have: set[int] = have) -> str | None:
            return f"../{c:04d}.html" if c in have else None  # the layer's folder

        atlas(
            ctx.model,
            ctx.data,
            key,
            out=ctx.out / folder / "atlas",
            grid=GRID,
            size=SIZE,
            seed=s.seed,
            device=ctx.dev,
            precision=s.precision,  # the schedule and lr: the atlas's own (Lucid's)
            split=s.split,
            preprocess=s.preprocess,
            progress=ctx.progress,
            force=s.force,
            title=f"Activation atlas of {key}",
            parent={"href": "../index.html", "text": f"the microscope's {key}"},
            unit_pages=unit_page,
        )
        ctx.atlas[key] = f"{folder}/atlas/index.html"
    ctx.stages["atlas"] = time.perf_counter() - t0
