import os
import zlib

import pytest
import torch

CUDA = torch.cuda.is_available()
# The SIMT backend (tests/simt_backend.py) runs the CUDA sources on the CPU;
# FASTBN_SIMT=0 leaves it out (it is built on first use, a few minutes).
SIMT = os.environ.get("FASTBN_SIMT", "1") != "0"

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
    pytest.param("simt", id="simt", marks=pytest.mark.skipif(not SIMT, reason="FASTBN_SIMT=0")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """The device tensors are made on. "simt" makes CPU tensors and routes
    fastbn's operators to the CUDA kernels run by the SIMT backend."""
    if request.param != "simt":
        yield request.param
        return
    import simt_backend

    with simt_backend.active():
        yield "cpu"


@pytest.fixture(autouse=True)
def fresh_seed(request):
    # A different but reproducible seed per test: fresh random inputs
    # everywhere, and a failure can be replayed.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield
