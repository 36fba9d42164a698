"""Figures for every convlens result. The only package that imports matplotlib.

Each function returns a :class:`matplotlib.figure.Figure` made without pyplot, so nothing
is shown or kept open behind your back: in Jupyter it displays as the cell's value;
elsewhere ``save_figure(fig, "x.png")``.
"""

from convlens.plot._base import save_figure, show_in_jupyter
from convlens.plot.activations import channel_stats, feature_maps, mean_maps
from convlens.plot.atlas import atlas_grid
from convlens.plot.attribution import attribution, faithfulness_curves, sanity
from convlens.plot.depth import depth_comparison
from convlens.plot.examples import examples
from convlens.plot.featurevis import feature_vis
from convlens.plot.filters import filter_grid, kernels
from convlens.plot.images import channels
from convlens.plot.microscope import microscope_grid
from convlens.plot.occlusion import occlusion
from convlens.plot.sensitivity import sensitivity
from convlens.plot.training import (
    confusion,
    curves,
    filters_before_after,
    predictions,
    sample_batch,
)

__all__ = [
    "atlas_grid",
    "attribution",
    "channel_stats",
    "channels",
    "confusion",
    "curves",
    "depth_comparison",
    "examples",
    "faithfulness_curves",
    "feature_maps",
    "feature_vis",
    "filter_grid",
    "filters_before_after",
    "kernels",
    "mean_maps",
    "microscope_grid",
    "occlusion",
    "predictions",
    "sample_batch",
    "sanity",
    "save_figure",
    "sensitivity",
]

show_in_jupyter()  # a figure that is a cell's value shows as an image
