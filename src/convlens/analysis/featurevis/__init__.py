"""Feature visualization (activation maximization). Built so far: image parameterizations
(:mod:`.param`) and the random transforms (:mod:`.transforms`).

Objectives, ``render``, the ``inceptionv1`` model and the ``visualize`` command are the
rest of this package's work (issue 5).
"""

from convlens.analysis.featurevis import transforms
from convlens.analysis.featurevis.param import ImageParam, fft_scale, spectrum_freqs

__all__ = ["ImageParam", "fft_scale", "spectrum_freqs", "transforms"]
