"""Inside ``torch.autocast`` every op behaves as the op it replaces: the output dtype PyTorch (or
torchvision) gives there, values within the low-precision rule against a float64 reference, and
gradients that reach each leaf in the leaf's own dtype.

PyTorch's rules (ATen autocast_mode.cpp): ``grid_sampler`` is "promote" on CUDA and float32 on
the CPU; ``F.affine_grid`` builds its grid with a batched matmul, so in the autocast dtype;
torchvision's ``deform_conv2d`` computes in float32 and returns the input's dtype.
"""

import pytest
import torch
import torch.nn.functional as F

import stn_triton
from conftest import DEVICE, assert_close_scaled, assert_within_low_precision_rule, generator, rand, randn
from stn_triton import fallback, functional

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _run(fn, inputs, grad_output_seed=11):
    """Output and the gradients of every input, with a random grad_output in the output's dtype."""
    leaves = [_leaf(t) for t in inputs]
    out = fn(*leaves)
    grad = randn(out.shape, generator(grad_output_seed), out.dtype)
    out.backward(grad)
    return out.detach(), [leaf.grad for leaf in leaves], grad


@pytest.mark.parametrize(
    "device_type, input_dtype, grid_dtype, expected",
    [
        ("cuda", torch.bfloat16, torch.float32, torch.float32),
        ("cuda", torch.float16, torch.float16, torch.float16),
        ("cuda", torch.float16, torch.bfloat16, torch.float32),
        ("cuda", torch.float64, torch.float32, torch.float64),
        ("cpu", torch.bfloat16, torch.bfloat16, torch.float32),
        ("cpu", torch.float16, torch.float32, torch.float32),
        ("cpu", torch.float64, torch.float64, torch.float64),
    ],
)
def test_sampled_dtype_is_atens_autocast_rule(device_type, input_dtype, grid_dtype, expected):
    assert functional.sampled_dtype(device_type, input_dtype, grid_dtype) == expected


def test_the_cpu_rule_matches_pytorch_itself():
    """The CPU half of the rule, checked against PyTorch's own CPU autocast."""
    x = torch.randn(1, 2, 4, 5, dtype=torch.bfloat16)
    for grid_dtype in (torch.bfloat16, torch.float32):
        grid = torch.rand(1, 3, 3, 2, dtype=grid_dtype) * 2 - 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = F.grid_sample(x, grid, align_corners=False).dtype
        assert functional.sampled_dtype("cpu", x.dtype, grid_dtype) == got


def _assert_in_its_dtype(ours, theirs, reference, what="output"):
    """A float16 / bfloat16 result within the low-precision rule; a float32 one (what autocast gives
    on the CPU) within float32 rounding of the float64 reference, not at a low dtype's tolerance."""
    if ours.dtype in (torch.float16, torch.bfloat16):
        assert_within_low_precision_rule(ours, theirs.to(ours.dtype), reference, ours.dtype, what)
    else:
        assert_close_scaled(ours.double(), reference.detach().double(), 1e-5, what)


