"""The kernels compile for Hopper (sm_90) with ptxas, without a GPU.

The interpreter runs kernels as numpy and so never sees what only the compiler checks: types
that do not unify across branches, constexpr misuse, unsupported casts or atomics. Compiling
the launches of real calls (every pass, mode, padding, dimension, dtype and path; captured on
the CPU by ``stn_triton.tuning.captured_launches``, so the arguments are the launcher's own)
through Triton's real pipeline to PTX and cubin catches those on a CPU-only machine. Compilation
needs the interpreter off, so it runs in a subprocess, one for all launches.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
PERF = Path(__file__).resolve().parent.parent / "perf"


def _calls() -> dict:
    """label -> (call, deterministic, force 64-bit indices): small calls covering every kernel variant."""
    import stn_triton

    g = torch.Generator().manual_seed(0)

    def rand(*shape, dtype=torch.float32, lo=-1.0, hi=1.0):
        return (torch.rand(shape, generator=g) * (hi - lo) + lo).to(dtype).requires_grad_()

    def grid_sample(dtype, nd, mode, padding, align_corners=False):
        x = rand(2, 4, *([5] * nd), dtype=dtype)
        grid = rand(2, *([6] * nd), nd, dtype=dtype, lo=-1.2, hi=1.2)
        return lambda: stn_triton.grid_sample(x, grid, mode, padding, align_corners)

    def warp(dtype, name, channels_last=False):
        x = rand(2, 8, 6, 7, dtype=dtype)
        if channels_last:
            x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        if name == "affine3d":
            x3 = rand(2, 4, 3, 5, 6, dtype=dtype)
            theta = (torch.eye(3, 4) + 0.1 * torch.randn(2, 3, 4, generator=g)).to(dtype).requires_grad_()
            return lambda: stn_triton.affine_grid_sample(x3, theta)
        if name == "tps":
            source = (stn_triton.geometry.regular_control_points(9, torch.float32, "cpu")
                      + 0.1 * torch.randn(2, 9, 2, generator=g)).to(dtype).requires_grad_()
            return lambda: stn_triton.tps_grid_sample(x, source, mode="bicubic", padding_mode="reflection")
        if name == "perspective-fill":
            M = (torch.eye(3) + 0.05 * torch.randn(2, 3, 3, generator=g)).requires_grad_()
            return lambda: stn_triton.warp_perspective(x, M.to(dtype), (5, 6), padding_mode="fill")
        theta = (torch.eye(2, 3) + 0.1 * torch.randn(2, 2, 3, generator=g)).to(dtype).requires_grad_()
        return lambda: stn_triton.affine_grid_sample(x, theta, mode="bicubic", padding_mode="border")

    def deform(dtype, channels=16, groups=1, offset_groups=1, size=6, bias=True, mask=True):
        x = rand(2, channels, size, size, dtype=dtype)
        offset = rand(2, 2 * offset_groups * 9, size, size, dtype=dtype, lo=-2.0, hi=2.0)
        weight = rand(8, channels // groups, 3, 3, dtype=dtype)
        b = rand(8, dtype=dtype) if bias else None
        m = rand(2, offset_groups * 9, size, size, dtype=dtype, lo=0.0, hi=1.0) if mask else None
        return lambda: stn_triton.deform_conv2d(x, offset, weight, b, padding=1, mask=m)

    def attention(dtype, d=32, per_level=False, softmax=False, loc_dtype=None):
        shapes = torch.tensor([[6, 5], [3, 3], [1, 2]])
        value = rand(2, 41, 2, d, dtype=dtype)
        loc_shape = (2, 7, 2, 6, 2) if per_level else (2, 7, 2, 3, 2, 2)
        locations = rand(*loc_shape, dtype=loc_dtype or dtype, lo=0.0)
        weights = rand(*loc_shape[:-1], dtype=loc_dtype or dtype, lo=0.0)
        return lambda: stn_triton.ms_deform_attn(value, shapes, None, locations, weights,
                                                 points_per_level=[3, 2, 1] if per_level else None, softmax=softmax)

    def roi(dtype, kind, channels_last=False, levels=1, channels=8):
        x = rand(2, channels, 9, 10, dtype=dtype)
        if channels_last:
            x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        rois = torch.tensor([[0, 1.0, 2.0, 8.0, 7.0], [1, -2.0, 0.5, 4.0, 9.0], [1, 3.0, 3.0, 3.5, 3.2]], dtype=dtype)
        if levels > 1:
            features = [x, rand(2, 8, 5, 5, dtype=dtype)]
            boxes = [rois[:1, 1:] * 40, rois[1:, 1:] * 40]
            return lambda: stn_triton.multi_scale_roi_align(features, boxes, (2, 2), 2, [0.25, 0.125])
        if kind == "ps":
            return lambda: stn_triton.ps_roi_align(x, rois, (2, 2), 0.5, -1)
        if kind == "deform":
            offset = rand(3, 2, 2, 3, dtype=dtype)
            mask = rand(3, 1, 2, 3, dtype=dtype, lo=0.0)
            return lambda: stn_triton.deform_roi_pool(x, rois, offset, (2, 3), 1.0, 0, 0.1, mask)
        return lambda: stn_triton.roi_align(x, rois, (3, 2), 0.5, 2, True)

    def blur(dtype, max_pool, channels_last=False):
        x = rand(2, 5, 9, 10, dtype=dtype)
        if channels_last:
            x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        if max_pool:
            return lambda: stn_triton.max_blur_pool2d(x, 3, 2, 2)
        return lambda: stn_triton.blur_pool2d(x, 4, 2, padding_mode="reflect")

    def dcn(dtype, packed):
        from stn_triton.ops.dcnv3 import DcnSpec, dcn_aggregate

        spec = DcnSpec(3, 3, 1, 1, 1, 1, 1, 1, 2, 1.0, packed, packed, False, dtype)
        x = rand(2, 6, 7, 32, dtype=dtype)
        offset = rand(2, 6, 7, 56 if packed else 36, dtype=dtype, lo=-2.0, hi=2.0)
        mask = None if packed else rand(2, 6, 7, 18, dtype=dtype, lo=0.0)
        return lambda: dcn_aggregate(x, offset, mask, spec)

    def affine_grid(dtype, nd):
        theta = rand(2, nd, nd + 1, dtype=dtype)
        return lambda: stn_triton.affine_grid(theta, (2, 3, *([5] * nd)))

    return {
        "grid_sample-fp32-bilinear-zeros": (grid_sample(torch.float32, 2, "bilinear", "zeros"), False, False),
        "grid_sample-bf16-bicubic-reflection": (grid_sample(torch.bfloat16, 2, "bicubic", "reflection", True), False,
                                                False),
        "grid_sample-fp16-3d-nearest-border": (grid_sample(torch.float16, 3, "nearest", "border"), False, True),
        "grid_sample-fp64-3d-bilinear-reflection": (grid_sample(torch.float64, 3, "bilinear", "reflection"), False,
                                                    False),
        "grid_sample-fp32-bilinear-det": (grid_sample(torch.float32, 2, "bilinear", "border"), True, False),
        "affine-bf16-bicubic-nhwc": (warp(torch.bfloat16, "affine", channels_last=True), False, False),
        "affine3d-fp32": (warp(torch.float32, "affine3d"), False, True),
        "tps-fp32-det": (warp(torch.float32, "tps"), True, False),
        "perspective-fill-fp16": (warp(torch.float16, "perspective-fill"), False, False),
        "affine_grid-bf16-3d": (affine_grid(torch.bfloat16, 3), False, False),
        "affine_grid-fp32-2d-int64": (affine_grid(torch.float32, 2), False, True),
        "deform-fp32": (deform(torch.float32), False, False),
        "deform-fp32-int64": (deform(torch.float32, bias=False), False, True),
        "deform-fp16-groups": (deform(torch.float16, groups=2, offset_groups=2), False, False),
        "deform-bf16-nchw-gather": (deform(torch.bfloat16, channels=4), False, False),
        "deform-fp64": (deform(torch.float64, mask=False), False, False),
        "deform-fp32-det": (deform(torch.float32), True, False),
        "attention-fp32": (attention(torch.float32), False, False),
        "attention-bf16-fp32-points-softmax": (attention(torch.bfloat16, softmax=True, loc_dtype=torch.float32), False,
                                               False),
        "attention-fp16-per-level-int64": (attention(torch.float16, d=8, per_level=True), False, True),
        "attention-fp64-det": (attention(torch.float64, d=3, softmax=True), True, False),
        "roi_align-fp32": (roi(torch.float32, "align"), False, False),
        "roi_align-fp32-1ch-det": (roi(torch.float32, "align", channels=1), True, False),
        "roi_align-bf16-nhwc-det": (roi(torch.bfloat16, "align", channels_last=True), True, False),
        "ps_roi_align-fp16-int64": (roi(torch.float16, "ps"), False, True),
        "ps_roi_align-fp32-det": (roi(torch.float32, "ps"), True, False),
        "deform_roi_pool-fp32": (roi(torch.float32, "deform"), False, False),
        "deform_roi_pool-fp64-det": (roi(torch.float64, "deform"), True, False),
        "multi_scale_roi_align-fp32-det": (roi(torch.float32, "align", levels=2), True, False),
        "blur_pool-fp32-reflect": (blur(torch.float32, False), False, False),
        "max_blur_pool-bf16-nhwc": (blur(torch.bfloat16, True, channels_last=True), False, False),
        "dcnv3-bf16": (dcn(torch.bfloat16, False), False, False),
        "dcnv4-fp32-remove-center-det": (dcn(torch.float32, True), True, False),
        # Sizes Triton specializes arriving as the constant 1: a depthwise layer, one output pixel.
        "deform-fp32-depthwise-1px": (deform(torch.float32, channels=8, groups=8, offset_groups=8, size=1), True, False),
    }


def captured() -> list[tuple[str, str, dict]]:
    """(label, kernel name, arguments) of every launch of every call, forward and backward."""
    from stn_triton import tuning

    launches = []
    for label, (make_call, deterministic, index_64) in _calls().items():
        torch.use_deterministic_algorithms(deterministic)
        try:
            with tuning.captured_launches() as calls:
                out = make_call()
                out.backward(torch.ones_like(out))
        finally:
            torch.use_deterministic_algorithms(False)
        for launch, arguments in calls:
            if index_64 and "INDEX_64" in arguments:
                arguments = dict(arguments, INDEX_64=True)  # as a tensor of 2^31 elements would launch it
            launches.append((label, launch, {**arguments, **launch.options}))
    return launches


def compile_all() -> dict[str, str]:
    """Compile every captured launch at its config; {label of each that fails: its error}."""
    import triton

    sys.path.insert(0, str(PERF))
    import resources

    errors = {}
    for label, launch, arguments in captured():
        kernel = launch.tuned.kernel
        config = triton.Config({name: arguments[name] for name in launch.options if name in kernel.arg_names},
                               num_warps=launch.options["num_warps"], num_stages=launch.options["num_stages"])
        name = f"{label}:{launch.tuned.name}"
        try:
            compiled = resources.compile_for_sm90(kernel, *resources.specialization(kernel, arguments), config)
            assert compiled.asm["cubin"]
        except Exception as error:  # reported per launch by the test below
            errors[name] = f"{type(error).__name__}: {error}"[-4000:]
    return errors


def _can_compile_for_cuda() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        return False
    return True


def _subprocess(*args: str) -> object:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


pytestmark = [
    pytest.mark.skipif(ON_GPU, reason="on a GPU the compiled kernels run in the other tests"),
    pytest.mark.skipif(not _can_compile_for_cuda(), reason="this triton has no CUDA backend to compile with"),
]


def test_every_launch_compiles_for_sm90():
    errors = _subprocess()
    assert not errors, "\n\n".join(f"{name}: {error}" for name, error in errors.items())


def test_the_calls_launch_every_tuned_kernel():
    """The compile test covers every kernel, so none can skip it."""
    from stn_triton import tuning

    launched = set(_subprocess("kernels"))
    assert launched == {kernel.name for kernel in tuning.REGISTRY}


# Which way a warp runs over each gather and scatter, compiled as perf/resources.py compiles the
# suite's launches: (kernel, variant label of resources.variants(), config, the extent of the pixel
# block, of the channel block, the one the warp must run along). Block sizes all differ, so a
# tile's shape says which dimension is which.
GATHERS = [
    ("sample_fwd", "grid2d_c64-fp32-nchw", dict(BLOCK_P=512, BLOCK_C=4), 512, 4, "pixels"),
    ("sample_fwd", "grid2d_c64-bf16-nchw", dict(BLOCK_P=128, BLOCK_C=2), 128, 2, "pixels"),
    ("sample_fwd", "affine3d_c4-fp32-nchw", dict(BLOCK_P=512, BLOCK_C=4), 512, 4, "pixels"),
    ("sample_fwd", "grid2d_c64-fp32-nhwc", dict(BLOCK_P=32, BLOCK_C=64), 32, 64, "channels"),
    ("sample_bwd", "affine2d_c64-fp32-nchw", dict(BLOCK_P=128, BLOCK_C=4), 128, 4, "pixels"),
    ("sample_bwd", "affine2d_c64-fp32-nhwc", dict(BLOCK_P=16, BLOCK_C=64), 16, 64, "channels"),
    ("sorted_segments", "grid2d_c64-fp32-nchw-det", dict(BLOCK_E=128, BLOCK_C=4), 128, 4, "pixels"),
    ("sorted_runs", "grid2d_c64-fp32-nchw-det", dict(BLOCK_E=128, BLOCK_C=4), 128, 4, "pixels"),
    ("sorted_segments", "dcn_r50-fp32-nchw-det", dict(BLOCK_E=16, BLOCK_C=64), 16, 64, "channels"),
    ("deform_conv_fwd", "dcn_r50-fp32-nchw", dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), 128, 32, "channels"),
    ("deform_conv_fwd", "dcn_r50-fp32-nchw-input-gather", dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), 128, 32,
     "pixels"),
    ("deform_conv_bwd_data", "dcn_r50-fp32-nchw", dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=16), 128, 16, "channels"),
    ("deform_conv_bwd_data", "dcn_r50-fp32-nchw-input-gather", dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=16), 128, 16,
     "pixels"),
    ("deform_conv_bwd_weight", "dcn_r50-fp32-nchw-input-gather", dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32), 64, 32,
     "pixels"),
]


def warp_layouts() -> dict[int, dict]:
    """perf/resources.py's row (warp_layout, global_access) of every GATHERS entry, at 8 warps."""
    import triton

    sys.path.insert(0, str(PERF))
    import resources

    found = resources.variants({kernel for kernel, *_ in GATHERS})
    rows = {}
    for index, (kernel, label, blocks, *_) in enumerate(GATHERS):
        variant = next(v for v in found[kernel] if v[0] == label)
        rows[index] = resources.measure(kernel, variant, triton.Config(blocks, num_warps=8, num_stages=2))
    return rows


