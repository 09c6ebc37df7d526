"""fastbn driven through torch's own BatchNorm sample inputs, imported from the
installed torch: the BatchNorm1d/2d/3d entries of common_modules.module_db and
the nn.functional.batch_norm entry of common_methods_invocations.op_db.

Each sample runs through torch's module (or F.batch_norm) and fastbn's on the
same state: outputs, gradients, buffers and error types must agree, and
gradcheck / gradgradcheck pass in float64 with the batched-gradient and
forward-mode checks on (as torch's test_modules / test_ops_gradients /
test_ops_fwd_gradients run them).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import fastbn

try:
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import ModuleErrorEnum, module_db
except Exception as error:  # noqa: BLE001 - any failure means the suite is not there
    pytest.skip(
        f"torch {torch.__version__} does not provide the module_db / op_db test data: {error!r}",
        allow_module_level=True,
    )

FASTBN_CLASSES = {
    nn.BatchNorm1d: fastbn.BatchNorm1d,
    nn.BatchNorm2d: fastbn.BatchNorm2d,
    nn.BatchNorm3d: fastbn.BatchNorm3d,
}
MODULE_INFOS = [info for info in module_db if info.module_cls in FASTBN_CLASSES]
OP_INFOS = [info for info in op_db if info.name == "nn.functional.batch_norm" and info.variant_test_name == ""]
if len(MODULE_INFOS) != 3 or len(OP_INFOS) != 1:
    pytest.skip(
        f"torch {torch.__version__}: expected the BatchNorm1d/2d/3d entries of module_db and "
        f"nn.functional.batch_norm in op_db, found {[i.name for i in MODULE_INFOS]} and "
        f"{[i.name for i in OP_INFOS]}",
        allow_module_level=True,
    )
OP_INFO = OP_INFOS[0]

# (rtol, atol) of fastbn against torch on the same input; float64 is exact up
# to summation order, the rest are rounding of the output.
COMPARE_TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}
# As torch's tests run them: every check on.
GRADCHECK_FLAGS = dict(
    check_batched_grad=True,
    check_forward_ad=True,
    check_backward_ad=True,
    check_undefined_grad=True,
    check_batched_forward_grad=True,
)
GRADGRADCHECK_FLAGS = dict(check_batched_grad=True, check_fwd_over_rev=True, check_rev_over_rev=True)


def assert_close(actual, expected, dtype, what):
    rtol, atol = COMPARE_TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def module_samples(training, dtype, requires_grad=True):
    for info in MODULE_INFOS:
        for sample in info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training
        ):
            yield info, sample


def module_cases():
    cases = []
    for training in (True, False):
        for info, sample in module_samples(training, torch.float64):
            mode = "train" if training else "eval"
            cases.append(pytest.param(info.module_cls, sample.desc, training, id=f"{info.name}-{sample.desc or 'default'}-{mode}"))
    return cases


def find_module_sample(module_cls, desc, training, dtype):
    for info, sample in module_samples(training, dtype):
        if info.module_cls is module_cls and sample.desc == desc:
            return sample
    raise LookupError(f"{module_cls.__name__} sample {desc!r}")


def module_pair(module_cls, sample, training, dtype):
    """torch's module with random parameters and running statistics, and
    fastbn's with the same state."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    reference = module_cls(*args, **kwargs).to(dtype=dtype)
    with torch.no_grad():
        for tensor in (reference.weight, reference.bias, reference.running_mean):
            if tensor is not None:
                tensor.copy_(torch.randn_like(tensor))
        if reference.running_var is not None:
            reference.running_var.copy_(torch.rand_like(reference.running_var) + 0.5)
    ours = FASTBN_CLASSES[module_cls](*args, **kwargs).to(dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    reference.train(training)
    ours.train(training)
    return reference, ours


def fresh_inputs(sample):
    return [x.detach().clone().requires_grad_(x.requires_grad) for x in sample.forward_input.args]


@pytest.mark.parametrize("module_cls,desc,training", module_cases())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_module_forward_backward_buffers_match_torch(module_cls, desc, training, dtype):
    sample = find_module_sample(module_cls, desc, training, dtype)
    reference, ours = module_pair(module_cls, sample, training, dtype)
    # Three steps, so momentum=None's cumulative average and the running
    # statistics' updates are exercised.
    for step in range(3):
        inputs = fresh_inputs(sample)
        dy = torch.randn_like(inputs[0])  # the output has the input's shape
        results = []
        for module in (reference, ours):
            xs = [x.detach().clone().requires_grad_() for x in inputs]
            y = module(*xs)
            y.backward(dy)
            results.append((y, [x.grad for x in xs]))
        (y_ref, gx_ref), (y, gx) = results
        assert_close(y, y_ref, dtype, f"step {step} output")
        for g, g_ref in zip(gx, gx_ref):
            assert_close(g, g_ref, dtype, f"step {step} input gradient")
    for name, param in reference.named_parameters():
        assert_close(getattr(ours, name).grad, param.grad, dtype, f"{name} gradient")
    for name, buffer in reference.named_buffers():
        assert_close(getattr(ours, name), buffer, dtype, name)


@pytest.mark.parametrize("module_cls,desc,training", module_cases())
def test_module_gradcheck_and_gradgradcheck(module_cls, desc, training):
    sample = find_module_sample(module_cls, desc, training, torch.float64)
    _, ours = module_pair(module_cls, sample, training, torch.float64)
    names = [name for name, _ in ours.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in ours.named_parameters()]
    inputs = fresh_inputs(sample)

    def fn(*args):
        xs, ps = args[: len(inputs)], args[len(inputs):]
        return torch.func.functional_call(ours, dict(zip(names, ps)), xs)

    assert gradcheck(fn, (*inputs, *params), **GRADCHECK_FLAGS)
    assert gradgradcheck(fn, (*inputs, *params), **GRADGRADCHECK_FLAGS)


def run_module_or_error(module, inputs):
    try:
        return module(*inputs), None
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return None, error


@pytest.mark.parametrize("info", MODULE_INFOS, ids=lambda info: info.name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_error_inputs_raise_as_torch(info, training):
    error_inputs = list(
        info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False, training=training)
    )
    assert error_inputs
    for error_input in error_inputs:
        sample = error_input.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        assert error_input.error_on == ModuleErrorEnum.FORWARD_ERROR
        reference = info.module_cls(*args, **kwargs)
        ours = FASTBN_CLASSES[info.module_cls](*args, **kwargs)
        if training:
            # torch's test_errors: a fresh module (training mode) must raise
            # the declared error.
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                ours(*sample.forward_input.args)
        reference.train(training)
        ours.train(training)
        state = copy.deepcopy(ours.state_dict())
        y_ref, error_ref = run_module_or_error(reference, sample.forward_input.args)
        y, error = run_module_or_error(ours, sample.forward_input.args)
        assert type(error) is type(error_ref), (error, error_ref)
        if error is None:
            torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        else:
            for name, value in ours.state_dict().items():
                assert torch.equal(value, state[name]), f"{name} changed by a rejected call"


def op_samples(dtype, requires_grad=True):
    return list(OP_INFO.sample_inputs("cpu", dtype, requires_grad=requires_grad))


def clone_sample_args(sample):
    def clone(t):
        if isinstance(t, torch.Tensor):
            return t.detach().clone().requires_grad_(t.requires_grad)
        return t

    return clone(sample.input), [clone(a) for a in sample.args], dict(sample.kwargs)


OP_SAMPLE_IDS = [
    f"{i}-{tuple(s.input.shape)}-{'train' if s.kwargs.get('training') else 'eval'}"
    for i, s in enumerate(op_samples(torch.float64, requires_grad=False))
]


def test_op_db_has_batch_norm_samples():
    # The (0,) inputs, negative momentum and None statistics are all in there.
    shapes = [tuple(s.input.shape) for s in op_samples(torch.float64, requires_grad=False)]
    assert (0,) in shapes and len(shapes) == len(OP_SAMPLE_IDS) >= 10


@pytest.mark.parametrize("index", range(len(OP_SAMPLE_IDS)), ids=OP_SAMPLE_IDS)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=["f64", "f32", "bf16", "f16"]
)
def test_op_forward_backward_running_stats_match_torch(index, dtype):
    sample = op_samples(dtype)[index]
    results = []
    for fn in (F.batch_norm, fastbn.batch_norm):
        x, args, kwargs = clone_sample_args(sample)
        y = fn(x, *args, **kwargs)
        leaves = [t for t in (x, *args) if isinstance(t, torch.Tensor) and t.requires_grad]
        dy = torch.randn_like(y) if not results else results[0][2]
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
        results.append((y, grads, dy, args[:2]))
    (y_ref, g_ref, _, stats_ref), (y, g, _, stats) = results
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert_close(y, y_ref, dtype, "output")
    assert len(g) == len(g_ref)
    for a, b in zip(g, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, dtype, "gradient")
    for s, s_ref in zip(stats, stats_ref):
        if s_ref is not None:
            assert_close(s, s_ref, dtype, "running statistic")


@pytest.mark.parametrize("index", range(len(OP_SAMPLE_IDS)), ids=OP_SAMPLE_IDS)
def test_op_gradcheck_and_gradgradcheck(index):
    sample = op_samples(torch.float64)[index]
    x, args, kwargs = clone_sample_args(sample)
    differentiable = [i for i, t in enumerate((x, *args)) if isinstance(t, torch.Tensor) and t.requires_grad]
    assert differentiable and differentiable[0] == 0
    all_args = [x, *args]

    def fn(*diff):
        call = list(all_args)
        for i, t in zip(differentiable, diff):
            call[i] = t
        return fastbn.batch_norm(*call, **kwargs)

    diff_inputs = tuple(all_args[i] for i in differentiable)
    assert gradcheck(fn, diff_inputs, **GRADCHECK_FLAGS)
    assert gradgradcheck(fn, diff_inputs, **GRADGRADCHECK_FLAGS)