def _autocast(device, dtype):
    return torch.autocast(torch.device(device).type, dtype=dtype)


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("input_dtype, grid_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                                     (torch.float16, torch.float16)])
def test_grid_sample_with_mixed_dtypes_follows_pytorch(autocast_dtype, input_dtype, grid_dtype):
    gen = generator(1)
    x = randn((2, 5, 6, 7), gen, input_dtype)
    grid = rand((2, 4, 9, 2), gen, -1.1, 1.1, grid_dtype)
    with _autocast(DEVICE, autocast_dtype):
        ours, (grad_x, grad_grid), grad = _run(stn_triton.grid_sample, (x, grid))
        theirs, (their_grad_x, their_grad_grid), _ = _run(
            lambda a, b: F.grid_sample(a, b, align_corners=False), (x, grid))
    assert ours.dtype == theirs.dtype
    assert ours.is_contiguous() and grad_x.dtype == input_dtype and grad_grid.dtype == grid_dtype
    # The float64 reference samples the very values autocast handed the kernel, without rounding.
    leaves = (_leaf(x.double()), _leaf(grid.double()))
    reference = F.grid_sample(*leaves, align_corners=False)
    ref_grad_x, ref_grad_grid = torch.autograd.grad(reference, leaves, grad.double())
    _assert_in_its_dtype(ours, theirs, reference)
    _assert_in_its_dtype(grad_x, their_grad_x, ref_grad_x, "grad input")
    _assert_in_its_dtype(grad_grid, their_grad_grid, ref_grad_grid, "grad grid")


def test_mixed_dtypes_outside_autocast_still_fail_naming_grid():
    x = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16, device=DEVICE)
    grid = torch.zeros(1, 3, 4, 2, device=DEVICE)
    with pytest.raises(TypeError, match="grid must have input's dtype"):
        stn_triton.grid_sample(x, grid)
    with pytest.raises(TypeError, match="theta must have input's dtype"):
        stn_triton.affine_grid_sample(x, torch.zeros(1, 2, 3, device=DEVICE))


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
def test_affine_grid_has_the_autocast_dtype_and_float32_values(autocast_dtype):
    theta = torch.eye(2, 3, dtype=torch.float64) + rand((3, 2, 3), generator(2), -0.2, 0.2)
    theta32 = theta.to(device=DEVICE, dtype=torch.float32)
    with _autocast(DEVICE, autocast_dtype):
        ours, (grad_theta,), grad = _run(lambda t: stn_triton.affine_grid(t, (3, 1, 7, 9)), (theta32,))
        theirs = F.affine_grid(theta32, [3, 1, 7, 9], align_corners=False)
    assert ours.dtype == theirs.dtype == autocast_dtype
    reference = F.affine_grid(theta32.double(), [3, 1, 7, 9], align_corners=False)
    assert_within_low_precision_rule(ours, theirs, reference, autocast_dtype)
    assert grad_theta.dtype == torch.float32
    leaf = _leaf(theta32.double())
    (expected,) = torch.autograd.grad(F.affine_grid(leaf, [3, 1, 7, 9], align_corners=False), (leaf,), grad.double())
    torch.testing.assert_close(grad_theta.double(), expected, atol=1e-4, rtol=1e-4)


def _affine(x, p):
    return stn_triton.affine_grid_sample(x, p)


def _affine_composition(x, p):
    return F.grid_sample(x, F.affine_grid(p, list(x.shape), align_corners=False), align_corners=False)


def _perspective(x, p):
    return stn_triton.perspective_grid_sample(x, p)


def _perspective_composition(x, p):
    base = F.affine_grid(torch.eye(2, 3, dtype=p.dtype, device=p.device).expand(x.shape[0], 2, 3), list(x.shape),
                         align_corners=False)
    points = torch.cat([base, torch.ones_like(base[..., :1])], dim=-1)
    mapped = torch.einsum("nij,nhwj->nhwi", p, points)
    return F.grid_sample(x, mapped[..., :2] / mapped[..., 2:], align_corners=False)


WARPS = [
    pytest.param(_affine, _affine_composition, lambda n, g: torch.eye(2, 3) + rand((n, 2, 3), g, -0.2, 0.2, device="cpu"),
                 id="affine"),
    pytest.param(_perspective, _perspective_composition,
                 lambda n, g: torch.eye(3) + rand((n, 3, 3), g, -0.05, 0.05, device="cpu"), id="perspective"),
]


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ours_fn, composition, make_param", WARPS)
def test_fused_warps_take_the_compositions_dtype(ours_fn, composition, make_param, input_dtype, autocast_dtype):
    gen = generator(3)
    x = randn((2, 3, 6, 8), gen, input_dtype)
    param = make_param(2, gen).to(device=DEVICE, dtype=torch.float32)
    with _autocast(DEVICE, autocast_dtype):
        ours, (grad_x, grad_param), grad = _run(ours_fn, (x, param))
        theirs = composition(x, param)
    assert ours.dtype == theirs.dtype
    assert grad_x.dtype == input_dtype and grad_param.dtype == torch.float32
    # Reference: the composition in float64 on the same inputs (ours computes the points in float32,
    # PyTorch's autocast composition in the autocast dtype, so ours is held to the rule with room).
    reference = composition(x.double(), param.double())
    if ours.dtype in (torch.float16, torch.bfloat16):
        assert_within_low_precision_rule(ours, theirs.to(ours.dtype), reference.detach(), ours.dtype)
    else:
        assert_close_scaled(ours.double(), reference.detach(), 1e-5, "output")
    leaves = (_leaf(x.double()), _leaf(param.double()))
    expected = torch.autograd.grad(composition(*leaves), leaves, grad.double())
    for name, got, want in (("grad input", grad_x, expected[0]), ("grad parameters", grad_param, expected[1])):
        float32_throughout = ours.dtype == got.dtype == torch.float32
        assert_close_scaled(got.double(), want, 1e-4 if float32_throughout else 0.05, name)


