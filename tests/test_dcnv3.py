"""stn_triton.dcnv3 / dcnv4 and the DCNv3 / DCNv4 modules: every dtype, odd sizes, strided inputs,
gradients (gradcheck, double backward, vmap), the fallback, the argument checks, and the modules
against InternImage's and FlashInternImage's definitions (parameter names, shapes, initialisation,
forward). The float64 reference is test_dcnv3_op's, written from InternImage's definition."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from test_dcnv3_op import GEOMETRIES, reference

import stn_triton
from conftest import DEVICE, assert_close_scaled, deterministic_algorithms, generator, rand, randn
from stn_triton import fallback
from stn_triton.ops.dcnv3 import DcnSpec

# (kernel h, w, stride h, w, pad h, w, dilation h, w, remove_center, offset_scale, group, group channels, H, W)
ODD = [
    pytest.param((3, 3, 1, 1, 1, 1, 1, 1, False, 1.0, 3, 1, 1, 7), id="C3-1x7"),
    pytest.param((3, 3, 1, 1, 1, 1, 1, 1, True, 1.0, 1, 33, 3, 2), id="D33-remove-center"),
    pytest.param((3, 1, 2, 1, 1, 0, 1, 1, False, 0.5, 2, 3, 33, 1), id="3x1-33x1-stride2"),
]
KINDS = [pytest.param((False, False), id="dcnv3"), pytest.param((True, False), id="dcnv4"),
         pytest.param((True, True), id="dcnv4-softmax")]
# Max error a side of a low-precision result against float64 on the same rounded inputs, per unit of
# the reference's magnitude: the output's rounding (float32 accumulation inside).
LOW_PRECISION_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make(geometry, packed: bool, softmax: bool, seed: int, n: int = 2, dtype=torch.float64):
    """(spec, input, offset or offset_mask, mask or None) with offsets of a few pixels."""
    kh, kw, sh, sw, ph, pw, dh, dw, remove_center, scale, g, d, h, w = geometry
    spec = DcnSpec(kh, kw, sh, sw, ph, pw, dh, dw, g, scale, remove_center, packed, softmax, dtype)
    ho, wo = spec.output_size(h, w)
    gen = generator(seed)
    x = randn((n, h, w, g * d), gen, dtype)
    if packed:
        return spec, x, rand((n, ho, wo, -(-g * 3 * spec.points // 8) * 8), gen, -2.0, 2.0, dtype), None
    return (spec, x, rand((n, ho, wo, g * spec.points * 2), gen, -2.0, 2.0, dtype),
            rand((n, ho, wo, g * spec.points), gen, 0.0, 1.0, dtype))


def geometry_args(spec: DcnSpec, channels: int) -> tuple:
    return (spec.kernel_h, spec.kernel_w, spec.stride_h, spec.stride_w, spec.pad_h, spec.pad_w, spec.dilation_h,
            spec.dilation_w, spec.group, channels // spec.group, spec.offset_scale, spec.remove_center)


def public(spec: DcnSpec):
    """The public function of ``spec``'s kind, on (input, offset[, mask])."""
    if spec.packed:
        return lambda x, om: stn_triton.dcnv4(x, om, *geometry_args(spec, x.shape[-1]), spec.softmax)
    return lambda x, off, m: stn_triton.dcnv3(x, off, m, *geometry_args(spec, x.shape[-1]))


def tensors(x, offset, mask):
    return [t for t in (x, offset, mask) if t is not None]


def forward_and_grads(fn, inputs, direction):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, direction))


def reference_of(spec):
    return lambda x, off, m=None: reference(x, off, m, spec).to(DEVICE)


# Every dtype with each kind at least twice in all: the interpreter runs a call in seconds.
DTYPE_CASES = [pytest.param(dtype, kind.values[0], id=f"{str(dtype)[6:]}-{kind.id}") for dtype, kind in (
    (torch.float64, KINDS[0]), (torch.float64, KINDS[2]), (torch.float32, KINDS[0]), (torch.float32, KINDS[1]),
    (torch.float16, KINDS[1]), (torch.bfloat16, KINDS[0]), (torch.bfloat16, KINDS[2]))]


