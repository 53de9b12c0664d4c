"""Realistic sizes and CUDA-only features (torch.compile, CUDA graphs, 64-bit indexing).

Every test here is marked ``gpu`` and skipped without CUDA.
"""

import pytest
import torch
import torch.nn.functional as F

import stn_triton
from conftest import (
    LOW_PRECISION,
    MODES_2D,
    MODES_3D,
    PADDING_MODES,
    assert_close_scaled,
    assert_within_low_precision_rule,
    generator,
    rand,
    randn,
    run_with_grads,
)

pytestmark = pytest.mark.gpu

CUDA = "cuda"
# (n, c, size_in, size_out): the sizes of a real spatial transformer layer.
REALISTIC = {2: (8, 64, (128, 128), (96, 160)), 3: (4, 4, (32, 32, 32), (24, 40, 32))}
MODES = {2: MODES_2D, 3: MODES_3D}


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 everywhere, so float32 references are float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def realistic_inputs(nd, seed, dtype):
    n, c, size_in, size_out = REALISTIC[nd]
    gen = generator(seed)
    x = randn((n, c, *size_in), gen, dtype, CUDA)
    grid = rand((n, *size_out, nd), gen, -1.3, 1.3, dtype, CUDA)
    grad_output = randn((n, c, *size_out), gen, dtype, CUDA)
    return x, grid, grad_output


def align_id(align_corners):
    return "align" if align_corners else "noalign"


REALISTIC_CASES = [
    pytest.param(nd, mode, padding, align, id=f"{nd}d-{mode}-{padding}-{align_id(align)}")
    for nd in (2, 3)
    for mode in MODES[nd]
    for padding in PADDING_MODES
    for align in (False, True)
]


@pytest.mark.slow
@pytest.mark.parametrize("nd, mode, padding_mode, align_corners", REALISTIC_CASES)
def test_realistic_float32_matches_torch(nd, mode, padding_mode, align_corners):
    x, grid, grad_output = realistic_inputs(nd, 1, torch.float32)
    ours = run_with_grads(stn_triton.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners)
    expected = run_with_grads(F.grid_sample, x, grid, grad_output, mode, padding_mode, align_corners)
    torch.testing.assert_close(ours[0], expected[0], atol=1e-5, rtol=1e-5)
    assert_close_scaled(ours[1], expected[1], 1e-4, "grad input")
    assert_close_scaled(ours[2], expected[2], 1e-4, "grad grid")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    "nd, mode", [pytest.param(nd, mode, id=f"{nd}d-{mode}") for nd in (2, 3) for mode in MODES[nd]]
)
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_realistic_low_precision_within_twice_torch_error(dtype, nd, mode, padding_mode):
    x, grid, grad_output = realistic_inputs(nd, 2, dtype)
    ours = run_with_grads(stn_triton.grid_sample, x, grid, grad_output, mode, padding_mode, False)
    torch_own = run_with_grads(F.grid_sample, x, grid, grad_output, mode, padding_mode, False)
    as_double = (t.double() for t in (x, grid, grad_output))
    reference = run_with_grads(F.grid_sample, *as_double, mode, padding_mode, False)
    for what, a, t, r in zip(("output", "grad input", "grad grid"), ours, torch_own, reference):
        assert_within_low_precision_rule(a, t, r, dtype, what)


def spatial_transformer(x, theta):
    """An STN's sampling step: the grid of theta over x's own size, sampled bilinearly."""
    grid = stn_triton.affine_grid(theta, x.shape, align_corners=False)
    return stn_triton.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("nd", [2, 3])
def test_torch_compile_fullgraph_matches_eager(nd):
    n, c, size_in, _ = REALISTIC[nd]
    gen = generator(3)
    x = randn((n, c, *size_in), gen, torch.float32, CUDA)
    theta = (torch.eye(nd, nd + 1, dtype=torch.float64) + rand((n, nd, nd + 1), gen, -0.3, 0.3, device="cpu")).to(
        dtype=torch.float32, device=CUDA
    )
    compiled = torch.compile(spatial_transformer, fullgraph=True, dynamic=False)
    results = []
    for fn in (compiled, spatial_transformer):
        x_leaf = x.detach().clone().requires_grad_()
        theta_leaf = theta.detach().clone().requires_grad_()
        out = fn(x_leaf, theta_leaf)
        (out * out).sum().backward()
        results.append((out.detach(), x_leaf.grad, theta_leaf.grad))
    for what, a, e in zip(("output", "grad input", "grad theta"), *results):
        assert_close_scaled(a, e, 1e-5, what)