def test_tps_and_pixel_warps_accept_float32_parameters_under_autocast():
    gen = generator(4)
    x = randn((2, 3, 6, 8), gen, torch.bfloat16)
    source = (stn_triton.geometry.regular_control_points(9, torch.float64, "cpu")
              + rand((2, 9, 2), gen, -0.05, 0.05, device="cpu")).to(device=DEVICE, dtype=torch.float32)
    M = torch.tensor([[1.0, 0.05, 0.3], [0.02, 0.95, -0.2]], device=DEVICE).repeat(2, 1, 1)
    with _autocast(DEVICE, torch.bfloat16):
        tps = stn_triton.tps_grid_sample(x, source)
        warped = stn_triton.warp_affine(x, M, (6, 8))
        plain = stn_triton.affine_grid_sample(x, torch.eye(2, 3, device=DEVICE).repeat(2, 1, 1))
    expected = functional.sampled_dtype(torch.device(DEVICE).type, torch.bfloat16, torch.bfloat16)
    assert tps.dtype == warped.dtype == plain.dtype == expected
    reference = stn_triton.tps_grid_sample(x.double(), source.double())
    assert_within_low_precision_rule(tps.to(torch.bfloat16), reference.to(torch.bfloat16), reference, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
def test_cuda_autocast_promotes_like_pytorch(autocast_dtype):
    gen = generator(5)
    x = randn((2, 8, 32, 33), gen, autocast_dtype, "cuda")
    grid = rand((2, 17, 19, 2), gen, -1.1, 1.1, torch.float32, "cuda")
    with torch.autocast("cuda", dtype=autocast_dtype):
        ours = stn_triton.grid_sample(x, grid)
        theirs = F.grid_sample(x, grid, align_corners=False)
        fused = stn_triton.affine_grid_sample(x.float(), torch.eye(2, 3, device="cuda").repeat(2, 1, 1))
        composed = _affine_composition(x.float(), torch.eye(2, 3, device="cuda").repeat(2, 1, 1))
    assert ours.dtype == theirs.dtype == torch.float32
    assert fused.dtype == composed.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_deform_conv2d_computes_in_float32_and_returns_the_inputs_dtype(autocast_dtype, input_dtype):
    """torchvision's autocast kernel casts every tensor to float32 and the result to input's dtype."""
    gen = generator(6)
    x = randn((2, 4, 6, 7), gen, input_dtype)
    offset = randn((2, 18, 6, 7), gen, autocast_dtype)
    weight = randn((5, 4, 3, 3), gen, torch.float32)
    mask = rand((2, 9, 6, 7), gen, 0.0, 1.0, torch.float32)
    bias = randn((5,), gen, torch.float32)

    def conv(a, o, w, m, b):
        return stn_triton.deform_conv2d(a, o, w, b, padding=1, mask=m)

    with _autocast(DEVICE, autocast_dtype):
        ours, grads, grad = _run(conv, (x, offset, weight, mask, bias))
    assert ours.dtype == input_dtype
    assert [g.dtype for g in grads] == [input_dtype, autocast_dtype, torch.float32, torch.float32, torch.float32]
    leaves = [_leaf(t.double()) for t in (x, offset, weight, mask, bias)]
    a, o, w, m, b = leaves
    reference = fallback.deform_conv2d(a, o, w, b, (1, 1), (1, 1), (1, 1), m)
    expected = torch.autograd.grad(reference, leaves, grad.double())
    if input_dtype == torch.float32:
        torch.testing.assert_close(ours.double(), reference.detach(), atol=1e-4, rtol=1e-4)
    else:
        # float32 arithmetic, one rounding to bfloat16 at the end: within an ulp of bfloat16.
        torch.testing.assert_close(ours.double(), reference.detach(), atol=2e-2, rtol=8e-3)
    for name, got, want in zip(("input", "offset", "weight", "mask", "bias"), grads, expected):
        scale = max(1.0, want.abs().max().item())
        tolerance = 1e-4 if got.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.double(), want, atol=tolerance * scale, rtol=tolerance,
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def _blur_composition(x, window, padding_mode):
    """kornia's max_blur_pool2d / blur_pool2d as composed ops: F.max_pool2d at stride 1 (window > 1),
    the padded copy, the depthwise binomial F.conv2d at stride 2, where autocast casts."""
    if window > 1:
        x = F.max_pool2d(x, window, stride=1)
    x = F.pad(x, (1, 1, 1, 1), mode="constant" if padding_mode == "zeros" else padding_mode)
    taps = fallback.binomial_kernel(3, x.dtype, x.device)
    return F.conv2d(x, (taps[:, None] * taps[None, :]).expand(x.shape[1], 1, 3, 3), stride=2, groups=x.shape[1])


BLURS = [
    pytest.param(lambda x: stn_triton.blur_pool2d(x, 3, 2, "reflect"), 1, "reflect", id="blur_pool2d"),
    pytest.param(lambda x: stn_triton.max_blur_pool2d(x, 3, 2, 2), 2, "zeros", id="max_blur_pool2d"),
]


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("ours_fn, window, padding_mode", BLURS)
def test_blur_pools_take_the_compositions_dtype(ours_fn, window, padding_mode, input_dtype, autocast_dtype):
    """The composition's conv2d returns the autocast dtype (float64 stays); ours computes in float32
    from the input as it is and rounds once, and the gradient reaches the input in its dtype."""
    gen = generator(7)
    x = randn((2, 3, 7, 9), gen, input_dtype)
    composition = lambda a: _blur_composition(a, window, padding_mode)  # noqa: E731
    with _autocast(DEVICE, autocast_dtype):
        ours, (grad_x,), grad = _run(ours_fn, (x,))
        theirs, (their_grad_x,), _ = _run(composition, (x,))
    assert ours.dtype == theirs.dtype == (torch.float64 if input_dtype == torch.float64 else autocast_dtype)
    assert grad_x.dtype == their_grad_x.dtype == input_dtype
    assert ours.is_contiguous() and grad_x.is_contiguous()
    leaf = _leaf(x.double())
    reference = composition(leaf)
    (ref_grad_x,) = torch.autograd.grad(reference, (leaf,), grad.double())
    if input_dtype == torch.float64:
        assert_close_scaled(ours, reference.detach(), 1e-12, "output")
        assert_close_scaled(grad_x, ref_grad_x, 1e-12, "grad input")
    else:
        _assert_in_its_dtype(ours, theirs, reference)
        _assert_in_its_dtype(grad_x, their_grad_x, ref_grad_x, "grad input")


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_dcn_returns_the_inputs_dtype(packed, autocast_dtype):
    """InternImage's and DCNv4's CUDA ops return the input's dtype inside autocast and read the
    offsets and mask (float32 after the module's softmax) as they are; so does stn_triton."""
    gen = generator(12)
    x = randn((1, 4, 5, 4), gen, autocast_dtype)
    if packed:
        inputs = (x, rand((1, 4, 5, 56), gen, -2.0, 2.0, torch.float32))
        fn = lambda a, om: stn_triton.dcnv4(a, om, 3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0)  # noqa: E731
    else:
        inputs = (x, rand((1, 4, 5, 36), gen, -2.0, 2.0, torch.float32), rand((1, 4, 5, 18), gen, 0.0, 1.0,
                                                                              torch.float32))
        fn = lambda a, o, m: stn_triton.dcnv3(a, o, m, 3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0)  # noqa: E731
    with _autocast(DEVICE, autocast_dtype):
        ours, grads, grad = _run(fn, inputs)
    assert ours.dtype == autocast_dtype
    assert [g.dtype for g in grads] == [t.dtype for t in inputs]
    leaves = [_leaf(t.double()) for t in inputs]
    reference = fn(*leaves)
    tolerance = 2e-3 if autocast_dtype == torch.float16 else 1.6e-2
    assert_close_scaled(ours.double(), reference.detach(), tolerance, "output")
    for got, want in zip(grads, torch.autograd.grad(reference, leaves, grad.double())):
        assert_close_scaled(got.double(), want, 4 * tolerance, "gradient")
