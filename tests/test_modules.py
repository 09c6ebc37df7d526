"""fastbn.BatchNorm1d/2d/3d as drop-ins for torch's, and fastbn.convert."""
import copy

import pytest
import torch
from torch import nn

import fastbn
from helpers import make_input

MODULES = [
    (nn.BatchNorm1d, fastbn.BatchNorm1d, (16, 5)),
    (nn.BatchNorm1d, fastbn.BatchNorm1d, (8, 5, 12)),
    (nn.BatchNorm2d, fastbn.BatchNorm2d, (8, 5, 6, 7)),
    (nn.BatchNorm3d, fastbn.BatchNorm3d, (4, 5, 3, 4, 5)),
]
CONFIGS = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.3, eps=1e-3),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(affine=False, track_running_stats=False),
]


def config_id(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


@pytest.mark.parametrize("torch_cls,fast_cls,shape", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_twenty_training_steps_match_torch(device, torch_cls, fast_cls, shape, cfg):
    """Outputs, gradients, running statistics and num_batches_tracked after 20
    training steps (and an eval pass) agree with torch's module."""
    C = shape[1]
    ref = torch_cls(C, **cfg).to(device).double()
    ours = fast_cls(C, **cfg).to(device).double()
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, torch_cls)
    for step in range(20):
        x = make_input(shape, torch.float64, device, offset=step * 0.1, scale=1 + step * 0.05)
        dy = torch.randn(shape, dtype=torch.float64, device=device)
        outs = []
        for module in (ref, ours):
            xi = x.clone().requires_grad_()
            y = module(xi)
            y.backward(dy)
            outs.append((y, xi.grad))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-9, atol=1e-9)
    for name, buf in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], buf, rtol=1e-10, atol=1e-10, msg=name)
    if ref.affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-9, atol=1e-9)
    if ref.track_running_stats:
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 20
    ref.eval()
    ours.eval()
    x = make_input(shape, torch.float64, device)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_float32_training_matches_torch(device, fmt):
    ref = nn.BatchNorm2d(6).to(device)
    ours = fastbn.BatchNorm2d(6).to(device)
    for _ in range(20):
        x = make_input((16, 6, 9, 9), torch.float32, device, fmt, offset=2.0)
        ref(x)
        ours(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked)


def test_state_dict_loads_both_ways_strict():
    for cfg in CONFIGS:
        t = nn.BatchNorm2d(4, **cfg)
        f = fastbn.BatchNorm2d(4, **cfg)
        if t.affine:
            with torch.no_grad():
                t.weight.uniform_()
                t.bias.uniform_()
        assert list(t.state_dict()) == list(f.state_dict())
        f.load_state_dict(t.state_dict(), strict=True)
        t2 = nn.BatchNorm2d(4, **cfg)
        t2.load_state_dict(f.state_dict(), strict=True)
        for name, value in t.state_dict().items():
            assert torch.equal(t2.state_dict()[name], value)


def test_module_repr_and_arguments_match_torch():
    t = nn.BatchNorm3d(7, eps=1e-3, momentum=None, affine=False, track_running_stats=True)
    f = fastbn.BatchNorm3d(7, eps=1e-3, momentum=None, affine=False, track_running_stats=True)
    assert repr(f) == repr(t)
    with pytest.raises(ValueError, match="expected 5D input"):
        f(torch.randn(2, 7, 3))


def test_convert_nested_model(device):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, momentum=None), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
        nn.BatchNorm1d(10, affine=False),
    ).to(device)
    reference = copy.deepcopy(model)
    bn = model[1]
    converted = fastbn.convert(model)
    kinds = [type(m) for m in converted.modules()]
    assert kinds.count(fastbn.BatchNorm2d) == 2 and kinds.count(fastbn.BatchNorm1d) == 1
    assert nn.BatchNorm1d not in kinds and nn.BatchNorm2d not in kinds
    # Parameters and buffers are the same tensors, not copies.
    assert converted[1].weight is bn.weight and converted[1].running_mean is bn.running_mean
    assert converted[3][1].momentum is None and converted[6].affine is False
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, device=device)
        torch.testing.assert_close(converted(x), reference(x), rtol=1e-4, atol=1e-4)
    converted.eval()
    reference.eval()
    x = torch.randn(4, 3, 8, 8, device=device)
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-4, atol=1e-4)
    assert converted[3][1].num_batches_tracked.item() == 3


def test_convert_keeps_eval_mode_and_leaves_other_modules():
    sync = nn.SyncBatchNorm(4)
    model = nn.Sequential(nn.BatchNorm1d(4), sync).eval()
    converted = fastbn.convert(model)
    assert type(converted[0]) is fastbn.BatchNorm1d and not converted[0].training
    assert converted[1] is sync


def test_eval_without_running_stats_uses_batch_statistics(device):
    ref = nn.BatchNorm2d(3, track_running_stats=False).to(device).eval()
    ours = fastbn.BatchNorm2d(3, track_running_stats=False).to(device).eval()
    x = make_input((4, 3, 5, 5), torch.float32, device)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_cpu_output_pool_reuses_and_releases_blocks():
    """Large CPU outputs come from fastbn's pool: a freed output's block is
    reused by the next one, outputs stay ordinary resizable tensors, and
    empty_cache() frees the pool."""
    fastbn.empty_cache()
    x = torch.randn(8, 16, 64, 64)  # 2 MiB: pooled
    y = fastbn.batch_norm(x, None, None, training=True)
    ptr = y.data_ptr()
    assert fastbn.cache_info()["cached_bytes"] == 0
    del y
    assert fastbn.cache_info()["cached_bytes"] > 0
    y2 = fastbn.batch_norm(x, None, None, training=True)
    assert y2.data_ptr() == ptr and fastbn.cache_info()["cached_bytes"] == 0
    torch.testing.assert_close(y2, torch.nn.functional.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)
    y2.resize_(2 * y2.numel())  # the storage can grow like any other
    del y2
    fastbn.empty_cache()
    assert fastbn.cache_info()["cached_bytes"] == 0


def test_cpu_output_pool_hands_out_the_block_freed_last():
    """Of several cached blocks of one size the pool reuses the one freed
    last, which is likeliest still in the cache (handing out the oldest made
    outputs rotate through every block and miss the cache on each write)."""
    fastbn.empty_cache()
    x = torch.randn(8, 16, 64, 64)  # 2 MiB: pooled
    for freed_last in (2, 0, 1):
        held = [fastbn.batch_norm(x, None, None, training=True) for _ in range(3)]
        pointers = [y.data_ptr() for y in held]
        assert len(set(pointers)) == 3
        for i in [j for j in range(3) if j != freed_last] + [freed_last]:
            held[i] = None  # frees output i
        assert fastbn.cache_info()["cached_bytes"] >= 3 * x.numel() * x.element_size()
        y = fastbn.batch_norm(x, None, None, training=True)
        assert y.data_ptr() == pointers[freed_last]
        del y
    fastbn.empty_cache()