@pytest.mark.parametrize(
    "nd, mode",
    [
        pytest.param(2, "bilinear", id="2d-bilinear"),
        pytest.param(2, "bicubic", id="2d-bicubic"),
        pytest.param(3, "nearest", id="3d-nearest"),
    ],
)
def test_cuda_graph_replay_sees_new_values(nd, mode):
    x_static, grid_static, _ = realistic_inputs(nd, 4, torch.float32)
    kwargs = dict(mode=mode, padding_mode="reflection", align_corners=True)
    # Warm up on a side stream: compiles and autotunes outside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            stn_triton.grid_sample(x_static, grid_static, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = stn_triton.grid_sample(x_static, grid_static, **kwargs)
    for seed in (5, 6):
        x_new, grid_new, _ = realistic_inputs(nd, seed, torch.float32)
        x_static.copy_(x_new)
        grid_static.copy_(grid_new)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out_static, F.grid_sample(x_new, grid_new, **kwargs), atol=1e-5, rtol=1e-5)


def _bilinear_reference(x, py, px):
    """Bilinear samples of x [1, C, H, W] at pixel coordinates (py, px), zeros padding, in float64.

    Returns values [C, P] and the taps as (y, x, weight [P]) for the gradient check.
    """
    _, _, h, w = x.shape
    y0, x0 = py.floor().long(), px.floor().long()
    wy, wx = py - y0, px - x0
    values = torch.zeros(x.shape[1], py.numel(), dtype=torch.float64, device=x.device)
    taps = []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        ty, tx = y0 + dy, x0 + dx
        weight = (wy if dy else 1 - wy) * (wx if dx else 1 - wx)
        inside = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        weight = torch.where(inside, weight, torch.zeros_like(weight))
        values += weight * x[0, :, ty.clamp(0, h - 1), tx.clamp(0, w - 1)].double()
        taps.append((ty, tx, weight))
    return values, taps


