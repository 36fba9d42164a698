"""Feature visualization (activation maximization). Built so far: image parameterizations.

Objectives, transforms and ``render`` are the rest of this package's work (issue 5).
"""

from convlens.analysis.featurevis.param import ImageParam, fft_scale, spectrum_freqs

__all__ = ["ImageParam", "fft_scale", "spectrum_freqs"]
