"""Autograd beyond one backward: double backward (gradient penalties), batched and per-sample
gradients (vmap over the backward, torch.func), forward-mode AD, a graph backpropagated twice, and
empty grids. Each against PyTorch's own ops (or, for deform_conv2d, the plain-PyTorch column-buffer
composition, which autograd differentiates to any order), in float64."""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import grad, jvp, vmap

import stn_triton
from conftest import DEVICE, PADDING_MODES, assert_close_scaled, generator, rand, randn
from stn_triton import fallback


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _grid_inputs(nd, seed, n=2, c=3):
    gen = generator(seed)
    x = randn((n, c, *([4] * nd)), gen)
    grid = rand((n, *([3] * nd), nd), gen, -1.2, 1.2)
    return x, grid


def _input_penalty(sample, x, grid, go, v):
    """<v, d<S(x, grid), go>/dx>: the gradient penalty of a critic on its input, through create_graph."""
    (gx,) = torch.autograd.grad((sample(x, grid) * go).sum(), x, create_graph=True)
    return (gx * v).sum()


DOUBLE_CASES = [
    pytest.param(nd, mode, padding, align, id=f"{nd}d-{mode}-{padding}-{'align' if align else 'noalign'}")
    for nd, mode, padding, align in [
        (2, "bilinear", "zeros", False), (2, "bilinear", "border", True), (2, "bicubic", "reflection", False),
        (2, "nearest", "zeros", True), (3, "bilinear", "reflection", True), (3, "nearest", "border", False),
    ]
]


@pytest.mark.parametrize("nd, mode, padding_mode, align_corners", DOUBLE_CASES)
def test_grid_sample_double_backward_through_the_input_gradient(nd, mode, padding_mode, align_corners):
    """The issue's case: a penalty on the input gradient differentiated by the grid and grad_output."""
    x, grid = _grid_inputs(nd, 1)
    gen = generator(2)
    go = randn((2, 3, *([3] * nd)), gen)
    v = randn(x.shape, gen)
    results = []
    for sample in (stn_triton.grid_sample, F.grid_sample):
        leaves = [_leaf(t) for t in (x, grid, go)]
        penalty = _input_penalty(lambda a, b: sample(a, b, mode, padding_mode, align_corners), *leaves[:2], leaves[2], v)
        results.append(torch.autograd.grad(penalty + leaves[1].pow(2).sum(), (leaves[1], leaves[2])))
    for what, ours, theirs in zip(("grid", "grad_output"), *results):
        assert_close_scaled(ours, theirs, 1e-10, what)


def test_differentiating_the_grid_gradient_again_raises():
    x, grid = _grid_inputs(2, 3)
    x, grid = _leaf(x), _leaf(grid)
    (gg,) = torch.autograd.grad(stn_triton.grid_sample(x, grid).pow(2).sum(), grid, create_graph=True)
    with pytest.raises(NotImplementedError, match="cannot be differentiated again"):
        torch.autograd.grad(gg.sum(), x)


def test_fused_warp_double_backward_through_the_input_gradient():
    """affine_grid_sample: the input-gradient penalty differentiated by theta, against the composition."""
    gen = generator(4)
    x = randn((2, 3, 5, 6), gen)
    theta = (torch.eye(2, 3, dtype=torch.float64) + rand((2, 2, 3), gen, -0.3, 0.3, device="cpu")).to(DEVICE)
    go = randn((2, 3, 4, 7), gen)
    v = randn(x.shape, gen)

    def composition(a, t):
        return F.grid_sample(a, F.affine_grid(t, [2, 3, 4, 7], align_corners=False), padding_mode="border",
                             align_corners=False)

    def ours(a, t):
        return stn_triton.affine_grid_sample(a, t, size=(2, 3, 4, 7), padding_mode="border")

    results = []
    for sample in (ours, composition):
        leaves = [_leaf(t) for t in (x, theta, go)]
        penalty = _input_penalty(sample, *leaves[:2], leaves[2], v)
        results.append(torch.autograd.grad(penalty, (leaves[1], leaves[2])))
    for what, a, b in zip(("theta", "grad_output"), *results):
        assert_close_scaled(a, b, 1e-10, what)


@pytest.mark.parametrize("size", [(1, 2, 3, 4), (1, 1, 2, 2, 3)], ids=["2d", "3d"])
def test_affine_grid_gradgradcheck_and_forward_ad(size):
    nd = len(size) - 2
    theta = _leaf(rand((1, nd, nd + 1), generator(5)))
    assert torch.autograd.gradgradcheck(lambda t: stn_triton.affine_grid(t, size), (theta,))
    assert torch.autograd.gradcheck(lambda t: stn_triton.affine_grid(t, size), (theta,), check_forward_ad=True,
                                    check_batched_grad=True)
    tangent = rand(theta.shape, generator(6))
    _, ours = jvp(lambda t: stn_triton.affine_grid(t, size), (theta.detach(),), (tangent,))
    _, theirs = jvp(lambda t: F.affine_grid(t, list(size), align_corners=False), (theta.detach(),), (tangent,))
    torch.testing.assert_close(ours, theirs)


