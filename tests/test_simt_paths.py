"""The CUDA operators' paths on the SIMT backend. Training forward and
training backward have two: the single pass (one cooperative launch that
keeps its share of the data in shared memory across a grid-wide sync) and two
passes (a reduction finishing in its last block, then an elementwise kernel).
Each is forced through FASTBN_CUDA_PATH and checked against the float64
reference in every dtype and layout, at 1, 2 and 3 spatial dimensions, C = 1,
C not a power of two, sizes off the vector width and misaligned storage; the
single pass's capacity limit is checked on both sides through the launch
record, and the path table file is honoured. Every call also runs under two
thread schedules whose results must agree bitwise (simt_backend.Backend)."""
import json

import pytest
import torch

import fastbn
from conftest import SIMT
from helpers import channel_params, make_input
from test_simt_backend import (call_each_operator, eval_against_reference, kernels_of, params_dtype_for,
                               train_and_backward_against_reference)

pytestmark = pytest.mark.skipif(not SIMT, reason="FASTBN_SIMT=0")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# The single-pass kernel and the two-pass pair of each layout.
SINGLE = {"cf": "single_pass_channels_first_kernel", "cl": "single_pass_channels_last_kernel"}
TWO_PASS = {"cf": ["reduce_channels_first_kernel", "elementwise_rows_kernel"],
            "cl": ["reduce_channels_last_kernel", "elementwise_channels_last_kernel"]}
ELEMENTWISE = {"cf": "elementwise_rows_kernel", "cl": "elementwise_channels_last_kernel"}


@pytest.fixture
def backend():
    import simt_backend

    with simt_backend.active() as b:
        yield b


def at_storage_offset(x, offset):
    """x's values, same strides, starting `offset` elements into a fresh
    storage (a data pointer off 16-byte alignment for offset > 0)."""
    storage = torch.empty(x.numel() + offset, dtype=x.dtype)
    view = storage.as_strided(x.shape, x.stride(), offset)
    view.copy_(x)
    return view


def channels_last(x):
    """x with C innermost, for 3-d (N, C, L) as for 4-d and 5-d inputs."""
    if x.dim() == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


# (shape, memory format, storage offset, the layout the kernels walk it in)
CASES = [
    ((6, 7), "contiguous", 0, "cl"),              # BatchNorm1d on (N, C): one value per row
    ((4, 1, 37), "contiguous", 1, "cf"),          # C = 1, rows of 37 (off every vector width), misaligned
    ((3, 5, 13), "channels_last", 0, "cl"),       # 1d channels-last
    ((3, 7, 5, 3), "contiguous", 3, "cf"),        # 2d, C = 7, misaligned
    ((3, 40, 3, 3), "channels_last", 0, "cl"),    # 2d channels-last, two channel tiles, the second partial
    ((2, 3, 3, 4, 5), "contiguous", 0, "cf"),     # 3d
    ((2, 3, 3, 2, 3), "channels_last", 1, "cl"),  # 3d channels-last, misaligned
    ((2, 70, 9), "contiguous", 0, "cf"),          # more channels than resident blocks: several per block
]


def case_id(case):
    shape, fmt, offset, _ = case
    return f"{'x'.join(map(str, shape))}-{fmt}-off{offset}"


