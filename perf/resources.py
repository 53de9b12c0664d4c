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
           "shared_bytes", "programs_per_sm", "warp_occupancy", "triton", "ptxas", "note"]

SM90 = dict(registers=65536, warps=64, shared=228 * 1024, programs=32, register_unit=256)

# The variants the perf suite launches, per kernel: (label, pointer dtypes, constexprs).
# Pointers not named are float32; ints are i32; BLOCK_* of the config are added per config.
_SAMPLE = dict(TRANSFORM=0, MODE=0, PADDING=0, FILL=False, ALIGN_CORNERS=False, NDIM=2, TAPS=4, F64=False,
               INDEX_64=False)
_DCN = dict(HAS_MASK=True, F64=False, LOW_PRECISION=False, INPUT_PRECISION="ieee", INDEX_64=False)
_HALF_DCN = dict(_DCN, LOW_PRECISION=True)
_DCN_DATA = dict(INPUT_GRAD=True, COLUMNS=False, OFFSET_GRAD=True, MASK_GRAD=True)
VARIANTS = {
    "sample_fwd": [
        ("affine2d-c3-fp32", {}, dict(_SAMPLE, TRANSFORM=1, BLOCK_C=4)),
        ("grid2d-c64-bf16", dict(inp_ptr="bf16", coords_ptr="bf16", out_ptr="bf16"),
         dict(_SAMPLE, BLOCK_C=32)),
        ("grid2d-c3-bicubic-fp32", {}, dict(_SAMPLE, MODE=2, TAPS=16, BLOCK_C=4)),
        ("affine3d-c4-fp32", {}, dict(_SAMPLE, TRANSFORM=1, NDIM=3, TAPS=8, BLOCK_C=4)),
    ],
    "sample_bwd": [
        ("affine2d-c64-fp32", {}, dict(_SAMPLE, TRANSFORM=1, BLOCK_C=32, INPUT_GRAD=True,
                                                      COORD_GRAD=True)),
        ("grid2d-c64-bf16", dict(gout_ptr="bf16", inp_ptr="bf16", coords_ptr="bf16",
                                                gcoords_ptr="bf16"),
         dict(_SAMPLE, BLOCK_C=32, INPUT_GRAD=True, COORD_GRAD=True)),
    ],
    "sample_taps": [("affine2d-fp32", dict(key_ptr="i64"), dict(_SAMPLE, TRANSFORM=1))],
    "sample_bwd_sorted": [("c64-fp32", dict(sorted_key_ptr="i64", order_ptr="i64", run_end_ptr="i64"),
                           dict(TAPS=4, F64=False, BLOCK_C=32))],
    "affine_grid": [("2d-fp32", {}, dict(ALIGN_CORNERS=False, NDIM=2, F64=False))],
    "affine_grid_bwd": [("2d-fp32", {}, dict(ALIGN_CORNERS=False, NDIM=2, F64=False))],
    "deform_conv_fwd": [
        ("fp32", {}, dict(_DCN, HAS_BIAS=True, ROW_GROUP=True)),
        ("fp16", dict.fromkeys(("x_ptr", "off_ptr", "mask_ptr", "w_ptr", "b_ptr", "out_ptr"), "fp16"),
         dict(_HALF_DCN, HAS_BIAS=True, ROW_GROUP=True)),
    ],
    "deform_conv_bwd_data": [
        ("fp32", {}, dict(_DCN, **_DCN_DATA)),
        ("bf16", dict.fromkeys(("gy_ptr", "x_ptr", "off_ptr", "mask_ptr", "w_ptr", "goff_ptr",
                                               "gmask_ptr"), "bf16"), dict(_HALF_DCN, **_DCN_DATA)),
    ],
    "deform_conv_bwd_weight": [
        ("fp32", {}, dict(_DCN, ROW_GROUP=True)),
        ("bf16", dict.fromkeys(("gy_ptr", "x_ptr", "off_ptr", "mask_ptr"), "bf16"), dict(_HALF_DCN, ROW_GROUP=True)),
    ],
    "deform_conv_taps": [("fp32", dict(key_ptr="i64"), dict(F64=False))],
    "deform_conv_bwd_sorted": [("fp32", dict(sorted_key_ptr="i64", order_ptr="i64",
                                                            run_end_ptr="i64"), dict(F64=False, BLOCK_C=32))],
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

    label, pointers, constexprs = variant
    kernel = next(tuned.kernel for tuned in REGISTRY if tuned.name == kernel_name)
    constexprs = {name: value for name, value in {**constexprs, **config.kwargs}.items() if name in kernel.arg_names}
    signature = {
        arg: "constexpr" if arg in constexprs else "*" + pointers.get(arg, "fp32") if arg.endswith("_ptr") else "i32"
        for arg in kernel.arg_names
    }
    row = dict(_identity(kernel_name, label, config), note="")
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints its own ptxas log (TRITON_DUMP_PTXAS_LOG)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
    if "registers" not in log.getvalue():  # a triton without that log: run ptxas on its PTX
        with tempfile.TemporaryDirectory() as folder:
            ptx = Path(folder) / "kernel.ptx"
            ptx.write_text(compiled.asm["ptx"])
            result = subprocess.run([_ptxas_path(), "-v", "-lineinfo", "--gpu-name=sm_90a", str(ptx), "-o",
                                     str(ptx.with_suffix(".o"))], capture_output=True, text=True, check=True)
        log.write(result.stderr + result.stdout)
    row.update(parse_ptxas(log.getvalue()))
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
            for config in tuned[name].autotuned.configs]


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
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.csv} (triton {triton.__version__})")
    return 1 if any(row["note"].startswith("compile failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
