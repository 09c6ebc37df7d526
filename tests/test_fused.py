"""Fused batch norm + residual add + ReLU: the operators against torch's
unfused composition (F.batch_norm, add, relu), their registration (opcheck,
gradcheck, torch.compile), the BatchNormAct modules and the fastbn.fuse pass."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

import fastbn
import fastbn.models
from helpers import FLOAT_DTYPES, assert_close_to_reference, channel_params, make_input, poison_allocator
from test_correctness import SHAPES as CORRECTNESS_SHAPES

SHAPES = [(16, 17), (3, 5, 7), (4, 6, 5, 5), (3, 64, 5, 7), (2, 3, 4, 5, 6)]
FORMATS = ["contiguous", "channels_last", "strided"]
EXACT = dict(rtol=1e-12, atol=1e-12)


def cases(shapes=SHAPES):
    return [(s, f) for s in shapes for f in FORMATS if f != "channels_last" or len(s) >= 4]


def case_id(case):
    shape, fmt = case
    return f"{'x'.join(map(str, shape))}-{fmt}"


def unfused(x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    """torch's composition that the fused operators replace."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def run_fused_and_unfused(x, residual, params, training, relu, momentum=0.1, eps=1e-5, grad_out=None):
    """Output, gradients (input, residual, weight, bias) and running
    statistics of fastbn.batch_norm_act and of torch's composition on copies of
    the same values."""
    weight, bias, running_mean, running_var = params
    if grad_out is None:
        grad_out = torch.randn_like(x)
    results = []
    for fn in (fastbn.batch_norm_act, None):
        xi, ri, wi, bi = leaves(x, residual, weight, bias)
        rm, rv = running_mean.clone(), running_var.clone()
        if fn is None:
            y = unfused(xi, ri, wi, bi, rm, rv, training, momentum, eps, relu)
        else:
            y = fn(xi, rm, rv, wi, bi, training, momentum, eps, residual=ri,
                   activation="relu" if relu else "identity")
        y.backward(grad_out)
        grads = [t.grad if t is not None else None for t in (xi, ri, wi, bi)]
        results.append((y.detach(), grads, rm, rv))
    return results


def assert_fused_equals_unfused(fused, unfused_results):
    """run_fused_and_unfused's two results agree to 1e-12: output (and its
    strides), every gradient, the running statistics."""
    (y, grads, rm, rv), (y_ref, grads_ref, rm_ref, rv_ref) = fused, unfused_results
    torch.testing.assert_close(y, y_ref, **EXACT)
    assert y.stride() == y_ref.stride()
    for name, g, g_ref in zip(("input", "residual", "weight", "bias"), grads, grads_ref):
        if g_ref is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, g_ref, **EXACT, msg=lambda m: f"grad {name}: {m}")
    torch.testing.assert_close(rm, rm_ref, **EXACT)
    torch.testing.assert_close(rv, rv_ref, **EXACT)


