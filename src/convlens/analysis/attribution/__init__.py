"""Attribution: which pixels a prediction or a unit depends on, and whether to trust it.

One verb, :func:`attribute`, for the gradient family (saliency, input x gradient,
integrated gradients with its completeness error, guided backpropagation, SmoothGrad
noise on any of them), the class-activation-map family (Grad-CAM, Grad-CAM++, LayerCAM,
Score-CAM) and occlusion (:func:`convlens.sensitivity`), for a class or a unit, on any
model form. Maps are signed and unscaled. :func:`sanity` runs Adebayo et al.'s model
randomization test; :func:`faithfulness` RISE's deletion and insertion curves.

Example:
    >>> a = convlens.attribute(bundle, x, 258, method="integrated_gradients")
    >>> s = convlens.sanity(bundle, x, 258, methods=("saliency", "guided_backprop"))
    >>> f = convlens.faithfulness(bundle, x, a, metric="deletion")
"""

from convlens.analysis.attribution.api import CAM_METHODS, METHODS, attribute
from convlens.analysis.attribution.faithfulness import Faithfulness, faithfulness
from convlens.analysis.attribution.result import Attribution
from convlens.analysis.attribution.sanity import Sanity, sanity

__all__ = [
    "CAM_METHODS",
    "METHODS",
    "Attribution",
    "Faithfulness",
    "Sanity",
    "attribute",
    "faithfulness",
    "sanity",
]
