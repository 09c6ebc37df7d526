"""fastbn.fuse: a torch.fx pass that fuses BatchNorm -> ReLU and
BatchNorm -> add -> ReLU into fastbn's BatchNormAct modules."""
from __future__ import annotations

import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import nn as fnn

# BatchNorm classes fused, and the fused module each becomes. Exact types:
# subclasses (SyncBatchNorm, LazyBatchNorm*) are left alone.
_FUSED = {
    nn.BatchNorm1d: fnn.BatchNormAct1d,
    nn.BatchNorm2d: fnn.BatchNormAct2d,
    nn.BatchNorm3d: fnn.BatchNormAct3d,
    fnn.BatchNorm1d: fnn.BatchNormAct1d,
    fnn.BatchNorm2d: fnn.BatchNormAct2d,
    fnn.BatchNorm3d: fnn.BatchNormAct3d,
}
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_, torch.nn.functional.relu}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with fastbn's BatchNorm modules kept as leaves (as
    torch's are): a model converted with fastbn.convert, or fused once
    already, traces too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, fnn._FastBatchNorm) or super().is_leaf_module(m, module_qualified_name)


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: fx.Node) -> bool:
    """A plain two-tensor add (no alpha, no out=)."""
    if node.kwargs or len(node.args) != 2:
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _fusable_bn(node, modules: dict, module_calls: dict) -> bool:
    """A BatchNorm module call whose output goes only to the next op, on a
    module called from this one place."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and type(modules.get(node.target)) in _FUSED
        and len(node.users) == 1
        and module_calls[node.target] == 1
        and len(node.args) == 1
        and not node.kwargs
    )


def _fused_module(bn: nn.Module) -> nn.Module:
    """The BatchNormAct module for bn, sharing its parameters and buffers."""
    fused = _FUSED[type(bn)](
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, device="meta", activation="relu",
    )
    if bn.affine:
        fused.weight = bn.weight
        fused.bias = bn.bias
    fused.running_mean = bn.running_mean
    fused.running_var = bn.running_var
    fused.num_batches_tracked = bn.num_batches_tracked
    fused.train(bn.training)
    return fused


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, module)


def fuse(model: nn.Module) -> nn.Module:
    """Returns a torch.fx GraphModule of `model` in which every
    BatchNorm1d/2d/3d -> ReLU and BatchNorm -> add -> ReLU (either operand
    order; nn.ReLU, F.relu, torch.relu or Tensor.relu, in place or not) is one
    fastbn.BatchNormAct*d call. A BatchNorm whose output (or whose add's
    output) has other users, or that is called from several places, is left
    as it was, and so is everything else.

    The fused modules share the original parameters and buffers, so the
    state_dict keys and values are the model's, and load both ways. `model`
    itself is not changed. A model that torch.fx cannot trace is returned as
    it is, with a warning naming the reason.
    """
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as error:  # noqa: BLE001 - any tracing failure leaves the model as it is
        warnings.warn(
            f"fastbn.fuse: {type(model).__name__} left unfused: torch.fx could not trace it "
            f"({type(error).__name__}: {error})",
            stacklevel=2,
        )
        return model
    modules = dict(gm.named_modules())
    module_calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module_calls[node.target] = module_calls.get(node.target, 0) + 1
    fused_any = False
    for relu in list(gm.graph.nodes):
        if not _is_relu(relu, modules) or not relu.args:
            continue
        source = relu.args[0]
        residual = None
        if _fusable_bn(source, modules, module_calls):
            bn_node, removed = source, [relu, source]
        elif isinstance(source, fx.Node) and _is_add(source) and len(source.users) == 1:
            first, second = source.args
            if _fusable_bn(first, modules, module_calls) and isinstance(second, fx.Node) and second is not first:
                bn_node, residual = first, second
            elif _fusable_bn(second, modules, module_calls) and isinstance(first, fx.Node):
                bn_node, residual = second, first
            else:
                continue
            removed = [relu, source, bn_node]
        else:
            continue
        _set_submodule(gm, bn_node.target, _fused_module(modules[bn_node.target]))
        with gm.graph.inserting_before(relu):
            kwargs = {"residual": residual} if residual is not None else {}
            fused = gm.graph.call_module(bn_node.target, (bn_node.args[0],), kwargs)
        relu.replace_all_uses_with(fused)
        for node in removed:
            gm.graph.erase_node(node)
        fused_any = True
    if fused_any:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm
