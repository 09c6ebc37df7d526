"""Autograd beyond first-order reverse mode, against torch's batch norm in
float64: double backward, forward-mode AD, and torch.func's transforms (vmap
with running statistics, grad, jacrev, jacfwd, hessian, functional_call)."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import fastbn
from helpers import make_input

SHAPES = [((6, 3), "contiguous"), ((4, 3, 5), "contiguous"), ((3, 2, 3, 4), "channels_last")]
MODES = [True, False]


def make_case(shape, fmt, device, affine=True):
    C = shape[1]
    x = make_input(shape, torch.float64, device, fmt)
    w = torch.randn(C, dtype=torch.float64, device=device) + 0.5 if affine else None
    b = torch.randn(C, dtype=torch.float64, device=device) if affine else None
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    return x, w, b, rm, rv


def call(fn, x, w, b, rm, rv, training):
    return fn(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)


@pytest.mark.parametrize("shape,fmt", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("training", MODES, ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_double_backward_matches_torch(device, shape, fmt, training, affine):
    x, w, b, rm, rv = make_case(shape, fmt, device, affine)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    dy = torch.randn(shape, dtype=torch.float64, device=device).requires_grad_()
    # A loss of the first-order gradients that touches every one of them.
    coefficients = [torch.randn_like(t) for t in leaves]
    results = []
    for fn in (F.batch_norm, fastbn.batch_norm):
        y = call(fn, x, w, b, rm, rv, training)
        first = torch.autograd.grad(y, leaves, dy, create_graph=True)
        loss = sum((g * c).sum() + g.pow(2).sum() for g, c in zip(first, coefficients))
        second = torch.autograd.grad(loss, [*leaves, dy], allow_unused=True)
        results.append((first, second))
    (first_ref, second_ref), (first, second) = results
    for g, g_ref in zip(first, first_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)
    for g, g_ref in zip(second, second_ref):
        if g_ref is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-8)


def test_first_order_values_under_create_graph_are_the_kernels(device):
    """create_graph=True keeps the backward kernel's values (no composite fallback)."""
    x, w, b, rm, rv = make_case((4, 3, 5), "contiguous", device)
    x.requires_grad_()
    dy = torch.randn_like(x)
    y = fastbn.batch_norm(x, None, None, w, b, True)
    plain = torch.autograd.grad(y, x, dy, retain_graph=True)[0]
    graphed = torch.autograd.grad(y, x, dy, create_graph=True)[0]
    assert torch.equal(plain, graphed)
    assert graphed.grad_fn is not None


@pytest.mark.parametrize("shape,fmt", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("training", MODES, ids=["train", "eval"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_requires_grad", "requires_grad"])
def test_forward_ad_matches_torch(device, shape, fmt, training, requires_grad):
    """Tangents on input, weight and bias (each alone and all together),
    whether or not the primals require grad: never dropped."""
    x, w, b, rm, rv = make_case(shape, fmt, device)
    tangents = [torch.randn_like(t) for t in (x, w, b)]
    for which in ([0], [1], [2], [0, 1, 2]):
        outs = []
        for fn in (F.batch_norm, fastbn.batch_norm):
            with fwAD.dual_level():
                primals = [t.detach().clone().requires_grad_(requires_grad) for t in (x, w, b)]
                duals = [fwAD.make_dual(p, tangents[i]) if i in which else p for i, p in enumerate(primals)]
                y = call(fn, *duals, rm, rv, training)
                primal, tangent = fwAD.unpack_dual(y)
                assert tangent is not None, f"tangent dropped for {which}"
                outs.append((primal.detach().clone(), tangent.detach().clone()))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("training", MODES, ids=["train", "eval"])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_statistic_with_a_tangent_is_an_error(device, training, which):
    x, w, b, rm, rv = make_case((4, 3, 5), "contiguous", device)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, torch.randn_like(x))
        stats = {"running_mean": rm.clone(), "running_var": rv.clone()}
        before = {k: v.clone() for k, v in stats.items()}
        stats[which] = fwAD.make_dual(stats[which], torch.randn_like(stats[which]))
        with pytest.raises(RuntimeError, match="cannot have a forward-mode tangent"):
            fastbn.batch_norm(xd, stats["running_mean"], stats["running_var"], w, b, training)
        for k in stats:
            assert torch.equal(fwAD.unpack_dual(stats[k]).primal, before[k])


@pytest.mark.parametrize("training", MODES, ids=["train", "eval"])
def test_running_statistic_requiring_grad_is_an_error_as_in_torch(device, training):
    x, w, b, rm, rv = make_case((4, 3, 5), "contiguous", device)
    for fn in (F.batch_norm, fastbn.batch_norm):
        with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'running_mean'"):
            fn(x, rm.clone().requires_grad_(), rv.clone(), w, b, training)
    with torch.no_grad():  # as torch: fine when nothing is recorded
        fastbn.batch_norm(x, rm.clone().requires_grad_(), rv.clone(), w, b, training)


def module_pair(device, **kwargs):
    reference = nn.BatchNorm2d(3, **kwargs).to(device).double()
    with torch.no_grad():
        reference.weight.copy_(torch.randn(3) + 0.5)
        reference.bias.copy_(torch.randn(3))
        if reference.track_running_stats:
            reference.running_mean.copy_(torch.randn(3))
            reference.running_var.copy_(torch.rand(3) + 0.5)
    ours = fastbn.BatchNorm2d(3, **kwargs).to(device).double()
    ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.mark.parametrize("training", MODES, ids=["train", "eval"])
def test_jacrev_jacfwd_hessian_grad_functional_call_match_torch(device, training):
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, device=device)
    results = []
    # In training, torch's module cannot update captured running statistics
    # under these transforms (torch.func's advice: track_running_stats=False).
    for module in module_pair(device, track_running_stats=not training):
        module.train(training)
        params = {k: v.detach().clone() for k, v in module.named_parameters()}

        def f(params, x):
            return torch.func.functional_call(module, params, (x,))

        def loss(params, x):
            return (f(params, x) ** 3).sum()

        results.append(
            (
                torch.func.jacrev(f, argnums=(0, 1))(params, x),
                torch.func.jacfwd(f, argnums=(0, 1))(params, x),
                torch.func.grad(loss, argnums=(0, 1))(params, x),
                torch.func.hessian(loss, argnums=1)(params, x),
                torch.func.jacrev(torch.func.jacrev(loss, argnums=1), argnums=0)(params, x),
                {k: v.clone() for k, v in module.named_buffers()},
            )
        )
    torch.testing.assert_close(results[1], results[0], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("bdims", [(0, 0), (1, 1), (2, 0)], ids=["front", "middle", "last_input"])
def test_vmap_training_with_batched_running_stats_matches_a_loop(device, bdims):
    """Each vmapped slice is its own batch norm, running statistics included."""
    B, C = 4, 3
    x_bdim, stat_bdim = bdims
    xs = torch.randn(B, 5, C, 6, dtype=torch.float64, device=device)
    w = torch.randn(B, C, dtype=torch.float64, device=device)
    b = torch.randn(C, dtype=torch.float64, device=device)
    rm = torch.randn(B, C, dtype=torch.float64, device=device)
    rv = torch.rand(B, C, dtype=torch.float64, device=device) + 0.5
    expected_rm, expected_rv = rm.clone(), rv.clone()
    expected = torch.stack(
        [F.batch_norm(xs[i], expected_rm[i], expected_rv[i], w[i], b, True, 0.3, 1e-5) for i in range(B)]
    )
    rm_in = rm.clone().movedim(0, stat_bdim).contiguous() if stat_bdim else rm.clone()
    rv_in = rv.clone().movedim(0, stat_bdim).contiguous() if stat_bdim else rv.clone()
    x_in = xs.movedim(0, x_bdim)
    y = torch.func.vmap(
        lambda x, w, rm, rv: fastbn.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-5),
        in_dims=(x_bdim, 0, stat_bdim, stat_bdim),
    )(x_in, w, rm_in, rv_in)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rm_in.movedim(stat_bdim, 0), expected_rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv_in.movedim(stat_bdim, 0), expected_rv, rtol=1e-12, atol=1e-12)


def test_vmap_eval_and_backward_match_a_loop(device):
    B, C = 3, 4
    xs = torch.randn(B, 6, C, 2, dtype=torch.float64, device=device)
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(B, C, dtype=torch.float64, device=device) + 0.5
    w = torch.randn(C, dtype=torch.float64, device=device)
    y = torch.func.vmap(lambda x, rv: fastbn.batch_norm(x, rm, rv, w, None, False), in_dims=(0, 0))(xs, rv)
    expected = torch.stack([F.batch_norm(xs[i], rm, rv[i], w, None, False) for i in range(B)])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # vjp with a batch of cotangents (jacrev's shape of call) through the backward op.
    for training in MODES:
        x = xs[0].clone().requires_grad_()
        dys = torch.randn(B, *x.shape, dtype=torch.float64, device=device)
        grads = []
        for fn in (F.batch_norm, fastbn.batch_norm):
            y = fn(x, rm.clone(), rv[0].clone(), w, None, training)
            grads.append(torch.autograd.grad(y, x, dys, is_grads_batched=True)[0])
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


