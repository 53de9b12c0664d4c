"""CoordConv (Liu et al., NeurIPS 2018): CoordConv2d against the concatenation it replaces (the
coordinate channels appended to every image, then one convolution), with the channels written here
from the paper's definition (Uber's reference code: x along the width, then y, in [-1, 1]; r =
sqrt(x^2 + y^2))."""

import warnings

import pytest
import torch

import stn_triton
from conftest import DEVICE, assert_close_scaled, deterministic_algorithms, generator, randn


def paper_channels(n, h, w, with_r, dtype):
    """[n, 2 or 3, h, w]: column / (w - 1) and row / (h - 1) mapped to [-1, 1] (0 on a one-pixel axis)."""
    cols = torch.arange(w, dtype=torch.float64).expand(h, w)
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w)
    x = cols / (w - 1) * 2 - 1 if w > 1 else torch.zeros(h, w, dtype=torch.float64)
    y = rows / (h - 1) * 2 - 1 if h > 1 else torch.zeros(h, w, dtype=torch.float64)
    channels = [x, y] + ([torch.sqrt(x * x + y * y)] if with_r else [])
    return torch.stack(channels)[None].expand(n, -1, -1, -1).to(dtype=dtype, device=DEVICE)


def concatenation(module, input):
    """The reference: the channels appended to every image, then the module's own convolution."""
    extra = paper_channels(input.shape[0], input.shape[2], input.shape[3], module.with_r, input.dtype)
    return module.conv(torch.cat([input, extra], 1))


def grads(fn, module, input, grad_output):
    module.zero_grad(set_to_none=True)
    leaf = input.detach().clone().requires_grad_()
    out = fn(module, leaf)
    out.backward(grad_output)
    return [out.detach(), leaf.grad] + [p.grad.clone() for p in module.parameters()]


CASES = [
    dict(n=1, c=1, size=(1, 1), kernel=1),
    dict(n=2, c=3, size=(7, 5), kernel=3, padding=1),
    dict(n=3, c=4, size=(9, 11), kernel=3, stride=2, padding=2, dilation=2, with_r=True),
    dict(n=2, c=2, size=(6, 7), kernel=(3, 2), padding="same", bias=False),
    dict(n=2, c=3, size=(5, 8), kernel=3, padding=1, padding_mode="reflect", with_r=True),
    dict(n=1, c=2, size=(4, 6), kernel=3, padding=1, padding_mode="circular"),
    dict(n=2, c=1, size=(1, 9), kernel=(1, 3), padding=(0, 1), with_r=True),
]


def build(case, dtype=torch.float64):
    options = {k: v for k, v in case.items() if k not in ("n", "c", "size", "kernel")}
    torch.manual_seed(0)
    return stn_triton.CoordConv2d(case["c"], 5, case["kernel"], **options).to(device=DEVICE, dtype=dtype)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # PyTorch's own, for both sides
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_equals_the_concatenation_forward_and_backward(case):
    module = build(case)
    gen = generator(1)
    x = randn((case["n"], case["c"], *case["size"]), gen)
    out = module(x)
    grad_output = randn(out.shape, gen)
    for what, a, b in zip(["output", "grad input", "grad weight", "grad bias"],
                          grads(lambda m, i: m(i), module, x, grad_output),
                          grads(concatenation, module, x, grad_output)):
        assert_close_scaled(a, b, 1e-12, what)


def test_a_hand_made_case():
    """One output channel reading only the x channel with a 1 x 1 kernel returns the x coordinates;
    with only r, the distance to the centre."""
    module = stn_triton.CoordConv2d(1, 2, 1, bias=False, with_r=True).double().to(DEVICE)
    with torch.no_grad():
        module.conv.weight.zero_()
        module.conv.weight[0, 1] = 1.0
        module.conv.weight[1, 3] = 1.0
    out = module(torch.zeros(1, 1, 3, 5, dtype=torch.float64, device=DEVICE))
    xs = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(out[0, 0], xs.expand(3, 5))
    ys = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64, device=DEVICE)[:, None]
    torch.testing.assert_close(out[0, 1], torch.sqrt(xs * xs + ys * ys))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_every_dtype_and_channels_last(dtype):
    """Output and gradients (input, weight, bias) in the module's dtype, against the float64
    concatenation; a channels_last input gives a channels_last output and gradient."""
    case = CASES[2]
    module = build(case, dtype)
    gen = generator(2)
    x = randn((case["n"], case["c"], *case["size"]), gen, dtype).contiguous(memory_format=torch.channels_last)
    grad_output = randn((3, 5, 5, 6), gen, dtype)
    got = grads(lambda m, i: m(i), module, x, grad_output)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    reference = build(case)
    reference.load_state_dict(module.state_dict())
    expected = grads(concatenation, reference, x.double(), grad_output.double())
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for what, a, b in zip(["output", "grad input", "grad weight", "grad bias"], got, expected):
        assert a.dtype == dtype, what
        assert_close_scaled(a.double(), b, tol, what)