@pytest.mark.parametrize("dtype, kind", DTYPE_CASES)
def test_every_dtype_equals_the_float64_reference(dtype, kind):
    spec, x, offset, mask = make(GEOMETRIES[1].values[0], *kind, seed=11, dtype=dtype)
    inputs = tensors(x, offset, mask)
    direction = randn((2, 3, 3, x.shape[-1]), generator(12), dtype)
    ours = forward_and_grads(public(spec), inputs, direction)
    exact = forward_and_grads(reference_of(spec), [t.double() for t in inputs], direction.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype) or LOW_PRECISION_TOLERANCE[dtype]
    for what, a, b in zip(("output", "grad input", "grad offset", "grad mask"), ours, exact):
        assert a.dtype == dtype, what
        # A gradient of the offsets is a difference of neighbouring reads times the direction: a few roundings more.
        assert_close_scaled(a.double(), b, tol if what == "output" or dtype in (torch.float64, torch.float32)
                            else 4 * tol, what)


@pytest.mark.parametrize("geometry, kind", [pytest.param(g.values[0], k.values[0], id=f"{g.id}-{k.id}")
                                             for g, k in zip(ODD, KINDS)])
def test_odd_sizes(geometry, kind):
    spec, x, offset, mask = make(geometry, *kind, seed=13, n=1)
    ho, wo = spec.output_size(x.shape[1], x.shape[2])
    direction = randn((1, ho, wo, x.shape[-1]), generator(14))
    ours = forward_and_grads(public(spec), tensors(x, offset, mask), direction)
    exact = forward_and_grads(reference_of(spec), tensors(x, offset, mask), direction)
    for what, a, b in zip(("output", "grad input", "grad offset", "grad mask"), ours, exact):
        assert_close_scaled(a, b, 1e-11, what)


def test_any_strides_and_an_expanded_grad_output():
    """An NCHW-strided input (the permuted view of a channels-first tensor), offsets and mask that are
    channel slices of wider tensors, and the stride-0 gradient of .sum()."""
    spec, x, offset, mask = make(GEOMETRIES[0].values[0], False, False, seed=15)
    strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    wide_offset = torch.cat([offset, offset], dim=-1)[..., 1:offset.shape[-1] + 1]
    wide_mask = torch.cat([mask, mask], dim=-1)[..., 2:mask.shape[-1] + 2]
    odd = [t.detach().requires_grad_() for t in (strided, wide_offset, wide_mask)]
    plain = [t.detach().contiguous().requires_grad_() for t in (strided, wide_offset, wide_mask)]
    assert not any(t.is_contiguous() for t in odd)
    out = public(spec)(*odd)
    expected = reference(*plain, spec).to(DEVICE)
    assert_close_scaled(out, expected, 1e-12, "output")
    for what, a, b in zip(("input", "offset", "mask"), torch.autograd.grad(out.sum(), odd),
                          torch.autograd.grad(expected.sum(), plain)):
        assert_close_scaled(a, b, 1e-11, f"grad {what}")


def test_mixed_dtypes_are_read_as_they_are():
    """A bfloat16 input with float32 offsets and mask (what autocast and InternImage's softmax give):
    the input's dtype out, float32 arithmetic."""
    spec, x, offset, mask = make(GEOMETRIES[0].values[0], False, False, seed=16)
    out = public(spec)(x.bfloat16(), offset.float(), mask.float())
    assert out.dtype == torch.bfloat16
    expected = reference(x.bfloat16().double(), offset.float().double(), mask.float().double(), spec).to(DEVICE)
    assert_close_scaled(out.double(), expected, LOW_PRECISION_TOLERANCE[torch.bfloat16], "output")


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    """Fast mode (one random direction per input; the full Jacobian takes the interpreter minutes);
    the full one on a GPU."""
    spec, x, offset, mask = make((3, 3, 2, 2, 1, 1, 1, 1, True, 0.8, 2, 1, 2, 3), *kind, seed=17, n=1)
    leaves = [t.detach().clone().requires_grad_() for t in tensors(x, offset, mask)]
    assert torch.autograd.gradcheck(public(spec), leaves, fast_mode=not torch.cuda.is_available())


