"""The kernels compile for Hopper (sm_90) with ptxas, without a GPU.

The interpreter runs kernels as numpy and so never sees what only the compiler checks: types
that do not unify across branches, constexpr misuse, unsupported casts or atomics. Compiling
representative variants through Triton's real pipeline (to PTX and cubin) catches those on a
CPU-only machine. Compilation needs the interpreter off, so it runs in a subprocess, one for all
variants.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()

# (kernel, pointer dtypes, constexprs): one variant per pass, mode, padding, dimension, dtype and path.
# Pointers not named are float32. The sampling kernel's ints compile unspecialized here, so every
# access is a gather; perf/resources.py compiles the layouts' specializations.
SAMPLE = dict(PASS=0, TRANSFORM=0, PADDING=0, FILL=False, ALIGN_CORNERS=False, F64=False, INDEX_64=False,
              INPUT_GRAD=False, COORD_GRAD=False, EVEN_C=False, BLOCK_P=64, BLOCK_C=4)
BWD = dict(SAMPLE, PASS=1, INPUT_GRAD=True, COORD_GRAD=True)
KERNEL = "_sample_kernel"
POINTERS = ("inp_ptr", "coords_ptr", "ctrl_ptr", "fill_ptr", "out_ptr", "gout_ptr", "ginp_ptr", "gcoords_ptr",
            "key_ptr", "weight_ptr")


def _typed(dtype: str, **overrides) -> dict:
    return {**dict.fromkeys(POINTERS, dtype), "key_ptr": "i64", **overrides}


VARIANTS = [
    ("sample", KERNEL, _typed("fp32"), dict(SAMPLE, MODE=0, NDIM=2, TAPS=4)),
    ("sample", KERNEL, _typed("bf16", ctrl_ptr="fp32"),
     dict(SAMPLE, TRANSFORM=3, MODE=2, NDIM=2, TAPS=16, PADDING=2, ALIGN_CORNERS=True, EVEN_C=True)),
    ("sample", KERNEL, _typed("fp16"), dict(SAMPLE, MODE=1, NDIM=3, TAPS=1, PADDING=1, INDEX_64=True)),
    ("sample", KERNEL, _typed("fp16", coords_ptr="fp32", out_ptr="fp32"),
     dict(SAMPLE, TRANSFORM=2, MODE=0, NDIM=2, TAPS=4, FILL=True)),
    ("sample", KERNEL, _typed("fp32"), dict(BWD, MODE=0, NDIM=3, TAPS=8, PADDING=2)),
    ("sample", KERNEL, _typed("fp64"), dict(BWD, MODE=2, NDIM=2, TAPS=16, PADDING=1, F64=True)),
    ("sample", KERNEL, _typed("bf16", ginp_ptr="fp32", coords_ptr="fp32", gcoords_ptr="fp32"),
     dict(BWD, TRANSFORM=1, MODE=0, NDIM=3, TAPS=8, EVEN_C=True)),
    ("sample", KERNEL, _typed("fp32"), dict(BWD, TRANSFORM=2, MODE=0, NDIM=2, TAPS=4, FILL=True, INPUT_GRAD=False)),
    ("sample", KERNEL, _typed("fp32"), dict(BWD, TRANSFORM=3, MODE=0, NDIM=2, TAPS=4, INDEX_64=True)),
    ("sample", KERNEL, _typed("fp16", weight_ptr="fp32"),
     dict(SAMPLE, PASS=2, TRANSFORM=1, MODE=2, NDIM=2, TAPS=16, BLOCK_P=128, BLOCK_C=1)),
    ("sample", "_sample_bwd_sorted_kernel",
     dict(gout_ptr="fp16", ginp_ptr="fp16", sorted_key_ptr="i64", order_ptr="i64", run_end_ptr="i64", weight_ptr="fp32"),
     dict(TAPS=4, F64=False, EVEN_C=False, BLOCK_E=64, BLOCK_C=16)),
    ("affine_grid", "_affine_grid_kernel", dict(theta_ptr="bf16", grid_ptr="bf16"),
     dict(ALIGN_CORNERS=True, NDIM=3, F64=False, BLOCK_P=128)),
    ("affine_grid", "_affine_grid_bwd_kernel", dict(ggrid_ptr="fp32", partial_ptr="fp32"),
     dict(ALIGN_CORNERS=False, NDIM=2, F64=False, BLOCK_P=128)),
]

DCN = dict(HAS_MASK=True, F64=False, LOW_PRECISION=False, INPUT_PRECISION="tf32x3", INDEX_64=False,
           CHANNELS_FASTEST=True, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)
DCN_POINTERS = ("x_ptr", "off_ptr", "mask_ptr", "w_ptr", "b_ptr", "out_ptr", "gy_ptr", "gx_ptr", "col_ptr",
                "goff_ptr", "gmask_ptr", "gw_ptr")
DCN_DATA = dict(INPUT_GRAD=True, COLUMNS=False, OFFSET_GRAD=True, MASK_GRAD=True)


def _dcn_pointers(dtype: str, **overrides) -> dict:
    return {**{name: dtype for name in DCN_POINTERS}, **overrides}


# float32 at each tl.dot precision the host picks (tf32x3, tf32, ieee), both gather orientations, half
# precision on tensor cores, float64 on FMA units, 64-bit indices.
VARIANTS += [
    ("deform_conv", "_deform_conv_fwd_kernel", _dcn_pointers("fp32"), dict(DCN, HAS_BIAS=True, INDEX_64=True)),
    ("deform_conv", "_deform_conv_fwd_kernel", _dcn_pointers("fp32"),
     dict(DCN, HAS_BIAS=False, INPUT_PRECISION="tf32", CHANNELS_FASTEST=False)),
    ("deform_conv", "_deform_conv_fwd_kernel", _dcn_pointers("fp32"), dict(DCN, HAS_BIAS=True, INPUT_PRECISION="ieee")),
    ("deform_conv", "_deform_conv_fwd_kernel", _dcn_pointers("fp16"), dict(DCN, HAS_BIAS=False, LOW_PRECISION=True)),
    ("deform_conv", "_deform_conv_fwd_kernel", _dcn_pointers("fp64"),
     dict(DCN, HAS_BIAS=True, F64=True, INPUT_PRECISION="ieee", CHANNELS_FASTEST=False, BLOCK_K=16)),
    ("deform_conv", "_deform_conv_bwd_data_kernel", _dcn_pointers("bf16", gx_ptr="fp32", col_ptr="fp32"),
     dict(DCN, LOW_PRECISION=True, INDEX_64=True, **DCN_DATA)),
    ("deform_conv", "_deform_conv_bwd_data_kernel", _dcn_pointers("fp32"),
     dict(DCN, CHANNELS_FASTEST=False, INPUT_GRAD=False, COLUMNS=True, OFFSET_GRAD=True, MASK_GRAD=False)),
    ("deform_conv", "_deform_conv_bwd_data_kernel", _dcn_pointers("fp64"),
     dict(DCN, F64=True, INPUT_PRECISION="ieee", BLOCK_K=16, **DCN_DATA)),
    ("deform_conv", "_deform_conv_bwd_weight_kernel", _dcn_pointers("fp16", gw_ptr="fp32"),
     dict(DCN, LOW_PRECISION=True, INDEX_64=True, CHANNELS_FASTEST=False)),
    ("deform_conv", "_deform_conv_bwd_weight_kernel", _dcn_pointers("fp32"), dict(DCN, BLOCK_N=64, BLOCK_K=64)),
    # Sizes Triton specializes (P, CG, COG, CPG) arriving as the constant 1: a depthwise layer, one output pixel.
    ("deform_conv", "_deform_conv_fwd_kernel", _dcn_pointers("fp32"), dict(DCN, HAS_BIAS=False, P=1, CG=1, COG=1, CPG=1)),
    ("deform_conv", "_deform_conv_bwd_data_kernel", _dcn_pointers("bf16", gx_ptr="fp32", col_ptr="fp32"),
     dict(DCN, LOW_PRECISION=True, P=1, CG=1, COG=1, CPG=1, **DCN_DATA)),
    ("deform_conv", "_deform_conv_bwd_weight_kernel", _dcn_pointers("fp32"), dict(DCN, P=1, CG=1, COG=1, CPG=1)),
    ("deform_conv", "_deform_conv_taps_kernel", dict(off_ptr="fp16", key_ptr="i64", weight_ptr="fp32"),
     dict(F64=False, BLOCK_M=128)),
    ("deform_conv", "_deform_conv_bwd_sorted_kernel",
     dict(col_ptr="fp32", gx_ptr="bf16", sorted_key_ptr="i64", order_ptr="i64", run_end_ptr="i64", weight_ptr="fp32"),
     dict(F64=False, BLOCK_E=64, BLOCK_C=16)),
]


def compile_variant(index: int) -> None:
    """Compile VARIANTS[index] for sm_90; raises on any compiler error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, pointers, constexprs = VARIANTS[index]
    kernel = getattr(importlib.import_module(f"stn_triton.kernels.{module}"), name)
    signature = {
        arg: "constexpr" if arg in constexprs else "*" + pointers[arg] if arg in pointers else "i32"
        for arg in kernel.arg_names
    }
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


