"""Models: the course's SimpleCNN, layer addressing, checkpoints and the model registry."""

from convlens.models.checkpoint import read_checkpoint, save_checkpoint
from convlens.models.layers import LayerInfo, evaluating, find_layers, list_layers, unwrap
from convlens.models.simple_cnn import SimpleCNN
from convlens.models.zoo import ModelBundle, Preprocess, build_architecture, load_model

__all__ = [
    "LayerInfo",
    "ModelBundle",
    "Preprocess",
    "SimpleCNN",
    "build_architecture",
    "evaluating",
    "find_layers",
    "list_layers",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
    "unwrap",
]
