"""A plain-PyTorch batch norm: the reference the tests compare fastbn with.

It is the tutorial's hand-written ``batch_norm_1d`` generalised to (N, C, *)
inputs and made correct:

* statistics are taken over every dimension but the channel one, in float64
  here when ``compute_dtype`` asks for it;
* the running variance gets the *unbiased* batch variance (n / (n - 1)),
  as PyTorch does, while normalisation uses the biased one;
* momentum follows PyTorch: ``running = (1 - momentum) * running + momentum * batch``.
  The tutorial writes ``moving = momentum * moving + (1 - momentum) * batch``,
  the opposite convention (its momentum 0.9 is PyTorch's 0.1). fastbn follows
  PyTorch's convention everywhere;
* ``momentum=None`` is a cumulative average, handled by the modules, which pass
  1 / num_batches_tracked as the momentum.

Everything is differentiable with autograd, which gives reference gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Same contract as torch.nn.functional.batch_norm.

    compute_dtype: dtype of the arithmetic (default float32 for half inputs,
    the input's dtype otherwise); the result is cast back to input.dtype.
    """
    if input.dim() < 2:
        raise ValueError(f"expected input of at least 2 dimensions, got shape {tuple(input.shape)}")
    if compute_dtype is None:
        compute_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    channels = input.shape[1]
    reduce_dims = [0, *range(2, input.dim())]
    per_channel = (1, channels) + (1,) * (input.dim() - 2)
    x = input.to(compute_dtype)

    if training:
        values_per_channel = input.numel() // max(channels, 1)
        mean = x.mean(dim=reduce_dims)
        var = ((x - mean.view(per_channel)) ** 2).mean(dim=reduce_dims)
        if running_mean is not None and running_var is not None:
            unbiased = var * values_per_channel / (values_per_channel - 1)
            with torch.no_grad():
                new_mean = (1 - momentum) * running_mean.to(compute_dtype) + momentum * mean
                new_var = (1 - momentum) * running_var.to(compute_dtype) + momentum * unbiased
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
    else:
        mean = running_mean.to(compute_dtype)
        var = running_var.to(compute_dtype)

    y = (x - mean.view(per_channel)) * torch.rsqrt(var.view(per_channel) + eps)
    if weight is not None:
        y = y * weight.to(compute_dtype).view(per_channel)
    if bias is not None:
        y = y + bias.to(compute_dtype).view(per_channel)
    return y.to(input.dtype)