def test_a_strided_view_equals_its_contiguous_copy():
    module = build(CASES[1])
    wide = randn((2, 3, 7, 10), generator(7))
    view = wide[..., ::2]
    direction = randn((2, 5, 7, 5), generator(8))
    for what, a, b in zip(["output", "grad input", "grad weight", "grad bias"],
                          grads(lambda m, i: m(i), module, view, direction),
                          grads(lambda m, i: m(i), module, view.contiguous(), direction)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=what)


def test_compiles_fullgraph_to_the_eager_result():
    """Dynamo traces the module in one graph (no break at the coordinate map) and AOT autograd's
    forward and backward give the eager values."""
    module = build(CASES[2])
    x = randn((3, 4, 9, 11), generator(9))
    direction = randn((3, 5, 5, 6), generator(10))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for what, a, b in zip(["output", "grad input", "grad weight", "grad bias"],
                          grads(lambda m, i: compiled(i), module, x, direction),
                          grads(lambda m, i: m(i), module, x, direction)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=what)


def test_backward_repeats_bitwise_under_deterministic_algorithms():
    module = build(CASES[1], torch.float32)
    x = randn((2, 3, 7, 5), generator(11), torch.float32)
    direction = randn((2, 5, 7, 5), generator(12), torch.float32)
    with deterministic_algorithms():
        first = grads(lambda m, i: m(i), module, x, direction)
        again = grads(lambda m, i: m(i), module, x, direction)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_autocast_returns_what_the_concatenation_returns():
    case = CASES[1]
    module = build(case, torch.float32)
    x = randn((case["n"], case["c"], *case["size"]), generator(3), torch.float32)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        ours, theirs = module(x), concatenation(module, x)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours.float(), theirs.float(), atol=5e-2, rtol=5e-2)


def test_gradcheck():
    module = build(CASES[2])
    x = randn((1, 4, 5, 6), generator(4)).requires_grad_()
    assert torch.autograd.gradcheck(module, (x,))
    weight = module.conv.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w: torch.func.functional_call(module, {"conv.weight": w, "conv.bias": module.conv.bias}, (x.detach(),)),
        (weight,))


def test_add_coords_and_the_state_dict_of_the_concatenation():
    x = randn((2, 3, 4, 5), generator(5))
    added = stn_triton.AddCoords(with_r=True)(x)
    torch.testing.assert_close(added, torch.cat([x, paper_channels(2, 4, 5, True, torch.float64)], 1))
    module = stn_triton.CoordConv2d(3, 6, 3, padding=1)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == {"conv.weight": (6, 5, 3, 3),
                                                                           "conv.bias": (6,)}
    plain = torch.nn.Conv2d(5, 6, 3, padding=1)
    module.conv.load_state_dict(plain.state_dict())
    torch.testing.assert_close(module(x.float()), plain(stn_triton.AddCoords()(x.float())))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="groups"):
        stn_triton.CoordConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="input"):
        stn_triton.CoordConv2d(3, 4, 3)(torch.zeros(1, 2, 5, 5))
    with pytest.raises(ValueError, match="input"):
        stn_triton.AddCoords()(torch.zeros(2, 5, 5))


def test_modules_script():
    x = randn((2, 3, 6, 5), generator(6), torch.float32)
    for module in (stn_triton.CoordConv2d(3, 4, 3, padding=1, with_r=True), stn_triton.AddCoords(True)):
        module = module.to(DEVICE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(module)
        torch.testing.assert_close(scripted(x), module(x))
