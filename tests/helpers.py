"""Shared helpers of the test suite."""
import torch

import fastbn

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (rtol, atol) against a float64 reference computed from the same input
# values, scaled by the reference's magnitude for atol. The half types are
# dominated by the final rounding of the output (fp16 ~5e-4, bf16 ~4e-3).
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def assert_close_to_reference(actual, expected, dtype, what=""):
    """actual (any dtype) against a float64 reference."""
    rtol, atol = TOLERANCES[dtype]
    expected = expected.double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}"
    )


def make_input(shape, dtype, device, memory_format="contiguous", offset=0.0, scale=1.0):
    """Random input (never zeros) in the requested layout.

    memory_format: "contiguous", "channels_last" (4-d/5-d), or "strided" (a
    non-contiguous view: every other element of a wider last dimension).
    """
    if memory_format == "strided":
        wide = list(shape)
        wide[-1] *= 2
        base = torch.randn(wide, dtype=torch.float64, device=device) * scale + offset
        x = base.to(dtype)[..., ::2]
        assert not x.is_contiguous()
        return x
    x = (torch.randn(shape, dtype=torch.float64, device=device) * scale + offset).to(dtype)
    if memory_format == "channels_last":
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def channel_params(C, dtype, device):
    weight = torch.randn(C, dtype=dtype, device=device) + 0.5
    bias = torch.randn(C, dtype=dtype, device=device)
    running_mean = torch.randn(C, dtype=dtype, device=device)
    running_var = torch.rand(C, dtype=dtype, device=device) + 0.5
    return weight, bias, running_mean, running_var


def poison_allocator(device, nbytes):
    """Leaves a NaN-filled freed block in the allocator so that an output the
    kernel fails to write shows up as NaN: CUDA's caching allocator, or on the
    CPU fastbn's output pool (outputs of 256 KiB and more), filled by an
    evaluation pass over NaN. Under the SIMT backend every allocation is
    NaN-filled already (its guarded allocator)."""
    import simt_backend

    if simt_backend.is_active():
        return
    if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
        block = torch.full((nbytes // 4 + 1,), float("nan"), device=device)
        del block
    else:
        nan = torch.full((nbytes // 4 + 1, 1), float("nan"))
        ones = torch.ones(1)
        block = torch.ops.fastbn.batch_norm_eval(nan, ones, ones, None, None, 1e-5)
        assert block.isnan().all()
        del block


# The correctness tests that cover every CPU kernel: statistics, elementwise
# passes and fused blocks, both layouts, every dtype, streamed outputs.
CORRECTNESS_SUBSET = ("cpu and (matches_float64_reference or matches_torch or output_mask or "
                      "large_offset or streamed_output or thread_count or four_streams)")


def run_correctness_subset(env: dict) -> None:
    """Runs CORRECTNESS_SUBSET of test_correctness.py, and test_fused.py's
    every-kernel-path tests, in a fresh process with this environment (for
    settings read once at load: the ISA cap, the streaming threshold)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_correctness.py",
         "tests/test_fused.py", "-k", f"({CORRECTNESS_SUBSET}) or every_kernel_path"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=1200, env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(r"\d+ passed", out.stdout)
