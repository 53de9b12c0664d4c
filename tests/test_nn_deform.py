"""``stn_triton.nn.DeformConv2d`` and ``SelfDeformConv2d``: torchvision's parameters, attributes and
initialisation, the forward as the functional op computes it, checkpoints, the self-offset module
starting as ``F.conv2d``, its gradients and learning, and argument checks.

The op itself is tested against an independent reference in test_deform_conv.py; here the modules
are held to the functional op (same backend) and to ``F.conv2d``. Sizes stay tiny: under the
interpreter every forward and backward runs the kernels in numpy.
"""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stn_triton
from conftest import DEVICE, generator, rand, randn
from stn_triton.nn import DeformConv2d, SelfDeformConv2d


def conv_options(module: DeformConv2d) -> dict:
    """The module's stride, padding and dilation as the functional ops take them."""
    return dict(stride=module.stride, padding=module.padding, dilation=module.dilation)


def output_size(module: DeformConv2d, h: int, w: int) -> tuple[int, int]:
    """The output's spatial size for an input of ``h`` x ``w``, as for a convolution."""
    return tuple(
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip((h, w), module.kernel_size, module.stride, module.padding, module.dilation)
    )


# --- DeformConv2d: torchvision's parameters and attributes --------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    "in_channels, out_channels, kernel_size, groups, weight_shape",
    [(3, 5, 3, 1, (5, 3, 3, 3)), (4, 6, (2, 3), 2, (6, 2, 2, 3)), (6, 3, (1, 1), 3, (3, 2, 1, 1))],
    ids=["3x3", "2x3-groups2", "1x1-groups3"],
)
def test_state_dict_keys_and_shapes_as_torchvision(in_channels, out_channels, kernel_size, groups, weight_shape, bias):
    module = DeformConv2d(in_channels, out_channels, kernel_size, groups=groups, bias=bias)
    state = module.state_dict()
    assert list(state) == (["weight", "bias"] if bias else ["weight"])
    assert tuple(state["weight"].shape) == weight_shape
    if bias:
        assert tuple(state["bias"].shape) == (out_channels,)
    else:
        assert module.bias is None
    assert [name for name, _ in module.named_parameters()] == list(state)


def test_attributes_as_torchvision():
    module = DeformConv2d(4, 6, 3, stride=2, padding=(1, 0), dilation=(1, 2), groups=2)
    assert (module.in_channels, module.out_channels, module.groups) == (4, 6, 2)
    assert module.kernel_size == (3, 3)
    assert module.stride == (2, 2)
    assert module.padding == (1, 0)
    assert module.dilation == (1, 2)
    defaults = DeformConv2d(2, 2, (2, 3))
    assert (defaults.kernel_size, defaults.stride, defaults.padding, defaults.dilation, defaults.groups) == (
        (2, 3), (1, 1), (0, 0), (1, 1), 1
    )


@pytest.mark.parametrize(
    "in_channels, out_channels, kernel_size, groups",
    [(16, 64, 3, 1), (12, 32, (2, 5), 4)],
    ids=["16-64-3x3", "12-32-2x5-groups4"],
)
def test_initialisation_is_torchvisions(in_channels, out_channels, kernel_size, groups):
    """Kaiming-uniform with a = sqrt(5): weight uniform in +-gain * sqrt(3 / fan_in) with
    gain = sqrt(2 / (1 + 5)), that is +-1/sqrt(fan_in); bias uniform in the same bound.

    The same seed gives the same values as torchvision's recipe run by hand, and the draws fill
    their bound (a uniform's max over thousands of draws reaches it within a few percent; its
    standard deviation is bound / sqrt(3)).
    """
    torch.manual_seed(0)
    module = DeformConv2d(in_channels, out_channels, kernel_size, groups=groups)
    kh, kw = module.kernel_size
    fan_in = in_channels // groups * kh * kw
    bound = math.sqrt(2 / (1 + 5)) * math.sqrt(3 / fan_in)
    assert bound == pytest.approx(1 / math.sqrt(fan_in), rel=1e-12)

    torch.manual_seed(0)
    weight = torch.empty(out_channels, in_channels // groups, kh, kw)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bias = torch.empty(out_channels).uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
    torch.testing.assert_close(module.weight.detach(), weight, atol=0, rtol=0)
    torch.testing.assert_close(module.bias.detach(), bias, atol=0, rtol=0)

    w = module.weight.detach()
    assert w.abs().max() <= bound
    assert w.abs().max() >= 0.98 * bound
    assert abs(w.mean().item()) < 0.05 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert module.bias.abs().max() <= bound


def test_reset_parameters_redraws_within_the_bounds():
    module = DeformConv2d(3, 4, 3)
    before = module.weight.detach().clone()
    module.reset_parameters()
    assert not torch.equal(module.weight.detach(), before)
    assert module.weight.abs().max() <= 1 / math.sqrt(27)


# --- DeformConv2d: forward and checkpoints ------------------------------------------------------

# (in, out, kernel, stride, padding, dilation, groups, offset groups, mask, bias)
FORWARD_CASES = [
    pytest.param(2, 3, 3, 1, 1, 1, 1, 1, True, True, id="3x3-pad1-mask"),
    pytest.param(2, 3, 3, 1, 0, 1, 1, 1, False, True, id="3x3-no-mask"),
    pytest.param(4, 2, (2, 3), 2, (1, 0), (1, 2), 2, 2, True, False, id="2x3-stride2-dil-groups2-og2-no-bias"),
]


@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding, dilation, groups, offset_groups, with_mask, bias",
                         FORWARD_CASES)