@pytest.mark.parametrize("case", cases(), ids=case_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
def test_float64_equals_unfused_composition(device, case, training, with_residual):
    shape, fmt = case
    poison_allocator(device, 1 << 20)
    x = make_input(shape, torch.float64, device, fmt)
    residual = make_input(shape, torch.float64, device, fmt) if with_residual else None
    params = channel_params(shape[1], torch.float64, device)
    for relu in (True, False):
        assert_fused_equals_unfused(*run_fused_and_unfused(x, residual, params, training, relu))


# The plain batch norm's path-covering shapes (see test_correctness.SHAPES):
# the fused operators run on the same CPU kernels (image walks, fused channel
# blocks, chunks, channels-last short periods and partial periods).
PATH_CASES = [(s, f) for dim in (3, 4, 5) for s in CORRECTNESS_SHAPES[dim]
              for f in ("contiguous", "channels_last") if f != "channels_last" or dim >= 4]


@pytest.mark.parametrize("case", PATH_CASES, ids=case_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_every_kernel_path_float64(device, case, training):
    """BN+ReLU and BN+add+ReLU on every shape of the plain operators' path
    list, float64, against torch's composition."""
    shape, fmt = case
    poison_allocator(device, 1 << 20)
    x = make_input(shape, torch.float64, device, fmt, offset=0.3)
    residual = make_input(shape, torch.float64, device, fmt)
    params = channel_params(shape[1], torch.float64, device)
    for r in (None, residual):
        assert_fused_equals_unfused(*run_fused_and_unfused(x, r, params, training, True))


@pytest.mark.parametrize("wanted", ["input", "residual", "weight", "input+residual", "residual+bias"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_subsets(device, wanted, fmt, training):
    """Only some gradients asked for (the backward's output mask): each one
    equals the composition's, whichever passes the mask leaves out."""
    for shape in ((3, 5, 24, 24), (4, 3, 40, 40)):  # image walk, fused channel blocks
        x = make_input(shape, torch.float64, device, fmt)
        residual = make_input(shape, torch.float64, device, fmt)
        weight, bias, rm, rv = channel_params(shape[1], torch.float64, device)
        grad_out = torch.randn_like(x)
        results = []
        for fused in (True, False):
            xi, ri, wi, bi = leaves(x, residual, weight, bias)
            named = {"input": xi, "residual": ri, "weight": wi, "bias": bi}
            if fused:
                y = fastbn.batch_norm_act(xi, rm.clone(), rv.clone(), wi, bi, training, residual=ri)
            else:
                y = unfused(xi, ri, wi, bi, rm.clone(), rv.clone(), training, 0.1, 1e-5, True)
            results.append(torch.autograd.grad(y, [named[n] for n in wanted.split("+")], grad_out))
        for got, expected in zip(*results):
            torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in PATH_CASES if len(c[0]) == 4], ids=case_id)
def test_every_kernel_path_dtypes(device, dtype, case):
    """Training BN+add+ReLU in every dtype on the 4-d path shapes against
    a float64 reference on the same values. The reference's ReLU mask is the
    tested output's (y > 0): where the pre-activation is within rounding of 0
    the two precisions may disagree on its sign, and on a million values
    that happens."""
    shape, fmt = case
    x = make_input(shape, dtype, device, fmt, offset=0.3)
    residual = make_input(shape, dtype, device, fmt)
    weight, bias, rm, rv = channel_params(shape[1], torch.float64, device)
    grad_out = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    xi, ri, wi, bi = leaves(x, residual, weight.to(dtype), bias.to(dtype))
    y = fastbn.batch_norm_act(xi, rm.to(dtype), rv.to(dtype), wi, bi, True, residual=ri)
    grads = torch.autograd.grad(y, [xi, ri, wi, bi], grad_out)

    xr, wr, br = leaves(x.double(), weight, bias)
    pre = F.batch_norm(xr, rm.clone(), rv.clone(), wr, br, True) + residual.double()
    masked = grad_out.double() * (y > 0)
    grads_ref = (*torch.autograd.grad(pre, [xr, wr, br], masked), masked)
    assert y.dtype == dtype
    assert_close_to_reference(y, torch.relu(pre), dtype, f"output {shape} {fmt} {dtype}")
    for name, got, expected in zip(("input", "weight", "bias", "residual"),
                                   (grads[0], grads[2], grads[3], grads[1]), grads_ref):
        assert got.dtype == dtype
        assert_close_to_reference(got, expected, dtype, f"grad {name} {shape} {fmt} {dtype}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_residual_in_another_layout(device, training):
    """A channels_last input with a contiguous residual (and the reverse)."""
    params = channel_params(8, torch.float64, device)
    for x_fmt, r_fmt in (("channels_last", "contiguous"), ("contiguous", "channels_last")):
        x = make_input((3, 8, 5, 6), torch.float64, device, x_fmt)
        residual = make_input((3, 8, 5, 6), torch.float64, device, r_fmt)
        (y, grads, _, _), (y_ref, grads_ref, _, _) = run_fused_and_unfused(x, residual, params, training, True)
        torch.testing.assert_close(y, y_ref, **EXACT)
        assert y.stride() == x.stride()
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, **EXACT)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_at_exactly_zero_is_zero(device, fmt, training):
    """Outputs of exactly 0 after the add get gradient 0, as torch's ReLU
    backward gives: at a third of the positions the residual is minus the
    batch norm's output (each implementation's own), so the pre-activation
    is exactly 0 there in both."""
    shape = (4, 6, 5, 5)
    x = make_input(shape, torch.float64, device, fmt)
    weight, bias, running_mean, running_var = channel_params(6, torch.float64, device)
    at_zero = torch.rand(shape, device=device) < 1 / 3
    noise = torch.randn_like(x)
    grad_out = torch.randn_like(x)
    results = []
    for fused in (True, False):
        rm, rv = running_mean.clone(), running_var.clone()
        with torch.no_grad():
            if fused:
                bn = fastbn.batch_norm_act(x, rm.clone(), rv.clone(), weight, bias, training, activation=None)
            else:
                bn = F.batch_norm(x, rm.clone(), rv.clone(), weight, bias, training)
        xi, ri, wi, bi = leaves(x, torch.where(at_zero, -bn, noise), weight, bias)
        if fused:
            y = fastbn.batch_norm_act(xi, rm, rv, wi, bi, training, residual=ri)
        else:
            y = torch.relu(F.batch_norm(xi, rm, rv, wi, bi, training) + ri)
        y.backward(grad_out)
        assert (y[at_zero] == 0).all() and (ri.grad[at_zero] == 0).all()
        results.append((y.detach(), xi.grad, ri.grad, wi.grad, bi.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, **EXACT)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES[:1] + FLOAT_DTYPES[2:], ids=str)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dtypes_against_float64(device, dtype, fmt, training):
    """float32, float16 and bfloat16 (with float32 parameters for the half
    types, autocast's case) against a float64 reference on the same values.
    The reference's ReLU mask is the fused output's: where the pre-activation
    is within rounding of 0 either mask is right."""
    shape = (4, 24, 7, 9)
    poison_allocator(device, 1 << 20)
    x = make_input(shape, dtype, device, fmt)
    residual = make_input(shape, dtype, device, fmt)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    weight, bias, running_mean, running_var = (p.to(param_dtype) for p in channel_params(24, torch.float64, device))
    grad_out = torch.randn(shape, dtype=torch.float64, device=device).to(dtype)
    xi, ri, wi, bi = leaves(x, residual, weight, bias)
    rm, rv = running_mean.clone(), running_var.clone()
    y = fastbn.batch_norm_act(xi, rm, rv, wi, bi, training, 0.1, 1e-5, residual=ri)
    y.backward(grad_out)
    assert y.dtype == dtype and xi.grad.dtype == dtype and wi.grad.dtype == param_dtype

    x64, r64, w64, b64 = leaves(*(t.double() for t in (x, residual, weight, bias)))
    rm64, rv64 = running_mean.double(), running_var.double()
    pre = F.batch_norm(x64, rm64, rv64, w64, b64, training, 0.1, 1e-5) + r64
    assert_close_to_reference(y, torch.relu(pre), dtype, "output")
    pre.backward(grad_out.double() * (y.detach() > 0))
    for name, got, ref in (("input", xi.grad, x64.grad), ("residual", ri.grad, r64.grad),
                           ("weight", wi.grad, w64.grad), ("bias", bi.grad, b64.grad)):
        assert_close_to_reference(got, ref, dtype, f"grad {name}")
    assert_close_to_reference(rm, rm64, dtype, "running_mean")
    assert_close_to_reference(rv, rv64, dtype, "running_var")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_gradcheck(device, training, fmt):
    x = make_input((3, 4, 3, 5), torch.float64, device, fmt).requires_grad_()
    residual = make_input((3, 4, 3, 5), torch.float64, device, fmt).requires_grad_()
    weight, bias, running_mean, running_var = channel_params(4, torch.float64, device)
    weight.requires_grad_()
    bias.requires_grad_()

    def fn(x, residual, weight, bias):
        # Running statistics as copies: gradcheck calls fn many times.
        return fastbn.batch_norm_act(x, running_mean.clone(), running_var.clone(), weight, bias,
                                     training, 0.1, 1e-5, residual=residual)

    assert torch.autograd.gradcheck(fn, (x, residual, weight, bias), check_batched_grad=False)
    assert torch.autograd.gradcheck(
        lambda x, w: fastbn.batch_norm_act(x, None, None, w, None, True, activation=None),
        (x, weight), check_batched_grad=False)


def test_opcheck(device):
    x = torch.randn(3, 5, 4, 4, dtype=torch.float64, device=device)
    residual = torch.randn_like(x)
    w, b, rm, rv = channel_params(5, torch.float64, device)
    for relu in (True, False):
        for r in (residual, None):
            opcheck(torch.ops.fastbn.batch_norm_act_train.default,
                    (x.clone().requires_grad_(), r, w.clone().requires_grad_(), b, rm, rv, 0.1, 1e-5, relu))
            opcheck(torch.ops.fastbn.batch_norm_act_eval.default,
                    (x.clone().requires_grad_(), r, rm, rv, w, b, 1e-5, relu))
    y, mean, invstd = torch.ops.fastbn.batch_norm_act_train(x, residual, w, b, None, None, 0.1, 1e-5, True)
    dy = torch.randn_like(x)
    for mask in ([True, True, True, True], [True, False, False, False], [False, True, False, True]):
        for training in (True, False):
            opcheck(torch.ops.fastbn.batch_norm_act_backward.default,
                    (dy, y, x, w, mean, invstd, training, True, mask))
    opcheck(torch.ops.fastbn.batch_norm_act_backward.default,
            (dy, None, x, None, mean, invstd, True, False, [True, True, True, True]))


class Block(nn.Module):
    """relu(bn2(conv(relu(bn1(x)))) + x), with fused modules."""

    def __init__(self, C, activation="relu"):
        super().__init__()
        self.bn1 = fastbn.BatchNormAct2d(C, activation=activation)
        self.conv = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.bn2 = fastbn.BatchNormAct2d(C)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(x)), residual=x)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(device, training):
    torch._dynamo.reset()
    model = Block(4).to(device).double().train(training)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, device=device)
    outs = []
    for fn in (model, compiled):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.sum().backward()
        outs.append((y.detach(), xi.grad))
    torch.testing.assert_close(outs[0], outs[1], **EXACT)


