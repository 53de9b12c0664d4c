"""blur_pool2d and max_blur_pool2d (Zhang, ICML 2019) against float64 references written here from
the definitions (F.max_pool2d's window rules: NaN wins, the first of equal values takes the
gradient; the normalized binomial taps; zeros, reflect and replicate padding of (k - 1) // 2
before and k // 2 after); against kornia's blur_pool2d / max_blur_pool2d and antialiased-cnns'
BlurPool composition (its padding layer, then the depthwise convolution) as they define them."""

import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import stn_triton
from conftest import (
    DEVICE,
    LOW_PRECISION_FLOOR,
    assert_close_scaled,
    deterministic_algorithms,
    generator,
    randn,
)

try:
    import kornia.filters as kornia_filters
except Exception:  # not installed here
    kornia_filters = None
needs_kornia = pytest.mark.skipif(kornia_filters is None, reason="kornia does not import here")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def axis_taps(size, k, s, mode):
    """[(weight, index [O], reads [O])] of one axis of ``size``: tap i of output o reads padded index
    o * s + i - (k - 1) // 2, folded by the padding (zeros: it reads nothing outside)."""
    out = (size - 1) // s + 1
    taps = []
    for i in range(k):
        q = torch.arange(out, device=DEVICE) * s + i - (k - 1) // 2
        reads = (q >= 0) & (q < size)
        if mode == "reflect":
            q = torch.where(q < 0, -q, q)
            q = torch.where(q >= size, 2 * (size - 1) - q, q)
        elif mode == "replicate":
            q = q.clamp(0, size - 1)
        if mode != "zeros":
            reads = torch.ones_like(reads)
        taps.append((math.comb(k - 1, i) / 2 ** (k - 1), q.clamp(0, size - 1), reads))
    return taps


def max_map(x, window):
    """F.max_pool2d(x, window, stride=1) by its rules: windows visited in row-major order, a value
    taken when greater or NaN; the output gathers the chosen element (autograd routes there)."""
    mh, mw = window
    hm, wm = x.shape[2] - mh + 1, x.shape[3] - mw + 1
    views = [x[:, :, u:u + hm, v:v + wm] for u in range(mh) for v in range(mw)]
    best, arg = views[0], torch.zeros(views[0].shape, dtype=torch.long, device=x.device)
    for t, value in enumerate(views[1:], 1):
        take = (value > best) | value.isnan()
        best = torch.where(take, value, best)
        arg = torch.where(take, t, arg)
    chosen = views[0]
    for t, value in enumerate(views[1:], 1):
        chosen = torch.where(arg == t, value, chosen)
    return chosen


def reference(x, kernel_size=3, stride=2, window=1, mode="zeros"):
    """float64, differentiable: the max map, then the sum over the taps of weight x value."""
    (kh, kw), (sh, sw), window = _pair(kernel_size), _pair(stride), _pair(window)
    m = max_map(x.double(), window) if window != (1, 1) else x.double()
    out = 0
    for a, rows, row_reads in axis_taps(m.shape[2], kh, sh, mode):
        for b, cols, col_reads in axis_taps(m.shape[3], kw, sw, mode):
            reads = row_reads[:, None] & col_reads[None, :]
            out = out + a * b * torch.where(reads, m[:, :, rows][:, :, :, cols], 0.0)
    return out


def ours(x, kernel_size=3, stride=2, window=1, mode="zeros"):
    if _pair(window) == (1, 1):
        return stn_triton.blur_pool2d(x, kernel_size, stride, mode)
    return stn_triton.max_blur_pool2d(x, kernel_size, stride, window, padding_mode=mode)


def with_grad(fn, x, grad_output=None, **options):
    leaf = x.detach().clone().requires_grad_()
    out = fn(leaf, **options)
    g = torch.randn(out.shape, generator=generator(3), dtype=torch.float64).to(DEVICE, out.dtype) \
        if grad_output is None else grad_output
    (grad,) = torch.autograd.grad(out, leaf, g)
    return out.detach(), grad


# (shape, kernel_size, stride, max window, padding): odd sizes, one-pixel axes, even and odd taps,
# strides 1 to 3, windows 1 to 3, rectangular options, every padding.
CASES = [
    ((2, 3, 7, 9), 3, 2, 1, "zeros"),
    ((2, 3, 7, 9), 3, 2, 2, "zeros"),
    ((1, 2, 1, 33), 3, 2, 1, "zeros"),
    ((1, 1, 1, 1), 5, 2, 1, "zeros"),
    ((1, 2, 3, 3), 1, 2, 1, "zeros"),
    ((1, 2, 7, 6), 4, 2, 2, "zeros"),
    ((1, 3, 5, 8), 2, 1, 3, "zeros"),
    ((1, 2, 9, 7), (3, 5), (2, 1), (2, 1), "zeros"),
    ((2, 2, 7, 9), 3, 2, 2, "reflect"),
    ((1, 2, 8, 7), 4, 2, 1, "reflect"),
    ((1, 2, 6, 9), 2, 3, 2, "reflect"),
    ((1, 1, 7, 8), 7, 2, 1, "reflect"),
    ((1, 2, 7, 6), 5, 3, 1, "replicate"),
    ((1, 2, 6, 7), 4, 2, 2, "replicate"),
    ((1, 1, 3, 1), 3, 1, 1, "replicate"),
]


@pytest.mark.parametrize("shape, k, s, m, mode", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_equals_the_reference_forward_and_backward(shape, k, s, m, mode):
    x = randn(shape, generator(hash((shape, k, s, m, mode)) % 1000))
    got = with_grad(ours, x, kernel_size=k, stride=s, window=m, mode=mode)
    expected = with_grad(reference, x, kernel_size=k, stride=s, window=m, mode=mode)
    for what, a, b in zip(("output", "grad input"), got, expected):
        assert a.shape == b.shape, what
        assert_close_scaled(a, b, 1e-12, what)


def test_a_constant_map_keeps_its_value_inside_and_darkens_at_zero_padded_borders():
    """Hand-made: the normalized taps sum to 1; zero padding at a corner keeps (3/4)^2 of a 3-tap
    blur, reflect and replicate keep everything."""
    x = torch.ones(1, 1, 6, 6, dtype=torch.float64, device=DEVICE)
    zeros = stn_triton.blur_pool2d(x, 3, 2)
    assert zeros[0, 0, 0, 0].item() == 0.75 ** 2 and zeros[0, 0, 1, 1].item() == 1.0
    for mode in ("reflect", "replicate"):
        assert torch.equal(stn_triton.blur_pool2d(x, 3, 2, mode), torch.ones_like(zeros))


def test_max_windows_follow_max_pool2d_nan_and_ties():
    """A NaN wins its windows (and only those); equal values send the gradient to the first in
    row-major order, as F.max_pool2d's indices do; -inf windows stay -inf-free of NaN."""
    x = torch.zeros(1, 1, 6, 7, dtype=torch.float64, device=DEVICE)
    x[0, 0, 1, 1:5] = 2.0  # ties along a row
    x[0, 0, 4, 5] = float("nan")
    x[0, 0, 0, 6] = -float("inf")
    out, grad = with_grad(ours, x, kernel_size=3, stride=2, window=2)
    expected, expected_grad = with_grad(reference, x, kernel_size=3, stride=2, window=2)
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().any() and not out.isnan().all()
    assert_close_scaled(out.nan_to_num(0.0), expected.nan_to_num(0.0), 1e-12, "output")
    assert_close_scaled(grad, expected_grad, 1e-12, "grad input")
    # PyTorch's own max_pool2d (and its index rule) feeding the same blur routes the same way.
    leaf = x.clone().requires_grad_()
    torch_out = reference(F.max_pool2d(leaf, 2, stride=1), 3, 2)
    (torch_grad,) = torch.autograd.grad(torch_out, leaf, torch.ones_like(torch_out))
    (_, our_grad) = with_grad(ours, x, torch.ones_like(out), kernel_size=3, stride=2, window=2)
    assert torch.equal(our_grad.isnan(), torch_grad.isnan())
    assert_close_scaled(our_grad.nan_to_num(0.0), torch_grad.nan_to_num(0.0), 1e-12, "max_pool2d's routing")


TOLERANCES = [(torch.float32, 1e-6, 1e-5), (torch.float16, 2 * LOW_PRECISION_FLOOR[torch.float16], 1e-2),
              (torch.bfloat16, 2 * LOW_PRECISION_FLOOR[torch.bfloat16], 2e-2)]


@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 2])
def test_every_dtype_accumulates_in_float32(dtype, atol, rtol, m):
    """The float64 reference on the same rounded inputs: one rounding of the output (float32 inside)."""
    x = randn((2, 3, 7, 9), generator(7)).to(dtype)
    grad_output = randn((2, 3, 4, 5) if m == 1 else (2, 3, 3, 4), generator(8)).to(dtype)
    got = with_grad(ours, x, grad_output, window=m)
    expected = with_grad(reference, x.double(), grad_output.double(), window=m)
    for what, a, b in zip(("output", "grad input"), got, expected):
        assert a.dtype == dtype, what
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda msg: f"{what}: {msg}")


