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


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_eps_must_be_positive_in_training(device, eps):
    x = torch.randn(4, 3, 5, device=device)
    with pytest.raises(ValueError, match=f"batch_norm eps must be positive during training, but got {eps}"):
        F.batch_norm(x, None, None, training=True, eps=eps)
    assert_rejected(
        device, ValueError, f"batch_norm eps must be positive during training, but got {eps}",
        lambda rm, rv: fastbn.batch_norm(x, rm, rv, training=True, eps=eps),
    )


def test_eps_must_be_non_negative_in_eval(device):
    x = torch.randn(4, 3, 5, device=device)
    assert_rejected(
        device, ValueError, "batch_norm eps must be non-negative, but got -0.5",
        lambda rm, rv: fastbn.batch_norm(x, rm, rv, training=False, eps=-0.5),
    )
    # eps = 0 is allowed in evaluation, as torch allows it.
    rm, rv = buffers(device)
    torch.testing.assert_close(
        fastbn.batch_norm(x, rm, rv, training=False, eps=0.0),
        F.batch_norm(x, rm, rv, training=False, eps=0.0), rtol=1e-5, atol=1e-5,
    )


def test_module_eps_checked_as_torch(device):
    x = torch.randn(4, 3, device=device)
    for eps in (0.0, -1.0):
        ours, theirs = fastbn.BatchNorm1d(3, eps=eps).to(device), torch.nn.BatchNorm1d(3, eps=eps).to(device)
        for module in (ours, theirs):
            with pytest.raises(ValueError, match="eps must be positive"):
                module(x)
        assert ours.num_batches_tracked.item() == 0 and torch.equal(ours.running_mean, theirs.running_mean)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_one_dim_input_returns_empty_as_torch(device, training):
    x = torch.randn(0, device=device, requires_grad=True)
    stats = torch.randn(0, device=device), torch.rand(0, device=device)
    y = fastbn.batch_norm(x, *stats, training=training)
    y_ref = F.batch_norm(x, *stats, training=training)
    assert y.shape == y_ref.shape == (0,) and y.dtype == y_ref.dtype
    # A new tensor in x's graph, as torch returns (not x itself, not detached).
    assert y is not x and y.requires_grad and y.grad_fn is not None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_float64_input_into_a_float32_module_as_torch(device, training):
    ours, theirs = fastbn.BatchNorm1d(3).to(device), torch.nn.BatchNorm1d(3).to(device)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(0, 3, dtype=torch.float64, device=device, requires_grad=True)
    y, y_ref = ours(x), theirs(x)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype == torch.float64
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(ours.weight.grad, theirs.weight.grad) and torch.equal(ours.bias.grad, theirs.bias.grad)
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
