"""fastbn: Batch Normalization for PyTorch on hand-written CPU and CUDA kernels.

    import fastbn
    bn = fastbn.BatchNorm2d(64)           # drop-in for torch.nn.BatchNorm2d
    model = fastbn.convert(model)         # swap every torch BatchNorm in a model
    model = fastbn.convert(model, sync=True)  # ... for fastbn.SyncBatchNorm (distributed)
    y = fastbn.batch_norm(x, rm, rv, w, b, training=True)
    model = fastbn.fuse(model)            # BN -> (add ->) ReLU as fused BatchNormAct modules
"""
from ._loader import build_info
from . import ops  # loads the extension (AOT or JIT) and registers fake kernels
from . import batching  # registers the vmap rules
from . import reference
from .functional import batch_norm, batch_norm_act
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert
from .sync import SyncBatchNorm
from .nn import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .fuse import fuse
from .ops import cache_info, empty_cache

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "batch_norm",
    "batch_norm_act",
    "build_info",
    "cache_info",
    "convert",
    "empty_cache",
    "fuse",
    "reference",
]
__version__ = "0.1.0"