def test_module_state_dict_and_composition():
    torch_bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 1.5)
        torch_bn.bias.normal_()
    fused = fastbn.BatchNormAct2d(6)
    fused.load_state_dict(torch_bn.state_dict(), strict=True)
    x = torch.randn(3, 6, 4, 4, dtype=torch.float32)
    residual = torch.randn_like(x)
    for mode in ("train", "eval"):
        torch_bn.train(mode == "train")
        fused.train(mode == "train")
        torch.testing.assert_close(fused(x, residual=residual), torch.relu(torch_bn(x) + residual))
        torch.testing.assert_close(fused(x), torch.relu(torch_bn(x)))
    back = nn.BatchNorm2d(6)
    back.load_state_dict(fused.state_dict(), strict=True)
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, torch_bn.state_dict()[key], msg=key)
    assert "activation=relu" in repr(fused)
    assert fastbn.BatchNormAct1d(3, activation=None)(torch.randn(4, 3)).min() < 0
    assert fastbn.BatchNormAct3d(3)(torch.randn(2, 3, 2, 2, 2)).min() == 0


def test_bad_input_is_refused_before_anything_changes():
    bn = fastbn.BatchNormAct2d(4)
    x = torch.randn(2, 4, 3, 3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"residual of the input's shape \[2, 4, 3, 3\], got \[2, 4, 3\]"):
        bn(x, residual=torch.randn(2, 4, 3))
    with pytest.raises(RuntimeError, match="residual of the input's dtype Float, got Double"):
        bn(x, residual=torch.randn(2, 4, 3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="expected residual on the input's device cpu, got residual on meta"):
        bn(x, residual=torch.randn(2, 4, 3, 3, device="meta"))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="activation must be 'relu', 'identity' or None, got 'gelu'"):
        fastbn.BatchNormAct2d(4, activation="gelu")
    with pytest.raises(RuntimeError, match="output is required with relu=True"):
        torch.ops.fastbn.batch_norm_act_backward(
            x, None, x, None, torch.zeros(4), torch.ones(4), True, True, [True, True, True, True])


