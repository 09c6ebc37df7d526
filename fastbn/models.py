"""The tutorial's MNIST models, with a choice of batch norm.

norm: "torch" (torch.nn.BatchNorm*), "fastbn" (fastbn.BatchNorm*) or "none".
"""
from __future__ import annotations

from torch import nn

from . import nn as fnn

_BN = {
    "torch": (nn.BatchNorm1d, nn.BatchNorm2d),
    "fastbn": (fnn.BatchNorm1d, fnn.BatchNorm2d),
}


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind not in _BN:
        raise ValueError(f"norm must be 'torch', 'fastbn' or 'none', got {kind!r}")
    return _BN[kind][dims - 1](channels)


def mlp(norm: str = "torch") -> nn.Sequential:
    """784 -> Linear(100) -> BatchNorm1d -> ReLU -> Linear(10)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(28 * 28, 100),
        _norm(norm, 1, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def conv_net(norm: str = "torch") -> nn.Sequential:
    """Conv(1,6,3,pad 1) -> BN2d(6) -> ReLU -> MaxPool(2) -> Conv(6,16,5) ->
    BN2d(16) -> ReLU -> MaxPool(2) -> Linear(400, 10)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        _norm(norm, 2, 6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        _norm(norm, 2, 16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    )


MODELS = {"mlp": mlp, "conv": conv_net}
