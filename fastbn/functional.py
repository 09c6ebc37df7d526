"""fastbn.batch_norm: torch.nn.functional.batch_norm on fastbn's kernels."""
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
    # Compiled and traced code must see torch.ops; eager calls take the
    # cheaper direct binding of the same operators.
    compiling = is_compiling()
    if training:
        train = ops.batch_norm_train if compiling else ops.eager_batch_norm_train
        return train(input, weight, bias, running_mean, running_var, momentum, eps)[0]
    if running_mean is None or running_var is None:
        raise RuntimeError(
            "fastbn.batch_norm: running_mean and running_var must be given in evaluation mode "
            "(training=False)"
        )
    evaluate = ops.batch_norm_eval if compiling else ops.eager_batch_norm_eval
    return evaluate(input, running_mean, running_var, weight, bias, eps)