def test_second_order_and_forward_ad_raise():
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    y = fastbn.batch_norm_act(x, None, None, training=True)
    grad_out = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, grad_out, create_graph=True)  # first order: the right values
    (g_plain,) = torch.autograd.grad(y, x, grad_out)
    torch.testing.assert_close(g, g_plain, **EXACT)
    with pytest.raises(RuntimeError, match="double backward of the fused batch norm"):
        torch.autograd.grad(g.sum(), x)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.randn_like(x))
        with pytest.raises(RuntimeError, match="does not support forward-mode AD"):
            fastbn.batch_norm_act(dual, None, None, training=True)


def test_empty_input():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    bn = fastbn.BatchNormAct2d(3)
    y = bn(x, residual=torch.zeros(0, 3, 4, 4))
    assert y.shape == x.shape
    y.sum().backward()


# ---------------------------------------------------------------------------
# fastbn.fuse
# ---------------------------------------------------------------------------

def fused_modules(model):
    return [m for m in model.modules() if isinstance(m, (fastbn.BatchNormAct1d, fastbn.BatchNormAct2d,
                                                         fastbn.BatchNormAct3d))]


def sgd_steps(model, x, target, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_fuse_resnet18_trains_identically_float64():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    fused = fastbn.fuse(model)
    # Stem, and in each of the 8 BasicBlocks bn1 -> relu and bn2 -> add -> relu;
    # the 3 downsample BatchNorms feed an add directly and stay as they are.
    assert len(fused_modules(fused)) == 17
    assert sum(type(m) is nn.BatchNorm2d for m in fused.modules()) == 3
    reference = torchvision.models.resnet18(num_classes=10).double()
    reference.load_state_dict(fused.state_dict(), strict=True)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    target = torch.randint(0, 10, (2,))
    fused_losses = sgd_steps(fused, x, target)
    reference_losses = sgd_steps(reference, x, target)
    torch.testing.assert_close(fused_losses, reference_losses, rtol=1e-12, atol=1e-12)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-10, atol=1e-10, msg=key)
    # And back: the trained fused state loads into a fresh unfused model and
    # the first state into the fused one.
    fresh = torchvision.models.resnet18(num_classes=10).double()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(state, strict=True)
    fresh.eval()
    fused.eval()
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fused(x), fresh(x), rtol=1e-12, atol=1e-12)


