"""Models: the course's SimpleCNN, layer addressing, checkpoints and the model registry."""

from convlens.models.checkpoint import read_checkpoint, save_checkpoint
from convlens.models.labels import imagenet_labels
from convlens.models.layers import LayerInfo, evaluating, find_layers, list_layers, unwrap
from convlens.models.simple_cnn import SimpleCNN
from convlens.models.zoo import (
    ModelBundle,
    ModelInfo,
    Preprocess,
    build_architecture,
    default_layers,
    list_models,
    load_model,
)

__all__ = [
    "LayerInfo",
    "ModelBundle",
    "ModelInfo",
    "Preprocess",
    "SimpleCNN",
    "build_architecture",
    "default_layers",
    "evaluating",
    "find_layers",
    "imagenet_labels",
    "list_layers",
    "list_models",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "unwrap",
]
