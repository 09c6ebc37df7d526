"""Process bodies of the multi-process SyncBatchNorm tests (test_sync_batch_norm.py).

Each process joins a gloo (or NCCL) group, runs every case and checks its own
share against one fastbn.BatchNorm over the concatenated global batch, which
every rank computes from the same seed. A failed check raises, the process
exits non-zero and the launching test reports the traceback.
"""
from __future__ import annotations

import datetime
import gc
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastbn
from fastbn.models import conv_net

TOL = dict(rtol=1e-12, atol=1e-12)
# A collective that waits longer than this fails instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def init_group(rank: int, world_size: int, init_file: str, backend: str = "gloo") -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT)


@dataclass
class Case:
    spatial: tuple  # () for (N, C) input
    batches: tuple  # per-rank batch sizes (may include 0)
    channels_last: bool = False
    affine: bool = True
    momentum: float | None = 0.1
    track_running_stats: bool = True
    steps: int = 2


def cases(world_size: int) -> list[Case]:
    if world_size == 2:
        uneven, with_empty = (3, 5), (4, 0)
    else:
        uneven, with_empty = (2, 5, 3), (3, 0, 2)
    equal = (3,) * world_size
    return [
        Case((), equal),
        Case((), uneven, affine=False, momentum=None),
        Case((7,), with_empty),
        Case((5, 6), equal, channels_last=False),
        Case((5, 6), uneven, channels_last=True, momentum=None),
        Case((5, 6), with_empty, channels_last=True, affine=False),
        Case((3, 4, 5), uneven, channels_last=True),
        Case((3, 4, 5), with_empty, momentum=None),
        Case((4, 4), uneven, track_running_stats=False),
    ]


def _module_class(spatial):
    return {0: fastbn.BatchNorm1d, 1: fastbn.BatchNorm1d, 2: fastbn.BatchNorm2d, 3: fastbn.BatchNorm3d}[
        len(spatial)]


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def run_case(case: Case, rank: int, world_size: int, device, seed: int) -> None:
    C = 3
    generator = torch.Generator().manual_seed(seed)
    total = sum(case.batches)
    shape = (total, C, *case.spatial)
    x_all = (torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 3)
    g_all = torch.randn(shape, generator=generator, dtype=torch.float64)
    start = sum(case.batches[:rank])
    stop = start + case.batches[rank]

    reference = _module_class(case.spatial)(
        C, momentum=case.momentum, affine=case.affine, track_running_stats=case.track_running_stats,
        dtype=torch.float64)
    if case.affine:
        with torch.no_grad():
            reference.weight.copy_(torch.randn(C, generator=generator, dtype=torch.float64) + 0.5)
            reference.bias.copy_(torch.randn(C, generator=generator, dtype=torch.float64))
    layer = fastbn.SyncBatchNorm.convert_sync_batchnorm(
        _module_class(case.spatial)(
            C, momentum=case.momentum, affine=case.affine,
            track_running_stats=case.track_running_stats, dtype=torch.float64))
    layer.load_state_dict(reference.state_dict())
    reference.to(device)
    layer.to(device)
    assert isinstance(layer, fastbn.SyncBatchNorm)

    for step in range(case.steps):
        x_ref = _layout((x_all + step).to(device), case.channels_last).requires_grad_()
        y_ref = reference(x_ref)
        (y_ref * g_all.to(device)).sum().backward()

        x = _layout((x_all[start:stop] + step).to(device), case.channels_last).requires_grad_()
        y = layer(x)
        (y * g_all[start:stop].to(device)).sum().backward()

        what = f"rank {rank}/{world_size} {case} step {step}"
        _close(y, y_ref[start:stop], f"{what} output")
        _close(x.grad, x_ref.grad[start:stop], f"{what} grad_input")
        if case.channels_last and x.numel():
            assert y.is_contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d), what
        if case.affine:
            grads = torch.stack([layer.weight.grad, layer.bias.grad])
            dist.all_reduce(grads)
            _close(grads[0], reference.weight.grad, f"{what} summed grad_weight")
            _close(grads[1], reference.bias.grad, f"{what} summed grad_bias")
            for module in (layer, reference):
                module.weight.grad = module.bias.grad = None
        if case.track_running_stats:
            _close(layer.running_mean, reference.running_mean, f"{what} running_mean")
            _close(layer.running_var, reference.running_var, f"{what} running_var")
            assert int(layer.num_batches_tracked) == int(reference.num_batches_tracked) == step + 1, what
    # Eval: fastbn.BatchNorm with the running statistics, no collective.
    layer.eval()
    reference.eval()
    x = _layout(x_all[start:stop].to(device), case.channels_last)
    _close(layer(x), reference(x), f"rank {rank} {case} eval output")


