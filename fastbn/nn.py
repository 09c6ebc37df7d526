"""Drop-in BatchNorm modules and fastbn.convert."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import batch_norm, batch_norm_act, check_activation


class _FastBatchNorm:
    """forward() of torch's _BatchNorm on fastbn's kernels.

    One difference in order, none in results: num_batches_tracked is
    incremented after the kernel has accepted the input, so that bad input
    leaves every buffer untouched.
    """

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input, batch_norm)

    def _normalize(self, input: Tensor, norm) -> Tensor:
        """Runs norm (with batch_norm's signature) as _BatchNorm.forward runs F.batch_norm."""
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        tracking = (
            self.training and self.track_running_stats and self.num_batches_tracked is not None
        )
        if tracking and self.momentum is None:
            # Cumulative moving average over the batches seen, this one included.
            factor = 1.0 / (float(self.num_batches_tracked) + 1.0)
        # Batch statistics in training, and in eval when no running stats exist.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        out = norm(
            input,
            self.running_mean if keep_running else None,
            self.running_var if keep_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )
        if tracking:
            self.num_batches_tracked.add_(1)
        return out


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on fastbn's kernels: same arguments, buffers and state_dict."""


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on fastbn's kernels: same arguments, buffers and state_dict."""


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on fastbn's kernels: same arguments, buffers and state_dict."""


class _FastBatchNormAct(_FastBatchNorm):
    """BatchNorm*d fused with an optional residual add and an activation:
    ``bn_act(x, residual)`` is ``relu(bn(x) + residual)`` (activation="relu")
    or ``bn(x) + residual`` (activation="identity"), in one fastbn operator.
    Same parameters, buffers and state_dict as torch's BatchNorm*d."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None,
                 activation: str = "relu") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = check_activation(activation)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        def norm(*args):
            return batch_norm_act(*args, residual=residual, activation=self.activation)

        return self._normalize(input, norm)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"


class BatchNormAct1d(_FastBatchNormAct, nn.BatchNorm1d):
    """fastbn.BatchNorm1d + residual add + activation in one operator (see _FastBatchNormAct)."""


class BatchNormAct2d(_FastBatchNormAct, nn.BatchNorm2d):
    """fastbn.BatchNorm2d + residual add + activation in one operator (see _FastBatchNormAct)."""


class BatchNormAct3d(_FastBatchNormAct, nn.BatchNorm3d):
    """fastbn.BatchNorm3d + residual add + activation in one operator (see _FastBatchNormAct)."""


_REPLACEMENTS = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def take_state(converted: nn.Module, module: nn.Module) -> None:
    """Gives the new layer `converted` the parameters and buffers (the same
    tensor objects), training mode and qconfig of the batch norm `module`."""
    if module.affine:
        converted.weight = module.weight
        converted.bias = module.bias
    converted.running_mean = module.running_mean
    converted.running_var = module.running_var
    converted.num_batches_tracked = module.num_batches_tracked
    converted.train(module.training)
    if hasattr(module, "qconfig"):
        converted.qconfig = module.qconfig


def convert(module: nn.Module, sync: bool = False, process_group=None) -> nn.Module:
    """Returns `module` with every torch BatchNorm1d/2d/3d replaced by fastbn's.

    Like nn.SyncBatchNorm.convert_sync_batchnorm: the new modules share the
    original parameters and buffers (same tensor objects) and training mode.
    Subclasses of the torch classes (e.g. SyncBatchNorm) are left alone.
    sync=True: every BatchNorm*d, torch's or fastbn's, becomes
    fastbn.SyncBatchNorm over `process_group` (default: the whole world), as
    fastbn.SyncBatchNorm.convert_sync_batchnorm does.
    """
    if sync:
        from .sync import SyncBatchNorm

        return SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    if process_group is not None:
        raise ValueError("convert: process_group is only used with sync=True")
    converted = module
    replacement = _REPLACEMENTS.get(type(module))
    if replacement is not None:
        converted = replacement(
            module.num_features,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            device="meta",
        )
        take_state(converted, module)
    for name, child in module.named_children():
        converted.add_module(name, convert(child))
    return converted
