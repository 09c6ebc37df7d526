"""Handles on the native operators and their fake (meta) kernels.

The schemas live in csrc/fastbn.cpp; autograd is registered in C++
(csrc/autograd.cpp). The fake kernels here give torch.compile and
torch.library.opcheck the output shapes, dtypes and strides without running
a kernel.
"""
from __future__ import annotations

import torch

from . import _loader

_native = _loader.load()["module"]

# Direct bindings for eager calls (cheaper than torch.ops' boxed call).
eager_batch_norm_train = _native.batch_norm_train
eager_batch_norm_eval = _native.batch_norm_eval

batch_norm_train = torch.ops.fastbn.batch_norm_train.default
batch_norm_eval = torch.ops.fastbn.batch_norm_eval.default
batch_norm_backward = torch.ops.fastbn.batch_norm_backward.default
# SyncBatchNorm's steps (fastbn/sync.py).
sync_batch_norm_stats = torch.ops.fastbn.sync_batch_norm_stats.default
sync_batch_norm_gather_stats = torch.ops.fastbn.sync_batch_norm_gather_stats.default
sync_batch_norm_elemt = torch.ops.fastbn.sync_batch_norm_elemt.default
sync_batch_norm_backward_reduce = torch.ops.fastbn.sync_batch_norm_backward_reduce.default
sync_batch_norm_backward_elemt = torch.ops.fastbn.sync_batch_norm_backward_elemt.default
batch_norm_act_train = torch.ops.fastbn.batch_norm_act_train.default
batch_norm_act_eval = torch.ops.fastbn.batch_norm_act_eval.default
batch_norm_act_backward = torch.ops.fastbn.batch_norm_act_backward.default


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_devices(op: str, input, **tensors) -> None:
    """Raises unless every given tensor is on the input's device.

    The dispatcher runs the kernel of the highest backend among the
    arguments, and meta ranks above CPU and CUDA: a CPU input with a meta
    weight or running statistic lands here, not in the CPU kernel, whose
    checks (csrc/batch_norm.h, same message) would reject it. Under
    torch.compile the fake tensors report their real devices, so consistent
    calls pass.
    """
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != input.device:
            raise RuntimeError(
                f"{op}: expected {name} on the input's device {input.device}, "
                f"got {name} on {tensor.device}"
            )


@torch.library.register_fake("fastbn::batch_norm_train")
def _batch_norm_train_fake(input, weight, bias, running_mean, running_var, momentum, eps):
    _check_devices("fastbn.batch_norm (training)", input, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var)
    channels = input.shape[1]
    stat = input.new_empty((channels,), dtype=_acc_dtype(input.dtype))
    return torch.empty_like(input), stat, torch.empty_like(stat)


@torch.library.register_fake("fastbn::batch_norm_eval")
def _batch_norm_eval_fake(input, running_mean, running_var, weight, bias, eps):
    _check_devices("fastbn.batch_norm (eval)", input, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var)
    return torch.empty_like(input)


@torch.library.register_fake("fastbn::batch_norm_backward")
def _batch_norm_backward_fake(grad_output, input, weight, mean, invstd, training, output_mask):
    _check_devices("fastbn.batch_norm_backward", input, grad_output=grad_output, weight=weight,
                   mean=mean, invstd=invstd)
    channels = input.shape[1]
    param_dtype = weight.dtype if weight is not None else input.dtype
    grad_input = torch.empty_like(input) if output_mask[0] else None
    grad_weight = input.new_empty((channels,), dtype=param_dtype) if output_mask[1] else None
    grad_bias = input.new_empty((channels,), dtype=param_dtype) if output_mask[2] else None
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("fastbn::sync_batch_norm_stats")
def _sync_batch_norm_stats_fake(input, weight, bias, running_mean, running_var):
    _check_devices("fastbn.SyncBatchNorm (statistics)", input, weight=weight, bias=bias,
                   running_mean=running_mean, running_var=running_var)
    return input.new_empty((3, input.shape[1]), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("fastbn::sync_batch_norm_gather_stats")
def _sync_batch_norm_gather_stats_fake(stats, running_mean, running_var, num_batches_tracked,
                                       momentum, eps):
    _check_devices("fastbn.SyncBatchNorm (merge of gathered statistics)", stats,
                   running_mean=running_mean, running_var=running_var,
                   num_batches_tracked=num_batches_tracked)
    channels = stats.shape[2]
    return tuple(stats.new_empty((channels,)) for _ in range(3))


@torch.library.register_fake("fastbn::sync_batch_norm_elemt")
def _sync_batch_norm_elemt_fake(input, weight, bias, mean, invstd):
    _check_devices("fastbn.SyncBatchNorm (normalisation)", input, weight=weight, bias=bias,
                   mean=mean, invstd=invstd)
    return torch.empty_like(input)


@torch.library.register_fake("fastbn::sync_batch_norm_backward_reduce")
def _sync_batch_norm_backward_reduce_fake(grad_output, input, mean):
    _check_devices("fastbn.SyncBatchNorm (backward sums)", input, grad_output=grad_output,
                   mean=mean)
    return input.new_empty((2, input.shape[1]), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("fastbn::sync_batch_norm_backward_elemt")
def _sync_batch_norm_backward_elemt_fake(grad_output, input, weight, mean, invstd, sums, count):
    _check_devices("fastbn.SyncBatchNorm (grad_input)", input, grad_output=grad_output,
                   weight=weight, mean=mean, invstd=invstd, sums=sums, count=count)
    return torch.empty_like(input)


@torch.library.register_fake("fastbn::batch_norm_act_train")
def _batch_norm_act_train_fake(input, residual, weight, bias, running_mean, running_var, momentum, eps, relu):
    _check_devices("fastbn.batch_norm_act (training)", input, residual=residual, weight=weight,
                   bias=bias, running_mean=running_mean, running_var=running_var)
    return _batch_norm_train_fake(input, weight, bias, running_mean, running_var, momentum, eps)


@torch.library.register_fake("fastbn::batch_norm_act_eval")
def _batch_norm_act_eval_fake(input, residual, running_mean, running_var, weight, bias, eps, relu):
    _check_devices("fastbn.batch_norm_act (eval)", input, residual=residual, weight=weight,
                   bias=bias, running_mean=running_mean, running_var=running_var)
    return torch.empty_like(input)


@torch.library.register_fake("fastbn::batch_norm_act_backward")
def _batch_norm_act_backward_fake(grad_output, output, input, weight, mean, invstd, training, relu,
                                  output_mask):
    _check_devices("fastbn.batch_norm_act_backward", input, grad_output=grad_output, output=output)
    grad_input, grad_weight, grad_bias = _batch_norm_backward_fake(
        grad_output, input, weight, mean, invstd, training,
        [output_mask[0], output_mask[2], output_mask[3]])
    grad_residual = torch.empty_like(input) if output_mask[1] else None
    return grad_input, grad_residual, grad_weight, grad_bias


def empty_cache() -> None:
    """Frees the CPU output blocks fastbn keeps for reuse (see README, "CPU memory")."""
    _native.cpu_cache_release()


def cache_info() -> dict:
    """Bytes held by fastbn's CPU output pool, and its limit (FASTBN_CPU_CACHE_MB)."""
    cached, limit = _native.cpu_cache_info()
    return {"cached_bytes": cached, "limit_bytes": limit}