def test_forward_equals_the_functional_op(c_in, c_out, kernel, stride, padding, dilation, groups, offset_groups,
                                          with_mask, bias):
    torch.manual_seed(0)
    module = DeformConv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias).double().to(DEVICE)
    ho, wo = output_size(module, 5, 6)
    taps = module.kernel_size[0] * module.kernel_size[1]
    gen = generator(10)
    x = rand((2, c_in, 5, 6), gen)
    offset = rand((2, 2 * offset_groups * taps, ho, wo), gen, -1.5, 1.5)
    mask = rand((2, offset_groups * taps, ho, wo), gen, 0, 1) if with_mask else None
    expected = stn_triton.deform_conv2d(x, offset, module.weight, module.bias, mask=mask, **conv_options(module))
    torch.testing.assert_close(module(x, offset, mask), expected, atol=0, rtol=0)
    assert expected.shape == (2, c_out, ho, wo)


def test_gradients_reach_weight_and_bias_as_the_functional_op_computes_them():
    torch.manual_seed(0)
    module = DeformConv2d(2, 3, 3, padding=1).double().to(DEVICE)
    gen = generator(11)
    x = rand((1, 2, 4, 5), gen).requires_grad_()
    offset = rand((1, 18, 4, 5), gen, -1.5, 1.5)
    weights = randn((1, 3, 4, 5), gen)
    (module(x, offset) * weights).sum().backward()
    weight = module.weight.detach().clone().requires_grad_()
    bias = module.bias.detach().clone().requires_grad_()
    out = stn_triton.deform_conv2d(x.detach().requires_grad_(), offset, weight, bias, **conv_options(module))
    grad_weight, grad_bias = torch.autograd.grad((out * weights).sum(), (weight, bias))
    torch.testing.assert_close(module.weight.grad, grad_weight, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(module.bias.grad, grad_bias, atol=1e-12, rtol=1e-10)
    assert module.weight.grad.abs().max() > 0


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_loads_a_state_dict_saved_from_another_instance(bias):
    torch.manual_seed(0)
    saved = DeformConv2d(2, 4, 3, padding=1, bias=bias).double()
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    loaded = DeformConv2d(2, 4, 3, padding=1, bias=bias).double()
    assert not torch.equal(loaded.weight, saved.weight)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, atol=0, rtol=0)
    saved, loaded = saved.to(DEVICE), loaded.to(DEVICE)
    gen = generator(12)
    x = rand((1, 2, 4, 4), gen)
    offset = rand((1, 18, 4, 4), gen, -1, 1)
    torch.testing.assert_close(loaded(x, offset), saved(x, offset), atol=0, rtol=0)