@pytest.mark.parametrize("path", ["single_pass", "two_pass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_path_matches_reference(backend, monkeypatch, path, dtype, case):
    shape, fmt, offset, layout = case
    monkeypatch.setenv("FASTBN_CUDA_PATH", path)
    x = make_input(shape, dtype, "cpu", offset=0.5, scale=2.0)
    if fmt == "channels_last":
        x = channels_last(x)
    x = at_storage_offset(x, offset)
    backend.calls.clear()
    train_and_backward_against_reference(x, params_dtype_for(dtype))
    eval_against_reference(x)
    forward = [SINGLE[layout]] if path == "single_pass" else TWO_PASS[layout]
    assert kernels_of(backend, "batch_norm_train") == [forward]
    assert kernels_of(backend, "batch_norm_backward") == [forward if path == "single_pass"
                                                          else [TWO_PASS[layout][0], ELEMENTWISE[layout]]]
    assert kernels_of(backend, "batch_norm_eval") == [[ELEMENTWISE[layout]]]
    cooperative = [launch["cooperative"] for call in backend.calls for launch in call.launches]
    assert cooperative.count(True) == (2 if path == "single_pass" else 0)


@pytest.mark.parametrize("path", ["single_pass", "two_pass"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]], ids=case_id)
def test_64_bit_index_kernels(backend, monkeypatch, path, case):
    """The 64-bit index instantiations (taken above 2^31 - 2^24 elements),
    forced by FASTBN_CUDA_INDEX64=1 on small inputs."""
    shape, fmt, offset, layout = case
    monkeypatch.setenv("FASTBN_CUDA_PATH", path)
    monkeypatch.setenv("FASTBN_CUDA_INDEX64", "1")
    x = make_input(shape, torch.float32, "cpu", offset=0.5, scale=2.0)
    x = at_storage_offset(channels_last(x) if fmt == "channels_last" else x, offset)
    backend.calls.clear()
    train_and_backward_against_reference(x)
    eval_against_reference(x)
    assert kernels_of(backend, "batch_norm_train") == [[SINGLE[layout]] if path == "single_pass"
                                                       else TWO_PASS[layout]]


def test_launch_counts_on_the_single_pass(backend, monkeypatch):
    """Auto picks the single pass for small inputs: one launch for training
    forward and for training backward (grad_input alone too); parameter
    gradients alone are one reduction; eval and eval-mode backward one
    elementwise launch."""
    monkeypatch.delenv("FASTBN_CUDA_PATH", raising=False)
    x = make_input((8, 5, 6, 7), torch.float32, "cpu")
    (w, _, _, _), (dy, mean, invstd) = call_each_operator(x)
    torch.ops.fastbn.batch_norm_backward(dy, x, w, mean, invstd, True, [True, False, False])
    assert kernels_of(backend, "batch_norm_train") == [[SINGLE["cf"]]]
    assert kernels_of(backend, "batch_norm_backward") == [
        [SINGLE["cf"]], ["reduce_channels_first_kernel"], ["elementwise_rows_kernel"], [SINGLE["cf"]]]
    assert kernels_of(backend, "batch_norm_eval") == [["elementwise_rows_kernel"]]


# ---------------------------------------------------------------------------
# Capacity: how much fits, from the emulated sm_90 (228 KiB of shared memory
# per SM, 1 KiB reserved per block, 2048 threads per SM) and the default table
# (2 cooperative blocks per SM) at FASTBN_SIMT_SMS SMs:
#   shared memory per block = 228 KiB / 2 - 1 KiB = 115712 bytes;
#   resident blocks = 2 per SM x SMs; with C = 1 (channels-first) each block
#   caches ceil(N * S / blocks) values of each input after a merge buffer of
#   256 states (12 bytes per Welford state in fp32, 8 per gradient-sum state).
# ---------------------------------------------------------------------------

SMEM_PER_BLOCK = 228 * 1024 // 2 - 1024


def largest_fitting_channel(backend, inputs, state_bytes):
    blocks = 2 * backend.lib.config()["sm_count"]
    per_block = (SMEM_PER_BLOCK - 256 * state_bytes) // (inputs * 4)
    return blocks * per_block


def forward_launch(backend, x):
    w, b, rm, rv = channel_params(1, torch.float32, "cpu")
    backend.calls.clear()
    torch.ops.fastbn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
    (call,) = backend.calls
    return call.launches


def backward_launch(backend, x):
    w = torch.rand(1) + 0.5
    mean, invstd = x.mean().reshape(1), x.var(unbiased=False).add(1e-5).rsqrt().reshape(1)
    backend.calls.clear()
    torch.ops.fastbn.batch_norm_backward(torch.randn_like(x), x, w, mean, invstd, True, [True, True, True])
    (call,) = backend.calls
    return call.launches


@pytest.mark.parametrize("op,inputs,state_bytes", [("forward", 1, 12), ("backward", 2, 8)])
def test_capacity_limit_both_sides(backend, monkeypatch, op, inputs, state_bytes):
    monkeypatch.delenv("FASTBN_CUDA_PATH", raising=False)
    launch_of = forward_launch if op == "forward" else backward_launch
    fitting = largest_fitting_channel(backend, inputs, state_bytes)
    x = make_input((1, 1, fitting), torch.float32, "cpu")
    (launch,) = launch_of(backend, x)
    assert launch["cooperative"] and launch["dynamic_smem"] == SMEM_PER_BLOCK, launch
    # One value more: a block would need 4 bytes more than it gets.
    x = make_input((1, 1, fitting + 1), torch.float32, "cpu")
    assert [launch["kernel"] for launch in launch_of(backend, x)] == TWO_PASS["cf"]
    monkeypatch.setenv("FASTBN_CUDA_PATH", "single_pass")
    with pytest.raises(RuntimeError, match=r"FASTBN_CUDA_PATH=single_pass.*does not fit.*needs \d+ bytes"):
        launch_of(backend, x)


def test_forced_single_pass_that_does_not_fit_leaves_running_stats_alone(backend, monkeypatch):
    monkeypatch.setenv("FASTBN_CUDA_PATH", "single_pass")
    x = make_input((1, 1, largest_fitting_channel(backend, 1, 12) + 1), torch.float32, "cpu")
    w, b, rm, rv = channel_params(1, torch.float32, "cpu")
    before = rm.clone(), rv.clone()
    with pytest.raises(RuntimeError, match="use FASTBN_CUDA_PATH=auto or two_pass"):
        fastbn.batch_norm(x, rm, rv, w, b, training=True)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def test_unknown_path_is_a_clear_error(backend, monkeypatch):
    monkeypatch.setenv("FASTBN_CUDA_PATH", "three_pass")
    x = make_input((4, 3, 5), torch.float32, "cpu")
    w, b, rm, rv = channel_params(3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="FASTBN_CUDA_PATH must be auto, single_pass or two_pass, got 'three_pass'"):
        fastbn.batch_norm(x, rm, rv, w, b, training=True)


def test_path_table_file_moves_the_crossover(backend, monkeypatch, tmp_path):
    """A tuned table (as `python -m fastbn.bench --tune` writes it) caps the
    single pass by input bytes per operator."""
    monkeypatch.delenv("FASTBN_CUDA_PATH", raising=False)
    x = make_input((4, 3, 50), torch.float32, "cpu")  # 2400 bytes
    table = tmp_path / "table.json"
    table.write_text(json.dumps({"device": "test", "single_pass_max_bytes_forward": 2399,
                                 "single_pass_max_bytes_backward": 2400, "single_pass_blocks_per_sm": 2}))
    monkeypatch.setenv("FASTBN_CUDA_PATH_TABLE", str(table))
    backend.calls.clear()
    train_and_backward_against_reference(x)
    assert kernels_of(backend, "batch_norm_train") == [TWO_PASS["cf"]]
    assert kernels_of(backend, "batch_norm_backward") == [[SINGLE["cf"]]]
    bad = tmp_path / "bad.json"
    bad.write_text('{"single_pass_max_bytes_forward": "many"}')
    monkeypatch.setenv("FASTBN_CUDA_PATH_TABLE", str(bad))
    with pytest.raises(RuntimeError, match="single_pass_max_bytes_forward.*non-negative integer"):
        train_and_backward_against_reference(x)
