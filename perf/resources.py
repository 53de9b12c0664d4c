"""What every config of every kernel costs in registers, spills and shared memory on Hopper, without a GPU.

Usage::

    python perf/resources.py                  # all kernels -> perf/results/static/sm90.csv
    python perf/resources.py --kernel deform_conv_fwd --jobs 2

Each config of each tuned kernel's space (``stn_triton.tuning.REGISTRY``) is compiled through
Triton's real pipeline for sm_90 at the variants the perf suite launches (dtypes, modes,
transforms), and ``ptxas -v`` reports the registers per thread, the spill stores and loads, and
Triton the shared memory per program. From those and the sm_90 limits (65536 registers,
64 warps, 228 KiB of shared memory per SM; registers allocated per warp in units of 256) the
CSV also gives the programs per SM and the share of the SM's warps they keep busy. These are
static facts of the compiled code: what bounds a config before it is timed (a config that
spills, or fits one program per SM, has to earn its place by measurement on a GPU).
"""

import argparse
import concurrent.futures
import contextlib
import csv
import functools
import io
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real pipeline (before triton is imported)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # the resource usage of the cubin Triton itself builds
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # as a launch compiles (and no warning about it)

import triton  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_CSV = ROOT / "results" / "static" / "sm90.csv"  # not beside the GPU CSVs, which the plots read
COLUMNS = ["kernel", "variant", "config", "num_warps", "num_stages", "registers", "spill_stores", "spill_loads",
           "shared_bytes", "programs_per_sm", "warp_occupancy", "global_access", "warp_layout", "triton", "ptxas",
           "note"]

SM90 = dict(registers=65536, warps=64, shared=228 * 1024, programs=32, register_unit=256)

# The variants the perf suite launches, per kernel: (label, pointer dtypes, constexprs, ints).
# Pointers not named are float32 and taken 16-byte aligned (torch's allocations are); BLOCK_* of
# the config are added per config. ``ints`` are the integer arguments of a real launch at the
# suite's shape: each is specialized as Triton specializes it at that launch (1 becomes a
# constant, a multiple of 16 is marked so, unless the kernel lists it in do_not_specialize). The
# strides equal to 1 decide which way a warp's threads run and whether accesses vectorize.


def _image_strides(prefix: str, n: int, c: int, spatial: tuple, layout: str) -> dict:
    """(n, c, d, h, w) strides of a dense [N, C, D, H, W] tensor (D = 1 for 4-D) in ``layout``."""
    d, h, w = spatial if len(spatial) == 3 else (1, *spatial)
    if layout == "nhwc":
        strides = (d * h * w * c, 1, h * w * c if len(spatial) == 3 else 0, w * c, c)
    else:
        strides = (c * d * h * w, d * h * w, h * w if len(spatial) == 3 else 0, w, 1)
    return dict(zip((f"{prefix}_n", f"{prefix}_c", f"{prefix}_d", f"{prefix}_h", f"{prefix}_w"), strides))


def _sample_ints(n: int, c: int, size: tuple, layout: str, transform: int, k: int = 0) -> dict:
    """The sampling kernel's integer arguments for input and output [N, C, *size] in ``layout``."""
    nd = len(size)
    d, h, w = size if nd == 3 else (1, *size)
    q = d * h * w
    if transform == 0:  # a contiguous grid [N, *size, nd]
        coords = dict(s0=q * nd, s1=h * w * nd if nd == 3 else 0, s2=w * nd, s3=nd, s4=1)
    else:  # parameters [N, rows, cols]
        rows, cols = (k + 3, 2) if transform == 3 else (3, 3) if transform == 2 else (nd, nd + 1)
        coords = dict(s0=rows * cols, s1=cols, s2=1, s3=0, s4=0)
    image = _image_strides("si", n, c, size, layout)
    return dict(Q=q, C=c, D=d, H=h, W=w, OD=d, OH=h, OW=w, K=k, PARTIALS=q // 16, SPLITS=1, **coords, **image,
                so_n=image["si_n"], so_c=image["si_c"], so_q=image["si_w"], **_image_strides("sgo", n, c, size, layout),
                **_image_strides("sgi", n, c, size, layout), sgc_split=n * q * nd)


