"""vmap batching rules for the fastbn operators (torch.library.register_vmap).

A vmapped batch norm is B independent batch norms, so the vmapped dimension
is folded into the channels: an input (B, N, C, *) becomes (N, B*C, *) and a
per-channel tensor (B, C) becomes (B*C,), and one kernel call normalises every
(b, c) pair with its own statistics. Unbatched tensors are expanded to B
copies. torch.func's vjp/jvp/jacrev/jacfwd and gradcheck's batched-gradient
checks reach these rules through the backward op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops


def _batched_first(t: Tensor, bdim: Optional[int], batch_size: int) -> Tensor:
    if bdim is None:
        return t.expand(batch_size, *t.shape)
    return t.movedim(bdim, 0)


def _fold_input(t: Tensor, bdim: Optional[int], batch_size: int, what: str) -> Tensor:
    """(B, N, C, *) -> (N, B*C, *)."""
    logical_dim = t.dim() - (bdim is not None)
    if logical_dim < 2:
        raise RuntimeError(
            f"fastbn.batch_norm under vmap: expected {what} of at least 2 dimensions (N, C, ...), "
            f"got {logical_dim}-d {what} per batch element"
        )
    return _batched_first(t, bdim, batch_size).transpose(0, 1).flatten(1, 2)


def _unfold_input(t: Optional[Tensor], batch_size: int):
    """(N, B*C, *) -> (N, B, C, *), batched at dimension 1."""
    if t is None:
        return None, None
    return t.unflatten(1, (batch_size, -1)), 1


def _fold_channels(t: Optional[Tensor], bdim: Optional[int], batch_size: int) -> Optional[Tensor]:
    """(B, C) -> (B*C,); a view of t where its layout allows."""
    if t is None:
        return None
    return _batched_first(t, bdim, batch_size).reshape(-1)


def _unfold_channels(t: Optional[Tensor], batch_size: int):
    if t is None:
        return None, None
    return t.view(batch_size, -1), 0


def _train_rule(info, in_dims, input, weight, bias, running_mean, running_var, momentum, eps):
    batch_size = info.batch_size
    input_bdim, weight_bdim, bias_bdim, mean_bdim, var_bdim = in_dims[:5]
    running_bdims = [bdim for t, bdim in ((running_mean, mean_bdim), (running_var, var_bdim)) if t is not None]
    if input_bdim is not None and None in running_bdims:
        # B different batches cannot all be blended into one running statistic.
        raise RuntimeError(
            "fastbn.batch_norm under vmap: the input is batched but running_mean or running_var, "
            "which training updates in place, is not; batch the running statistics as well, or "
            "pass None for them (track_running_stats=False)"
        )
    folded_mean = _fold_channels(running_mean, mean_bdim, batch_size)
    folded_var = _fold_channels(running_var, var_bdim, batch_size)
    out, mean, invstd = ops.batch_norm_train(
        _fold_input(input, input_bdim, batch_size, "input"),
        _fold_channels(weight, weight_bdim, batch_size),
        _fold_channels(bias, bias_bdim, batch_size),
        folded_mean,
        folded_var,
        momentum,
        eps,
    )
    # The kernel updated the folded statistics; write them back where folding copied.
    for target, bdim, folded in ((running_mean, mean_bdim, folded_mean), (running_var, var_bdim, folded_var)):
        if target is None:
            continue
        per_batch = folded.view(batch_size, -1)
        if bdim is None:
            # Unbatched input: every batch element computed the same update.
            target.copy_(per_batch[0])
        else:
            target = target.movedim(bdim, 0)
            if target.data_ptr() != folded.data_ptr() or not target.is_contiguous():
                target.copy_(per_batch)
    out, out_bdim = _unfold_input(out, batch_size)
    mean, mean_bdim = _unfold_channels(mean, batch_size)
    invstd, invstd_bdim = _unfold_channels(invstd, batch_size)
    return (out, mean, invstd), (out_bdim, mean_bdim, invstd_bdim)


def _eval_rule(info, in_dims, input, running_mean, running_var, weight, bias, eps):
    batch_size = info.batch_size
    input_bdim, mean_bdim, var_bdim, weight_bdim, bias_bdim = in_dims[:5]
    if running_mean is None or running_var is None:
        raise RuntimeError("fastbn.batch_norm: running_mean and running_var are required in evaluation mode")
    out = ops.batch_norm_eval(
        _fold_input(input, input_bdim, batch_size, "input"),
        _fold_channels(running_mean, mean_bdim, batch_size),
        _fold_channels(running_var, var_bdim, batch_size),
        _fold_channels(weight, weight_bdim, batch_size),
        _fold_channels(bias, bias_bdim, batch_size),
        eps,
    )
    return _unfold_input(out, batch_size)


def _backward_rule(info, in_dims, grad_output, input, weight, mean, invstd, training, output_mask):
    batch_size = info.batch_size
    grad_bdim, input_bdim, weight_bdim, mean_bdim, invstd_bdim = in_dims[:5]
    grad_input, grad_weight, grad_bias = ops.batch_norm_backward(
        _fold_input(grad_output, grad_bdim, batch_size, "grad_output"),
        _fold_input(input, input_bdim, batch_size, "input"),
        _fold_channels(weight, weight_bdim, batch_size),
        _fold_channels(mean, mean_bdim, batch_size),
        _fold_channels(invstd, invstd_bdim, batch_size),
        training,
        output_mask,
    )
    outputs = (
        _unfold_input(grad_input, batch_size),
        _unfold_channels(grad_weight, batch_size),
        _unfold_channels(grad_bias, batch_size),
    )
    return tuple(o for o, _ in outputs), tuple(d for _, d in outputs)


torch.library.register_vmap("fastbn::batch_norm_train", _train_rule)
torch.library.register_vmap("fastbn::batch_norm_eval", _eval_rule)
torch.library.register_vmap("fastbn::batch_norm_backward", _backward_rule)