@pytest.fixture(scope="module")
def layouts() -> dict[int, dict]:
    return {int(index): row for index, row in _subprocess("layouts").items()}


@pytest.mark.parametrize("index", range(len(GATHERS)), ids=[f"{g[0]}-{g[1]}" for g in GATHERS])
def test_gathers_run_a_warp_along_the_contiguous_dimension(index, layouts):
    """NCHW: along the pixels (neighbouring output pixels read neighbouring input pixels); channels_last:
    along the channels, 16 bytes at a time. Whatever way this Triton breaks the tie when no address
    is provably contiguous (sampling.py's TIES_GO_FIRST)."""
    kernel, label, _, pixels, channels, along = GATHERS[index]
    row = layouts[index]
    tiles = re.findall(r"(load|atomic|cp\.async|store) (\d+)x(\d+) dim(\d) x\d+", row["warp_layout"])
    gathers = [(kind, (int(a), int(b)), int(dim)) for kind, a, b, dim in tiles if {int(a), int(b)} == {pixels, channels}]
    assert gathers, f"no [pixels, channels] tile among {row['warp_layout']!r}"
    wanted = pixels if along == "pixels" else channels
    for kind, shape, dim in gathers:
        assert shape[dim] == wanted, f"{kind} {shape} runs along dim {dim}, not the {along}: {row['warp_layout']!r}"
    if along == "channels":
        assert re.search(r"\.v4\.|cp\.async\.16B", row["global_access"]), row["global_access"]


if __name__ == "__main__":
    if sys.argv[1:] == ["layouts"]:
        print(json.dumps(warp_layouts()))
    elif sys.argv[1:] == ["kernels"]:
        print(json.dumps(sorted({launch.tuned.name for _, launch, _ in captured()})))
    else:
        print(json.dumps(compile_all()))
