"""``stn_triton.swap``: ``F.grid_sample``, ``F.affine_grid`` and torchvision's ``deform_conv2d``
routed to stn_triton for a whole program.

Routed calls must reach stn_triton's functions and equal PyTorch's results; every argument that
stn_triton would reject or treat differently must reach the saved original with the same outcome
(result or exception, and warnings) as the original called directly; ``revert`` must put back
the identical objects. Spies stand in for the originals (put in place before ``apply``, so it
saves them) and for stn_triton's functions. torchvision's routing runs against a fake
torchvision with its module layout (real torchvision is not installed on the CPU machines), and
against the real one where it is installed.
"""

import contextlib
import inspect
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.nn.modules.utils import _pair

import stn_triton
from conftest import DEVICE, ON_GPU, generator, rand
from stn_triton import fallback, functional, swap

BACKEND_MODULE = sys.modules["stn_triton.backend"]

# PyTorch's own, from the scripting tests and from forward AD's first use.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


@pytest.fixture(autouse=True)
def nothing_left_swapped(monkeypatch):
    """A failing test must not leave the swap on for the next one. It reverts before monkeypatch
    (set up first, so torn down last) puts back what the recorders replaced."""
    yield
    swap.revert()


def record_calls(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` with a function that records each call and then makes it."""
    calls = []
    target = getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return target(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


@pytest.fixture
def originals(monkeypatch) -> types.SimpleNamespace:
    """Calls reaching PyTorch's functions: recorders put in their place before ``apply`` saves them."""
    return types.SimpleNamespace(
        grid_sample=record_calls(monkeypatch, F, "grid_sample"),
        affine_grid=record_calls(monkeypatch, F, "affine_grid"),
    )


@pytest.fixture
def ours(monkeypatch) -> types.SimpleNamespace:
    """Calls reaching stn_triton's functions."""
    return types.SimpleNamespace(
        grid_sample=record_calls(monkeypatch, functional, "grid_sample"),
        affine_grid=record_calls(monkeypatch, functional, "affine_grid"),
        deform_conv2d=record_calls(monkeypatch, functional, "deform_conv2d"),
    )


@contextlib.contextmanager
def plain_pytorch_backend():
    """CPU tensors take stn_triton's plain-PyTorch fallback, as on a CPU without TRITON_INTERPRET=1."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(BACKEND_MODULE, "INTERPRETING", False)
        yield


def image(shape=(2, 3, 5, 6), seed=0, dtype=torch.float64, device=DEVICE) -> torch.Tensor:
    return rand(shape, generator(seed), dtype=dtype, device=device)


def sampling_grid(shape=(2, 4, 3, 2), seed=1, dtype=torch.float64, device=DEVICE) -> torch.Tensor:
    """Normalized points in [-1.2, 1.2): inside the image, and some outside for the padding."""
    return rand(shape, generator(seed), -1.2, 1.2, dtype=dtype, device=device)


def affine_theta(n=2, nd=2, seed=2, dtype=torch.float64, device=DEVICE) -> torch.Tensor:
    """theta [n, nd, nd + 1]: the identity plus up to 0.3 of rotation, scale, shear and shift."""
    noise = rand((n, nd, nd + 1), generator(seed), -0.3, 0.3, device="cpu")
    return (torch.eye(nd, nd + 1, dtype=torch.float64) + noise).to(dtype=dtype, device=device)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """An affine spatial transformer as user code writes it: F's functions looked up at call time."""
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], 4, 5], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --- apply routes to stn_triton -------------------------------------------------------------------


@pytest.mark.parametrize(
    "input_shape, grid_shape, mode, padding_mode, align_corners",
    [
        pytest.param((2, 3, 5, 6), (2, 4, 3, 2), "bilinear", "zeros", False, id="2d-bilinear-zeros"),
        pytest.param((2, 3, 5, 6), (2, 4, 3, 2), "bicubic", "reflection", True, id="2d-bicubic-reflection"),
        pytest.param((2, 2, 3, 4, 5), (2, 2, 3, 4, 3), "nearest", "border", False, id="3d-nearest-border"),
    ],
)
def test_grid_sample_routes_to_stn_triton(originals, ours, input_shape, grid_shape, mode, padding_mode, align_corners):
    x = image(input_shape).requires_grad_()
    grid = sampling_grid(grid_shape).requires_grad_()
    expected = F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    expected_grads = torch.autograd.grad(expected.sum(), (x, grid))
    originals.grid_sample.clear()

    with swap.swapped():
        out = F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    grads = torch.autograd.grad(out.sum(), (x, grid))

    assert len(ours.grid_sample) == 1 and not originals.grid_sample
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, expected_grads)


def test_grid_sample_routes_mixed_dtypes_under_autocast(originals, ours):
    """Inside autocast stn_triton follows PyTorch's dtype rule, so a mixed-dtype call is routed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, grid = image(dtype=torch.bfloat16, device=device), sampling_grid(dtype=torch.float32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = F.grid_sample(x, grid, align_corners=False)
        originals.grid_sample.clear()
        with swap.swapped():
            out = F.grid_sample(x, grid, align_corners=False)
    assert len(ours.grid_sample) == 1 and not originals.grid_sample
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_grid_sample_routes_positional_and_keyword_calls(originals, ours):
    x, grid = image(), sampling_grid()
    expected = F.grid_sample(x, grid, "nearest", "border", True)
    originals.grid_sample.clear()

    with swap.swapped():
        positional = F.grid_sample(x, grid, "nearest", "border", True)
        keywords = torch.nn.functional.grid_sample(
            align_corners=True, padding_mode="border", mode="nearest", grid=grid, input=x
        )

    assert len(ours.grid_sample) == 2 and not originals.grid_sample
    torch.testing.assert_close(positional, expected)
    torch.testing.assert_close(keywords, expected)


@pytest.mark.parametrize(
    "size, align_corners",
    [
        pytest.param((2, 3, 4, 5), False, id="2d"),
        pytest.param(torch.Size((2, 3, 4, 5)), True, id="2d-torch-size-align"),
        pytest.param([2, 3, 2, 3, 4], False, id="3d-list"),
    ],
)
def test_affine_grid_routes_to_stn_triton(originals, ours, size, align_corners):
    # A parameter, as a spatial transformer's theta often is: it carries no __torch_function__.
    theta = torch.nn.Parameter(affine_theta(nd=len(size) - 2))
    expected = F.affine_grid(theta, size, align_corners=align_corners)
    originals.affine_grid.clear()

    with swap.swapped():
        grid = F.affine_grid(theta, size, align_corners=align_corners)

    assert len(ours.affine_grid) == 1 and not originals.affine_grid
    torch.testing.assert_close(grid, expected)


def test_affine_grid_routes_unit_sizes_with_pytorchs_warning(originals, ours):
    """F.affine_grid warns about unit-size grids with align_corners=True; stn_triton warns the same."""
    theta = affine_theta()
    with pytest.warns(UserWarning) as expected_warnings:
        expected = F.affine_grid(theta, [2, 3, 1, 5], align_corners=True)
    originals.affine_grid.clear()
    with swap.swapped(), pytest.warns(UserWarning) as actual_warnings:
        grid = F.affine_grid(theta, [2, 3, 1, 5], align_corners=True)
    assert len(ours.affine_grid) == 1 and not originals.affine_grid
    assert [str(w.message) for w in actual_warnings] == [str(w.message) for w in expected_warnings]
    torch.testing.assert_close(grid, expected)


def test_wrappers_carry_the_originals_signature_and_docs():
    originals = F.grid_sample, F.affine_grid
    with swap.swapped():
        for wrapper, original in zip((F.grid_sample, F.affine_grid), originals):
            assert wrapper is not original
            assert wrapper.__wrapped__ is original
            assert wrapper.__name__ == original.__name__ and wrapper.__doc__ == original.__doc__
            assert inspect.signature(wrapper) == inspect.signature(original)


# --- revert, idempotence, the context manager -----------------------------------------------------


def test_revert_restores_the_identical_objects():
    originals = F.grid_sample, F.affine_grid
    swap.revert()  # nothing applied: harmless
    assert (F.grid_sample, F.affine_grid) == originals

    swap.apply()
    wrappers = F.grid_sample, F.affine_grid
    assert wrappers[0] is not originals[0] and wrappers[1] is not originals[1]
    swap.apply()  # again: harmless, the same wrappers stay
    assert F.grid_sample is wrappers[0] and F.affine_grid is wrappers[1]

    swap.revert()
    assert F.grid_sample is originals[0] and F.affine_grid is originals[1]
    swap.revert()
    assert F.grid_sample is originals[0] and F.affine_grid is originals[1]


def test_swapped_reverts_on_exception():
    originals = F.grid_sample, F.affine_grid
    with pytest.raises(RuntimeError, match="inside the block"):
        with swap.swapped():
            assert F.grid_sample is not originals[0] and F.affine_grid is not originals[1]
            raise RuntimeError("inside the block")
    assert F.grid_sample is originals[0] and F.affine_grid is originals[1]


def test_swapped_after_a_revert_inside_it_leaves_nothing_swapped():
    originals = F.grid_sample, F.affine_grid
    with swap.swapped():
        swap.revert()
    assert F.grid_sample is originals[0] and F.affine_grid is originals[1]


def test_swapped_inside_apply_leaves_the_swap_on():
    originals = F.grid_sample, F.affine_grid
    swap.apply()
    wrappers = F.grid_sample, F.affine_grid
    with swap.swapped():
        assert F.grid_sample is wrappers[0] and F.affine_grid is wrappers[1]
    assert F.grid_sample is wrappers[0] and F.affine_grid is wrappers[1]
    swap.revert()
    assert F.grid_sample is originals[0] and F.affine_grid is originals[1]


# --- what stn_triton does not promise goes to the original -----------------------------------------


class Tagged(torch.Tensor):
    """A tensor subclass with PyTorch's default ``__torch_function__``."""


@contextlib.contextmanager
def forward_ad_level():
    """Forward-mode AD: stn_triton would drop the tangent where PyTorch raises."""
    with forward_ad.dual_level():
        yield


@contextlib.contextmanager
def autocast():
    """Autocast on the tests' device: mixed floating dtypes are fine there, an integer grid is not."""
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        yield


def outcome(fn, make_arguments, setting) -> tuple:
    """What ``fn`` does with the case's arguments, under its setting: its result or its exception,
    and the warnings it gave."""
    with setting():
        args, kwargs = make_arguments()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result = fn(*args, **kwargs)
            except Exception as error:  # the original's own error is the outcome to compare
                result = (type(error), str(error))
    return result, [(w.category, str(w.message)) for w in caught]


def assert_same_outcome(actual, expected):
    (result, warned), (expected_result, expected_warned) = actual, expected
    assert warned == expected_warned
    if not isinstance(expected_result, torch.Tensor):
        assert result == expected_result
        return
    assert type(result) is type(expected_result)
    assert (result.dtype, result.device, result.shape) == (
        expected_result.dtype, expected_result.device, expected_result.shape
    )
    if result.device.type != "meta":
        assert torch.equal(result, expected_result)


def arguments(*args, **kwargs):
    return args, kwargs


def unsupported(case_id, make_arguments, setting=contextlib.nullcontext):
    return pytest.param(make_arguments, setting, id=case_id)


GRID_SAMPLE_UNSUPPORTED = [
    unsupported("align-corners-default-warns", lambda: arguments(image(), sampling_grid())),
    unsupported("align-corners-none", lambda: arguments(image(), sampling_grid(), align_corners=None)),
    unsupported("align-corners-int", lambda: arguments(image(), sampling_grid(), align_corners=1)),
    unsupported("integer-grid-under-autocast", lambda: arguments(
        image(dtype=torch.float32), sampling_grid(dtype=torch.float32).long(), align_corners=False), autocast),
    unsupported("grid-dtype-differs", lambda: arguments(
        image(), sampling_grid(dtype=torch.float32), align_corners=False)),
    unsupported("grid-on-meta", lambda: arguments(image(), sampling_grid(device="meta"), align_corners=False)),
    unsupported("meta-tensors", lambda: arguments(
        image(device="meta"), sampling_grid(device="meta"), align_corners=False)),
    unsupported("integer-tensors", lambda: arguments(image().long(), sampling_grid().long(), align_corners=False)),
    unsupported("input-a-list", lambda: arguments(image().tolist(), sampling_grid(), align_corners=False)),
    unsupported("extra-keyword", lambda: arguments(image(), sampling_grid(), align_corners=False, antialias=True)),
    unsupported("extra-positional", lambda: arguments(image(), sampling_grid(), "bilinear", "zeros", False, None)),
    unsupported("mode-unknown", lambda: arguments(image(), sampling_grid(), mode="area", align_corners=False)),
    unsupported("padding-unknown", lambda: arguments(
        image(), sampling_grid(), padding_mode="circular", align_corners=False)),
    unsupported("3d-bicubic", lambda: arguments(
        image((2, 2, 3, 4, 5)), sampling_grid((2, 2, 3, 4, 3)), mode="bicubic", align_corners=False)),
    unsupported("3d-input", lambda: arguments(image((2, 3, 5)), sampling_grid((2, 4, 2)), align_corners=False)),
    unsupported("grid-rank-differs", lambda: arguments(image(), sampling_grid((2, 2, 4, 3, 2)), align_corners=False)),
    unsupported("grid-last-dim", lambda: arguments(image(), sampling_grid((2, 4, 3, 3)), align_corners=False)),
    unsupported("batch-differs", lambda: arguments(image(), sampling_grid((1, 4, 3, 2)), align_corners=False)),
    unsupported("empty-input-side", lambda: arguments(image((2, 3, 0, 6)), sampling_grid(), align_corners=False)),
    unsupported("cpu-plain-pytorch", lambda: arguments(
        image(device="cpu"), sampling_grid(device="cpu"), align_corners=False), plain_pytorch_backend),
    unsupported("forward-mode-ad", lambda: arguments(
        forward_ad.make_dual(image(), torch.ones_like(image())), sampling_grid(), align_corners=False),
        forward_ad_level),
]


AFFINE_GRID_UNSUPPORTED = [
    unsupported("align-corners-default-warns", lambda: arguments(affine_theta(), [2, 3, 4, 5])),
    unsupported("align-corners-int", lambda: arguments(affine_theta(), [2, 3, 4, 5], align_corners=0)),
    unsupported("size-zero", lambda: arguments(affine_theta(), [2, 3, 0, 5], align_corners=False)),
    unsupported("size-3-entries", lambda: arguments(affine_theta(), [2, 3, 4], align_corners=False)),
    unsupported("size-6-entries", lambda: arguments(affine_theta(), [2, 3, 4, 5, 6, 7], align_corners=False)),
    unsupported("size-a-tensor", lambda: arguments(affine_theta(), torch.tensor([2, 3, 4, 5]), align_corners=False)),
    unsupported("size-bools", lambda: arguments(affine_theta(), [2, True, 4, 5], align_corners=False)),
    unsupported("size-floats", lambda: arguments(affine_theta(), [2, 3, 4.0, 5], align_corners=False)),
    unsupported("theta-shape-for-3d", lambda: arguments(affine_theta(nd=3), [2, 3, 4, 5], align_corners=False)),
    unsupported("theta-batch-differs", lambda: arguments(affine_theta(n=1), [2, 3, 4, 5], align_corners=False)),
    unsupported("theta-2d", lambda: arguments(affine_theta()[0], [2, 3, 4, 5], align_corners=False)),
    unsupported("theta-integer", lambda: arguments(affine_theta().long(), [2, 3, 4, 5], align_corners=False)),
    unsupported("theta-a-list", lambda: arguments(affine_theta().tolist(), [2, 3, 4, 5], align_corners=False)),
    unsupported("theta-on-meta", lambda: arguments(affine_theta(device="meta"), [2, 3, 4, 5], align_corners=False)),
    unsupported("extra-keyword", lambda: arguments(affine_theta(), [2, 3, 4, 5], align_corners=False, dtype=None)),
    unsupported("cpu-plain-pytorch", lambda: arguments(affine_theta(device="cpu"), [2, 3, 4, 5], align_corners=False),
                plain_pytorch_backend),
]


@pytest.mark.parametrize(
    "name, make_arguments, setting",
    [pytest.param("grid_sample", *case.values, id=f"grid_sample-{case.id}") for case in GRID_SAMPLE_UNSUPPORTED]
    + [pytest.param("affine_grid", *case.values, id=f"affine_grid-{case.id}") for case in AFFINE_GRID_UNSUPPORTED],
)
def test_unsupported_arguments_reach_the_original(originals, ours, name, make_arguments, setting):
    expected = outcome(getattr(F, name), make_arguments, setting)
    getattr(originals, name).clear()

    with swap.swapped():
        actual = outcome(getattr(F, name), make_arguments, setting)

    assert len(getattr(originals, name)) == 1 and not getattr(ours, name)
    assert_same_outcome(actual, expected)


def test_torch_function_subclasses_take_pytorchs_protocol(originals, ours):
    """The original runs ``__torch_function__``. It hands the subclass the function as F names it
    now, the wrapper; PyTorch's default handler calls that with the protocol disabled, so that
    inner call routes, and the subclass wraps the result."""
    x, grid, theta = image().as_subclass(Tagged), sampling_grid(), affine_theta().as_subclass(Tagged)
    expected = F.grid_sample(x, grid, align_corners=False), F.affine_grid(theta, [2, 3, 4, 5], align_corners=False)
    originals.grid_sample.clear()
    originals.affine_grid.clear()

    with swap.swapped():
        actual = F.grid_sample(x, grid, align_corners=False), F.affine_grid(theta, [2, 3, 4, 5], align_corners=False)

    assert len(originals.grid_sample) == len(ours.grid_sample) == 1
    assert len(originals.affine_grid) == len(ours.affine_grid) == 1
    assert all(type(t) is Tagged for t in actual)
    torch.testing.assert_close([t.as_subclass(torch.Tensor) for t in actual],
                               [t.as_subclass(torch.Tensor) for t in expected])


def test_torch_func_transforms_reach_the_original(originals, ours):
    """stn_triton's autograd does not support torch.func's transforms; PyTorch's does."""
    x, grid = image(), sampling_grid()
    jacobian = torch.func.jacrev(lambda x: F.grid_sample(x, grid, align_corners=False))
    batched = torch.func.vmap(lambda x, grid: F.grid_sample(x[None], grid[None], align_corners=False))
    expected = jacobian(x), batched(x, grid)
    originals.grid_sample.clear()

    with swap.swapped():
        actual = jacobian(x), batched(x, grid)

    assert len(originals.grid_sample) == 2 and not ours.grid_sample
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated", "ignore::torch.jit.TracerWarning")
def test_jit_trace_records_pytorchs_ops(originals, ours):
    """A trace (and so a legacy ONNX export) keeps aten::grid_sampler, not stn_triton's op."""
    x, theta = image(), affine_theta()
    expected = warp(x, theta)

    with swap.swapped():
        traced = torch.jit.trace(warp, (x, theta), check_trace=False)

    assert not ours.grid_sample and not ours.affine_grid
    graph = str(traced.inlined_graph)
    assert "aten::grid_sampler" in graph and "aten::affine_grid_generator" in graph
    torch.testing.assert_close(traced(x, theta), expected)


# --- TorchScript and torch.compile ------------------------------------------------------------------


def test_script_while_swapped_compiles_pytorchs_functions(ours):
    x, theta = image(), affine_theta()
    expected = warp(x, theta)

    with swap.swapped():
        scripted = torch.jit.script(warp)
        scripted_directly = torch.jit.script(F.grid_sample)
        inside = scripted(x, theta)
    after = scripted(x, theta)

    graph = str(scripted.inlined_graph)
    assert "aten::grid_sampler" in graph and "aten::affine_grid_generator" in graph
    assert not ours.grid_sample and not ours.affine_grid
    torch.testing.assert_close(inside, expected, rtol=0, atol=0)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    grid = F.affine_grid(theta, [2, 3, 4, 5], align_corners=False)
    torch.testing.assert_close(scripted_directly(x, grid, "bilinear", "border", False),
                               F.grid_sample(x, grid, padding_mode="border", align_corners=False), rtol=0, atol=0)


def test_torch_compile_traces_the_wrappers(monkeypatch):
    """fullgraph: the wrappers' checks trace without a graph break, and the calls reach stn_triton's
    functions. On a GPU they trace into the kernels; on a CPU the interpreter cannot run on
    torch.compile's fake tensors, so PyTorch's functions stand in for stn_triton's there."""
    x, theta = image(), affine_theta()
    expected = warp(x, theta)
    routed = []

    def stand_in(pytorchs):
        def routed_call(*args):
            routed.append(pytorchs.__name__)
            return pytorchs(*args)

        return routed_call

    if not ON_GPU:
        monkeypatch.setattr(functional, "grid_sample", stand_in(F.grid_sample))
        monkeypatch.setattr(functional, "affine_grid", stand_in(F.affine_grid))

    with swap.swapped():
        out = torch.compile(warp, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")(x, theta)

    if not ON_GPU:
        assert sorted(routed) == ["affine_grid", "grid_sample"]
    torch.testing.assert_close(out, expected)


# --- torchvision -----------------------------------------------------------------------------------


@pytest.fixture
def fake_torchvision(monkeypatch) -> types.ModuleType:
    """torchvision's layout: ``ops.deform_conv2d`` is ``ops.deform_conv.deform_conv2d``, and
    ``ops.DeformConv2d.forward`` calls its module's ``deform_conv2d``, looked up when it runs (as
    torchvision's does). stn_triton's plain-PyTorch reference stands in for torchvision's op."""
    torchvision = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    deform_conv = types.ModuleType("torchvision.ops.deform_conv")

    def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), mask=None):
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        return fallback.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)

    class DeformConv2d(stn_triton.DeformConv2d):
        def forward(self, input, offset, mask=None):
            return deform_conv.deform_conv2d(
                input, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                dilation=self.dilation, mask=mask,
            )

    deform_conv.deform_conv2d, deform_conv.DeformConv2d = deform_conv2d, DeformConv2d
    ops.deform_conv, ops.deform_conv2d, ops.DeformConv2d = deform_conv, deform_conv2d, DeformConv2d
    torchvision.ops = ops
    for module in (torchvision, ops, deform_conv):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return torchvision


def deform_conv_arguments(dtype=torch.float64, device=DEVICE) -> dict:
    """A 3x3 deformable convolution, padding 1, 2 weight groups, 2 offset groups, with mask and
    bias: input [2, 4, 5, 6] -> [2, 6, 5, 6]."""
    gen = generator(3)
    tensors = dict(
        input=rand((2, 4, 5, 6), gen),
        offset=rand((2, 2 * 2 * 9, 5, 6), gen, -2.0, 2.0),
        weight=rand((6, 2, 3, 3), gen),
        bias=rand((6,), gen),
        mask=rand((2, 2 * 9, 5, 6), gen, 0.0, 1.0),
    )
    return {name: t.to(dtype=dtype, device=device) for name, t in tensors.items()} | dict(padding=1)


def test_fake_torchvision_deform_conv2d_routes_and_reverts(fake_torchvision, ours):
    ops = fake_torchvision.ops
    original = ops.deform_conv2d
    args = deform_conv_arguments()
    expected = original(**args)

    swap.apply()
    assert ops.deform_conv2d is not original
    assert ops.deform_conv2d is ops.deform_conv.deform_conv2d  # one function under both names, as before
    out = ops.deform_conv2d(**args)
    module = ops.DeformConv2d(4, 6, 3, padding=1, groups=2).to(dtype=torch.float64, device=DEVICE)
    module_out = module(args["input"], args["offset"], args["mask"])
    swap.revert()

    assert len(ours.deform_conv2d) == 2
    assert ops.deform_conv2d is original and ops.deform_conv.deform_conv2d is original
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(module_out, original(
        args["input"], args["offset"], module.weight, module.bias, padding=1, mask=args["mask"]))


def test_fake_torchvision_deform_conv2d_routes_under_cuda_autocast_only(fake_torchvision, ours):
    """Inside CUDA autocast torchvision computes in float32 and returns the input's dtype; so does
    stn_triton, and the call routes. Its autocast kernel is registered for CUDA only: under CPU
    autocast a bfloat16 input reaches torchvision's CPU kernel, which rejects it, so the call must
    reach the original there."""
    args = deform_conv_arguments(torch.float32)
    device_type = torch.device(DEVICE).type
    with swap.swapped(), torch.autocast(device_type, dtype=torch.bfloat16):
        out = fake_torchvision.ops.deform_conv2d(**args | dict(input=args["input"].bfloat16()))
    if device_type != "cuda":
        assert not ours.deform_conv2d, "CPU autocast: torchvision's behaviour, not stn_triton's"
        return
    assert ours.deform_conv2d, "routed to stn_triton"
    assert out.dtype == torch.bfloat16
    expected = fallback.deform_conv2d(args["input"].bfloat16().double(), args["offset"].double(),
                                       args["weight"].double(), args["bias"].double(), (1, 1), (1, 1), (1, 1),
                                       args["mask"].double())
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=8e-3)


def replaced(args: dict, **changes) -> tuple[tuple, dict]:
    return (), args | changes


DEFORM_CONV_UNSUPPORTED = [
    unsupported("bfloat16", lambda: replaced(deform_conv_arguments(torch.bfloat16))),
    unsupported("weight-dtype-differs", lambda: replaced(
        deform_conv_arguments(), weight=deform_conv_arguments(torch.float32)["weight"])),
    unsupported("mask-on-meta", lambda: replaced(
        deform_conv_arguments(), mask=deform_conv_arguments(device="meta")["mask"])),
    unsupported("integer-input", lambda: replaced(
        deform_conv_arguments(), input=deform_conv_arguments()["input"].long())),
    unsupported("weight-a-list", lambda: replaced(
        deform_conv_arguments(), weight=deform_conv_arguments()["weight"].tolist())),
    unsupported("torch-function-subclass", lambda: replaced(
        deform_conv_arguments(), offset=deform_conv_arguments()["offset"].as_subclass(Tagged))),
    unsupported("mask-shape", lambda: replaced(
        deform_conv_arguments(), mask=deform_conv_arguments()["mask"][:, :9])),
    unsupported("bias-broadcasts", lambda: replaced(
        deform_conv_arguments(), bias=deform_conv_arguments()["bias"][:1])),
    unsupported("offset-channels", lambda: replaced(
        deform_conv_arguments(), offset=deform_conv_arguments()["offset"][:, :17])),
    unsupported("stride-zero", lambda: replaced(deform_conv_arguments(), stride=0)),
    unsupported("stride-three-entries", lambda: replaced(deform_conv_arguments(), stride=(1, 1, 1))),
    unsupported("padding-float", lambda: replaced(deform_conv_arguments(), padding=1.0)),
    unsupported("extra-keyword", lambda: replaced(deform_conv_arguments(), groups=2)),
    unsupported("cpu-plain-pytorch", lambda: replaced(deform_conv_arguments(device="cpu")), plain_pytorch_backend),
]


@pytest.mark.parametrize("make_arguments, setting", DEFORM_CONV_UNSUPPORTED)
def test_unsupported_deform_conv2d_arguments_reach_the_original(
    fake_torchvision, monkeypatch, ours, make_arguments, setting
):
    ops = fake_torchvision.ops
    original_calls = record_calls(monkeypatch, ops, "deform_conv2d")
    expected = outcome(ops.deform_conv2d, make_arguments, setting)
    original_calls.clear()

    with swap.swapped():
        actual = outcome(ops.deform_conv2d, make_arguments, setting)

    assert len(original_calls) == 1 and not ours.deform_conv2d
    assert_same_outcome(actual, expected)


def test_torchvision_deform_conv2d_routes_scripts_and_reverts(ours):
    torchvision = pytest.importorskip("torchvision")
    ops = torchvision.ops
    original = ops.deform_conv2d
    args = deform_conv_arguments()
    module = ops.DeformConv2d(4, 6, 3, padding=1, groups=2).to(dtype=torch.float64, device=DEVICE)
    expected = original(**args)
    expected_module = module(args["input"], args["offset"], args["mask"])

    with swap.swapped():
        assert ops.deform_conv2d is not original and ops.deform_conv.deform_conv2d is ops.deform_conv2d
        out = ops.deform_conv2d(**args)
        module_out = module(args["input"], args["offset"], args["mask"])
        scripted = torch.jit.script(module)
        scripted_out = scripted(args["input"], args["offset"], args["mask"])

    assert len(ours.deform_conv2d) == 2
    assert ops.deform_conv2d is original and ops.deform_conv.deform_conv2d is original
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(module_out, expected_module)
    torch.testing.assert_close(scripted_out, expected_module, rtol=0, atol=0)