def check_global_count_error(rank: int, world_size: int, device) -> None:
    """One value per channel over the whole group: every rank raises, nothing changes."""
    layer = fastbn.SyncBatchNorm(4, dtype=torch.float64).to(device)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1 if rank == 0 else 0, 4, dtype=torch.float64, device=device)
    try:
        layer(x)
    except ValueError as error:
        assert "Expected more than 1 value per channel when training" in str(error), error
    else:
        raise AssertionError(f"rank {rank}: a global batch of 1 value per channel was accepted")
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"rank {rank}: {key} changed by a rejected batch"


def check_identical_statistics(rank: int, world_size: int, device) -> None:
    """Every rank holds bitwise the same running statistics (rank-order merge)."""
    layer = fastbn.SyncBatchNorm(5).to(device)
    x = torch.randn(3 + rank, 5, 4, 4, device=device) * 3 + 1
    layer(x)
    stats = torch.stack([layer.running_mean, layer.running_var])
    gathered = [torch.empty_like(stats) for _ in range(world_size)]
    dist.all_gather(gathered, stats)
    for other in gathered:
        assert torch.equal(other, stats), f"rank {rank}: running statistics differ between ranks"


def layer_cases(rank: int, world_size: int, init_file: str, backend: str = "gloo") -> None:
    init_group(rank, world_size, init_file, backend)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    try:
        for index, case in enumerate(cases(world_size)):
            run_case(case, rank, world_size, device, seed=1000 * world_size + index)
        check_global_count_error(rank, world_size, device)
        # The group still works after the error.
        check_identical_statistics(rank, world_size, device)
    finally:
        dist.destroy_process_group()


def ddp_training(rank: int, world_size: int, init_file: str) -> None:
    """The tutorial's conv net with SyncBatchNorm under DistributedDataParallel
    against the same net trained in one process on the full batch."""
    init_group(rank, world_size, init_file)
    try:
        _ddp_training_steps(rank, world_size)
        # DDP's reducer holds the group and its gloo threads: free it (with
        # the model, in reference cycles) while the group is alive, and let
        # no rank tear its connections down while the other still uses them.
        # Once (2026-12-07), without this, a rank aborted at exit with
        # "terminate called without an active exception".
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _ddp_training_steps(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    single = conv_net("fastbn").double()
    distributed = fastbn.convert(conv_net("torch").double(), sync=True)
    distributed.load_state_dict(single.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(distributed)
    per_rank = 4
    generator = torch.Generator().manual_seed(1)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.1)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for step in range(3):
        images = torch.randn(per_rank * world_size, 1, 28, 28, generator=generator, dtype=torch.float64)
        labels = torch.randint(0, 10, (per_rank * world_size,), generator=generator)
        opt_single.zero_grad()
        F.cross_entropy(single(images), labels).backward()
        opt_single.step()
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        opt_ddp.zero_grad()
        F.cross_entropy(ddp(images[mine]), labels[mine]).backward()
        opt_ddp.step()
    state = distributed.state_dict()
    for key, expected in single.state_dict().items():
        torch.testing.assert_close(
            state[key], expected, rtol=1e-10, atol=1e-10,
            msg=lambda m, key=key: f"rank {rank}: {key} after 3 steps: {m}")
    flat = torch.cat([p.detach().flatten() for p in distributed.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    for other in gathered:
        assert torch.equal(other, flat), f"rank {rank}: parameters differ between ranks"
