"""The connections between the requested layers, for the pages (not a stage of its own: the
pages stage calls it): for every layer, the requested layer it directly follows (read from
the model's traced graph through channel-wise modules only: BatchNorm, activations, pooling,
dropout) and, through a convolution, the strength of each input channel (the L2 norm of its
weights), or why there is no such link.

Inputs: the model, the layers and their output shapes. Outputs: none on disk (the pages
list each unit's strongest inputs). Resume: computed again on every run (seconds).

Example:
    >>> src, why, strength = _connections(net, ["conv1", "conv2"], shapes)["conv2"]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# ------------------------------------------------------------------------ connections


_CHANNELWISE = (
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
)
_CHANNELWISE_FUNCS = {
    "relu",
    "relu6",
    "silu",
    "gelu",
    "hardswish",
    "sigmoid",
    "tanh",
    "leaky_relu",
    "elu",
    "dropout",
    "max_pool2d",
    "avg_pool2d",
    "contiguous",
    "clone",
}


def _connections(
    net: nn.Module, layers: list[str], shapes: dict[str, tuple[int, ...]]
) -> dict[str, tuple[str | None, str | None, torch.Tensor | None]]:
    """For every requested layer: ``(the requested layer it directly follows, why not,
    strengths [out, in])``. A layer follows another when it is a convolution whose input
    is that layer's output, through channel-wise ops only (BatchNorm, activations,
    pooling, dropout), so input channel ``i`` is that layer's channel ``i``."""
    from convlens.analysis._incremental import Unsupported, trace_model
    from convlens.models.forms import hooks_aside
    from convlens.models.layers import unwrap

    base = unwrap(net)
    modules = dict(base.named_modules())
    out: dict[str, tuple[str | None, str | None, torch.Tensor | None]] = {}
    names = {layer.partition("#")[0]: layer for layer in layers}
    try:
        with hooks_aside(base):
            traced = trace_model(base)
    except Unsupported as e:
        return {layer: (None, f"{e}, so its inputs cannot be followed", None) for layer in layers}
    producer: dict[Any, str] = {}
    for name, nodes in traced.module_outputs.items():
        if name in names and nodes:
            producer[nodes[0]] = names[name]
    for layer in layers:
        name = layer.partition("#")[0]
        mod = modules.get(name)
        if not isinstance(mod, nn.Conv2d):
            kind = type(mod).__name__ if mod is not None else "not a module"
            out[layer] = (
                None,
                f"{layer} is a {kind}, not a convolution: only a convolution's weights say "
                "which input channels it reads",
                None,
            )
            continue
        nodes = traced.module_outputs.get(name) or []
        if "#" in layer or len(nodes) != 1:
            out[layer] = (None, f"{layer} runs more than once: its input is ambiguous", None)
            continue
        node: Any = nodes[0].args[0] if nodes[0].args else None
        found = None
        via: Any = None
        while node is not None and hasattr(node, "op"):
            if node in producer and producer[node] != layer:
                found = producer[node]
                break
            via = via or node
            nxt: Any = None
            if node.op == "call_module" and isinstance(modules.get(node.target), _CHANNELWISE):
                nxt = node.args[0] if node.args else None
            elif node.op in ("call_function", "call_method"):
                fname = getattr(node.target, "__name__", str(node.target))
                if fname in _CHANNELWISE_FUNCS and node.args:
                    nxt = node.args[0]
            node = nxt
        if found is None:
            before = _describe_node(via, traced)
            out[layer] = (
                None,
                f"its input is not the output of another requested layer (it reads "
                f"{before}); request that layer too to see which of its channels it reads",
                None,
            )
            continue
        w = mod.weight.detach().float().cpu()
        o, i_per, *_ = w.shape
        groups = mod.groups
        n_in = i_per * groups
        if shapes.get(found) and shapes[found][0] != n_in:
            out[layer] = (
                None,
                f"{found} has {shapes[found][0]} channels, {layer} reads {n_in}",
                None,
            )
            continue
        strength = torch.zeros(o, n_in)
        per_group = o // groups
        norms = w.flatten(2).norm(dim=2)  # [o, i_per]
        for oc in range(o):
            g = oc // per_group
            strength[oc, g * i_per : (g + 1) * i_per] = norms[oc]
        out[layer] = (found, None, strength)
    return out


def _describe_node(node: Any, traced: Any) -> str:
    if node is None:
        return "the model's input"
    for name, nodes in traced.module_outputs.items():
        if node in nodes:
            return f"the output of {name}"
    if node.op == "placeholder":
        return "the model's input"
    return f"the result of {getattr(node.target, '__name__', node.target)}"
