"""Bad arguments to ``deform_conv2d`` fail before any launch, with an error naming the argument.

Every call here runs with the op module and the PyTorch fallback replaced by a stub that fails the
test if reached, so an error raised by a kernel launch, by the fallback or by PyTorch itself cannot
pass for validation.
"""

import re
from types import SimpleNamespace

import pytest
import torch

import stn_triton
from conftest import DEVICE
from stn_triton import functional


class Launched(Exception):
    """Raised by the stubs: validation let the call through."""


def _launched(*args, **kwargs):
    raise Launched


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Replace both ways out of ``deform_conv2d`` (the Triton op and the fallback) by the stub.

    Only the launch is stubbed: the op module's shape arithmetic is what the validation itself uses.
    """
    monkeypatch.setattr(functional._deform_conv_op, "deform_conv2d", _launched)
    monkeypatch.setattr(functional, "fallback", SimpleNamespace(deform_conv2d=_launched))


def t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


# input [2, 4, 5, 6] with a 3x3 weight and no padding -> output 3x4; K = 9.
X = (2, 4, 5, 6)
W = (6, 4, 3, 3)
OFF = (2, 18, 3, 4)
MASK = (2, 9, 3, 4)


def call(input=X, offset=OFF, weight=W, bias=None, mask=None, **kwargs):
    """deform_conv2d on zero tensors of the given shapes (a tensor passes through as it is)."""
    make = lambda v: t(*v) if isinstance(v, tuple) else v
    return stn_triton.deform_conv2d(make(input), make(offset), make(weight), make(bias), mask=make(mask), **kwargs)


VALID = [
    pytest.param(lambda: call(), id="plain"),
    pytest.param(lambda: call(bias=(6,), mask=MASK), id="mask-and-bias"),
    pytest.param(
        lambda: call(weight=(6, 2, 3, 3), offset=(2, 36, 3, 4), mask=(2, 18, 3, 4)), id="groups-2-offset-groups-2"
    ),
    pytest.param(lambda: call(offset=(2, 18, 5, 6), stride=1, padding=(1, 1), dilation=[1, 1]), id="pairs"),
    pytest.param(lambda: call(offset=(2, 18, 2, 2), stride=2, padding=1, dilation=2), id="stride-dilation"),
]


@pytest.mark.parametrize("valid", VALID)
def test_valid_arguments_reach_the_launch(valid):
    """The stub is what a valid call reaches: the cases below really fail in validation."""
    with pytest.raises(Launched):
        valid()


# (call, argument the message must name, what it got that the message must show)
BAD = [
    # shapes
    pytest.param(lambda: call(offset=(2, 16, 3, 4)), "offset", "16", id="offset-channels-not-2GK"),
    pytest.param(lambda: call(offset=(2, 27, 3, 4)), "offset", "27", id="offset-channels-odd-multiple-of-K"),
    pytest.param(lambda: call(offset=(2, 54, 3, 4)), "offset", "3", id="offset-groups-not-dividing-cin"),
    pytest.param(lambda: call(offset=(2, 18, 5, 6)), "offset", "(5, 6)", id="offset-spatial-not-output"),
    pytest.param(lambda: call(offset=(2, 18, 4, 3)), "offset", "(4, 3)", id="offset-spatial-transposed"),
    pytest.param(lambda: call(mask=(2, 18, 3, 4)), "mask", "(2, 18, 3, 4)", id="mask-channels-not-GK"),
    pytest.param(lambda: call(mask=(2, 9, 4, 3)), "mask", "(2, 9, 4, 3)", id="mask-spatial-not-output"),
    pytest.param(lambda: call(weight=(6, 3, 3, 3)), "weight", "3", id="weight-channels-not-dividing-cin"),
    pytest.param(lambda: call(weight=(6, 8, 3, 3)), "weight", "8", id="weight-channels-above-cin"),
    pytest.param(lambda: call(weight=(5, 2, 3, 3), offset=OFF), "weight", "5", id="cout-not-divisible-by-groups"),
    pytest.param(lambda: call(offset=(3, 18, 3, 4)), "offset", "(3, 18, 3, 4)", id="offset-batch-mismatch"),
    pytest.param(lambda: call(mask=(1, 9, 3, 4)), "mask", "(1, 9, 3, 4)", id="mask-batch-mismatch"),
    pytest.param(lambda: call(bias=(5,)), "bias", "(5,)", id="bias-length-not-cout"),
    pytest.param(
        lambda: call(weight=(6, 4, 7, 3), offset=(2, 42, 1, 4)), "input", "(2, 4, 5, 6)", id="kernel-larger-than-input"
    ),
    # dimensions
    pytest.param(lambda: call(input=(4, 5, 6)), "input", "(4, 5, 6)", id="input-3d"),
    pytest.param(lambda: call(input=(1, 2, 4, 5, 6)), "input", "5-D", id="input-5d"),
    pytest.param(lambda: call(offset=(18, 3, 4)), "offset", "(18, 3, 4)", id="offset-3d"),
    pytest.param(lambda: call(weight=(6, 4, 9)), "weight", "(6, 4, 9)", id="weight-3d"),
    pytest.param(lambda: call(mask=(2, 9, 12)), "mask", "(2, 9, 12)", id="mask-3d"),
    pytest.param(lambda: call(bias=(6, 1)), "bias", "(6, 1)", id="bias-2d"),
    # types and dtypes
    pytest.param(lambda: call(input=[[1.0]]), "input", "list", id="input-not-a-tensor"),
    pytest.param(lambda: call(offset=[[0.0]]), "offset", "list", id="offset-not-a-tensor"),
    pytest.param(lambda: call(weight=None), "weight", "NoneType", id="weight-none"),
    pytest.param(lambda: call(input=t(*X, dtype=torch.int64)), "input", "torch.int64", id="integer-input"),
    pytest.param(lambda: call(offset=t(*OFF, dtype=torch.int32)), "offset", "torch.int32", id="integer-offset"),
    pytest.param(lambda: call(weight=t(*W, dtype=torch.int64)), "weight", "torch.int64", id="integer-weight"),
    pytest.param(lambda: call(mask=t(*MASK, dtype=torch.bool)), "mask", "torch.bool", id="bool-mask"),
    pytest.param(lambda: call(offset=t(*OFF, dtype=torch.float64)), "offset", "float64", id="offset-dtype-mismatch"),
    pytest.param(lambda: call(weight=t(*W, dtype=torch.float16)), "weight", "float16", id="weight-dtype-mismatch"),
    pytest.param(lambda: call(mask=t(*MASK, dtype=torch.bfloat16)), "mask", "torch.bfloat16", id="mask-dtype-mismatch"),
    pytest.param(lambda: call(bias=t(6, dtype=torch.float64)), "bias", "torch.float64", id="bias-dtype-mismatch"),
    # convolution parameters
    pytest.param(lambda: call(padding=-1), "padding", "-1", id="negative-padding"),
    pytest.param(lambda: call(padding=(0, -2)), "padding", "-2", id="negative-padding-pair"),
    pytest.param(lambda: call(stride=0), "stride", "0", id="zero-stride"),
    pytest.param(lambda: call(stride=(1, -1)), "stride", "-1", id="negative-stride"),
    pytest.param(lambda: call(dilation=0), "dilation", "0", id="zero-dilation"),
    pytest.param(lambda: call(stride=1.5), "stride", "1.5", id="float-stride"),
    pytest.param(lambda: call(padding=(1, 1, 1)), "padding", "(1, 1, 1)", id="padding-of-3"),
    pytest.param(lambda: call(dilation="2"), "dilation", "2", id="dilation-string"),
]


@pytest.mark.parametrize("bad, argument, got", BAD)
def test_bad_argument_fails_before_launch(bad, argument, got):
    with pytest.raises((ValueError, TypeError), match=re.escape(argument)) as error:
        bad()
    assert got in str(error.value), f"the message should show what it got ({got!r}): {error.value}"


@pytest.mark.gpu
def test_tensors_on_another_device_fail_before_launch():
    for name in ("offset", "weight", "mask", "bias"):
        shapes = {"offset": OFF, "weight": W, "mask": MASK, "bias": (6,)}
        kwargs = {name: torch.zeros(shapes[name])}  # on the CPU, input on the GPU
        with pytest.raises(ValueError, match=re.escape(name)) as error:
            call(input=torch.zeros(X, device="cuda"), **kwargs)
        assert "cpu" in str(error.value), str(error.value)


def test_torchvisions_own_wrong_sizes_checks_pass():
    """torchvision's test_wrong_sizes: a wrong offset or mask channel count raises RuntimeError with
    its words (a 3x2 kernel, 2 weight groups), as code catching torchvision's errors expects."""
    layer = stn_triton.DeformConv2d(6, 2, (3, 2), groups=2)
    x = t(10, 6, 5, 4)
    offset = t(10, 2 * 3 * 2, 3, 3)
    with pytest.raises(RuntimeError, match="the shape of the offset"):
        layer(x, offset[:, :2])
    with pytest.raises(RuntimeError, match=r"mask.shape\[1\] is not valid"):
        layer(x, offset, t(10, 2, 3, 3))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: call(weight=t(*W, dtype=torch.float64)), id="weight-float64"),
    pytest.param(lambda: call(offset=t(*OFF, dtype=torch.float16)), id="offset-float16"),
    pytest.param(lambda: call(offset=(2, 17, 3, 4)), id="offset-channels"),
    pytest.param(lambda: call(weight=(6, 3, 3, 3)), id="weight-groups"),
    pytest.param(lambda: call(mask=(2, 9, 3, 5)), id="mask-spatial"),
])
def test_errors_are_runtime_errors_as_torchvisions(make):
    """torchvision raises RuntimeError for these (its C++ checks); stn_triton's errors are one too."""
    with pytest.raises(RuntimeError):
        make()
