"""convlens: look inside convolutional networks.

Compute functions return tensors and dataclasses; :mod:`convlens.plot` turns them into
matplotlib figures (``import convlens`` itself never imports matplotlib).

Example:
    >>> import convlens, torchvision
    >>> model = torchvision.models.resnet18()
    >>> x = convlens.load_model("resnet18", weights=None).preprocess(convlens.sample_image())
    >>> acts = convlens.capture(model, x, ["bn1", "layer4"])
    >>> r = convlens.occlude(model, x, box=(30, 90, 40, 110), layers=["bn1", "layer4"])
    >>> vis = convlens.render(convlens.load_model("efficientnet_lite0"), "blocks.4:0-9")
"""

from convlens.analysis.activations import channel_stats, mean_map, normalize_maps
from convlens.analysis.attribution import (
    Attribution,
    Faithfulness,
    Sanity,
    attribute,
    faithfulness,
    sanity,
)
from convlens.analysis.examples import DatasetExamples, Example, dataset_examples
from convlens.analysis.featurevis import RenderResult, objectives, render
from convlens.analysis.filters import filter_responses, selectivity
from convlens.analysis.occlusion import OcclusionResult, occlude
from convlens.analysis.sensitivity import SensitivityResult, sensitivity
from convlens.atlas import atlas  # the function; its module: sys.modules["convlens.atlas"]
from convlens.capture import capture
from convlens.classify import Prediction, classify
from convlens.device import resolve_device
from convlens.errors import (
    ConvlensError,
    DatasetError,
    ImageLoadError,
    LayerNotFoundError,
    ModelLoadError,
    Preempted,
)
from convlens.images import load_image, sample_image
from convlens.microscope import microscope  # the function; its module: sys.modules[...]
from convlens.models import ModelBundle, SimpleCNN, list_layers, list_models, load_model
from convlens.tour import tour  # the function; the module's names: from convlens.tour import ...
from convlens.train import TrainResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "Attribution",
    "ConvlensError",
    "DatasetError",
    "DatasetExamples",
    "Example",
    "Faithfulness",
    "ImageLoadError",
    "LayerNotFoundError",
    "ModelBundle",
    "ModelLoadError",
    "OcclusionResult",
    "Prediction",
    "Preempted",
    "RenderResult",
    "Sanity",
    "SensitivityResult",
    "SimpleCNN",
    "TrainResult",
    "__version__",
    "atlas",
    "attribute",
    "capture",
    "channel_stats",
    "classify",
    "dataset_examples",
    "evaluate",
    "faithfulness",
    "filter_responses",
    "list_layers",
    "list_models",
    "load_image",
    "load_model",
    "mean_map",
    "microscope",
    "normalize_maps",
    "objectives",
    "occlude",
    "render",
    "resolve_device",
    "sample_image",
    "sanity",
    "selectivity",
    "sensitivity",
    "tour",
    "train",
]
