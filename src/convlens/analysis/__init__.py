"""Pure tensor analyses: filters, activations, occlusion. No plotting here."""

from convlens.analysis.activations import ChannelStats, channel_stats, mean_map, normalize_maps
from convlens.analysis.depth import DepthMaps, depth_maps
from convlens.analysis.filters import SelectivityTable, filter_responses, selectivity
from convlens.analysis.occlusion import LayerChange, OcclusionResult, apply_fill, occlude

__all__ = [
    "ChannelStats",
    "DepthMaps",
    "LayerChange",
    "OcclusionResult",
    "SelectivityTable",
    "apply_fill",
    "channel_stats",
    "depth_maps",
    "filter_responses",
    "mean_map",
    "normalize_maps",
    "occlude",
    "selectivity",
]
