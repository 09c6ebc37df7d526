"""Bad input gets a clear error before anything is mutated."""
import pytest
import torch
import torch.nn.functional as F

import fastbn


def buffers(device, C=3):
    return torch.randn(C, device=device), torch.rand(C, device=device) + 0.5


def assert_rejected(device, exc, match, call, **kw):
    """`call(rm, rv)` raises `exc` matching `match`; rm, rv stay untouched."""
    rm, rv = buffers(device, **kw)
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(exc, match=match):
        call(rm, rv)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("name,index", [("weight", 3), ("bias", 4)])
def test_wrong_length_weight_or_bias(device, name, index):
    x = torch.randn(4, 3, 5, device=device)
    bad = torch.randn(4, device=device)

    def call(rm, rv):
        args = [x, rm, rv, None, None]
        args[index] = bad
        fastbn.batch_norm(*args, training=True)

    assert_rejected(device, RuntimeError, rf"expected {name} to have shape \[3\].*got shape \[4\]", call)


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_wrong_length_running_stats(device, which):
    x = torch.randn(4, 3, 5, device=device)

    def call(rm, rv):
        bad = torch.zeros(5, device=device)
        if which == "running_mean":
            fastbn.batch_norm(x, bad, rv, training=True)
        else:
            fastbn.batch_norm(x, rm, bad, training=True)

    assert_rejected(device, RuntimeError, rf"expected {which} to have shape \[3\]", call)


def test_input_with_fewer_than_two_dims(device):
    x = torch.randn(3, device=device)
    assert_rejected(
        device, RuntimeError, r"expected input of shape \(N, C\).*got 1-d input of shape \[3\]",
        lambda rm, rv: fastbn.batch_norm(x, rm, rv, training=True),
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_or_bool_input(device, dtype):
    x = torch.ones(4, 3, device=device, dtype=dtype)
    assert_rejected(
        device, RuntimeError, "expected input to be float32, float64, float16 or bfloat16",
        lambda rm, rv: fastbn.batch_norm(x, rm, rv, training=True),
    )


def test_one_value_per_channel_when_training(device):
    x = torch.randn(1, 3, 1, 1, device=device)
    assert_rejected(
        device, ValueError, "Expected more than 1 value per channel when training",
        lambda rm, rv: fastbn.batch_norm(x, rm, rv, training=True),
    )
    # The same message as torch's, and eval mode is fine with one value.
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        F.batch_norm(x, None, None, training=True)
    rm, rv = buffers(device)
    assert fastbn.batch_norm(x, rm, rv, training=False).shape == x.shape


def test_wrong_dtype_params(device):
    x = torch.randn(4, 3, device=device)
    assert_rejected(
        device, RuntimeError, "expected running_mean to have dtype Float.*got Double",
        lambda rm, rv: fastbn.batch_norm(x, rm.double(), rv, training=True),
    )


def test_eval_requires_running_stats(device):
    x = torch.randn(4, 3, device=device)
    with pytest.raises(RuntimeError, match="running_mean and running_var must be given"):
        fastbn.batch_norm(x, None, None, training=False)


def test_only_one_running_stat(device):
    x = torch.randn(4, 3, device=device)
    assert_rejected(
        device, RuntimeError, "running_mean and running_var must be given together",
        lambda rm, rv: fastbn.batch_norm(x, rm, None, training=True),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_different_devices():
    x = torch.randn(4, 3, device="cuda")
    w = torch.randn(3)  # on the CPU

    def call(rm, rv):
        fastbn.batch_norm(x, rm, rv, w, None, training=True)

    assert_rejected("cuda", RuntimeError, "expected weight on the input's device cuda", call)


def test_module_bad_input_leaves_every_buffer_untouched(device):
    bn = fastbn.BatchNorm2d(3).to(device)
    bn(torch.randn(4, 3, 5, 5, device=device))
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    for bad in (torch.randn(1, 3, 1, 1, device=device), torch.randn(4, 4, 5, 5, device=device)):
        with pytest.raises((ValueError, RuntimeError)):
            bn(bad)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert bn.num_batches_tracked.item() == 1