def _can_compile_for_cuda() -> bool:
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        return False
    return True


def compile_all() -> dict[int, str]:
    """Compile every variant; {index: the error of each that fails}. One process: importing torch,
    triton and the kernels costs more than most compilations."""
    errors = {}
    for index in range(len(VARIANTS)):
        try:
            compile_variant(index)
        except Exception as error:  # reported per variant by the test below
            errors[index] = f"{type(error).__name__}: {error}"[-4000:]
    return errors


@pytest.fixture(scope="module")
def compile_errors() -> dict[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return {int(index): error for index, error in json.loads(result.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.skipif(ON_GPU, reason="on a GPU the compiled kernels run in the other tests")
@pytest.mark.skipif(not _can_compile_for_cuda(), reason="this triton has no CUDA backend to compile with")
@pytest.mark.parametrize("index", range(len(VARIANTS)), ids=[f"{v[1]}-{i}" for i, v in enumerate(VARIANTS)])
def test_kernel_compiles_for_sm90(index, compile_errors):
    assert index not in compile_errors, compile_errors.get(index)


# Which way a warp runs over each gather and scatter, compiled as perf/resources.py compiles the
# suite's variants (integers specialized as a launch specializes them): (kernel, variant, config,
# the extent of the pixel block, of the channel block, the one the warp must run along). Block sizes
# all differ, so a tile's shape says which dimension is which.
GATHERS = [
    ("sample_fwd", "grid2d-c64-fp32-nchw", dict(BLOCK_P=512, BLOCK_C=4), 512, 4, "pixels"),
    ("sample_fwd", "grid2d-c64-bf16-nchw", dict(BLOCK_P=128, BLOCK_C=2), 128, 2, "pixels"),
    ("sample_fwd", "affine3d-c4-fp32-nchw", dict(BLOCK_P=512, BLOCK_C=4), 512, 4, "pixels"),
    ("sample_fwd", "grid2d-c64-fp32-nhwc", dict(BLOCK_P=32, BLOCK_C=64), 32, 64, "channels"),
    ("sample_bwd", "affine2d-c64-fp32-nchw", dict(BLOCK_P=128, BLOCK_C=4), 128, 4, "pixels"),
    ("sample_bwd", "affine2d-c64-fp32-nhwc", dict(BLOCK_P=16, BLOCK_C=64), 16, 64, "channels"),
    ("sample_bwd_sorted", "c64-fp32-nchw", dict(BLOCK_E=128, BLOCK_C=4), 128, 4, "pixels"),
    ("deform_conv_fwd", "r50-tf32x3", dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), 128, 32, "channels"),
    ("deform_conv_fwd", "r50-tf32x3-nchw-gather", dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), 128, 32, "pixels"),
    ("deform_conv_bwd_data", "r50-tf32x3", dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=16), 128, 16, "channels"),
    ("deform_conv_bwd_data", "r50-tf32x3-nchw-gather", dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=16), 128, 16, "pixels"),
    ("deform_conv_bwd_weight", "r50-tf32x3-nchw-gather", dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32), 64, 32, "pixels"),
]


def warp_layouts() -> dict[int, dict]:
    """perf/resources.py's row (warp_layout, global_access) of every GATHERS entry, at 8 warps."""
    from pathlib import Path

    import triton

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "perf"))
    import resources

    rows = {}
    for index, (kernel, label, blocks, *_) in enumerate(GATHERS):
        variant = next(v for v in resources.VARIANTS[kernel] if v[0] == label)
        rows[index] = resources.measure(kernel, variant, triton.Config(blocks, num_warps=8, num_stages=2))
    return rows


@pytest.fixture(scope="module")
def layouts() -> dict[int, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, __file__, "layouts"], env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return {int(index): row for index, row in json.loads(result.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.skipif(ON_GPU, reason="on a GPU the compiled kernels run in the other tests")
@pytest.mark.skipif(not _can_compile_for_cuda(), reason="this triton has no CUDA backend to compile with")
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
    print(json.dumps(warp_layouts() if sys.argv[1:] == ["layouts"] else compile_all()))