def test_affine_grid_tangent_of_a_dual_that_needs_no_grad():
    """A dual input whose primal does not require grad: the tangent must not come back None."""
    theta = rand((2, 2, 3), generator(7))
    tangent = rand(theta.shape, generator(8))
    with forward_ad.dual_level():
        grid = stn_triton.affine_grid(forward_ad.make_dual(theta, tangent), (2, 3, 4, 5))
        ours = forward_ad.unpack_dual(grid).tangent
    assert ours is not None
    torch.testing.assert_close(ours, F.affine_grid(tangent, [2, 3, 4, 5], align_corners=False))


def test_forward_ad_of_grid_sample_raises_as_pytorchs_does():
    x, grid = _grid_inputs(2, 9)
    for sample in (F.grid_sample, stn_triton.grid_sample):
        with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward AD"):
            sample(forward_ad.make_dual(x, torch.ones_like(x)), grid, align_corners=False)


def test_affine_grid_backpropagates_twice():
    theta = _leaf(rand((2, 2, 3), generator(10)))
    grid = stn_triton.affine_grid(theta, (2, 3, 4, 5))
    gradient = torch.ones_like(grid)
    grid.backward(gradient)
    grid.backward(gradient)
    expected = _leaf(theta)
    reference = F.affine_grid(expected, [2, 3, 4, 5], align_corners=False)
    reference.backward(2 * gradient)
    torch.testing.assert_close(theta.grad, expected.grad)


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("align_corners", [False, True], ids=["noalign", "align"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_an_empty_grid_has_gradients_of_its_shape(nd, padding_mode, align_corners, mode):
    x = _leaf(randn((5, 2, *([3] * nd)), generator(11)))
    grid = torch.zeros((5, 0, *([4] * (nd - 1)), nd), dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = stn_triton.grid_sample(x, grid, mode, padding_mode, align_corners)
    out.sum().backward()
    assert grid.grad.shape == grid.shape
    assert x.grad.shape == x.shape and not x.grad.any()


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_grid_sample_batched_gradients(mode):
    """gradcheck's check_batched_grad: autograd's vmap over the backward (is_grads_batched=True)."""
    gen = generator(12)
    x, grid = randn((1, 1, 3, 3), gen), rand((1, 2, 2, 2), gen, -1.2, 1.2)
    assert torch.autograd.gradcheck(lambda a, b: stn_triton.grid_sample(a, b, mode, "border"), (_leaf(x), _leaf(grid)),
                                    check_batched_grad=True)


def _batched_grads_match_one_by_one(fn, tensors, batch=3):
    """grad(fn(*tensors), tensors, V, is_grads_batched=True) equals the B gradients taken one by one."""
    leaves = [_leaf(t) for t in tensors]
    out = fn(*leaves)
    directions = randn((batch, *out.shape), generator(21))
    batched = torch.autograd.grad(out, leaves, directions, is_grads_batched=True, retain_graph=True)
    for b in range(batch):
        single = torch.autograd.grad(out, leaves, directions[b], retain_graph=True)
        for index, (many, one) in enumerate(zip(batched, single)):
            assert_close_scaled(many[b], one, 1e-12, f"sample {b}, input {index}")


def test_warp_and_deform_conv2d_batched_gradients():
    gen = generator(13)
    x = randn((2, 2, 4, 5), gen)
    theta = torch.eye(2, 3, dtype=torch.float64, device=DEVICE)[None] + rand((2, 2, 3), gen, -0.2, 0.2)
    _batched_grads_match_one_by_one(lambda a, t: stn_triton.affine_grid_sample(a, t), (x, theta))
    offset = rand((2, 18, 4, 5), gen, -1.5, 1.5)
    weight = randn((2, 2, 3, 3), gen)
    mask = rand((2, 9, 4, 5), gen, 0.0, 1.0)
    _batched_grads_match_one_by_one(lambda a, o, w, m: stn_triton.deform_conv2d(a, o, w, padding=1, mask=m),
                                    (x, offset, weight, mask))


def test_per_sample_gradients_with_torch_func():
    """vmap(grad(...)): each sample's gradient of the grid and of a deformable convolution's weight."""
    x, grid = _grid_inputs(2, 14, n=3, c=2)

    def sample_loss(sample):
        return lambda a, g: sample(a[None], g[None], "bilinear", "zeros", False).pow(2).sum()

    ours = vmap(grad(sample_loss(stn_triton.grid_sample), argnums=(0, 1)))(x, grid)
    theirs = vmap(grad(sample_loss(F.grid_sample), argnums=(0, 1)))(x, grid)
    for what, a, b in zip(("input", "grid"), ours, theirs):
        assert_close_scaled(a, b, 1e-10, what)

    gen = generator(15)
    inputs = randn((3, 2, 4, 4), gen)
    offsets = rand((3, 18, 4, 4), gen, -1.0, 1.0)
    weight = randn((2, 2, 3, 3), gen)

    def conv_loss(conv):
        return lambda w, a, o: conv(a[None], o[None], w).pow(2).sum()

    def ours_conv(a, o, w):
        return stn_triton.deform_conv2d(a, o, w, padding=1)

    def reference_conv(a, o, w):
        return fallback.deform_conv2d(a, o, w, None, (1, 1), (1, 1), (1, 1), None)

    ours = vmap(grad(conv_loss(ours_conv)), in_dims=(None, 0, 0))(weight, inputs, offsets)
    theirs = torch.stack([grad(conv_loss(reference_conv))(weight, a, o) for a, o in zip(inputs, offsets)])
    assert_close_scaled(ours, theirs, 1e-10, "per-sample grad_weight")


def _deform_inputs(seed, mask=True):
    gen = generator(seed)
    return dict(
        input=randn((2, 4, 5, 5), gen), offset=rand((2, 2 * 2 * 9, 5, 5), gen, -1.5, 1.5),
        weight=randn((6, 2, 3, 3), gen), bias=randn((6,), gen),
        mask=rand((2, 2 * 9, 5, 5), gen, 0.0, 1.0) if mask else None,
    )


def _deform(conv, tensors):
    if conv is stn_triton.deform_conv2d:
        return conv(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"], padding=1,
                    mask=tensors["mask"])
    return conv(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"], (1, 1), (1, 1), (1, 1),
                tensors["mask"])


@pytest.mark.parametrize("first", ["input", "weight", "mask", "bias"])
def test_deform_conv2d_double_backward(first):
    """A first gradient by ``first``, a penalty on it, differentiated by every tensor, against the
    column-buffer composition differentiated twice by autograd."""
    values = _deform_inputs(16)
    gen = generator(17)
    go = randn((2, 6, 5, 5), gen)
    v = randn(values[first].shape, gen)
    results = []
    for conv in (stn_triton.deform_conv2d, fallback.deform_conv2d):
        leaves = {name: _leaf(t) for name, t in values.items()}
        grad_output = _leaf(go)
        (first_grad,) = torch.autograd.grad((_deform(conv, leaves) * grad_output).sum(), leaves[first],
                                            create_graph=True)
        targets = [grad_output] + [leaves[name] for name in ("input", "weight", "mask")]
        results.append(torch.autograd.grad((first_grad * v).sum(), targets, allow_unused=True))
    for what, ours, theirs in zip(("grad_output", "input", "weight", "mask"), *results):
        if theirs is None or not theirs.any():
            assert ours is None or not ours.any(), what
        else:
            assert_close_scaled(ours, theirs, 1e-9, what)


def test_differentiating_the_offset_gradient_again_raises():
    leaves = {name: _leaf(t) for name, t in _deform_inputs(18).items()}
    (goff,) = torch.autograd.grad(_deform(stn_triton.deform_conv2d, leaves).pow(2).sum(), leaves["offset"],
                                  create_graph=True)
    with pytest.raises(NotImplementedError, match="offsets cannot be differentiated again"):
        torch.autograd.grad(goff.sum(), leaves["input"])


def test_deform_conv2d_bias_gradient_from_the_weight_kernel():
    """grad_bias comes out of the weight-gradient kernel's grad_y tiles, or out of a plain sum when the
    weight needs none: both grad_output summed over images and pixels."""
    values = _deform_inputs(19)
    go = randn((2, 6, 5, 5), generator(20))
    for frozen_weight in (False, True):
        leaves = {name: _leaf(t) for name, t in values.items()}
        leaves["weight"].requires_grad_(not frozen_weight)
        _deform(stn_triton.deform_conv2d, leaves).backward(go)
        torch.testing.assert_close(leaves["bias"].grad, go.sum(dim=(0, 2, 3)))


def test_a_call_after_a_transform_reuses_no_wrapped_table():
    """The ops keep host-made tables on the device in caches (attention levels, DCNv3's taps, the
    warps' zero fill). One made under torch.func.grad would be that transform's wrapper, and the
    next plain call with the same arguments would get it: each runs under grad, then plainly."""
    gen = generator(90)
    shapes = [(2, 3)]
    value, loc, weights = randn((1, 6, 1, 2), gen), rand((1, 3, 1, 1, 2, 2), gen, 0.0, 1.0), randn((1, 3, 1, 1, 2), gen)
    src, M = randn((1, 2, 5, 6), gen), torch.tensor([[[1.0, 0.1, 0.5], [0.05, 0.9, -0.3]]], dtype=torch.float64,
                                                    device=DEVICE)
    x, offset, mask = randn((1, 3, 4, 2), gen), rand((1, 3, 4, 18), gen), rand((1, 3, 4, 9), gen)
    calls = [
        (lambda v: stn_triton.ms_deform_attn(v, shapes, None, loc, weights), value),
        (lambda s: stn_triton.warp_affine(s, M, (4, 4), padding_mode="fill"), src),
        (lambda i: stn_triton.dcnv3(i, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 1, 2, 1.0), x),
    ]
    for fn, input in calls:
        transformed = grad(lambda t: fn(t).square().sum())(input)
        leaf = _leaf(input)
        (plain,) = torch.autograd.grad(fn(leaf).square().sum(), leaf)
        assert_close_scaled(transformed, plain, 1e-12, "gradient")