def test_fuse_resnet50_bottleneck():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet50(num_classes=10).double().eval()
    fused = fastbn.fuse(model)
    # Stem, and bn1, bn2 -> relu and bn3 -> add -> relu in 16 Bottlenecks.
    assert len(fused_modules(fused)) == 1 + 16 * 3
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,count", [("conv", 2), ("mlp", 1)])
def test_fuse_tutorial_models(name, count):
    model = fastbn.models.MODELS[name]("torch").double()
    fused = fastbn.fuse(model)
    assert len(fused_modules(fused)) == count
    x = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    target = torch.randint(0, 10, (8,))
    reference = fastbn.models.MODELS[name]("torch").double()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(sgd_steps(fused, x, target), sgd_steps(reference, x, target), **EXACT)


class Variants(nn.Module):
    """Every ReLU and add spelling the pass fuses, and two it must not."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(8))
        self.relu_inplace = nn.ReLU(inplace=True)

    def forward(self, x):
        a = F.relu(self.bns[0](x))
        b = torch.relu(self.bns[1](a) + x)           # bn + residual
        c = F.relu(b + self.bns[2](a), inplace=True)  # residual + bn
        d = self.bns[3](c)
        d += b                                        # in-place add
        d = self.relu_inplace(d)
        e = self.bns[4](d).relu()
        kept = self.bns[5](e)                         # two users: not fused
        f = torch.relu(kept) + kept
        g = self.bns[6](f) + f                        # add with two users: not fused
        h = torch.relu(g) * g
        return torch.relu_(self.bns[7](h))


def test_fuse_variants_and_limits():
    model = Variants().double()
    fused = fastbn.fuse(copy.deepcopy(model))  # own buffers: torch's graph saves the running stats
    assert [type(fused.get_submodule(f"bns.{i}")).__name__ for i in range(8)] == (
        ["BatchNormAct2d"] * 5 + ["BatchNorm2d", "BatchNorm2d", "BatchNormAct2d"])
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [m(xi) for m, xi in zip((model, fused), xs)]
    torch.testing.assert_close(outs[0], outs[1], **EXACT)
    outs[0].sum().backward()
    outs[1].sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **EXACT)
    assert all(type(m) is nn.BatchNorm2d for m in model.bns)  # the model itself is unchanged


def test_fuse_untraceable_model_warns_and_returns_it():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(x)
            return torch.relu(y) if y.sum() > 0 else y

    model = DataDependent()
    with pytest.warns(UserWarning, match="DataDependent left unfused: torch.fx could not trace it"):
        assert fastbn.fuse(model) is model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastbn.fuse(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()))


def test_fuse_converted_and_fused_models():
    """fastbn's own BatchNorm modules (fastbn.convert) are fused too, and a
    fused model fuses to itself."""
    model = fastbn.convert(fastbn.models.conv_net("torch")).double()
    fused = fastbn.fuse(model)
    assert len(fused_modules(fused)) == 2
    again = fastbn.fuse(fused)
    assert len(fused_modules(again)) == 2
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(again(x), model(x), **EXACT)