@pytest.mark.slow
def test_more_than_2_pow_31_elements_index_in_64_bits():
    """A [1, 3, 32769, 32769] float16 input: channel 2 starts past element 2^31.

    With align_corners=True and sides of 2^15 + 1 a pixel coordinate is (g + 1) * 2^14 exactly
    in float32, so a manual float64 gather is an exact reference.
    """
    side = 2**15 + 1
    channels = 3
    # bytes per element: input 2, a float32 gradient accumulator 4, the float16 gradient 2, a bool 1
    needed = 9 * channels * side * side
    free, _ = torch.cuda.mem_get_info()
    if free < needed + 4 * 2**30:
        pytest.skip(f"needs {needed / 2**30:.1f} GiB + 4 GiB free on the GPU, has {free / 2**30:.1f} GiB")
    assert channels * side * side > 2**31
    gen = generator(7)
    x = torch.empty((1, channels, side, side), dtype=torch.float16, device=CUDA).uniform_(-1, 1)
    # Near the centre, where float16 grid values resolve 1/8 pixel; then the far corners.
    sign = torch.randint(0, 2, (2, 24), generator=gen) * 2 - 1
    near_centre = sign * (2.0**-7 + torch.randint(0, 1024, (2, 24), generator=gen) * 2.0**-17)
    corners = torch.tensor(
        [
            [1.0, 1.0 - 2**-11, 1.0, -1.0, 1.0 - 5 * 2**-11, 0.75, -1.0, 1.0],
            [1.0, 1.0, 1.0 - 2**-10, -1.0, 1.0 - 3 * 2**-11, 0.9375, 1.0, -1.0],
        ]
    )
    coords = torch.cat([near_centre, corners], dim=1).to(torch.float16)  # [2 (x, y), 32]
    grid = coords.t().reshape(1, 4, 8, 2).to(CUDA)
    grad_output = randn((1, channels, 4, 8), gen, torch.float16, CUDA)

    x_leaf = x.requires_grad_()
    out = stn_triton.grid_sample(x_leaf, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out.backward(grad_output)

    px = (coords[0].double() + 1) * 2**14
    py = (coords[1].double() + 1) * 2**14
    expected, taps = _bilinear_reference(x.detach(), py.to(CUDA), px.to(CUDA))
    torch.testing.assert_close(out.reshape(channels, -1).double(), expected, atol=2e-3, rtol=2e-3)

    # The gradient lands on exactly the taps read, with the bilinear weights.
    expected_grad = {}
    go = grad_output.reshape(channels, -1).double()
    for ty, tx, weight in taps:
        for p in range(weight.numel()):
            if weight[p] == 0:
                continue
            for c in range(channels):
                key = (c, ty[p].item(), tx[p].item())
                expected_grad[key] = expected_grad.get(key, 0.0) + (weight[p] * go[c, p]).item()
    keys = list(expected_grad)
    index = torch.tensor(keys, device=CUDA)
    got = x_leaf.grad[0, index[:, 0], index[:, 1], index[:, 2]].double()
    want = torch.tensor([expected_grad[k] for k in keys], dtype=torch.float64, device=CUDA)
    torch.testing.assert_close(got, want, atol=5e-3, rtol=5e-3)
    assert torch.count_nonzero(x_leaf.grad).item() <= len(keys), "gradient written outside the taps read"


def test_tensors_on_different_devices_fail_naming_grid():
    x = torch.zeros(1, 2, 3, 5, device=CUDA)
    grid = torch.zeros(1, 3, 5, 2)
    with pytest.raises((ValueError, TypeError), match="grid"):
        stn_triton.grid_sample(x, grid)
    with pytest.raises((ValueError, TypeError), match="grid"):
        stn_triton.grid_sample(x.cpu(), grid.to(CUDA))


@pytest.mark.parametrize("warp", ["affine", "perspective", "tps"])
def test_autotuning_gives_the_transform_gradient_of_the_heuristic_config(warp, tmp_path, monkeypatch):
    """STN_TRITON_AUTOTUNE=1 times the backward over its config space at a new shape: the trials with
    small pixel blocks write rows of the transform's partial sums that the winner's launch does not,
    and the buffer must be zeroed between them (reset_to_zero), or theta's gradient takes them in."""
    from stn_triton import tuning

    monkeypatch.setenv("STN_TRITON_CONFIG_DIR", str(tmp_path))  # an empty user table: every shape autotunes
    tuning.load_table.cache_clear()
    gen = generator(41)
    x = randn((4, 16, 40, 56), gen, torch.float32, CUDA)
    grad_output = randn((4, 16, 40, 56), gen, torch.float32, CUDA)
    if warp == "tps":
        control = stn_triton.geometry.regular_control_points(16, torch.float32, CUDA)
        params = control + 0.05 * randn((4, 16, 2), gen, torch.float32, CUDA)
    else:
        rows = 2 if warp == "affine" else 3
        params = (torch.eye(rows, 3, dtype=torch.float64) + rand((4, rows, 3), gen, -0.1, 0.1, device="cpu")).to(
            dtype=torch.float32, device=CUDA)
    call = {"affine": stn_triton.affine_grid_sample, "perspective": stn_triton.perspective_grid_sample,
            "tps": stn_triton.tps_grid_sample}[warp]

    def gradients():
        leaves = [t.detach().clone().requires_grad_() for t in (x, params)]
        call(*leaves).backward(grad_output)
        return [leaf.grad for leaf in leaves]

    expected = gradients()
    tuning.set_autotune(True)
    try:
        tuned, again = gradients(), gradients()
    finally:
        tuning.set_autotune(False)
        tuning.load_table.cache_clear()
    for result in (tuned, again):
        for what, a, e in zip(("grad input", "grad params"), result, expected):
            assert_close_scaled(a, e, 1e-5, what)
