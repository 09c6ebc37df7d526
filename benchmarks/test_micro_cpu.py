"""pytest-benchmark micro-benchmarks on the CPU: fastbn and torch side by side.

    pytest benchmarks                          # timings
    pytest benchmarks --benchmark-disable      # one run each, as a smoke test (the test suite does this)
"""
import pytest
import torch
import torch.nn.functional as F

import fastbn

CASES = [
    ((64, 100), torch.contiguous_format),
    ((64, 6, 28, 28), torch.contiguous_format),
    ((64, 6, 28, 28), torch.channels_last),
    ((256, 16, 10, 10), torch.contiguous_format),
]
IMPLEMENTATIONS = {"fastbn": fastbn.batch_norm, "torch": F.batch_norm}


def case_id(case):
    shape, fmt = case
    return "x".join(map(str, shape)) + ("-cl" if fmt == torch.channels_last else "")


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_train_forward_backward(benchmark, case, impl):
    shape, fmt = case
    fn = IMPLEMENTATIONS[impl]
    x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=fmt).requires_grad_()
    C = shape[1]
    w = torch.rand(C, requires_grad=True)
    b = torch.randn(C, requires_grad=True)
    rm, rv = torch.zeros(C), torch.ones(C)
    dy = torch.randn_like(x)

    def step():
        y = fn(x, rm, rv, w, b, True, 0.1, 1e-5)
        return torch.autograd.grad(y, (x, w, b), dy)

    grads = benchmark(step)
    assert grads[0].shape == x.shape and torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_eval_forward(benchmark, case, impl):
    shape, fmt = case
    fn = IMPLEMENTATIONS[impl]
    x = (torch.randn(shape) * 2 + 1).contiguous(memory_format=fmt)
    C = shape[1]
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    with torch.no_grad():
        y = benchmark(fn, x, rm, rv, None, None, False, 0.1, 1e-5)
    torch.testing.assert_close(y, F.batch_norm(x, rm, rv, None, None, False, 0.1, 1e-5), rtol=1e-5, atol=1e-5)
