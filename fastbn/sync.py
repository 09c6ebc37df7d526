"""fastbn.SyncBatchNorm: batch norm over the global batch of a torch.distributed
process group, on any backend torch.distributed runs on (gloo on CPU, NCCL on GPU).

One training step, per layer:
  forward   local (count, mean, M2) per channel   (fastbn kernel)
            all_gather of that one [3, C] tensor   (collective)
            Chan merge in rank order, running stats (fastbn kernel; every rank
                                                     gets bitwise the same result)
            normalisation with the global mean/invstd (fastbn kernel)
  backward  local (sum dy, sum dy * (x - mean))    (fastbn kernel)
            all_reduce of that one [2, C] tensor   (collective)
            grad_input from the global sums         (fastbn kernel)

grad_weight and grad_bias are this process's own contribution, as
torch.nn.SyncBatchNorm returns them: DistributedDataParallel's averaging of
parameter gradients then gives the gradient of the mean loss.

Failure on one rank: every argument is checked before the first collective,
so bad input raises on the rank that got it, before it joins the collective.
The other ranks are then waiting in their all_gather and stay there until the
process group's timeout, or until the launcher stops them (torchrun ends the
job when a worker exits with an error). The one data-dependent error, a global
batch of one value per channel, is raised after the collective on every rank
alike.
"""
from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import ops
from .nn import _FastBatchNorm, take_state


# torch 2.14 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _check_global_count(input: Tensor, gathered: Tensor) -> None:
    """Every rank raises alike when the global batch has one value per channel.

    A rank whose own input has more than one value per channel knows the
    global count is larger without looking; only a rank with at most one reads
    the gathered counts (a host sync, on that rare path only). If the global
    count is 1, every rank has at most one, so every rank reads it and raises.
    """
    channels = input.size(1)
    if channels == 0 or input.numel() // channels > 1:
        return
    total = int(gathered[:, 0, 0].sum().item())
    if total <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{total} value per channel over all {gathered.size(0)} processes of the group "
            f"(this process's input size {input.size()})"
        )


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, group, world_size):
        local = ops.sync_batch_norm_stats(input, weight, bias, running_mean, running_var)
        # Concatenated along dim 0, the layout every backend's all-gather
        # writes (gloo refuses a stacked [world, 3, C] output).
        gathered = local.new_empty((world_size * local.size(0), local.size(1)))
        _all_gather_into_tensor(gathered, local, group=group)
        gathered = gathered.view(world_size, *local.shape)
        _check_global_count(input, gathered)
        mean, invstd, count = ops.sync_batch_norm_gather_stats(
            gathered, running_mean, running_var, num_batches_tracked, momentum, eps)
        output = ops.sync_batch_norm_elemt(input, weight, bias, mean, invstd)
        ctx.save_for_backward(input, weight, mean, invstd, count)
        ctx.group = group
        ctx.param_dtype = weight.dtype if weight is not None else (
            bias.dtype if bias is not None else input.dtype)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd, count = ctx.saved_tensors
        sums = ops.sync_batch_norm_backward_reduce(grad_output, input, mean)
        grad_input = grad_weight = grad_bias = None
        # This rank's own parameter gradients, taken before the all_reduce.
        if ctx.needs_input_grad[1]:
            grad_weight = (sums[1] * invstd).to(ctx.param_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sums[0].to(ctx.param_dtype, copy=True)
        if ctx.needs_input_grad[0]:
            dist.all_reduce(sums, group=ctx.group)
            grad_input = ops.sync_batch_norm_backward_elemt(
                grad_output, input, weight, mean, invstd, sums, count)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def sync_batch_norm(input: Tensor, running_mean, running_var, weight, bias, num_batches_tracked,
                    momentum: float, eps: float, group, world_size: int) -> Tensor:
    """Training-mode batch norm over the global batch of `group` (world_size > 1).

    Updates running_mean / running_var (when given) in place by `momentum`,
    or by 1 / (num_batches_tracked + 1) when num_batches_tracked is given
    (momentum=None; read on the device). num_batches_tracked is not
    incremented here.
    """
    if eps <= 0.0:  # as torch checks it, and before any collective
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    return _SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
        group, world_size)


class SyncBatchNorm(_FastBatchNorm, _BatchNorm):
    """torch.nn.SyncBatchNorm on fastbn's kernels, on CPU (gloo) and GPU (NCCL).

    Same arguments, buffers and state_dict as torch.nn.SyncBatchNorm; any
    input BatchNorm1d/2d/3d accept, contiguous or channels_last. In training
    with a process group of more than one process, the statistics are those
    of the global batch (see the module docstring); in eval, with one process,
    or without torch.distributed initialised, it is fastbn.BatchNorm*d.

    Not a subclass of torch.nn.SyncBatchNorm: DistributedDataParallel
    rejects every instance of that class in a CPU module.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _sync_group(self):
        """(group, world_size) when this call synchronises, else None."""
        if not self.training or not dist.is_available() or not dist.is_initialized():
            return None
        group = self.process_group if self.process_group else dist.group.WORLD
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        sync = self._sync_group()
        if sync is None:
            return _FastBatchNorm.forward(self, input)
        group, world_size = sync
        tracking = self.track_running_stats and self.num_batches_tracked is not None
        cumulative = tracking and self.momentum is None
        out = sync_batch_norm(
            input,
            self.running_mean if self.track_running_stats else None,
            self.running_var if self.track_running_stats else None,
            self.weight,
            self.bias,
            self.num_batches_tracked if cumulative else None,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
            group,
            world_size,
        )
        if tracking:
            self.num_batches_tracked.add_(1)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Returns `module` with every BatchNorm*d (torch's, fastbn's, and
        torch.nn.SyncBatchNorm) replaced by fastbn.SyncBatchNorm.

        As torch.nn.SyncBatchNorm.convert_sync_batchnorm: the new layers
        share the original parameters and buffers (same tensor objects) and
        training mode.
        """
        converted = module
        if isinstance(module, _BatchNorm):
            extra = {}
            if _HAS_BIAS_ARGUMENT:
                extra["bias"] = module.bias is not None
            converted = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                device="meta",
                **extra,
            )
            take_state(converted, module)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


# torch 2.14 added BatchNorm(..., bias=False); torch 2.11 has no such argument.
_HAS_BIAS_ARGUMENT = "bias" in inspect.signature(nn.SyncBatchNorm.__init__).parameters
