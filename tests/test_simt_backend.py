"""The SIMT backend itself: it must be able to fail (planted bugs are caught),
its built-ins must behave like the GPU's, the launch limits of an sm_90 device
are enforced, and today's launch counts per operator are pinned. The CUDA
operators' correctness runs under the `simt` device of every other test."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastbn
from conftest import SIMT
from helpers import assert_close_to_reference, channel_params, make_input

pytestmark = pytest.mark.skipif(not SIMT, reason="FASTBN_SIMT=0")

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def simt():
    import simt_backend

    return simt_backend


@pytest.fixture
def backend(simt):
    with simt.active() as b:
        yield b


@pytest.fixture
def two_pass(monkeypatch):
    """The two-pass kernels (reduction + elementwise) even where the
    single-pass one would be chosen (tests of those kernels' own decisions)."""
    monkeypatch.setenv("FASTBN_CUDA_PATH", "two_pass")


def planted(backend, bug, x, with_bug, **kw):
    return backend.call(torch.ops.fastbn_planted_simt.run.default, bug, x, with_bug, **kw)


def feature(backend, name, x, arg=0):
    return backend.call(torch.ops.fastbn_features_simt.run.default, name, x, arg)


# ---------------------------------------------------------------------------
# Planted bugs: each is caught, and the same kernel without it passes.
# ---------------------------------------------------------------------------

def test_missing_syncthreads_is_caught_by_the_reverse_schedule(simt, backend):
    x = torch.randn(1000)
    torch.testing.assert_close(planted(backend, "missing_syncthreads", x, False), x.sum().reshape(1))
    with pytest.raises(simt.SimtError, match="results differ between the forward and reverse"):
        planted(backend, "missing_syncthreads", x, True, second_schedule="reverse")


def test_unwritten_shared_memory_reads_as_nan(backend):
    x = torch.randn(1000)
    torch.testing.assert_close(planted(backend, "unwritten_shared", x, False), x.sum().reshape(1))
    assert planted(backend, "unwritten_shared", x, True).isnan().all()


def test_off_by_one_partial_index_is_caught_by_guard_bytes(backend):
    x = torch.randn(5000)
    torch.testing.assert_close(planted(backend, "partial_off_by_one", x, False), x.sum().reshape(1),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match=r"partial_sum_kernel.*bytes after the end of a block of 16 bytes|bytes after the end of a block of 16 bytes.*partial_sum_kernel"):
        planted(backend, "partial_off_by_one", x, True)


def test_unwritten_output_element_reads_as_nan(backend):
    x = torch.randn(700)
    torch.testing.assert_close(planted(backend, "unwritten_output", x, False), 2 * x)
    y = planted(backend, "unwritten_output", x, True)
    assert y[-1].isnan() and torch.equal(y[:-1], 2 * x[:-1])


def test_grid_y_above_65535_is_refused(backend):
    x = torch.randn(70000, 2).reshape(-1)
    torch.testing.assert_close(planted(backend, "grid_y_overflow", x, False), x.reshape(-1, 2).sum(1))
    with pytest.raises(RuntimeError, match=r"invalid configuration argument: gridDim.y = 70000 is outside 1..65535"):
        planted(backend, "grid_y_overflow", x, True)


def test_barrier_in_divergent_branch_is_reported_not_hung(backend):
    x = torch.randn(64)
    torch.testing.assert_close(planted(backend, "divergent_barrier", x, False), x)
    with pytest.raises(RuntimeError, match=r"barrier divergence.*16 at __syncthreads planted_bugs.cu:\d+, 48 exited"):
        planted(backend, "divergent_barrier", x, True)


PAGE_GUARD_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import simt_backend
    with simt_backend.active(guard_mode="page") as backend:
        x = torch.randn(1024)  # 4 KiB: the buffer ends exactly at the guard page
        out = backend.call(torch.ops.fastbn_planted_simt.run.default, "tail_read_past_input", x, {planted})
        assert torch.allclose(out, x.sum().reshape(1), rtol=1e-5, atol=1e-4), (out, x.sum())
    print("clean exit")
    """
)


@pytest.mark.parametrize("with_bug", [False, True], ids=["fixed", "planted"])
def test_tail_thread_reading_past_its_input_faults_with_page_guards(simt, with_bug):
    simt.load()  # built here, not in the child
    script = PAGE_GUARD_SCRIPT.format(tests=str(TESTS), planted=with_bug)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    if with_bug:
        assert proc.returncode == 86, proc.stderr[-2000:]
        assert "memory fault" in proc.stderr and "kernel tail_sum_kernel" in proc.stderr, proc.stderr[-2000:]
    else:
        assert proc.returncode == 0 and "clean exit" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------------------
# Built-ins against plain torch
# ---------------------------------------------------------------------------

def test_warp_shuffle_reductions(backend):
    x = torch.randn(512)
    down, xor = feature(backend, "warp_sum", x)
    expected = x.reshape(-1, 32).sum(1)
    torch.testing.assert_close(down, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xor, expected, rtol=1e-5, atol=1e-5)


def test_warp_scan_and_broadcast(backend):
    x = torch.randn(256)
    scan, broadcast = feature(backend, "warp_scan", x)
    torch.testing.assert_close(scan, x.reshape(-1, 32).cumsum(1).reshape(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(broadcast, x.reshape(-1, 32)[:, 5:6].expand(-1, 32).reshape(-1))


def test_warp_votes(backend):
    x = torch.randn(256)
    x[:32] = x[:32].abs() + 0.1  # a warp where all are positive
    x[32:64] = -x[32:64].abs() - 0.1  # and one where none is
    ballot, all_, any_ = feature(backend, "warp_vote", x)
    positive = (x > 0).reshape(-1, 32)
    expected_ballot = (positive.long() << torch.arange(32)).sum(1)
    assert torch.equal(ballot.long() & 0xFFFFFFFF, expected_ballot)
    assert torch.equal(all_.bool(), positive.all(1)) and torch.equal(any_.bool(), positive.any(1))


@pytest.mark.parametrize("bins", [64, 20000], ids=["small", "over-48KiB-dynamic-shared"])
def test_shared_and_global_atomics_with_dynamic_shared_memory(backend, bins):
    x = torch.randn(10000)
    counts = feature(backend, "histogram", x, bins)
    expected = ((x + 4) / 8 * bins).to(torch.int64).clamp(0, bins - 1).bincount(minlength=bins)
    assert torch.equal(counts.long(), expected)


def test_three_dimensional_grid_and_block_indices(backend):
    out = feature(backend, "index_3d", torch.empty(0))
    threads = 5 * 4 * 3
    ids = torch.arange(out.numel())
    assert torch.equal(out.long(), (ids // threads) * 10000 + ids % threads)


@pytest.mark.parametrize("sm_count", [4, 132])
def test_cooperative_launch_with_grid_sync(simt, backend, sm_count):
    backend.lib.configure(sm_count=sm_count)
    try:
        x = torch.randn(50000)
        out = feature(backend, "cooperative_sum", x, 1)
        torch.testing.assert_close(out, x.sum().reshape(1), rtol=1e-5, atol=1e-3)
        (launch,) = backend.calls[-1].launches
        assert launch["cooperative"] and launch["grid"] == (sm_count, 1, 1)
        # More blocks than can be resident at once is refused.
        with pytest.raises(RuntimeError, match="too many blocks in cooperative launch"):
            feature(backend, "cooperative_sum", x, 64)
    finally:
        backend.lib.configure(sm_count=4)


@pytest.mark.parametrize(
    "what,arg,message",
    [
        ("block_of", 1025, r"blockDim.x = 1025 is outside 1..1024"),
        ("grid_z_of", 65536, r"gridDim.z = 65536 is outside 1..65535"),
        ("dynamic_smem_of", 48 * 1024 + 4, r"dynamic shared memory of 49156 bytes exceeds the kernel's limit of 49152"),
    ],
)
def test_launch_limits_of_the_device(backend, what, arg, message):
    with pytest.raises(RuntimeError, match=message):
        feature(backend, what, torch.empty(0), arg)


def test_rewriter_keeps_lines_comments_and_template_closers(simt):
    source = textwrap.dedent(
        """
        // k<<<1, 2>>>(x) in a comment stays
        std::vector<std::pair<int, std::tuple<int>>> v;
        kernel<T, std::tuple<int>>
            <<<grid(a, b), 256, 0, stream>>>(x, y);
        __shared__ float tile[8][32];
        extern __shared__ __align__(16) unsigned char smem[];
        TORCH_LIBRARY_IMPL(fastbn, CUDA, m) {}
        """
    )
    out = simt.rewrite_cuda_source(source)
    assert out.count("\n") == source.count("\n")
    assert "// k<<<1, 2>>>(x) in a comment stays" in out
    assert "std::tuple<int>>> v;" in out
    assert 'kernel<T, std::tuple<int>>\n     ->* ::simt::launch_config("kernel", SIMT_SITE, grid(a, b), 256, 0, stream)(x, y);' in out
    assert "float (&tile)[8][32] = ::simt::shared_var<float[8][32]>([] {}, SIMT_SITE);" in out
    assert "unsigned char* smem = ::simt::dynamic_shared<unsigned char>();" in out
    assert "TORCH_LIBRARY_IMPL(fastbn_simt, CPU, m)" in out


# ---------------------------------------------------------------------------
# Launch accounting: today's kernels, pinned (a kernel change shows here)
# ---------------------------------------------------------------------------

def kernels_of(backend, op):
    return [[launch["kernel"] for launch in call.launches] for call in backend.calls if call.op == op]


def call_each_operator(x):
    """Training forward, backward (all gradients; grad_weight alone), eval,
    eval-mode backward; returns what further calls need."""
    w, b, rm, rv = channel_params(x.shape[1], torch.float32, "cpu")
    y, mean, invstd = torch.ops.fastbn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)
    dy = torch.randn_like(x)
    torch.ops.fastbn.batch_norm_backward(dy, x, w, mean, invstd, True, [True, True, True])
    torch.ops.fastbn.batch_norm_backward(dy, x, w, mean, invstd, True, [False, True, False])
    torch.ops.fastbn.batch_norm_eval(x, rm, rv, w, b, 1e-5)
    torch.ops.fastbn.batch_norm_backward(dy, x, w, mean, invstd, False, [True, False, False])
    return (w, b, rm, rv), (dy, mean, invstd)


def test_launch_counts_per_operator(backend, two_pass):
    x = make_input((8, 5, 6, 7), torch.float32, "cpu")
    (w, b, rm, rv), _ = call_each_operator(x)
    torch.ops.fastbn.batch_norm_train(x[:0], w, b, rm, rv, 0.1, 1e-5)
    # The reductions finish their statistics in their last block, and eval
    # computes scale and shift inside the elementwise kernel.
    assert kernels_of(backend, "batch_norm_train") == [
        ["reduce_channels_first_kernel", "elementwise_rows_kernel"],
        [],  # empty input: no launch
    ]
    assert kernels_of(backend, "batch_norm_backward") == [
        ["reduce_channels_first_kernel", "elementwise_rows_kernel"],
        ["reduce_channels_first_kernel"],
        ["elementwise_rows_kernel"],
    ]
    assert kernels_of(backend, "batch_norm_eval") == [["elementwise_rows_kernel"]]
    # channels_last takes the tiled reduction.
    backend.calls.clear()
    xl = x.contiguous(memory_format=torch.channels_last)
    torch.ops.fastbn.batch_norm_train(xl, w, b, rm, rv, 0.1, 1e-5)
    (launches,) = [call.launches for call in backend.calls]
    assert [launch["kernel"] for launch in launches] == [
        "reduce_channels_last_kernel", "elementwise_channels_last_kernel"]
    assert launches[0]["block"] == (32, 8, 1)
    assert launches[1]["block"] == (32, 8, 1)


# ---------------------------------------------------------------------------
# Grid-size decisions at another SM count, and channels beyond a grid's y limit
# ---------------------------------------------------------------------------

def train_and_backward_against_reference(x, dtype_params=torch.float32):
    C = x.shape[1]
    w, b, rm, rv = channel_params(C, dtype_params, "cpu")
    rmr, rvr = rm.double(), rv.double()
    xi = x.clone().requires_grad_()
    wi = w.clone().requires_grad_()
    y = fastbn.batch_norm(xi, rm, rv, wi, b, training=True)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (xi, wi), dy)
    xr = x.double().requires_grad_()
    wr = w.double().requires_grad_()
    yr = fastbn.reference.batch_norm(xr, rmr, rvr, wr, b.double(), training=True)
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), dy.double())
    for name, ours, ref in (("output", y, yr), ("grad_input", gx, gxr), ("grad_weight", gw, gwr),
                            ("running_mean", rm, rmr), ("running_var", rv, rvr)):
        assert_close_to_reference(ours, ref, x.dtype, name)


@pytest.mark.parametrize("shape,fmt", [((64, 3, 40, 40), "contiguous"), ((32, 40, 9, 9), "channels_last"),
                                       ((4096, 24), "contiguous")])
def test_at_132_sms_partial_counts_change_and_results_hold(backend, two_pass, shape, fmt):
    x = make_input(shape, torch.float32, "cpu", fmt, offset=0.5, scale=2.0)
    grids = {}
    for sms in (4, 132):
        backend.lib.configure(sm_count=sms)
        try:
            backend.calls.clear()
            train_and_backward_against_reference(x)
            grids[sms] = [launch["grid"] for call in backend.calls for launch in call.launches]
        finally:
            backend.lib.configure(sm_count=4)
    assert grids[4] != grids[132], "the SM count did not change any grid"


@pytest.mark.parametrize("shape", [(3, 70000), (2, 70000, 2)], ids=["channels-last-tiles", "grid-y-clamped"])
def test_more_channels_than_a_grid_dimension_holds(backend, two_pass, shape):
    x = make_input(shape, torch.float32, "cpu", offset=0.5, scale=2.0)
    train_and_backward_against_reference(x)
    reduce_grids = [launch["grid"] for call in backend.calls for launch in call.launches
                    if launch["kernel"].startswith("reduce_")]
    assert reduce_grids and all(max(g[1], g[2]) <= 65535 for g in reduce_grids)


def test_channel_of_more_than_two_to_the_24_values(backend):
    """Counts held in float32 are exact only up to 2^24: one channel of
    1025 x 16384 values (more than that) keeps fp32 accuracy."""
    x = make_input((1025, 1, 16384), torch.float32, "cpu", offset=3.0, scale=2.0)
    assert x.numel() > 2**24
    train_and_backward_against_reference(x)


# ---------------------------------------------------------------------------
# Second-generation kernels: vector heads and tails, misaligned storage,
# launch counts per layout
# ---------------------------------------------------------------------------

def at_storage_offset(x, offset):
    """x's values in a fresh contiguous tensor that starts `offset` elements
    into its storage (so its data pointer is misaligned for offset > 0)."""
    storage = torch.empty(x.numel() + offset, dtype=x.dtype)
    view = storage[offset:].view(x.shape)
    view.copy_(x)
    assert view.storage_offset() == offset
    return view


def params_dtype_for(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def eval_against_reference(x):
    w, b, rm, rv = channel_params(x.shape[1], params_dtype_for(x.dtype), "cpu")
    y = fastbn.batch_norm(x, rm, rv, w, b, training=False)
    yr = fastbn.reference.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(),
                                     training=False)
    assert_close_to_reference(y, yr, x.dtype, "eval output")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0, 1, 3])
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 3, 4101), (4, 1, 2, 9)],
                         ids=["rows-of-37", "rows-over-a-chunk", "C1-rows-of-18"])
def test_rows_with_vector_heads_tails_and_misaligned_storage(backend, two_pass, dtype, offset, shape):
    """Channels-first rows whose lengths are not multiples of any vector width
    (every row after the first starts mid-vector), rows longer than one block's
    chunk, and inputs starting 1 or 3 elements into their storage (pointers off
    16-byte alignment, alone or together with the other operands)."""
    x = at_storage_offset(make_input(shape, dtype, "cpu", offset=0.5, scale=2.0), offset)
    backend.calls.clear()
    train_and_backward_against_reference(x, params_dtype_for(dtype))
    eval_against_reference(x)
    kernels = [launch["kernel"] for call in backend.calls for launch in call.launches]
    assert kernels.count("elementwise_rows_kernel") == 3, kernels  # forward, grad_input, eval


@pytest.mark.parametrize("shape", [(6, 3, 5, 5), (2, 70, 3, 3), (3, 4, 2, 3, 2)], ids=str)
def test_launch_counts_channels_last(backend, two_pass, shape):
    x = make_input(shape, torch.float32, "cpu", "channels_last", offset=0.5, scale=2.0)
    backend.calls.clear()
    train_and_backward_against_reference(x)
    eval_against_reference(x)
    assert kernels_of(backend, "batch_norm_train") == [
        ["reduce_channels_last_kernel", "elementwise_channels_last_kernel"]]
    assert kernels_of(backend, "batch_norm_backward") == [
        ["reduce_channels_last_kernel", "elementwise_channels_last_kernel"]]
    assert kernels_of(backend, "batch_norm_eval") == [["elementwise_channels_last_kernel"]]


def test_arrival_counters_reset_between_calls_of_different_sizes(backend, two_pass):
    """The reductions' arrival counters live across calls (per stream): after
    a call with many channel groups, calls with fewer groups and more partials
    per group still finish every channel (each call also runs twice, so a
    counter left non-zero would change the second run's results)."""
    for shape in [(3, 600, 4), (64, 2, 40, 40), (3, 600, 4), (4096, 24)]:
        x = make_input(shape, torch.float32, "cpu", offset=0.5, scale=2.0)
        train_and_backward_against_reference(x)