def test_double_backward_through_the_input_gradient():
    """A penalty on the input's gradient, differentiated by the offsets, the mask and grad_output."""
    spec, x, offset, mask = make(GEOMETRIES[0].values[0], False, False, seed=18, n=1)
    go = randn((1, 5, 7, x.shape[-1]), generator(19))
    v = randn(x.shape, generator(20))
    results = []
    for fn in (public(spec), reference_of(spec)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, offset, mask, go)]
        (g_input,) = torch.autograd.grad((fn(*leaves[:3]) * leaves[3]).sum(), leaves[0], create_graph=True)
        results.append(torch.autograd.grad((g_input * v).sum(), leaves[1:]))
    for what, a, b in zip(("offset", "mask", "grad_output"), *results):
        assert_close_scaled(a, b, 1e-11, what)


@pytest.mark.parametrize("kind", KINDS[1:2])
def test_per_sample_gradients_under_vmap(kind):
    spec, x, offset, mask = make(GEOMETRIES[0].values[0], *kind, seed=21, n=2)
    inputs = tensors(x, offset, mask)

    def loss(fn):
        return lambda *ts: fn(*(t[None] for t in ts)).pow(2).sum()

    argnums = tuple(range(len(inputs)))
    ours = torch.func.vmap(torch.func.grad(loss(public(spec)), argnums=argnums))(*inputs)
    reference_loss = loss(reference_of(spec))
    for b in range(2):
        leaves = [t[b].detach().clone().requires_grad_() for t in inputs]
        for a, e in zip(ours, torch.autograd.grad(reference_loss(*leaves), leaves)):
            assert_close_scaled(a[b], e, 1e-11, "per-sample grad")


@pytest.mark.parametrize("kind", KINDS[:2])
def test_deterministic_backward_repeats_bitwise(kind):
    spec, x, offset, mask = make(GEOMETRIES[1].values[0], *kind, seed=22, dtype=torch.float32)
    inputs = tensors(x, offset, mask)
    direction = randn((2, 3, 3, x.shape[-1]), generator(23), torch.float32)
    with deterministic_algorithms():
        runs = [forward_and_grads(public(spec), inputs, direction) for _ in range(2)]
    exact = forward_and_grads(reference_of(spec), [t.double() for t in inputs], direction.double())
    for a, b, e in zip(*runs, exact):
        assert torch.equal(a, b)
        assert_close_scaled(a.double(), e, 1e-5, "deterministic")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0 in numpy
@pytest.mark.parametrize("kind", KINDS[1:2])  # dcnv3's in test_dcnv3_op
def test_non_finite_offsets_read_nothing(kind):
    spec, x, offset, mask = make(GEOMETRIES[0].values[0], *kind, seed=24)
    offset[0, 1, 2, :2] = float("nan")
    offset[1, 0, 0, 2:4] = float("inf")
    offset[1, 2, 3, 4:6] = -1e30
    args = tensors(x, offset, mask)
    out = public(spec)(*[t.requires_grad_() for t in args])
    grads = torch.autograd.grad(out.sum(), args)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    clean = offset.detach().nan_to_num(nan=1e30)
    assert_close_scaled(out, reference(x.detach(), clean, mask if mask is None else mask.detach(), spec).to(DEVICE),
                        1e-12, "output")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("geometry", GEOMETRIES + ODD)
def test_the_fallback_equals_the_reference(geometry, kind):
    """The plain-PyTorch path (CPU without the interpreter; the perf suite's composition)."""
    spec, x, offset, mask = make(geometry, *kind, seed=25)
    inputs = [t.cpu() for t in tensors(x, offset, mask)]
    inputs[1][0, 0, 0, :2] = float("nan")  # never read: sent far outside, as the kernel sends it
    ho, wo = spec.output_size(x.shape[1], x.shape[2])
    direction = randn((2, ho, wo, x.shape[-1]), generator(26), device="cpu")
    packed = (lambda a, b: fallback.dcn_aggregate(a, b, None, spec)) if spec.packed else \
        (lambda a, b, c: fallback.dcn_aggregate(a, b, c, spec))
    ours = forward_and_grads(packed, inputs, direction)
    clean = [inputs[0], inputs[1].nan_to_num(nan=1e30), *inputs[2:]]
    exact = forward_and_grads(lambda *ts: reference(*ts, None, spec) if spec.packed else reference(*ts, spec),
                              clean, direction)
    for what, a, b in zip(("output", "grad input", "grad offset", "grad mask"), ours, exact):
        assert_close_scaled(a, b, 1e-12, what)


