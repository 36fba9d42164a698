"""Feature visualization (activation maximization): which input makes a unit fire.

- :mod:`.param`: image parameterizations (pixel or 1/f Fourier, colour decorrelation,
  alpha), :class:`ImageParam`;
- :mod:`.transforms`: seeded random pad, jitter, scale and rotate (Lucid's standard set);
- :mod:`.objectives`: what to maximise (channel, neuron, deepdream, direction, class
  logit, diversity, penalties), composable, with the ``"layer:0-9"`` shorthand;
- :mod:`.render`: :func:`render` optimises images for an objective, :func:`score`
  measures an objective on given images.

Re-exported as ``convlens.render`` and ``convlens.objectives``.

Example:
    >>> b = convlens.load_model("efficientnet_lite0")
    >>> r = convlens.render(b, "blocks.4:0-9", size=224, steps=64)
    >>> r.images.shape
    torch.Size([10, 3, 224, 224])
"""

from convlens.analysis.featurevis import objectives, transforms
from convlens.analysis.featurevis.objectives import Objective
from convlens.analysis.featurevis.param import ImageParam, fft_scale, spectrum_freqs
from convlens.analysis.featurevis.render import (
    RenderResult,
    default_objective,
    featurevis_layer,
    render,
    score,
)

__all__ = [
    "ImageParam",
    "Objective",
    "RenderResult",
    "default_objective",
    "featurevis_layer",
    "fft_scale",
    "objectives",
    "render",
    "score",
    "spectrum_freqs",
    "transforms",
]