def test_vmap_batched_input_with_unbatched_running_stats_is_an_error(device):
    xs = torch.randn(2, 4, 3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match="running_mean or running_var, which training updates in place, is not"):
        torch.func.vmap(lambda x: fastbn.batch_norm(x, rm, rv, training=True))(xs)
    assert torch.equal(rm, torch.zeros(3, device=device)) and torch.equal(rv, torch.ones(3, device=device))
    # Without running statistics (track_running_stats=False) it is fine.
    y = torch.func.vmap(lambda x: fastbn.batch_norm(x, None, None, training=True))(xs)
    expected = torch.stack([F.batch_norm(x, None, None, training=True) for x in xs])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_vmap_over_weights_only_updates_unbatched_running_stats_once(device):
    x = torch.randn(5, 3, 4, dtype=torch.float64, device=device)
    ws = torch.randn(4, 3, dtype=torch.float64, device=device)
    rm, rv = torch.randn(3, dtype=torch.float64, device=device), torch.rand(3, dtype=torch.float64, device=device) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = torch.func.vmap(lambda w: fastbn.batch_norm(x, rm, rv, w, None, True, 0.2))(ws)
    y_ref = F.batch_norm(x, rm_ref, rv_ref, None, None, True, 0.2)
    torch.testing.assert_close(y, ws[:, None, :, None] * y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-12, atol=1e-12)


def test_vmap_of_module_with_functional_call_and_batched_buffers(device):
    """Model ensembling: B copies of a module's state stacked, the module run with vmap."""
    B = 3
    modules = [fastbn.BatchNorm1d(4).to(device).double() for _ in range(B)]
    references = [nn.BatchNorm1d(4).to(device).double() for _ in range(B)]
    for m, r in zip(modules, references):
        with torch.no_grad():
            r.weight.copy_(torch.randn(4))
            r.running_var.copy_(torch.rand(4) + 0.5)
        m.load_state_dict(r.state_dict())
    params, buffers = torch.func.stack_module_state(modules)
    xs = torch.randn(B, 8, 4, dtype=torch.float64, device=device)

    def run(params, buffers, x):
        return torch.func.functional_call(modules[0], (params, buffers), (x,))

    y = torch.func.vmap(run)(params, buffers, xs)
    expected = torch.stack([r(x) for r, x in zip(references, xs)])
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    for i, r in enumerate(references):
        torch.testing.assert_close(buffers["running_mean"][i], r.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(buffers["running_var"][i], r.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", MODES, ids=["train", "eval"])
def test_forward_ad_half_input_with_float_params(device, training):
    """Tangent dtypes follow their primals for the autocast case (half input, float32 params)."""
    x = torch.randn(8, 3, 4, device=device, dtype=torch.float64)
    w, b = torch.randn(3, device=device) + 0.5, torch.randn(3, device=device)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    with fwAD.dual_level():
        y = fastbn.batch_norm(
            fwAD.make_dual(x.half(), tx.half()), rm.clone(), rv.clone(), fwAD.make_dual(w, tw), b, training
        )
        tangent = fwAD.unpack_dual(y).tangent
    with fwAD.dual_level():
        y_ref = F.batch_norm(
            fwAD.make_dual(x.half().double(), tx.half().double()), rm.double(), rv.double(),
            fwAD.make_dual(w.double(), tw.double()), b.double(), training,
        )
        expected = fwAD.unpack_dual(y_ref).tangent
    assert tangent.dtype == torch.float16
    torch.testing.assert_close(tangent.double(), expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("training", MODES, ids=["train", "eval"])
def test_double_backward_low_precision_against_float64_torch(device, dtype, training):
    """Half inputs with float32 parameters (autocast's case): second-order
    gradients within the input dtype's rounding of torch's in float64."""
    rtol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    x64 = torch.randn(8, 3, 5, dtype=torch.float64, device=device)
    coefficients = torch.randn_like(x64)
    w = torch.randn(3, device=device) + 0.5
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    results = []
    for x, weight, stats in (
        (x64.to(dtype), w, (rm, rv)),
        (x64.to(dtype).double(), w.double(), (rm.double(), rv.double())),
    ):
        x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
        fn = fastbn.batch_norm if not results else F.batch_norm
        y = fn(x, stats[0].clone(), stats[1].clone(), weight, None, training)
        gx, gw = torch.autograd.grad((y.double() ** 3).sum(), (x, weight), create_graph=True)
        results.append(torch.autograd.grad((gx.double() * coefficients).sum() + gw.double().sum(), (x, weight)))
    for g, g_ref in zip(*results):
        assert g is not None
        torch.testing.assert_close(g.double(), g_ref, rtol=rtol, atol=rtol * g_ref.abs().max().item())