def _dcn_ints(n: int, c: int, side: int, channels_fastest: bool, k: int = 9) -> dict:
    """The deform_conv kernels' integer arguments at a 3x3, stride 1, padding 1, C -> C convolution."""
    p = side * side
    x = _image_strides("sx", n, c, (side, side), "nhwc" if channels_fastest else "nchw")
    return dict(P=p, C=c, H=side, W=side, WO=side, KW=3, K=k, G=1, COUT=c, CG=c, COG=c, CPG=c, E=n * p * k * 4,
                P_PAD=-(-p // 128) * 128, ROWS=n * -(-p // 128) * 128, ROWS_PER_SPLIT=4096,
                stride_h=1, stride_w=1, pad_h=1, pad_w=1, dil_h=1, dil_w=1,
                **{key: value for key, value in x.items() if key != "sx_d"},
                so_n=2 * k * p, so_c=p, so_p=1, sm_n=k * p, sm_c=p, sm_p=1, sw_o=c * k, sw_i=1, sw_h=3 * c, sw_w=c,
                sy_n=c * p, sy_c=p, sy_p=1, sgy_n=c * p, sgy_c=p, sgy_p=1,
                **{f"sgx{key[2:]}": value for key, value in x.items() if key != "sx_d"})


_SAMPLE = dict(PASS=0, TRANSFORM=0, MODE=0, PADDING=0, FILL=False, ALIGN_CORNERS=False, NDIM=2, TAPS=4, F64=False,
               INDEX_64=False, INPUT_GRAD=False, COORD_GRAD=False, EVEN_C=True)
_SAMPLE_BWD = dict(_SAMPLE, PASS=1, INPUT_GRAD=True, COORD_GRAD=True)
_BF16_SAMPLE = dict(inp_ptr="bf16", coords_ptr="bf16", out_ptr="bf16", gout_ptr="bf16")
_C64 = {layout: _sample_ints(32, 64, (128, 128), layout, 0) for layout in ("nchw", "nhwc")}
_AFFINE_C64 = {layout: _sample_ints(32, 64, (128, 128), layout, 1) for layout in ("nchw", "nhwc")}
_DCN = dict(HAS_MASK=True, F64=False, LOW_PRECISION=False, INPUT_PRECISION="tf32x3", INDEX_64=False,
            CHANNELS_FASTEST=True)
_HALF_DCN = dict(_DCN, LOW_PRECISION=True, INPUT_PRECISION="ieee")
_DCN_DATA = dict(INPUT_GRAD=True, COLUMNS=False, OFFSET_GRAD=True, MASK_GRAD=True)
_R50 = _dcn_ints(8, 256, 56, True)
_R50_NCHW = _dcn_ints(8, 256, 56, False)
_HALF_POINTERS = ("x_ptr", "off_ptr", "mask_ptr", "w_ptr", "b_ptr", "out_ptr", "gy_ptr", "goff_ptr", "gmask_ptr")
VARIANTS = {
    "sample_fwd": [
        ("affine2d-c3-fp32-nchw", {}, dict(_SAMPLE, TRANSFORM=1, EVEN_C=False), _sample_ints(64, 3, (224, 224), "nchw", 1)),
        ("grid2d-c64-fp32-nchw", {}, _SAMPLE, _C64["nchw"]),
        ("grid2d-c64-bf16-nchw", _BF16_SAMPLE, _SAMPLE, _C64["nchw"]),
        ("grid2d-c64-fp32-nhwc", {}, _SAMPLE, _C64["nhwc"]),
        ("grid2d-c3-bicubic-fp32-nchw", {}, dict(_SAMPLE, MODE=2, TAPS=16, EVEN_C=False),
         _sample_ints(64, 3, (224, 224), "nchw", 0)),
        ("affine3d-c4-fp32-nchw", {}, dict(_SAMPLE, TRANSFORM=1, NDIM=3, TAPS=8), _sample_ints(4, 4, (64, 64, 64), "nchw", 1)),
        ("tps-c3-fp32-nchw", {}, dict(_SAMPLE, TRANSFORM=3, EVEN_C=False), _sample_ints(256, 3, (32, 100), "nchw", 3, 20)),
    ],
    "sample_bwd": [
        ("affine2d-c64-fp32-nchw", {}, dict(_SAMPLE_BWD, TRANSFORM=1), _AFFINE_C64["nchw"]),
        ("affine2d-c64-fp32-nhwc", {}, dict(_SAMPLE_BWD, TRANSFORM=1), _AFFINE_C64["nhwc"]),
        ("grid2d-c64-bf16-nchw", dict(_BF16_SAMPLE, ginp_ptr="fp32"), _SAMPLE_BWD, _C64["nchw"]),
        ("affine3d-c4-fp32-nchw", {}, dict(_SAMPLE_BWD, TRANSFORM=1, NDIM=3, TAPS=8),
         _sample_ints(4, 4, (64, 64, 64), "nchw", 1)),
    ],
    "sample_taps": [("affine2d-fp32", dict(key_ptr="i64"), dict(_SAMPLE, PASS=2, TRANSFORM=1), _AFFINE_C64["nchw"])],
    "sample_bwd_sorted": [
        ("c64-fp32-nchw", dict(sorted_key_ptr="i64", order_ptr="i64", run_end_ptr="i64"),
         dict(TAPS=4, F64=False, EVEN_C=True), dict(_C64["nchw"], E=32 * 128 * 128 * 4)),
    ],
    "affine_grid": [("2d-fp32", {}, dict(ALIGN_CORNERS=False, NDIM=2, F64=False), {})],
    "affine_grid_bwd": [("2d-fp32", {}, dict(ALIGN_CORNERS=False, NDIM=2, F64=False), {})],
    "deform_conv_fwd": [
        ("r50-tf32x3", {}, dict(_DCN, HAS_BIAS=True), _R50),
        ("r50-tf32", {}, dict(_DCN, HAS_BIAS=True, INPUT_PRECISION="tf32"), _R50),
        ("r50-fp16", dict.fromkeys(_HALF_POINTERS, "fp16"), dict(_HALF_DCN, HAS_BIAS=True), _R50),
        ("r50-tf32x3-nchw-gather", {}, dict(_DCN, HAS_BIAS=True, CHANNELS_FASTEST=False), _R50_NCHW),
    ],
    "deform_conv_bwd_data": [
        ("r50-tf32x3", {}, dict(_DCN, **_DCN_DATA), _R50),
        ("r50-bf16", dict(dict.fromkeys(_HALF_POINTERS, "bf16"), gx_ptr="fp32"), dict(_HALF_DCN, **_DCN_DATA), _R50),
        ("r50-tf32x3-nchw-gather", {}, dict(_DCN, **_DCN_DATA, CHANNELS_FASTEST=False), _R50_NCHW),
    ],
    "deform_conv_bwd_weight": [
        ("r50-tf32x3", {}, _DCN, _R50),
        ("r50-bf16", dict.fromkeys(_HALF_POINTERS, "bf16"), _HALF_DCN, _R50),
        ("r50-tf32x3-nchw-gather", {}, dict(_DCN, CHANNELS_FASTEST=False), _R50_NCHW),
    ],
    "deform_conv_taps": [("r50-fp32", dict(key_ptr="i64"), dict(F64=False), _R50)],
    "deform_conv_bwd_sorted": [("r50-fp32", dict(sorted_key_ptr="i64", order_ptr="i64", run_end_ptr="i64"),
                                dict(F64=False, BLOCK_C=32), _R50)],
}

_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict:
    """Registers and spill bytes from ``ptxas -v`` output (one kernel)."""
    registers = _PTXAS_USAGE.search(log)
    spills = _PTXAS_SPILLS.search(log)
    if registers is None or spills is None:
        raise ValueError(f"no resource usage in ptxas output: {log[-500:]!r}")
    return dict(registers=int(registers.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))


_GLOBAL_ACCESS = re.compile(r"\b((?:ld|st|red|atom)\.global[.\w]*)")
_ASYNC_COPY = re.compile(r"\bcp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-f]+|\d+)")


def global_access(ptx: str) -> str:
    """The kernel's global memory instructions by kind and width, e.g. ``ld.global.v4.b32 x16``:
    how wide its loads and stores are (``cp.async.16B`` for asynchronous copies of 16 bytes into
    shared memory), and whether its atomics are fenced (atom) or not (red)."""
    counts: dict[str, int] = {}
    for instruction in _GLOBAL_ACCESS.findall(ptx) + [f"cp.async.{int(n, 0)}B" for n in _ASYNC_COPY.findall(ptx)]:
        counts[instruction] = counts.get(instruction, 0) + 1
    return " ".join(f"{name} x{count}" for name, count in sorted(counts.items()))


_BLOCKED = re.compile(r"^(#\w+) = #ttg\.blocked<\{.*order = \[(\d+)", re.M)
_MEMORY_OP = re.compile(r"\b(tt\.load|tt\.store|tt\.atomic_rmw|ttg\.async_copy_global_to_local)\b.*"
                        r": (?:\(\s*)?tensor<((?:\d+x){2,})!tt\.ptr<\w+>, (#\w+)>")


def warp_layout(ttgir: str) -> str:
    """Which way a warp runs on each multi-dimensional global access of the kernel, as
    ``load 4x512 dim1 x3``: the tile's shape and its fastest dimension in the layout (``order[0]``:
    a thread's consecutive elements, then neighbouring threads, step along it). The compiler takes
    the dimension whose addresses it can prove contiguous; where none is (a gather), its tie-break
    decides, and that tie-break changed between Triton 3.6 (first dimension) and 3.7 (last)."""
    fastest = dict(_BLOCKED.findall(ttgir))
    counts: dict[str, int] = {}
    for op, shape, layout in _MEMORY_OP.findall(ttgir):
        if layout not in fastest:
            continue
        kind = {"tt.load": "load", "tt.store": "store", "tt.atomic_rmw": "atomic"}.get(op, "cp.async")
        entry = f"{kind} {shape.rstrip('x')} dim{fastest[layout]}"
        counts[entry] = counts.get(entry, 0) + 1
    return " ".join(f"{entry} x{count}" for entry, count in sorted(counts.items()))


def occupancy(registers: int, shared: int, num_warps: int) -> tuple[int, float]:
    """(programs per SM, share of the SM's warps busy) under the sm_90 limits."""
    unit = SM90["register_unit"]
    registers_per_warp = math.ceil(registers * 32 / unit) * unit
    limits = [SM90["programs"], SM90["warps"] // num_warps, SM90["registers"] // (registers_per_warp * num_warps)]
    if shared:
        limits.append(SM90["shared"] // shared)
    programs = min(limits)
    return programs, programs * num_warps / SM90["warps"]


def _ptxas_path() -> str:
    from triton.backends.nvidia import compiler

    try:
        return compiler.get_ptxas(90).path
    except TypeError:  # older triton: no arch argument
        return compiler.get_ptxas().path


def measure(kernel_name: str, variant: tuple, config: triton.Config) -> dict:
    """Compile one variant at one config for sm_90; its row of the CSV."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import stn_triton  # noqa: F401  (creates the tuned kernels)
    from stn_triton.tuning import REGISTRY

    label, pointers, constexprs, ints = variant
    kernel = next(tuned.kernel for tuned in REGISTRY if tuned.name == kernel_name)
    constexprs = {name: value for name, value in {**constexprs, **config.kwargs}.items() if name in kernel.arg_names}
    signature, attrs = {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        value = ints.get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif value == 1 and not param.do_not_specialize:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32"
            if value is not None and value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
    row = dict(_identity(kernel_name, label, config), note="")
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints its own ptxas log (TRITON_DUMP_PTXAS_LOG)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
    if "registers" not in log.getvalue():  # a triton without that log: run ptxas on its PTX
        with tempfile.TemporaryDirectory() as folder:
            ptx = Path(folder) / "kernel.ptx"
            ptx.write_text(compiled.asm["ptx"])
            result = subprocess.run([_ptxas_path(), "-v", "-lineinfo", "--gpu-name=sm_90a", str(ptx), "-o",
                                     str(ptx.with_suffix(".o"))], capture_output=True, text=True, check=True)
        log.write(result.stderr + result.stdout)
    row.update(parse_ptxas(log.getvalue()))
    row["global_access"] = global_access(compiled.asm["ptx"])
    row["warp_layout"] = warp_layout(compiled.asm["ttgir"])
    row["shared_bytes"] = compiled.metadata.shared
    programs, busy = occupancy(row["registers"], row["shared_bytes"], config.num_warps)
    row.update(programs_per_sm=programs, warp_occupancy=f"{busy:.3f}")
    if programs == 0:
        row["note"] = "does not fit an SM"
    elif row["spill_stores"]:
        row["note"] = "spills"
    return row


def _jobs(kernels: list[str]) -> list[tuple]:
    import stn_triton  # noqa: F401
    from stn_triton.tuning import REGISTRY

    tuned = {k.name: k for k in REGISTRY}
    unknown = set(kernels) - set(tuned)
    if unknown:
        raise SystemExit(f"unknown kernels {sorted(unknown)}; known: {sorted(tuned)}")
    return [(name, variant, config) for name in kernels for variant in VARIANTS[name]
            for config in tuned[name].configs]


def _measure_job(job: tuple) -> dict:
    try:
        return measure(*job)
    except Exception as error:  # a config the compiler rejects is a finding, not a crash of the report
        name, (label, *_), config = job
        return dict(_identity(name, label, config),
                    note=f"compile failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}")


def _identity(kernel_name: str, label: str, config: triton.Config) -> dict:
    """The columns that say what was compiled, and with which toolchain."""
    return dict(kernel=kernel_name, variant=label, config=" ".join(f"{k}={v}" for k, v in config.kwargs.items()),
                num_warps=config.num_warps, num_stages=config.num_stages, triton=triton.__version__,
                ptxas=_ptxas_version())


@functools.cache
def _ptxas_version() -> str:
    output = subprocess.run([_ptxas_path(), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+)", output)
    return found.group(1) if found else "unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="append", choices=sorted(VARIANTS), help="only these (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    args = parser.parse_args(argv)
    jobs = _jobs(args.kernel or sorted(VARIANTS))
    rows = []
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for done, row in enumerate(pool.map(_measure_job, jobs), 1):
            rows.append(row)
            print(f"[{done}/{len(jobs)}] {row['kernel']} {row['variant']} {row['config']} w{row['num_warps']}"
                  f" s{row['num_stages']}: {row.get('registers', '-')} regs, {row.get('spill_stores', '-')} B spilled,"
                  f" {row.get('shared_bytes', '-')} B shared {row['note']}", flush=True)
    if args.kernel and args.csv.is_file():  # a partial run replaces its kernels' rows and keeps the others
        with args.csv.open(newline="") as f:
            rows = [row for row in csv.DictReader(f) if row["kernel"] not in args.kernel] + rows
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.csv} (triton {triton.__version__})")
    return 1 if any(row["note"].startswith("compile failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