def test_refuses_a_state_dict_of_another_shape():
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        DeformConv2d(2, 4, 3).load_state_dict(DeformConv2d(2, 4, 5).state_dict())
    with pytest.raises(RuntimeError, match='Missing key.*"bias"'):
        DeformConv2d(2, 4, 3).load_state_dict(DeformConv2d(2, 4, 3, bias=False).state_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_loads_a_torchvision_checkpoint_and_matches_its_output(bias):
    """A ``torchvision.ops.DeformConv2d`` state_dict loads unchanged (strict), and both modules give
    the same output and gradients (float64, so only summation order differs)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    theirs = torchvision.ops.DeformConv2d(4, 6, 3, stride=1, padding=1, dilation=1, groups=2, bias=bias)
    theirs = theirs.double().to(DEVICE)
    ours = DeformConv2d(4, 6, 3, stride=1, padding=1, dilation=1, groups=2, bias=bias).double().to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    gen = generator(13)
    x = rand((3, 4, 9, 10), gen)
    offset = rand((3, 2 * 2 * 9, 9, 10), gen, -2, 2)  # two offset groups
    mask = rand((3, 2 * 9, 9, 10), gen, 0, 1)
    grad_output = randn((3, 6, 9, 10), gen)
    results = []
    for module in (ours, theirs):
        module.zero_grad()
        out = module(x, offset, mask)
        out.backward(grad_output)
        results.append((out.detach(), *(p.grad for p in module.parameters())))
    for name, a, b in zip(("output", "grad weight", "grad bias"), *results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


# --- SelfDeformConv2d ---------------------------------------------------------------------------

# (in, out, kernel, stride, padding, dilation, groups, offset groups, modulated)
PLAIN_CONV_CASES = [
    pytest.param(2, 3, 3, 1, 1, 1, 1, 1, True, id="3x3-pad1"),
    pytest.param(2, 3, 3, 2, 0, 1, 1, 1, True, id="3x3-stride2"),
    pytest.param(2, 2, (2, 3), 1, (2, 1), (2, 1), 1, 1, True, id="2x3-pad-dil2"),
    pytest.param(4, 6, 3, 1, 1, 1, 2, 2, True, id="groups2-og2"),
    pytest.param(3, 2, 3, (1, 2), 1, 1, 1, 1, False, id="unmodulated-stride1x2"),
]


@pytest.mark.parametrize("c_in, c_out, kernel, stride, padding, dilation, groups, offset_groups, modulated",
                         PLAIN_CONV_CASES)
def test_starts_as_a_plain_convolution(c_in, c_out, kernel, stride, padding, dilation, groups, offset_groups,
                                       modulated):
    torch.manual_seed(0)
    module = SelfDeformConv2d(c_in, c_out, kernel, stride, padding, dilation, groups,
                              offset_groups=offset_groups, modulated=modulated).double().to(DEVICE)
    x = rand((2, c_in, 5, 6), generator(20))
    expected = F.conv2d(x, module.weight, module.bias, groups=groups, **conv_options(module))
    out, offset, mask = module(x, return_offsets=True)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(module(x), out, atol=0, rtol=0)
    ho, wo = expected.shape[2:]
    taps = module.kernel_size[0] * module.kernel_size[1]
    assert offset.shape == (2, 2 * offset_groups * taps, ho, wo)
    assert torch.equal(offset, torch.zeros_like(offset))
    if modulated:
        assert mask.shape == (2, offset_groups * taps, ho, wo)
        assert torch.equal(mask, torch.ones_like(mask))
    else:
        assert mask is None


@pytest.mark.parametrize("modulated", [True, False], ids=["modulated", "unmodulated"])
def test_offset_conv_is_a_zero_convolution_of_the_same_geometry(modulated):
    module = SelfDeformConv2d(4, 6, (2, 3), stride=2, padding=1, dilation=(2, 1), groups=2, offset_groups=2,
                              modulated=modulated)
    conv = module.offset_conv
    assert isinstance(conv, nn.Conv2d)
    assert conv.out_channels == (3 if modulated else 2) * 2 * 6
    assert (conv.in_channels, conv.groups) == (4, 1)
    assert (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == (
        module.kernel_size, module.stride, module.padding, module.dilation
    )
    assert torch.equal(conv.weight, torch.zeros_like(conv.weight))
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    assert list(module.state_dict()) == ["weight", "bias", "offset_conv.weight", "offset_conv.bias"]


@pytest.mark.parametrize("modulated", [True, False], ids=["modulated", "unmodulated"])
def test_return_offsets_are_what_the_layer_samples_with(modulated):
    """Away from init: the returned offset and mask come from ``offset_conv`` (mask = 2 sigmoid of
    the logits) and the output is the functional op run with them."""
    torch.manual_seed(0)
    module = SelfDeformConv2d(2, 3, 3, padding=1, offset_groups=2, modulated=modulated).double()
    with torch.no_grad():
        module.offset_conv.weight.normal_(std=0.3)
        module.offset_conv.bias.normal_(std=0.3)
    module = module.to(DEVICE)
    x = rand((2, 2, 5, 4), generator(21))
    out, offset, mask = module(x, return_offsets=True)
    predicted = module.offset_conv(x)
    torch.testing.assert_close(offset, predicted[:, :36], atol=0, rtol=0)
    if modulated:
        torch.testing.assert_close(mask, 2 * torch.sigmoid(predicted[:, 36:]), atol=0, rtol=0)
    else:
        assert predicted.shape[1] == 36 and mask is None
    expected = stn_triton.deform_conv2d(x, offset, module.weight, module.bias, mask=mask, **conv_options(module))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert offset.abs().max() > 0.1


@pytest.mark.parametrize(
    "modulated, input_grad",
    [(True, False), (True, True), (False, False), (False, True)],
    ids=["modulated-image-input", "modulated-feature-input", "unmodulated-image-input", "unmodulated-feature-input"],
)
def test_one_backward_reaches_the_offset_conv(modulated, input_grad):
    """At init the offsets are 0 (bilinear taps on pixel centres) and yet the loss has a gradient
    for the offset conv: the same one as through the functional op with the offsets and mask
    computed outside the module. An image input (no grad) and a feature input (with grad)."""
    torch.manual_seed(0)
    module = SelfDeformConv2d(2, 3, 3, padding=1, modulated=modulated).double().to(DEVICE)
    gen = generator(22)
    x = rand((2, 2, 5, 6), gen).requires_grad_(input_grad)
    weights = randn((2, 3, 5, 6), gen)
    (module(x) * weights).sum().backward()

    conv_weight = module.offset_conv.weight.detach().clone().requires_grad_()
    conv_bias = module.offset_conv.bias.detach().clone().requires_grad_()
    predicted = F.conv2d(x.detach(), conv_weight, conv_bias, padding=1)
    mask = 2 * torch.sigmoid(predicted[:, 18:]) if modulated else None
    out = stn_triton.deform_conv2d(x.detach(), predicted[:, :18], module.weight.detach(), module.bias.detach(),
                                   padding=1, mask=mask)
    expected = torch.autograd.grad((out * weights).sum(), (conv_weight, conv_bias))
    for name, grad, reference in zip(("weight", "bias"), (module.offset_conv.weight.grad,
                                                          module.offset_conv.bias.grad), expected):
        assert grad is not None and grad.abs().max() > 1e-3, f"no gradient reached offset_conv.{name}"
        torch.testing.assert_close(grad, reference, atol=1e-12, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    assert module.weight.grad.abs().max() > 0


def test_learns_the_offsets_of_a_shifted_deformable_convolution():
    """The target is a fixed deformable convolution whose taps all read (+0.4, -0.3) pixels away
    from the regular grid, applied to a smooth pattern; the module starts with the target's weight
    and zero offsets, and only its offset conv trains (so the backward wants neither the input's nor
    the weight's gradient).

    Over seeds 0-4 of the pattern, 10 Adam steps lower the loss by 8x-26x; 4x is asked.
    """
    torch.manual_seed(0)
    gen = generator(23)
    side = 8
    coarse = randn((1, 1, 3, 3), gen, device="cpu")
    pattern = F.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=True).to(DEVICE)
    weight = randn((1, 1, 3, 3), gen)
    shift = torch.tensor([0.4, -0.3], dtype=torch.float64, device=DEVICE)
    target_offset = shift.repeat(9).view(1, 18, 1, 1).expand(1, 18, side, side)
    target = stn_triton.deform_conv2d(pattern, target_offset, weight, padding=1)

    module = SelfDeformConv2d(1, 1, 3, padding=1, bias=False).double().to(DEVICE)
    with torch.no_grad():
        module.weight.copy_(weight)
    module.weight.requires_grad_(False)
    optimizer = torch.optim.Adam(
        [{"params": [module.offset_conv.bias], "lr": 0.05}, {"params": [module.offset_conv.weight], "lr": 0.005}]
    )
    losses = []
    for _ in range(10):
        loss = F.mse_loss(module(pattern), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.mse_loss(module(pattern), target).item()
    assert final < losses[0] / 4, f"loss went from {losses[0]:.4g} to {final:.4g}, not down by 4x"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_channels=3, groups=2), "must be divisible by groups"),
        (dict(out_channels=3, groups=2), "must be divisible by groups"),
        (dict(in_channels=6, offset_groups=4), r"offset_groups \(4\) must divide in_channels \(6\)"),
        (dict(groups=0), "groups"),
        (dict(offset_groups=0), "offset_groups"),
        (dict(in_channels=0), "in_channels"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(stride=0), "stride"),
        (dict(padding=-1), "padding"),
        (dict(dilation=0), "dilation"),
    ],
    ids=lambda v: "-".join(f"{k}={v[k]!r}" for k in v) if isinstance(v, dict) else "",
)
def test_bad_constructor_arguments_raise_value_error(kwargs, match):
    arguments = dict(in_channels=4, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        SelfDeformConv2d(**arguments)