@pytest.mark.parametrize("m", [1, 2])
def test_channels_last_and_strided_views_are_read_as_they_are(m):
    """A channels_last input keeps its layout in the output and the gradient; a view sliced out of a
    wider tensor and the stride-0 gradient of .sum() are read through their strides."""
    x = randn((2, 5, 7, 8), generator(9))
    expected = with_grad(reference, x, torch.ones(2, 5, *reference(x, window=m).shape[2:], dtype=torch.float64,
                                                     device=DEVICE), window=m)
    wide = torch.zeros(2, 5, 7, 16, dtype=torch.float64, device=DEVICE)
    wide[..., ::2] = x
    variants = {"channels_last": x.contiguous(memory_format=torch.channels_last), "sliced": wide[..., ::2],
                "transposed": x.transpose(2, 3).contiguous().transpose(2, 3)}
    for name, view in variants.items():
        leaf = view.detach().requires_grad_()
        out = ours(leaf, window=m)
        (grad,) = torch.autograd.grad(out.sum(), leaf)
        if name == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert grad.is_contiguous(memory_format=torch.channels_last)
        assert_close_scaled(out, expected[0], 1e-12, f"{name} output")
        assert_close_scaled(grad, expected[1], 1e-12, f"{name} grad")


def test_an_empty_batch_or_channel_set_gives_an_empty_output():
    for shape in ((0, 3, 5, 5), (2, 0, 5, 5)):
        leaf = torch.zeros(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
        out = stn_triton.max_blur_pool2d(leaf, 3, 2)
        assert out.shape == (*shape[:2], 2, 2)
        (grad,) = torch.autograd.grad(out.sum(), leaf)
        assert grad.shape == shape


@pytest.mark.parametrize("m, mode", [(1, "zeros"), (2, "reflect"), (2, "zeros")])
def test_gradcheck_and_gradgradcheck(m, mode):
    x = randn((1, 1, 4, 5), generator(11)).requires_grad_()
    fn = lambda a: ours(a, 3, 2, m, mode)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


def test_forward_mode_and_vmap_equal_the_reference():
    x = randn((3, 2, 6, 7), generator(12))
    tangent = randn(x.shape, generator(13))
    for m in (1, 2):
        out, jvp = torch.func.jvp(lambda a: ours(a, 3, 2, m), (x,), (tangent,))
        ref_out, ref_jvp = torch.func.jvp(lambda a: reference(a, 3, 2, m), (x,), (tangent,))
        assert_close_scaled(jvp, ref_jvp, 1e-12, f"jvp m={m}")
        batched = torch.func.vmap(lambda a: ours(a, 3, 2, m))(x[:, None])
        assert_close_scaled(batched[:, 0], ref_out, 1e-12, f"vmap m={m}")
        grads = torch.func.vmap(torch.func.grad(lambda a: ours(a, 3, 2, m).pow(2).sum()))(x[:, None])
        ref = torch.func.vmap(torch.func.grad(lambda a: reference(a, 3, 2, m).pow(2).sum()))(x[:, None])
        assert_close_scaled(grads, ref, 1e-12, f"vmap grad m={m}")


def test_the_backward_is_bitwise_reproducible_with_and_without_deterministic_algorithms():
    x = randn((2, 4, 9, 8), generator(14)).float()
    grad_output = randn((2, 4, 4, 4), generator(15)).float()
    default = with_grad(ours, x, grad_output, window=2)[1]
    with deterministic_algorithms():
        runs = [with_grad(ours, x, grad_output, window=2)[1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], default)


def test_autocast_returns_the_compositions_dtype_computed_from_the_input():
    """Inside autocast kornia's depthwise conv2d returns the autocast dtype (float64 stays): so do
    these, computed in float32 from the input as it is and rounded once."""
    x = randn((2, 3, 7, 9), generator(16))
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        out = stn_triton.max_blur_pool2d(x.float(), 3, 2)
        out64 = stn_triton.blur_pool2d(x, 3, 2)
    assert out.dtype == torch.bfloat16 and out64.dtype == torch.float64
    assert_close_scaled(out.double(), reference(x.float(), 3, 2, 2), 2 ** -8, "bfloat16 under autocast")
    assert_close_scaled(out64, reference(x, 3, 2), 1e-12, "float64 under autocast")


def test_the_plain_pytorch_fallback_equals_the_reference():
    """The path a CPU tensor takes without the interpreter: the composition in memory."""
    from stn_triton.backend import TORCH, forced

    x = randn((2, 3, 7, 9), generator(17)).contiguous(memory_format=torch.channels_last)
    with forced(TORCH):
        for m, mode in ((1, "zeros"), (2, "reflect"), (3, "replicate")):
            out, grad = with_grad(ours, x, window=m, mode=mode)
            expected = with_grad(reference, x, window=m, mode=mode)
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert_close_scaled(out, expected[0], 1e-12, f"fallback {mode}")
            assert_close_scaled(grad, expected[1], 1e-12, f"fallback grad {mode}")


@needs_kornia
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("k, s, m", [(3, 2, 2), (1, 2, 2), (4, 2, 3), (5, 3, 1), (2, 1, 2)])
def test_equals_kornia(k, s, m, dtype):
    x = randn((2, 3, 9, 8), generator(18)).to(dtype)
    if m == 1:
        got = with_grad(stn_triton.blur_pool2d, x, kernel_size=k, stride=s)
        expected = with_grad(kornia_filters.blur_pool2d, x, kernel_size=k, stride=s)
    else:
        got = with_grad(stn_triton.max_blur_pool2d, x, kernel_size=k, stride=s, max_pool_size=m)
        expected = with_grad(kornia_filters.max_blur_pool2d, x, kernel_size=k, stride=s, max_pool_size=m)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for what, a, b in zip(("output", "grad input"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        assert_close_scaled(a, b, tol, what)
    module = stn_triton.MaxBlurPool2d(k, s, m) if m > 1 else stn_triton.BlurPool2d(k, s)
    theirs = kornia_filters.MaxBlurPool2D(k, s, m) if m > 1 else kornia_filters.BlurPool2D(k, s)
    assert_close_scaled(module(x), theirs(x), tol, "module")
    if m > 1:  # ceil_mode: kornia passes it to its stride-1 max pooling, where it changes nothing
        ceil = stn_triton.max_blur_pool2d(x, kernel_size=k, stride=s, max_pool_size=m, ceil_mode=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # newer kornia deprecates the argument
            theirs = kornia_filters.max_blur_pool2d(x, kernel_size=k, stride=s, max_pool_size=m, ceil_mode=True)
        assert ceil.shape == theirs.shape
        assert_close_scaled(ceil, theirs, tol, "ceil_mode")


def antialiased_cnns_blurpool(x, filt_size, stride, pad_type):
    """antialiased-cnns' BlurPool(channels, pad_type, filt_size, stride) as it defines it: padding
    layer of (filt_size - 1) // 2 before and ceil((filt_size - 1) / 2) after, then the depthwise
    convolution with the normalized outer product of the binomial row; filt_size 1 subsamples."""
    if filt_size == 1:
        return x[:, :, ::stride, ::stride]
    before, after = (filt_size - 1) // 2, math.ceil((filt_size - 1) / 2)
    mode = {"reflect": "reflect", "replicate": "replicate", "zero": "constant"}[pad_type]
    padded = F.pad(x, (before, after, before, after), mode=mode)
    row = torch.tensor([math.comb(filt_size - 1, i) for i in range(filt_size)], dtype=x.dtype, device=x.device)
    filt = row[:, None] * row[None, :]
    filt = (filt / filt.sum()).expand(x.shape[1], 1, filt_size, filt_size)
    return F.conv2d(padded, filt, stride=stride, groups=x.shape[1])


@pytest.mark.parametrize("pad_type", ["reflect", "replicate", "zero"])
def test_equals_antialiased_cnns_blurpool(pad_type):
    x = randn((1, 2, 8, 7), generator(19))
    mode = {"zero": "zeros"}.get(pad_type, pad_type)
    for filt_size in range(1, 8):
        for stride in (2, 1) if filt_size in (3, 4) else (2,):
            got = with_grad(stn_triton.blur_pool2d, x, kernel_size=filt_size, stride=stride, padding_mode=mode)
            expected = with_grad(antialiased_cnns_blurpool, x, filt_size=filt_size, stride=stride, pad_type=pad_type)
            for what, a, b in zip(("output", "grad input"), got, expected):
                assert_close_scaled(a, b, 1e-12, f"filt_size={filt_size} stride={stride} {what}")


def test_modules_hold_their_options_and_equal_the_functions():
    x = randn((1, 2, 8, 7), generator(20))
    blur = stn_triton.BlurPool2d(4, 2, "reflect")
    pool = stn_triton.MaxBlurPool2d(3, 2, 2, padding_mode="replicate")
    assert repr(blur) == "BlurPool2d(kernel_size=4, stride=2, padding_mode='reflect')"
    assert "max_pool_size=2" in repr(pool) and not list(blur.parameters())
    assert torch.equal(blur(x), stn_triton.blur_pool2d(x, 4, 2, "reflect"))
    assert torch.equal(pool(x), stn_triton.max_blur_pool2d(x, 3, 2, 2, padding_mode="replicate"))
    with pytest.raises(ValueError, match="padding_mode"):
        stn_triton.BlurPool2d(3, 2, "circular")


BAD = [
    (dict(input=torch.zeros(3, 5, 5)), "input"),
    (dict(input=torch.zeros(1, 3, 5, 5, dtype=torch.int64)), "input"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=17), "kernel_size"),
    (dict(kernel_size=2.0), "kernel_size"),
    (dict(stride=0), "stride"),
    (dict(stride=(2, 2, 2)), "stride"),
    (dict(padding_mode="circular"), "padding_mode"),
    (dict(max_pool_size=0), "max_pool_size"),
    (dict(max_pool_size=6), "max_pool_size"),
    (dict(ceil_mode=1), "ceil_mode"),
    (dict(kernel_size=11, padding_mode="reflect"), "reflect"),
    (dict(input=torch.zeros(1, 3, 0, 5)), "input"),
]


@pytest.mark.parametrize("changes, named", BAD, ids=lambda v: re.sub(r"\W+", "-", str(v))[:40])
def test_malformed_arguments_fail_before_any_launch_naming_the_argument(changes, named, monkeypatch):
    from stn_triton import functional

    monkeypatch.setattr(functional._blur_pool_op, "blur_pool", lambda *args: pytest.fail("launched"))
    monkeypatch.setattr(functional.fallback, "blur_pool", lambda *args: pytest.fail("launched"))
    arguments = dict(input=torch.zeros(1, 3, 5, 5), kernel_size=3, stride=2, max_pool_size=2, ceil_mode=False,
                     padding_mode="zeros")
    arguments.update(changes)
    arguments["input"] = arguments["input"].to(DEVICE)
    with pytest.raises((ValueError, TypeError), match=re.escape(named)):
        stn_triton.max_blur_pool2d(**arguments)
    if "max_pool_size" not in changes and "ceil_mode" not in changes:
        del arguments["max_pool_size"], arguments["ceil_mode"]
        with pytest.raises((ValueError, TypeError), match=re.escape(named)):
            stn_triton.blur_pool2d(**arguments)
