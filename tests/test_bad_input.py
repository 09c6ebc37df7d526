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

    assert_rejected(
        device, RuntimeError,
        rf"input has 3 channels \(input shape \[4, 3, 5\]\) where {name} expects 4 \({name} of shape \[4\]",
        call,
    )


@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_wrong_length_running_stats(device, which):
    x = torch.randn(4, 3, 5, device=device)

    def call(rm, rv):
        bad = torch.zeros(5, device=device)
        if which == "running_mean":
            fastbn.batch_norm(x, bad, rv, training=True)
        else:
            fastbn.batch_norm(x, rm, bad, training=True)

    assert_rejected(device, RuntimeError, rf"input has 3 channels .* where {which} expects 5", call)


def test_channel_tensor_of_more_than_one_dim(device):
    x = torch.randn(4, 3, 5, device=device)
    assert_rejected(
        device, RuntimeError,
        r"expected weight to be 1-d with one value per channel, shape \[3\] .*got shape \[1, 3\]",
        lambda rm, rv: fastbn.batch_norm(x, rm, rv, torch.ones(1, 3, device=device), training=True),
    )


@pytest.mark.parametrize("training", [True, False])
def test_layer_given_input_with_the_wrong_channel_count(device, training):
    """8 channels into BatchNorm2d(16): the message says the input has 8
    channels where the layer's parameters expect 16, naming the argument."""
    bn = fastbn.BatchNorm2d(16).to(device).train(training)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"input has 8 channels \(input shape \[2, 8, 4, 4\]\) "
                                           r"where weight expects 16 \(weight of shape \[16\]"):
        bn(torch.randn(2, 8, 4, 4, device=device))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k


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


# Mixed devices: every tensor argument of every op is checked against the
# input's device before anything runs. A meta tensor among CPU ones sends the
# call to the meta (fake) kernel, CUDA among CPU ones to the CUDA kernel: both
# must refuse, leaving the running statistics as they were.

def _train(x, w, b, rm, rv):
    return fastbn.batch_norm(x, rm, rv, w, b, training=True)


def _eval(x, w, b, rm, rv):
    return fastbn.batch_norm(x, rm, rv, w, b, training=False)


def _train_op(x, w, b, rm, rv):
    return torch.ops.fastbn.batch_norm_train(x, w, b, rm, rv, 0.1, 1e-5)


def _eval_op(x, w, b, rm, rv):
    return torch.ops.fastbn.batch_norm_eval(x, rm, rv, w, b, 1e-5)


FORWARD_CALLS = [_train, _eval, _train_op, _eval_op]


def _mixed_device_args(arg_device, other_device, odd_one, C=3):
    x = torch.randn(4, C, 5, device=arg_device("input", odd_one, other_device))
    args = {
        "weight": torch.rand(C) + 0.5,
        "bias": torch.randn(C),
        "running_mean": torch.randn(C),
        "running_var": torch.rand(C) + 0.5,
    }
    args = {k: v.to(arg_device(k, odd_one, other_device)) for k, v in args.items()}
    return x, args


def _check_forward_mix(base, odd, odd_one, call, grad):
    def arg_device(name, odd_one, other):
        return odd if name == odd_one else base

    x, args = _mixed_device_args(arg_device, odd, odd_one)
    if grad:  # the call takes the autograd kernels' graph-building path
        x.requires_grad_()
        args["bias" if odd_one == "weight" else "weight"].requires_grad_()
    before = {k: v.clone() for k, v in args.items() if k.startswith("running") and v.device.type != "meta"}
    name = "weight" if odd_one == "input" else odd_one
    expected_device, found_device = (odd, base) if odd_one == "input" else (base, odd)
    with pytest.raises(
        RuntimeError, match=rf"expected {name} on the input's device {expected_device}(:0)?, "
                            rf"got {name} on {found_device}"
    ):
        call(x, args["weight"], args["bias"], args["running_mean"], args["running_var"])
    for k, v in before.items():
        assert torch.equal(args[k], v), k


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("call", FORWARD_CALLS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("odd_one", ["input", "weight", "bias", "running_mean", "running_var"])
def test_forward_with_one_tensor_on_meta(odd_one, call, grad):
    _check_forward_mix("cpu", "meta", odd_one, call, grad)


@pytest.mark.parametrize("call", FORWARD_CALLS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("odd_one", ["input", "running_mean"])
def test_forward_with_one_tensor_on_meta_in_inference_mode(odd_one, call):
    """Inference tensors skip the autograd kernels; the check still runs."""
    with torch.inference_mode():
        _check_forward_mix("cpu", "meta", odd_one, call, grad=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("base,odd", [("cpu", "cuda"), ("cuda", "cpu")])
@pytest.mark.parametrize("call", FORWARD_CALLS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("odd_one", ["input", "weight", "bias", "running_mean", "running_var"])
def test_forward_with_cpu_and_cuda_tensors(odd_one, call, base, odd):
    _check_forward_mix(base, odd, odd_one, call, grad=False)


def _backward_mix_devices():
    devices = [("cpu", "meta")]
    if torch.cuda.is_available():
        devices += [("cpu", "cuda"), ("cuda", "cpu")]
    return devices


@pytest.mark.parametrize("base,odd", _backward_mix_devices())
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("odd_one", ["grad_output", "weight", "mean", "invstd"])
def test_backward_with_one_tensor_on_another_device(odd_one, training, base, odd):
    x = torch.randn(4, 3, 5, device=base)
    tensors = {
        "grad_output": torch.randn(4, 3, 5),
        "weight": torch.rand(3) + 0.5,
        "mean": torch.randn(3),
        "invstd": torch.rand(3) + 0.5,
    }
    tensors = {k: v.to(odd if k == odd_one else base) for k, v in tensors.items()}
    with pytest.raises(
        RuntimeError,
        match=rf"fastbn.batch_norm_backward: expected {odd_one} on the input's device {base}(:0)?, "
              rf"got {odd_one} on {odd}",
    ):
        torch.ops.fastbn.batch_norm_backward(
            tensors["grad_output"], x, tensors["weight"], tensors["mean"], tensors["invstd"],
            training, [True, True, True])


def test_module_with_parameters_on_meta_leaves_buffers_untouched():
    bn = fastbn.BatchNorm2d(3)
    bn.weight = torch.nn.Parameter(torch.ones(3, device="meta"))
    buffers_before = {k: v.clone() for k, v in bn.named_buffers()}
    with pytest.raises(RuntimeError, match="expected weight on the input's device cpu, got weight on meta"):
        bn(torch.randn(4, 3, 5, 5))
    for k, v in bn.named_buffers():
        assert torch.equal(v, buffers_before[k]), k


@pytest.mark.parametrize("training", [True, False])
def test_all_tensors_on_meta_give_shapes(training):
    """A call with everything on meta is consistent: it gives meta outputs of
    the right shapes (what meta-device models and shape inference need)."""
    x = torch.empty(4, 3, 5, 5, device="meta").requires_grad_()
    w = torch.empty(3, device="meta").requires_grad_()
    rm, rv = torch.empty(3, device="meta"), torch.empty(3, device="meta")
    y = fastbn.batch_norm(x, rm, rv, w, None, training=training)
    assert y.device.type == "meta" and y.shape == x.shape
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.device.type == "meta" and gx.shape == x.shape and gw.shape == (3,)
