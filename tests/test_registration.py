"""Operator registration: opcheck, gradcheck and gradgradcheck in float64, torch.compile."""
import pytest
import torch
from torch import nn
from torch.library import opcheck

import fastbn
from helpers import make_input


def opcheck_cases(device):
    for fmt, shape in (("contiguous", (4, 3, 5)), ("channels_last", (4, 3, 5, 6)), ("contiguous", (8, 5))):
        for dtype in (torch.float32, torch.float16):
            x = make_input(shape, dtype, device, fmt)
            C = shape[1]
            pdt = torch.float32
            w = torch.randn(C, device=device, dtype=pdt, requires_grad=True)
            b = torch.randn(C, device=device, dtype=pdt, requires_grad=True)
            yield x, w, b, torch.zeros(C, device=device, dtype=pdt), torch.ones(C, device=device, dtype=pdt)


def test_opcheck_train(device):
    for x, w, b, rm, rv in opcheck_cases(device):
        opcheck(torch.ops.fastbn.batch_norm_train.default, (x.requires_grad_(), w, b, rm, rv, 0.1, 1e-5))
        opcheck(torch.ops.fastbn.batch_norm_train.default, (x.detach(), None, None, None, None, 0.1, 1e-5))


def test_opcheck_eval(device):
    for x, w, b, rm, rv in opcheck_cases(device):
        opcheck(torch.ops.fastbn.batch_norm_eval.default, (x.requires_grad_(), rm, rv, w, b, 1e-5))


def test_opcheck_backward(device):
    for x, w, b, rm, rv in opcheck_cases(device):
        _, mean, invstd = torch.ops.fastbn.batch_norm_train(x, w, b, None, None, 0.1, 1e-5)
        dy = torch.randn_like(x)
        for training in (True, False):
            for mask in ([True, True, True], [True, False, False], [False, True, True]):
                opcheck(
                    torch.ops.fastbn.batch_norm_backward.default,
                    (dy, x.detach(), w.detach(), mean, invstd, training, mask),
                )


@pytest.mark.parametrize("fmt,shape", [("contiguous", (4, 3, 5)), ("channels_last", (3, 2, 3, 4)), ("contiguous", (6, 4))])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(device, fmt, shape, training):
    x = make_input(shape, torch.float64, device, fmt).requires_grad_()
    C = shape[1]
    w = torch.randn(C, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, device=device, requires_grad=True)
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5

    def fn(x, w, b):
        # Running stats are updated in place; gradcheck calls fn many times,
        # so each call gets its own copies.
        return fastbn.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    # And the analytic gradients equal the plain-PyTorch reference's.
    y = fn(x, w, b)
    y_ref = fastbn.reference.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
    dy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_ref, (x, w, b), dy)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_float64(device, training):
    """Double backward is supported (its own formula; see test_autograd_features.py
    for the comparison with torch's)."""
    x = make_input((4, 3, 5), torch.float64, device).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
    rm = torch.randn(3, dtype=torch.float64, device=device)
    rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5

    def fn(x, w, b):
        return fastbn.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)

    assert torch.autograd.gradgradcheck(fn, (x, w, b), check_batched_grad=True, check_fwd_over_rev=True)


class ConvBNReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(device, training):
    torch._dynamo.reset()
    reference = ConvBNReLU().to(device)
    model = fastbn.convert(ConvBNReLU().to(device))
    model.load_state_dict(reference.state_dict())
    reference.train(training)
    model.train(training)
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8, device=device)
        xr = x.clone().requires_grad_()
        xc = x.clone().requires_grad_()
        y_ref = reference(xr)
        y = compiled(xc)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        dy = torch.randn_like(y)
        y_ref.backward(dy)
        y.backward(dy)
        torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.conv.weight.grad, reference.conv.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.bn.weight.grad, reference.bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var, rtol=1e-5, atol=1e-6)
    assert model.bn.num_batches_tracked.item() == reference.bn.num_batches_tracked.item()
