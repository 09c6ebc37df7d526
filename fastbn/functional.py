"""fastbn.batch_norm: torch.nn.functional.batch_norm on fastbn's kernels;
fastbn.batch_norm_act: the same fused with a residual add and a ReLU."""
from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.compiler import is_compiling

from . import ops


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Same signature and behaviour as torch.nn.functional.batch_norm.

    training=True normalises with the batch statistics and, when running_mean
    and running_var are given, updates them in place with PyTorch's momentum
    convention: running = (1 - momentum) * running + momentum * batch, using the
    unbiased batch variance for running_var. training=False normalises with the
    running statistics.
    """
    _check_eps(training, eps)
    if is_compiling():
        # Compiled and traced code must see torch.ops.
        if input.numel() == 0:
            return _empty_batch_norm(input, weight, bias)
        if training:
            return ops.batch_norm_train(input, weight, bias, running_mean, running_var, momentum, eps)[0]
        _check_eval_running_stats(running_mean, running_var)
        return ops.batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
    # Eager calls take the cheaper direct binding of the same operators. The
    # rare cases below are sorted out once a call has failed, so that they
    # cost the common call nothing.
    try:
        if training:
            return ops.eager_batch_norm_train(input, weight, bias, running_mean, running_var, momentum, eps)[0]
        return ops.eager_batch_norm_eval(input, running_mean, running_var, weight, bias, eps)
    except (RuntimeError, TypeError):
        if input.numel() == 0:
            return _empty_batch_norm(input, weight, bias)
        if not training:
            _check_eval_running_stats(running_mean, running_var)
        raise


def _check_eps(training: bool, eps: float) -> None:
    """eps as torch checks it (torch.nn.functional.batch_norm, before anything runs)."""
    if training:
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


ACTIVATIONS = ("relu", "identity")


def check_activation(activation: Optional[str]) -> str:
    """The activation's canonical name: "relu", or "identity" (also None)."""
    name = "identity" if activation is None else activation
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be 'relu', 'identity' or None, got {activation!r}")
    return name


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = "relu",
) -> Tensor:
    """act(batch_norm(input, ...) + residual) in one fused operator.

    The batch norm arguments are torch.nn.functional.batch_norm's (and
    fastbn.batch_norm's, running statistics updated the same way); residual,
    when given, has the input's shape and dtype and is added before the
    activation; activation is "relu" or "identity" (None). Equal to
    ``torch.relu(F.batch_norm(input, ...) + residual)``, with one pass over
    the tensor each way instead of three, and no tensor kept for the backward
    but the input and the output (the ReLU's mask is the output's sign; at an
    output of exactly 0 the gradient is 0, as torch's ReLU gives).
    First-order gradients only: double backward and forward-mode AD raise.
    """
    relu = check_activation(activation) == "relu"
    _check_eps(training, eps)
    if input.numel() == 0:
        out = _empty_batch_norm(input, weight, bias)
        if residual is not None:
            out = out + residual
        return out.relu() if relu else out
    if training:
        return ops.batch_norm_act_train(
            input, residual, weight, bias, running_mean, running_var, momentum, eps, relu)[0]
    _check_eval_running_stats(running_mean, running_var)
    return ops.batch_norm_act_eval(input, residual, running_mean, running_var, weight, bias, eps, relu)


def _check_eval_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> None:
    if running_mean is None or running_var is None:
        raise RuntimeError(
            "fastbn.batch_norm: running_mean and running_var must be given in evaluation mode "
            "(training=False)"
        )


def _empty_batch_norm(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """torch's result for an input without elements, whatever its shape or dtype:
    a copy of it (not a view), kept in the graph of weight and bias."""
    out = input.clone()
    if weight is not None:
        out = out * weight[0]
    if bias is not None:
        out = out + bias[0]
    return out