def _bad(packed=False, **changes):
    spec, x, offset, mask = make(GEOMETRIES[0].values[0], packed, False, seed=27)
    arguments = dict(input=x, offset=offset, mask=mask, kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1,
                     pad_w=1, dilation_h=1, dilation_w=1, group=2, group_channels=4, offset_scale=1.0,
                     remove_center=False)
    if packed:
        arguments["offset_mask"] = arguments.pop("offset")
        del arguments["mask"]
    return {**arguments, **changes}


BAD = [
    pytest.param(_bad(input=torch.zeros(2, 5, 7)), "input", id="input-3d"),
    pytest.param(_bad(input=torch.zeros(2, 5, 7, 8, dtype=torch.int64)), "input", id="integer-input"),
    pytest.param(_bad(group_channels=3), "group * group_channels", id="channels-not-group-times-width"),
    pytest.param(_bad(group=0), "group", id="group-0"),
    pytest.param(_bad(stride_h=0), "stride_h", id="stride-0"),
    pytest.param(_bad(pad_w=-1), "pad_w", id="negative-padding"),
    pytest.param(_bad(dilation_w=1.0), "dilation_w", id="float-dilation"),
    pytest.param(_bad(offset_scale=float("nan")), "offset_scale", id="nan-offset-scale"),
    pytest.param(_bad(remove_center=2), "remove_center", id="remove-center-2"),
    pytest.param(_bad(kernel_h=2, pad_h=0, remove_center=True), "odd kernel", id="remove-center-even-kernel"),
    pytest.param(_bad(kernel_h=9, pad_h=0), "too small", id="no-output"),
    pytest.param(_bad(offset=torch.zeros(2, 5, 7, 35, dtype=torch.float64)), "offset", id="offset-width"),
    pytest.param(_bad(offset=torch.zeros(2, 4, 7, 36, dtype=torch.float64)), "offset", id="offset-height"),
    pytest.param(_bad(mask=torch.zeros(2, 5, 7, 9, dtype=torch.float64)), "mask", id="mask-width"),
    pytest.param(_bad(mask=None), "mask", id="mask-none"),
    pytest.param(_bad(True, offset_mask=torch.zeros(2, 5, 7, 53, dtype=torch.float64)), "offset_mask",
                 id="offset-mask-too-narrow"),
    pytest.param(_bad(True, softmax=1), "softmax", id="softmax-int"),
]


@pytest.mark.parametrize("arguments, named", BAD)
def test_malformed_arguments_fail_before_any_launch_naming_the_argument(arguments, named, monkeypatch):
    from stn_triton import functional

    monkeypatch.setattr(functional._dcn_op, "dcn_aggregate", lambda *args: pytest.fail("launched"))
    monkeypatch.setattr(functional.fallback, "dcn_aggregate", lambda *args: pytest.fail("launched"))
    arguments = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in arguments.items()}
    fn = stn_triton.dcnv4 if "offset_mask" in arguments else stn_triton.dcnv3
    with pytest.raises((ValueError, TypeError), match=re.escape(named)):
        fn(**arguments)


def test_offset_mask_padding_is_never_read_and_gets_a_zero_gradient():
    spec, x, offset_mask, _ = make(GEOMETRIES[0].values[0], True, False, seed=28)
    used = spec.group * 3 * spec.points
    assert offset_mask.shape[-1] > used
    noisy = offset_mask.clone()
    noisy[..., used:] = float("nan")
    leaf = noisy.requires_grad_()
    out = public(spec)(x, leaf)
    torch.testing.assert_close(out, public(spec)(x, offset_mask), atol=0, rtol=0)
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    assert not grad[..., used:].any() and grad[..., :used].any()


