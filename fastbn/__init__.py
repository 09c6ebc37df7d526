"""fastbn: Batch Normalization for PyTorch on hand-written CPU and CUDA kernels.

    import fastbn
    bn = fastbn.BatchNorm2d(64)           # drop-in for torch.nn.BatchNorm2d
    model = fastbn.convert(model)         # swap every torch BatchNorm in a model
    model = fastbn.convert(model, sync=True)  # ... for fastbn.SyncBatchNorm (distributed)
    y = fastbn.batch_norm(x, rm, rv, w, b, training=True)
"""
from ._loader import build_info
from . import ops  # loads the extension (AOT or JIT) and registers fake kernels
from . import batching  # registers the vmap rules
from . import reference
from .functional import batch_norm
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert
from .sync import SyncBatchNorm
from .ops import cache_info, empty_cache

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "build_info",
    "cache_info",
    "convert",
    "empty_cache",
    "reference",
]
__version__ = "0.1.0"
