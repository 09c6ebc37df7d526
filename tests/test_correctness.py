"""Forward and backward of fastbn against torch.nn.functional.batch_norm and
against fastbn.reference in float64, over shapes, layouts, dtypes and modes."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastbn
from helpers import (
    FLOAT_DTYPES,
    assert_close_to_reference,
    channel_params,
    make_input,
    poison_allocator,
)

# Shapes chosen to reach every code path: C = 1, odd C, C below and above the
# vector width, spatial sizes with and without vector tails, and sizes large
# enough to be split into several parallel chunks, and channels-first shapes
# for each of its CPU strategies (image walk for short rows, fused channel
# blocks for long rows, chunks for large channels; see csrc/cpu/statistics.h),
# and channels-last shapes whose channel pattern repeats within 1 to 4 vector
# steps (C = 64, 12, 6, 4: the register-held short-period path), with and
# without a partial period at the end and over several parallel chunks.
# No channel has only two
# values: there the exact grad_input is 0 and fp32 rounding, amplified by a
# large invstd, is all that is left to compare.
SHAPES = {
    2: [(7, 1), (5, 3), (16, 17), (64, 100)],
    3: [(3, 5, 7), (2, 3, 33), (4, 1, 50)],
    4: [(4, 6, 5, 5), (5, 3, 1, 1), (3, 16, 7, 9), (40, 2, 64, 64), (10, 4, 180, 180),
        (3, 600, 2, 3), (3, 5, 24, 24), (3, 64, 5, 7), (7, 12, 31, 29), (3, 32, 5, 7),
        # Channels-first rows of 64, 48 and 160 values: tails of 0 steps, of
        # full steps only, and after whole rounds (see RowWelford).
        (3, 5, 8, 8), (4, 3, 4, 12), (2, 4, 16, 10)],
    5: [(2, 3, 4, 5, 6), (2, 20, 3, 3, 3)],
}
CASES = [
    (shape, fmt)
    for dim, shapes in SHAPES.items()
    for shape in shapes
    for fmt in (["contiguous", "strided"] + (["channels_last"] if dim >= 4 else []))
]


def case_id(case):
    shape, fmt = case
    return f"{'x'.join(map(str, shape))}-{fmt}"


def run_both(x, params, training, momentum, affine, track, dtype_params):
    """fastbn and the float64 reference on the same values; returns outputs,
    gradients and the running stats of each."""
    weight, bias, running_mean, running_var = (p.to(dtype_params) for p in params)
    if not affine:
        weight = bias = None
    if not track:
        running_mean = running_var = None
    grad_out = torch.randn(x.shape, dtype=torch.float64, device=x.device).to(x.dtype)

    def run(fn, cast):
        xi = cast(x).detach().requires_grad_()
        w = cast(weight).detach().requires_grad_() if weight is not None else None
        b = cast(bias).detach().requires_grad_() if bias is not None else None
        rm = cast(running_mean).clone() if running_mean is not None else None
        rv = cast(running_var).clone() if running_var is not None else None
        y = fn(xi, rm, rv, w, b, training, momentum, 1e-5)
        inputs = [t for t in (xi, w, b) if t is not None]
        grads = torch.autograd.grad(y, inputs, cast(grad_out))
        return y, grads, rm, rv

    ours = run(fastbn.batch_norm, lambda t: t)
    ref = run(fastbn.reference.batch_norm, lambda t: t.double() if t is not None else None)
    return ours, ref


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_float64_reference(device, case, dtype, training):
    shape, fmt = case
    x = make_input(shape, dtype, device, fmt, offset=0.5, scale=2.0)
    params = channel_params(shape[1], torch.float64, device)
    poison_allocator(device, x.numel() * x.element_size())
    for affine, track in itertools.product([True, False], [True, False]):
        if not training and not track:
            continue  # evaluation needs running statistics
        ours, ref = run_both(x, params, training, 0.1, affine, track, dtype)
        what = f"{shape} {fmt} {dtype} train={training} affine={affine} track={track}"
        assert ours[0].dtype == dtype and ours[0].shape == x.shape
        assert not torch.isnan(ours[0]).any(), what
        assert_close_to_reference(ours[0], ref[0], dtype, f"output {what}")
        for i, (g, g_ref) in enumerate(zip(ours[1], ref[1])):
            assert_close_to_reference(g, g_ref, dtype, f"grad {i} {what}")
        if track and training:
            assert_close_to_reference(ours[2], ref[2], dtype, f"running_mean {what}")
            assert_close_to_reference(ours[3], ref[3], dtype, f"running_var {what}")


# Channels-last reductions combine four periods a quarter of a chunk apart
# (part_stride in csrc/cpu/work_split.h), one less when the quarter is a
# multiple of 4 KiB; the periods left over go one by one.
@pytest.mark.parametrize(
    "shape",
    [
        (8, 64, 16, 16),  # quarters of 4 KiB multiples: one less, 4 periods left over
        (4, 1024, 3, 3),  # fp32 periods of a whole page: every quarter a page multiple
        (5, 24, 13, 11),  # a partial last period, quarters of uneven chunks
        (3, 2048, 2, 2),  # bf16 periods of a whole page, chunks of under 4 periods
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channels_last_reductions_in_four_streams(device, shape, dtype):
    x = make_input(shape, dtype, device, "channels_last", offset=3.0, scale=2.0)
    params = channel_params(shape[1], torch.float64, device)
    ours, ref = run_both(x, params, True, 0.1, True, True, dtype)
    assert_close_to_reference(ours[0], ref[0], dtype, "output")
    for name, g, g_ref in zip(["input", "weight", "bias"], ours[1], ref[1]):
        assert_close_to_reference(g, g_ref, dtype, f"grad_{name}")
    assert_close_to_reference(ours[2], ref[2], dtype, "running_mean")
    assert_close_to_reference(ours[3], ref[3], dtype, "running_var")


@pytest.mark.parametrize(
    "shape",
    [
        (32, 6, 7, 7),  # rows of 49: whole steps and a partial one, 1568 values a channel
        (64, 3, 4, 8),  # whole steps only, 2048 values a channel (the most for two passes)
        (65, 3, 4, 8),  # one image more: Welford
        (5, 4, 3, 3),  # rows shorter than a vector step
        (3, 5, 17),  # 1-d: a step and one value
    ],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_short_row_statistics_of_few_images(device, shape, dtype):
    """Channels-first statistics over few images of short rows, which the CPU
    computes in two passes (short_row_channel_stats in csrc/cpu/statistics.h).
    The channels lie far apart, so that a row's last step summing values of
    the next row would show."""
    C = shape[1]
    offsets = (10.0 * torch.arange(C, dtype=torch.float64, device=device)).view(1, C, *[1] * (len(shape) - 2))
    x = (make_input(shape, torch.float64, device, scale=2.0) + offsets).to(dtype)
    params = channel_params(C, torch.float64, device)
    ours, ref = run_both(x, params, True, 0.1, True, True, dtype if dtype == torch.float64 else torch.float32)
    assert_close_to_reference(ours[0], ref[0], dtype, "output")
    for name, g, g_ref in zip(["input", "weight", "bias"], ours[1], ref[1]):
        assert_close_to_reference(g, g_ref, dtype, f"grad_{name}")
    assert_close_to_reference(ours[2], ref[2], dtype, "running_mean")
    assert_close_to_reference(ours[3], ref[3], dtype, "running_var")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mixed_precision_float32_params(device, dtype, training):
    """Half input with float32 weight, bias and running stats, as autocast makes them."""
    x = make_input((8, 5, 6, 6), dtype, device, "channels_last")
    params = channel_params(5, torch.float64, device)
    ours, ref = run_both(x, params, training, 0.1, True, True, torch.float32)
    assert ours[0].dtype == dtype
    assert_close_to_reference(ours[0], ref[0], dtype, "output")
    assert ours[1][1].dtype == torch.float32 and ours[1][2].dtype == torch.float32
    for g, g_ref in zip(ours[1], ref[1]):
        assert_close_to_reference(g, g_ref, dtype, "grad")
    if training:
        assert ours[2].dtype == torch.float32
        assert_close_to_reference(ours[2], ref[2], torch.float32, "running_mean")
        assert_close_to_reference(ours[3], ref[3], torch.float32, "running_var")


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch(device, fmt, dtype, training):
    """Against torch's own kernels in the same dtype."""
    x = make_input((6, 7, 9, 11), dtype, device, fmt)
    w, b, rm, rv = channel_params(7, dtype, device)
    grad_out = torch.randn_like(x)
    results = []
    for fn in (fastbn.batch_norm, F.batch_norm):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        rmi, rvi = rm.clone(), rv.clone()
        y = fn(xi, rmi, rvi, wi, bi, training, 0.1, 1e-5)
        results.append((y, *torch.autograd.grad(y, (xi, wi, bi), grad_out), rmi, rvi))
    rtol, atol = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4),
                  torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}[dtype]
    for name, a, t in zip(["out", "dx", "dw", "db", "rm", "rv"], *results):
        scale = max(1.0, t.abs().max().item())
        torch.testing.assert_close(a, t, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")
    # The output keeps the input's memory format, as torch's does.
    assert results[0][0].stride() == results[1][0].stride()
    assert results[0][1].stride() == results[1][1].stride()


def test_backward_output_mask(device):
    """Only the requested gradients are computed and returned."""
    x = make_input((4, 3, 5), torch.float32, device)
    w, b, _, _ = channel_params(3, torch.float32, device)
    y, mean, invstd = torch.ops.fastbn.batch_norm_train(x, w, b, None, None, 0.1, 1e-5)
    dy = torch.randn_like(x)
    full = torch.ops.fastbn.batch_norm_backward(dy, x, w, mean, invstd, True, [True, True, True])
    for mask in itertools.product([False, True], repeat=3):
        got = torch.ops.fastbn.batch_norm_backward(dy, x, w, mean, invstd, True, list(mask))
        for wanted, g, ref in zip(mask, got, full):
            if wanted:
                torch.testing.assert_close(g, ref, rtol=0, atol=0)
            else:
                assert g is None


def test_input_gradient_only(device):
    """With only x requiring grad, grad_input is still right and nothing else is produced."""
    x = make_input((4, 3, 5), torch.float32, device).requires_grad_()
    w, b, _, _ = channel_params(3, torch.float32, device)
    dy = torch.randn(x.shape, device=device)
    y = fastbn.batch_norm(x, None, None, w, b, training=True)
    y.backward(dy)
    xr = x.detach().double().requires_grad_()
    yr = fastbn.reference.batch_norm(xr, None, None, w.double(), b.double(), training=True)
    yr.backward(dy.double())
    assert_close_to_reference(x.grad, xr.grad, torch.float32, "grad_input")
    assert w.grad is None and b.grad is None


@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((3, 4, 4, 8), "contiguous"),  # rows of whole vector steps
        ((3, 5, 5, 5), "contiguous"),  # short rows: one flat walk
        ((2, 3, 600), "contiguous"),  # long rows
        ((4, 64, 3, 5), "channels_last"),  # periods with parameters in memory
        ((4, 4, 5, 5), "channels_last"),  # periods with parameters in registers
    ],
)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_non_finite_inputs_propagate_like_torch(device, shape, fmt, dtype):
    """NaN, +inf and -inf in x come out of the evaluation forward where
    torch's do (the 16-bit narrowing must keep a NaN a NaN, whatever its
    payload), and the finite values around them are unharmed."""
    base = torch.randn(shape, dtype=torch.float64)
    flat = base.view(-1)
    picks = torch.randperm(flat.numel())[:21]
    flat[picks[0::3]] = float("nan")
    flat[picks[1::3]] = float("inf")
    flat[picks[2::3]] = -float("inf")
    x = base.to(dtype).to(device)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, b, rm, rv = channel_params(shape[1], pdtype, device)
    ours = fastbn.batch_norm(x, rm, rv, w, b, training=False)
    theirs = F.batch_norm(x, rm, rv, w, b, training=False)
    for kind in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(kind(ours), kind(theirs)), kind.__name__
    assert torch.isnan(ours).sum() >= 7
    exact = fastbn.reference.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(),
                                        training=False)
    finite = torch.isfinite(exact)
    assert_close_to_reference(ours[finite], exact[finite], dtype, "finite values")


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_large_offset_statistics_are_accurate(device, fmt):
    """x = 1e4 + randn in fp32: Welford statistics, no E[x^2] - E[x]^2 cancellation.
    fastbn's mean and variance must be at least as accurate as torch's."""
    x = make_input((64, 8, 32, 32), torch.float32, device, fmt, offset=1e4)
    exact = x.double()
    mean_exact = exact.mean(dim=(0, 2, 3))
    var_exact = exact.var(dim=(0, 2, 3), unbiased=True)
    errors = {}
    for name, fn in (("fastbn", fastbn.batch_norm), ("torch", F.batch_norm)):
        rm = torch.zeros(8, device=device)
        rv = torch.zeros(8, device=device)
        fn(x, rm, rv, None, None, True, 1.0, 1e-5)  # momentum 1: running = batch
        errors[name] = (
            (rm.double() - mean_exact).abs().max().item(),
            ((rv.double() - var_exact) / var_exact).abs().max().item(),
        )
    mean_err, var_err = errors["fastbn"]
    torch_mean_err, torch_var_err = errors["torch"]
    # Within the fp32 rounding of a value near 1e4 and a relative 1e-4 on the
    # variance, and no worse than torch (with a little slack for rounding).
    assert mean_err <= max(2 * torch_mean_err, 1e-3), errors
    assert var_err <= max(2 * torch_var_err, 1e-4), errors


