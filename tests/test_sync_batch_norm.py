"""fastbn.SyncBatchNorm: its operators in one process (every device, the SIMT
backend included), the layer without a process group, and the layer across
spawned gloo processes (world sizes 2 and 3) and under DistributedDataParallel;
NCCL where GPUs exist. Multi-process launches have a time limit, so a hang
fails instead of stalling the suite."""
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.library import opcheck

import fastbn
import sync_workers
from fastbn import ops
from helpers import TOLERANCES, assert_close_to_reference, make_input

LAUNCH_TIMEOUT_S = 240  # process start-up included: a few seconds per process on a loaded 2-core machine


def launch(fn, world_size, tmp_path, *args):
    """Runs fn(rank, world_size, init_file, *args) in world_size spawned
    processes; fails the test if one raises or if they take longer than
    LAUNCH_TIMEOUT_S (then every process is killed)."""
    init_file = str(tmp_path / "rendezvous")
    context = mp.start_processes(
        fn, args=(world_size, init_file, *args), nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    # join raises ProcessRaisedException / ProcessExitedException with the worker's traceback.
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{fn.__name__} at world size {world_size} did not finish in {LAUNCH_TIMEOUT_S} s")


# ---------------------------------------------------------------------------
# Across processes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 3])
def test_gloo_matches_one_batch_norm_over_the_global_batch(world_size, tmp_path):
    """Per case (sync_workers.cases): outputs, grad_input, running stats and
    num_batches_tracked of every rank equal (1e-12, float64) those of one
    fastbn.BatchNorm over the concatenated batch, summed grad_weight/grad_bias
    equal its; unequal batches with an empty rank, 1d/2d/3d, NCHW and
    channels_last, affine or not, momentum=None; then a global batch of one
    value per channel raises on every rank and the ranks' statistics are
    bitwise identical."""
    launch(sync_workers.layer_cases, world_size, tmp_path)


def test_ddp_conv_net_matches_single_process_training(tmp_path):
    launch(sync_workers.ddp_training, 2, tmp_path)


def test_torchrun_example_from_readme():
    """README's `torchrun --nproc-per-node 2 -m fastbn.ddp_demo`, shortened."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "fastbn.ddp_demo", "--steps", "3", "--batch", "4", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "parameters identical on all 2 processes" in done.stdout, done.stdout + done.stderr
    assert "step   2  mean loss" in done.stdout, done.stdout


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")
def test_nccl_multi_gpu(tmp_path):
    launch(sync_workers.layer_cases, 2, tmp_path, "nccl")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_nccl_world_size_one(tmp_path):
    """The synchronised path (collectives included) on NCCL with one process,
    through the functional form (the layer skips the collective at world size 1)."""
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        x = torch.randn(6, 4, 5, 5, device="cuda", dtype=torch.float64, requires_grad=True)
        layer = fastbn.BatchNorm2d(4, dtype=torch.float64, device="cuda")
        rm, rv = layer.running_mean.clone(), layer.running_var.clone()
        weight = layer.weight.detach().clone().requires_grad_()
        bias = layer.bias.detach().clone().requires_grad_()
        y = fastbn.sync.sync_batch_norm(x, rm, rv, weight, bias, None, 0.1, 1e-5, dist.group.WORLD, 1)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        y_ref = layer(x_ref)
        (y_ref * g).sum().backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(weight.grad, layer.weight.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bias.grad, layer.bias.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rm, layer.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rv, layer.running_var, rtol=1e-12, atol=1e-12)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# The operators in one process: ranks simulated by slices of one batch
# ---------------------------------------------------------------------------

def simulated_step(x_parts, weight, bias, running_mean, running_var, grad_parts, momentum=0.1, eps=1e-5):
    """The layer's step with the collectives done by hand: returns per-part
    outputs and grad_inputs, the summed grad_weight/grad_bias and the merged
    (mean, invstd)."""
    stats = torch.stack([ops.sync_batch_norm_stats(x, weight, bias, running_mean, running_var)
                         for x in x_parts])
    mean, invstd, count = ops.sync_batch_norm_gather_stats(stats, running_mean, running_var, None,
                                                           momentum, eps)
    outputs = [ops.sync_batch_norm_elemt(x, weight, bias, mean, invstd) for x in x_parts]
    local_sums = [ops.sync_batch_norm_backward_reduce(g, x, mean) for g, x in zip(grad_parts, x_parts)]
    sums = torch.stack(local_sums).sum(0)
    grad_inputs = [ops.sync_batch_norm_backward_elemt(g, x, weight, mean, invstd, sums, count)
                   for g, x in zip(grad_parts, x_parts)]
    return outputs, grad_inputs, sums, mean, invstd, count


def reference_step(x, weight, bias, running_mean, running_var, grad, momentum=0.1, eps=1e-5):
    """float64 torch batch norm on the whole batch."""
    x = x.detach().double().requires_grad_()
    w = None if weight is None else weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    rm = None if running_mean is None else running_mean.double().clone()
    rv = None if running_var is None else running_var.double().clone()
    y = torch.nn.functional.batch_norm(x, rm, rv, w, b, True, momentum, eps)
    (y * grad.double()).sum().backward()
    return y.detach(), x.grad, w, b, rm, rv


SIMULATED_CASES = [
    # (global shape, per-part batches, memory format)
    ((9, 5), (4, 0, 5), "contiguous"),
    ((6, 3, 70), (1, 5), "contiguous"),
    ((7, 6, 5, 9), (2, 3, 2), "channels_last"),
    ((5, 40, 3, 4), (5, 0), "contiguous"),
    ((4, 3, 3, 4, 5), (1, 2, 1), "channels_last"),
    ((3, 35, 2, 3), (1, 1, 1), "strided"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_simulated_ranks_match_reference(device, dtype):
    for shape, batches, fmt in SIMULATED_CASES:
        C = shape[1]
        x = make_input(shape, dtype, device, fmt, offset=3.0, scale=2.0)
        grad = make_input(shape, dtype, device, fmt)
        param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        weight = (torch.randn(C, device=device) + 0.5).to(param_dtype)
        bias = torch.randn(C, device=device).to(param_dtype)
        running_mean = torch.randn(C, device=device).to(param_dtype)
        running_var = (torch.rand(C, device=device) + 0.5).to(param_dtype)
        bounds = [sum(batches[:i]) for i in range(len(batches) + 1)]
        parts = [x[bounds[i]:bounds[i + 1]] for i in range(len(batches))]
        grad_parts = [grad[bounds[i]:bounds[i + 1]] for i in range(len(batches))]
        y_ref, gx_ref, w_ref, b_ref, rm_ref, rv_ref = reference_step(
            x, weight, bias, running_mean, running_var, grad)
        outputs, grad_inputs, sums, mean, invstd, count = simulated_step(
            parts, weight, bias, running_mean, running_var, grad_parts)
        what = f"{shape} {batches} {fmt} {dtype}"
        for i, (y, gx) in enumerate(zip(outputs, grad_inputs)):
            assert y.dtype == dtype and y.shape == parts[i].shape
            assert y.stride() == parts[i].stride() or fmt == "strided", what
            assert_close_to_reference(y, y_ref[bounds[i]:bounds[i + 1]], dtype, f"{what} output {i}")
            assert_close_to_reference(gx, gx_ref[bounds[i]:bounds[i + 1]], dtype, f"{what} grad_input {i}")
        assert torch.equal(count, torch.full_like(count, x.numel() // C)), what
        assert_close_to_reference(sums[1] * invstd, w_ref.grad, dtype, f"{what} grad_weight")
        assert_close_to_reference(sums[0], b_ref.grad, dtype, f"{what} grad_bias")
        assert_close_to_reference(running_mean, rm_ref, dtype, f"{what} running_mean")
        assert_close_to_reference(running_var, rv_ref, dtype, f"{what} running_var")


def test_stats_of_empty_input_are_zero(device):
    stats = ops.sync_batch_norm_stats(torch.randn(0, 4, 3, device=device), None, None, None, None)
    assert torch.equal(stats, torch.zeros(3, 4, device=device))


def test_momentum_none_reads_num_batches_tracked(device):
    """The cumulative average factor 1 / (num_batches_tracked + 1), taken on the device."""
    stats = ops.sync_batch_norm_stats(torch.randn(8, 3, device=device, dtype=torch.float64) + 2,
                                      None, None, None, None)[None]
    for tracked in (0, 4):
        rm = torch.randn(3, device=device, dtype=torch.float64)
        rv = torch.rand(3, device=device, dtype=torch.float64) + 1
        expected_rm, expected_rv = rm.clone(), rv.clone()
        nbt = torch.tensor(tracked, device=device)
        ops.sync_batch_norm_gather_stats(stats, rm, rv, nbt, 0.0, 1e-5)
        factor = 1.0 / (tracked + 1)
        count, mean, m2 = stats[0]
        torch.testing.assert_close(rm, (1 - factor) * expected_rm + factor * mean, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(rv, (1 - factor) * expected_rv + factor * m2 / (count - 1),
                                   rtol=1e-14, atol=1e-14)
        assert int(nbt) == tracked  # read, never written


def test_merge_is_in_rank_order(device):
    """Reordering the ranks changes the last bits in general; the merge must
    follow the given order (same input, same bits, on every rank)."""
    parts = [torch.randn(n, 6, device=device) * 5 + 100 for n in (3, 7, 11)]
    stats = torch.stack([ops.sync_batch_norm_stats(p, None, None, None, None) for p in parts])
    first = ops.sync_batch_norm_gather_stats(stats, None, None, None, 0.1, 1e-5)
    again = ops.sync_batch_norm_gather_stats(stats.clone(), None, None, None, 0.1, 1e-5)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    whole = torch.cat(parts)
    torch.testing.assert_close(first[0], whole.double().mean(0).float(), rtol=1e-6, atol=1e-4)


def opcheck_args(device):
    x = torch.randn(5, 3, 4, 4, device=device, dtype=torch.float64)
    w, b = torch.randn(3, device=device, dtype=torch.float64), torch.randn(3, device=device, dtype=torch.float64)
    rm, rv = torch.randn(3, device=device, dtype=torch.float64), torch.rand(3, device=device, dtype=torch.float64) + 1
    stats = torch.stack([ops.sync_batch_norm_stats(x[:2], None, None, None, None),
                         ops.sync_batch_norm_stats(x[2:], None, None, None, None)])
    mean, invstd, count = ops.sync_batch_norm_gather_stats(stats, None, None, None, 0.1, 1e-5)
    g = torch.randn_like(x)
    sums = ops.sync_batch_norm_backward_reduce(g, x, mean)
    nbt = torch.tensor(3, device=device)
    return [
        (ops.sync_batch_norm_stats, (x, w, b, rm, rv)),
        (ops.sync_batch_norm_stats, (x.contiguous(memory_format=torch.channels_last), None, None, None, None)),
        (ops.sync_batch_norm_gather_stats, (stats, rm, rv, None, 0.1, 1e-5)),
        (ops.sync_batch_norm_gather_stats, (stats, rm, rv, nbt, 0.0, 1e-5)),
        (ops.sync_batch_norm_elemt, (x, w, b, mean, invstd)),
        (ops.sync_batch_norm_backward_reduce, (g, x, mean)),
        (ops.sync_batch_norm_backward_elemt, (g, x, w, mean, invstd, sums, count)),
        (ops.sync_batch_norm_backward_elemt, (g, x, None, mean, invstd, sums, count)),
    ]


def test_opcheck(device):
    for op, args in opcheck_args(device):
        opcheck(op, args)


def test_bad_input_is_rejected_before_anything_changes(device):
    x = torch.randn(4, 3, 5, device=device)
    w = torch.randn(3, device=device)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 1
    rm_before, rv_before = rm.clone(), rv.clone()
    with pytest.raises(RuntimeError, match="input has 3 channels .* where weight expects 4"):
        ops.sync_batch_norm_stats(x, torch.randn(4, device=device), None, rm, rv)
    with pytest.raises(RuntimeError, match="expected input to be float32, float64"):
        ops.sync_batch_norm_stats(x.int(), None, None, None, None)
    stats = ops.sync_batch_norm_stats(x, w, None, rm, rv)[None]
    with pytest.raises(RuntimeError, match=r"expected stats of shape \[world_size, 3, C\]"):
        ops.sync_batch_norm_gather_stats(stats[:, :2], rm, rv, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match=r"expected running_var of shape \[3\]"):
        ops.sync_batch_norm_gather_stats(stats, rm, rv[:2], None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="expected num_batches_tracked to be one int64 value"):
        ops.sync_batch_norm_gather_stats(stats, rm, rv, torch.zeros(2, dtype=torch.long, device=device), 0.1, 1e-5)
    assert torch.equal(rm, rm_before) and torch.equal(rv, rv_before)
    mean, invstd, count = ops.sync_batch_norm_gather_stats(stats, None, None, None, 0.1, 1e-5)
    with pytest.raises(RuntimeError, match="expected mean to have dtype Float"):
        ops.sync_batch_norm_elemt(x, w, None, mean.double(), invstd)
    with pytest.raises(RuntimeError, match="expected grad_output of the input's shape"):
        ops.sync_batch_norm_backward_reduce(x[:2], x, mean)
    sums = ops.sync_batch_norm_backward_reduce(x, x, mean)
    with pytest.raises(RuntimeError, match=r"expected sums of shape \[2, 3\]"):
        ops.sync_batch_norm_backward_elemt(x, x, w, mean, invstd, sums[:1], count)


# ---------------------------------------------------------------------------
# The layer without a process group, conversion, state dicts
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_is_fastbn_batch_norm(momentum):
    assert not dist.is_initialized()
    sync = fastbn.SyncBatchNorm(4, momentum=momentum)
    local = fastbn.BatchNorm2d(4, momentum=momentum)
    for step in range(2):
        x = torch.randn(3, 4, 5, 5)
        torch.testing.assert_close(sync(x), local(x), rtol=0, atol=0)
    for key, value in local.state_dict().items():
        assert torch.equal(sync.state_dict()[key], value), key
    sync.eval(), local.eval()
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(sync(x), local(x))


def test_state_dict_loads_both_ways_with_torch():
    ours = fastbn.SyncBatchNorm(6, momentum=None)
    theirs = torch.nn.SyncBatchNorm(6, momentum=None)
    ours(torch.randn(4, 6, 3))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    again = fastbn.SyncBatchNorm(6, momentum=None)
    again.load_state_dict(theirs.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_convert_sync_batchnorm_shares_parameters():
    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(3), fastbn.BatchNorm2d(4, affine=False),
        torch.nn.Sequential(torch.nn.BatchNorm3d(5, momentum=None, eps=1e-3)),
        torch.nn.SyncBatchNorm(2), torch.nn.Linear(2, 2))
    model[0].eval()
    originals = [model[0], model[1], model[2][0], model[3]]
    group = object()  # any handle: stored, used only when synchronising
    converted = fastbn.SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    layers = [converted[0], converted[1], converted[2][0], converted[3]]
    for before, after in zip(originals, layers):
        assert type(after) is fastbn.SyncBatchNorm
        assert after.process_group is group
        assert (after.num_features, after.eps, after.momentum, after.affine, after.training) == (
            before.num_features, before.eps, before.momentum, before.affine, before.training)
        assert after.running_mean is before.running_mean and after.num_batches_tracked is before.num_batches_tracked
        assert after.weight is before.weight
    assert isinstance(converted[4], torch.nn.Linear)
    via_convert = fastbn.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), sync=True)
    assert type(via_convert[0]) is fastbn.SyncBatchNorm
    with pytest.raises(ValueError, match="process_group is only used with sync=True"):
        fastbn.convert(torch.nn.BatchNorm2d(3), process_group=group)


def test_bad_layer_input():
    with pytest.raises(ValueError, match="expected at least 2D input"):
        fastbn.SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        fastbn.SyncBatchNorm(0)(torch.randn(3, 0))
    # Refused before the collective (no process group is needed to see it).
    with pytest.raises(ValueError, match="eps must be positive during training, but got 0.0"):
        fastbn.sync.sync_batch_norm(torch.randn(4, 3), None, None, None, None, None, 0.1, 0.0, None, 2)