# --- the modules ------------------------------------------------------------------------------------


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` in float64 on the device, its parameters moved away from the initialisation so that
    offsets, masks and the centre scale matter."""
    torch.manual_seed(seed)
    module = module.double().to(DEVICE)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return module


def internimage_dcnv3(module, input):
    """InternImage's DCNv3.forward, from its definition, on the float64 reference aggregation."""
    n, h, w, _ = input.shape
    g, k = module.group, module.kernel_size ** 2 - module.remove_center
    x = F.linear(input, module.input_proj.weight, module.input_proj.bias)
    x1 = module.dw_conv(input.permute(0, 3, 1, 2))
    offset = F.linear(x1, module.offset.weight, module.offset.bias)
    mask = F.linear(x1, module.mask.weight, module.mask.bias).reshape(n, h, w, g, k).softmax(-1).reshape(n, h, w, -1)
    s, p, d = module.stride, module.pad, module.dilation
    spec = DcnSpec(module.kernel_size, module.kernel_size, s, s, p, p, d, d, g, module.offset_scale,
                   bool(module.remove_center), False, False, torch.float64)
    out = reference(x, offset, mask, spec).to(DEVICE)
    if module.center_feature_scale:
        scale = torch.sigmoid(F.linear(x1, module.center_feature_scale_proj_weight,
                                       module.center_feature_scale_proj_bias))
        scale = scale[..., None].repeat(1, 1, 1, 1, module.channels // g).flatten(-2)
        out = out * (1 - scale) + x * scale
    return F.linear(out, module.output_proj.weight, module.output_proj.bias)


def internimage_dcnv4(module, input, shape):
    """FlashInternImage's DCNv4.forward, from its definition, on the float64 reference aggregation."""
    n, length, c = input.shape
    h, w = shape if shape is not None else (int(math.isqrt(length)),) * 2
    x = input if module.without_pointwise else F.linear(input, module.value_proj.weight, module.value_proj.bias)
    x = x.reshape(n, h, w, c)
    om_input = input
    if module.dw_kernel_size is not None:
        om_input = module.offset_mask_dw(input.view(n, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    offset_mask = F.linear(om_input, module.offset_mask.weight, module.offset_mask.bias).reshape(n, h, w, -1)
    s, p, d = module.stride, module.pad, module.dilation
    spec = DcnSpec(module.kernel_size, module.kernel_size, s, s, p, p, d, d, module.group, module.offset_scale,
                   bool(module.remove_center), True, False, torch.float64)
    out = reference(x, offset_mask, None, spec).to(DEVICE)
    if module.center_feature_scale:
        scale = torch.sigmoid(F.linear(out, module.center_feature_scale_proj_weight,
                                       module.center_feature_scale_proj_bias))
        scale = scale[..., None].repeat(1, 1, 1, 1, c // module.group).flatten(-2)
        out = out * (1 - scale) + x * scale
    out = out.reshape(n, length, c)
    return out if module.without_pointwise else F.linear(out, module.output_proj.weight, module.output_proj.bias)


def _xavier_bound(weight: torch.Tensor) -> float:
    return math.sqrt(6.0 / (weight.shape[0] + weight.shape[1]))


def test_dcnv3_parameters_and_initialisation_are_internimages():
    torch.manual_seed(0)
    module = stn_triton.DCNv3(channels=32, group=2, center_feature_scale=True, remove_center=True)
    c, k = 32, 2 * 8
    expected = {"center_feature_scale_proj_weight": (2, c), "center_feature_scale_proj_bias": (2,),
                "dw_conv.0.weight": (c, 1, 3, 3), "dw_conv.0.bias": (c,), "dw_conv.1.1.weight": (c,),
                "dw_conv.1.1.bias": (c,), "offset.weight": (2 * k, c), "offset.bias": (2 * k,), "mask.weight": (k, c),
                "mask.bias": (k,), "input_proj.weight": (c, c), "input_proj.bias": (c,), "output_proj.weight": (c, c),
                "output_proj.bias": (c,)}
    assert {name: tuple(t.shape) for name, t in module.state_dict().items()} == expected
    for name in ("offset.weight", "offset.bias", "mask.weight", "mask.bias", "input_proj.bias", "output_proj.bias",
                 "center_feature_scale_proj_weight", "center_feature_scale_proj_bias"):
        assert not module.state_dict()[name].any(), name
    for layer in (module.input_proj, module.output_proj):
        assert layer.weight.abs().max() <= _xavier_bound(layer.weight) and layer.weight.std() > 0.1
    assert module.dw_conv[1][1].eps == 1e-6 and isinstance(module.dw_conv[2], torch.nn.GELU)
    bn = stn_triton.DCNv3(channels=16, group=2, norm_layer="BN", act_layer="ReLU", dw_kernel_size=5)
    assert isinstance(bn.dw_conv[1][0], torch.nn.BatchNorm2d) and bn.dw_conv[0].weight.shape == (16, 1, 5, 5)
    with pytest.warns(UserWarning, match="power of 2"):
        stn_triton.DCNv3(channels=24, group=2)
    with pytest.raises(ValueError, match="divisible"):
        stn_triton.DCNv3(channels=30, group=4)
    with pytest.raises(ValueError, match="odd kernel"):
        stn_triton.DCNv3(channels=16, kernel_size=2, group=2, remove_center=True)


def test_dcnv4_parameters_and_initialisation_are_flashinternimages():
    torch.manual_seed(0)
    module = stn_triton.DCNv4(channels=32, group=2, dw_kernel_size=3, center_feature_scale=True, output_bias=False)
    c = 32
    expected = {"center_feature_scale_proj_weight": (2, c), "center_feature_scale_proj_bias": (2,),
                "offset_mask_dw.weight": (c, 1, 3, 3), "offset_mask_dw.bias": (c,),
                "offset_mask.weight": (56, c), "offset_mask.bias": (56,),  # ceil(3 * 18 / 8) * 8
                "value_proj.weight": (c, c), "value_proj.bias": (c,), "output_proj.weight": (c, c)}
    assert {name: tuple(t.shape) for name, t in module.state_dict().items()} == expected
    assert module.K == 18
    for name in ("offset_mask.weight", "offset_mask.bias", "value_proj.bias"):
        assert not module.state_dict()[name].any(), name
    assert module.value_proj.weight.abs().max() <= _xavier_bound(module.value_proj.weight)
    bare = stn_triton.DCNv4(channels=8, group=1, without_pointwise=True, remove_center=True)
    assert set(bare.state_dict()) == {"offset_mask.weight", "offset_mask.bias"} and bare.K == 8
    assert bare.offset_mask.weight.shape == (24, 8)


@pytest.mark.parametrize("options", [
    pytest.param(dict(), id="default"),
    pytest.param(dict(center_feature_scale=True, remove_center=True, offset_scale=0.5), id="centre-scale"),
    pytest.param(dict(norm_layer="BN", act_layer="SiLU", dw_kernel_size=5, dilation=2, pad=2), id="bn-dilated"),
])
def test_dcnv3_forward_is_internimages(options):
    module = perturbed(stn_triton.DCNv3(channels=8, group=2, **options), 30)
    if options.get("norm_layer") == "BN":
        module.eval()
    input = randn((2, 5, 6, 8), generator(31))
    torch.testing.assert_close(module(input), internimage_dcnv3(module, input))


@pytest.mark.parametrize("options, shape", [
    pytest.param(dict(), None, id="default-square"),
    pytest.param(dict(dw_kernel_size=3, center_feature_scale=True, output_bias=False), (4, 6), id="dw-centre-scale"),
    pytest.param(dict(without_pointwise=True, remove_center=True, offset_scale=2.0), (3, 5), id="without-pointwise"),
])
def test_dcnv4_forward_is_flashinternimages(options, shape):
    module = perturbed(stn_triton.DCNv4(channels=8, group=2, **options), 32)
    length = 16 if shape is None else shape[0] * shape[1]
    input = randn((2, length, 8), generator(33))
    torch.testing.assert_close(module(input, shape), internimage_dcnv4(module, input, shape))


def test_module_checkpoints_load_and_train():
    """A state_dict under InternImage's / DCNv4's names loads strictly, and one step reaches every parameter."""
    for make_module, input in ((lambda: stn_triton.DCNv3(channels=8, group=2, center_feature_scale=True),
                                randn((1, 4, 4, 8), generator(34))),
                               (lambda: stn_triton.DCNv4(channels=8, group=2, dw_kernel_size=3,
                                                         center_feature_scale=True),
                                randn((1, 16, 8), generator(35)))):
        source = perturbed(make_module(), 36)
        target = make_module().double().to(DEVICE)
        target.load_state_dict(source.state_dict(), strict=True)
        torch.testing.assert_close(target(input), source(input))
        target(input).square().sum().backward()
        for name, parameter in target.named_parameters():
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
            assert parameter.grad.any(), name