@pytest.mark.parametrize(
    "shape,fmt",
    [
        ((40, 6, 33, 31), "contiguous"),  # fused channel blocks
        ((12, 3, 150, 150), "contiguous"),  # chunks of rows
        ((300, 16, 10, 10), "contiguous"),  # gradient sums walk images
        ((40, 6, 33, 31), "channels_last"),
        ((64, 100), "contiguous"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_results_do_not_depend_on_thread_count(shape, fmt, dtype):
    """Chunking depends on the shape only, so 1 and 2 threads give bitwise-equal results."""
    x = make_input(shape, dtype, "cpu", fmt)
    C = shape[1]
    w, b, rm, rv = channel_params(C, torch.float32, "cpu")
    dy = torch.randn_like(x)
    outputs = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rmi, rvi = rm.clone(), rv.clone()
            y, mean, invstd = torch.ops.fastbn.batch_norm_train(x, w, b, rmi, rvi, 0.1, 1e-5)
            grads = torch.ops.fastbn.batch_norm_backward(dy, x, w, mean, invstd, True, [True] * 3)
            outputs.append([y, mean, invstd, rmi, rvi, *grads])
    finally:
        torch.set_num_threads(previous)
    for a, b_ in zip(*outputs):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_streamed_output_with_misaligned_rows(dtype, threads):
    """Outputs of 1 MiB per thread or more are written with streaming stores,
    which need aligned addresses; these rows (301 * 300 values) start
    misaligned, so each begins with a partial vector."""
    shape = (4, 3, 300, 301)
    x = make_input(shape, dtype, "cpu", "contiguous", offset=0.5, scale=2.0)
    params = channel_params(shape[1], torch.float64, "cpu")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for training in (True, False):
            poison_allocator("cpu", x.numel() * x.element_size())
            ours, ref = run_both(x, params, training, 0.1, True, True, dtype)
            assert_close_to_reference(ours[0], ref[0], dtype, f"output train={training}")
            for i, (g, g_ref) in enumerate(zip(ours[1], ref[1])):
                assert_close_to_reference(g, g_ref, dtype, f"grad {i} train={training}")
    finally:
        torch.set_num_threads(previous)


def page_placed(values, page_offset):
    """A copy of `values` (same strides) whose data starts `page_offset` bytes into a 4 KiB page."""
    size = values.element_size()
    buffer = torch.empty(values.numel() + 4096 // size, dtype=values.dtype)
    shift = (page_offset - buffer.data_ptr()) % 4096 // size
    placed = buffer.as_strided(values.shape, values.stride(), shift)
    placed.copy_(values)
    assert placed.data_ptr() % 4096 == page_offset
    return placed


@pytest.mark.parametrize("shape,fmt", [((8, 16, 32, 32), "contiguous"), ((8, 64, 16, 16), "channels_last"),
                                       ((16, 96, 12, 12), "channels_last")], ids=["rows-4KiB", "cl-64", "cl-96"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# 0: rows of 4 KiB alias; 2048: cl-64's partners (fp32, 2 KiB periods);
# 384 and 768: cl-96's (fp32) at 2 and 1 threads; 64: torch's usual offset.
@pytest.mark.parametrize("page_offset", [0, 64, 384, 768, 2048])
def test_streamed_output_with_inputs_at_any_page_offset(shape, fmt, dtype, page_offset):
    """Outputs of the pool start on a page, inputs anywhere in theirs. The
    elementwise walks go down two parts of their range side by side, except
    where an input of one part would share its page offset with the output
    of the other (parts_alias in csrc/cpu/elementwise.h): rows of 4 KiB with
    the input on a page boundary, or periods whose partner distance matches
    the inputs' offset. Both walks, forward and backward, against the fp64
    reference at 1 and 2 threads (pairs need prefetching passes: this runs
    with every pass streamed and prefetching in test_streaming.py)."""
    x = page_placed(make_input(shape, dtype, "cpu", fmt, offset=0.5, scale=2.0), page_offset)
    dy = page_placed(make_input(shape, dtype, "cpu", fmt), page_offset)
    w, b, rm, rv = channel_params(shape[1], torch.float32, "cpu")
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for training in (True, False):
                poison_allocator("cpu", x.numel() * x.element_size())
                xi = x.detach().requires_grad_()
                y = fastbn.batch_norm(xi, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
                (gx,) = torch.autograd.grad(y, xi, dy)
                xr = x.double().requires_grad_()
                yr = fastbn.reference.batch_norm(xr, rm.double(), rv.double(), w.double(), b.double(),
                                                 training, 0.1, 1e-5)
                (gr,) = torch.autograd.grad(yr, xr, dy.double())
                what = f"threads={threads} train={training}"
                assert_close_to_reference(y, yr, dtype, f"output {what}")
                assert_close_to_reference(gx, gr, dtype, f"grad_input {what}")
    finally:
        torch.set_num_threads(previous)


def test_grad_output_in_another_layout(device):
    """grad_output in a different memory format from the input is handled."""
    x = make_input((4, 6, 5, 7), torch.float32, device, "channels_last").requires_grad_()
    w, b, _, _ = channel_params(6, torch.float32, device)
    dy = torch.randn(x.shape, device=device)  # contiguous, unlike x
    y = fastbn.batch_norm(x, None, None, w, b, training=True)
    (gx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().double().requires_grad_()
    yr = fastbn.reference.batch_norm(xr, None, None, w.double(), b.double(), training=True)
    (gr,) = torch.autograd.grad(yr, xr, dy.double())
    assert gx.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(gx, gr, torch.float32, "grad_input")


def test_empty_batch_like_torch(device):
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    w, b, rm, rv = channel_params(3, torch.float32, device)
    w.requires_grad_()
    rm0, rv0 = rm.clone(), rv.clone()
    y = fastbn.batch_norm(x, rm, rv, w, b, training=True)
    assert y.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert x.grad.shape == x.shape
