"""What every config of every kernel costs in registers, spills and shared memory on Hopper, without a GPU.

Usage::

    python perf/resources.py                  # all kernels -> perf/results/static/sm90.csv
    python perf/resources.py --kernel deform_conv_fwd --jobs 2

Each config of each tuned kernel's space (``stn_triton.tuning.REGISTRY``) is compiled through
Triton's real pipeline for sm_90 at the variants the perf suite launches (``VARIANT_CASES``: the
suite's cases at their shapes, run on CPU tensors with their launches captured, so every argument,
stride and dtype is the real launch's and specialized as Triton specializes it), and ``ptxas -v`` reports the registers per thread, the spill stores and loads, and
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

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parent
DEFAULT_CSV = ROOT / "results" / "static" / "sm90.csv"  # not beside the GPU CSVs, which the plots read
COLUMNS = ["kernel", "variant", "config", "num_warps", "num_stages", "registers", "spill_stores", "spill_loads",
           "shared_bytes", "programs_per_sm", "warp_occupancy", "global_access", "warp_layout", "triton", "ptxas",
           "note"]

SM90 = dict(registers=65536, warps=64, shared=228 * 1024, programs=32, register_unit=256)

# The variants compiled: the real launches of the perf suite's cases at their shapes (captured on the
# CPU, stn_triton.tuning.captured_launches), so no copy of any launch's arguments is kept here.
# (case id, dtype, layout, passes, deterministic, the deform_conv2d gather layout, TF32 allowed).
VARIANT_CASES = [
    ("affine2d_c3", torch.float32, "nchw", ("fwd",), False, None, False),
    ("grid2d_c64", torch.float32, "nchw", ("fwd",), False, None, False),
    ("grid2d_c64", torch.bfloat16, "nchw", ("fwd", "fwd+bwd"), False, None, False),
    ("grid2d_c64", torch.float32, "nhwc", ("fwd",), False, None, False),
    ("grid2d_c3_bicubic", torch.float32, "nchw", ("fwd",), False, None, False),
    ("affine3d_c4", torch.float32, "nchw", ("fwd", "fwd+bwd"), False, None, False),
    ("tps_text", torch.float32, "nchw", ("fwd",), False, None, False),
    ("affine2d_c64", torch.float32, "nchw", ("fwd+bwd",), False, None, False),
    ("affine2d_c64", torch.float32, "nhwc", ("fwd+bwd",), False, None, False),
    ("grid2d_c64_det", torch.float32, "nchw", ("fwd+bwd",), True, None, False),
    ("affine_grid_c3", torch.float32, "nchw", ("fwd+bwd",), False, None, False),
    ("dcn_r50", torch.float32, "nchw", ("fwd+bwd",), False, None, False),
    ("dcn_r50", torch.float32, "nchw", ("fwd",), False, None, True),
    ("dcn_r50", torch.float16, "nchw", ("fwd",), False, None, False),
    ("dcn_r50", torch.bfloat16, "nchw", ("fwd+bwd",), False, None, False),
    ("dcn_r50", torch.float32, "nchw", ("fwd+bwd",), False, "input", False),
    ("dcn_r50", torch.float32, "nchw", ("fwd+bwd",), True, None, False),
    ("msda_detr_encoder", torch.float32, "nsmd", ("fwd+bwd",), False, None, False),
    ("msda_detr_encoder", torch.bfloat16, "nsmd", ("fwd+bwd",), False, None, False),
    ("msda_detr_encoder_det", torch.float32, "nsmd", ("fwd+bwd",), True, None, False),
    ("dcnv4_flash_s1", torch.float32, "nhwc", ("fwd+bwd",), False, None, False),
    ("dcnv4_flash_s1", torch.bfloat16, "nhwc", ("fwd+bwd",), False, None, False),
    ("dcnv4_flash_s1", torch.float32, "nhwc", ("fwd+bwd",), True, None, False),
    ("dcnv4_flash_s4", torch.float32, "nhwc", ("fwd+bwd",), False, None, False),
    ("dcnv3_internimage_s1", torch.float32, "nhwc", ("fwd+bwd",), False, None, False),
    ("dcnv3_internimage_s1", torch.bfloat16, "nhwc", ("fwd+bwd",), False, None, False),
    ("roi_maskrcnn_box", torch.float32, "nchw", ("fwd+bwd",), False, None, False),
    ("roi_maskrcnn_box", torch.float16, "nhwc", ("fwd+bwd",), False, None, False),
    ("roi_maskrcnn_mask_det", torch.float32, "nchw", ("fwd+bwd",), True, None, False),
    ("roi_maskrcnn_mask_det", torch.float32, "nhwc", ("fwd+bwd",), True, None, False),
    ("roi_maskrcnn_targets", torch.float32, "nchw", ("fwd",), False, None, False),
    ("maxblur_r50_c64", torch.float32, "nchw", ("fwd+bwd",), False, None, False),
    ("maxblur_r50_c64", torch.bfloat16, "nhwc", ("fwd+bwd",), False, None, False),
    ("blur_r50_c256", torch.float32, "nchw", ("fwd+bwd",), False, None, False),
    ("blur_r50_c256", torch.bfloat16, "nhwc", ("fwd+bwd",), False, None, False),
]
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_POINTER_TYPES = {**_DTYPE_NAMES, torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                  torch.uint8: "u8", torch.bool: "i1"}


def specialization(kernel, arguments: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of a launch of ``kernel`` with ``arguments``, as Triton specializes
    it: pointers typed by dtype and marked 16-byte aligned when they are, an int of 1 a constant and a
    multiple of 16 marked so (unless the kernel lists it in do_not_specialize). Meta-parameters the
    config sets (BLOCK_*) are left out of ``constexprs``; ``measure`` adds them per config."""
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        value = arguments.get(name)
        if param.is_constexpr:
            signature[name] = "constexpr"
            if name in arguments:
                constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _POINTER_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int) and value == 1 and not param.do_not_specialize:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _run_case(case, dtype, layout: str, pass_: str) -> None:
    """One pass of ``case``'s ours at its real shape on CPU tensors (its launches captured, not run)."""
    inputs = case.make_inputs(case.shape, dtype, torch.device("cpu"), layout, torch.Generator().manual_seed(0))
    backward = pass_ != "fwd"
    leaves = {name: t.requires_grad_(backward and name in case.grad_inputs) if t.is_floating_point() else t
              for name, t in inputs.items()}
    out = case.ours(**leaves)
    if backward:
        out.backward(torch.ones_like(out))


def variants(kernels=None) -> dict[str, list[tuple]]:
    """{kernel name: [(label, signature, constexprs, attrs)]}: every distinct launch of VARIANT_CASES
    (``kernels``: of only these)."""
    from cases import CASES
    from stn_triton import tuning
    from stn_triton.ops import deform_conv_policy

    by_id = {case.case: case.at(case.shape) for case in CASES}
    found: dict[str, dict] = {}
    for case_id, dtype, layout, passes, deterministic, gather, tf32 in VARIANT_CASES:
        label = "-".join([case_id.removesuffix("_det"), _DTYPE_NAMES[dtype], layout] + ["det"] * deterministic
                         + [f"{gather}-gather"] * (gather is not None) + ["tf32"] * tf32)
        previous_layout, previous_tf32 = deform_conv_policy.gather_layout(), torch.backends.cuda.matmul.allow_tf32
        torch.use_deterministic_algorithms(deterministic)
        deform_conv_policy.set_gather_layout(gather or previous_layout)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            with tuning.captured_launches() as launches:
                for pass_ in passes:
                    _run_case(by_id[case_id], dtype, layout, pass_)
        finally:
            torch.use_deterministic_algorithms(False)
            deform_conv_policy.set_gather_layout(previous_layout)
            torch.backends.cuda.matmul.allow_tf32 = previous_tf32
        for launch, arguments in launches:
            name = launch.tuned.name
            if kernels is None or name in kernels:
                spec = specialization(launch.tuned.kernel, arguments)
                # One row per distinct specialization: the first case that launches it names it.
                found.setdefault(name, {}).setdefault(repr(spec), (label, *spec))
    return {name: list(specs.values()) for name, specs in found.items()}


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


def compile_for_sm90(kernel, signature: dict, constexprs: dict, attrs: dict, config: triton.Config):
    """Compile ``kernel`` for sm_90 with a specialization (``specialization``) and a config."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {name: value for name, value in {**constexprs, **config.kwargs}.items() if name in kernel.arg_names}
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def measure(kernel_name: str, variant: tuple, config: triton.Config) -> dict:
    """Compile one variant at one config for sm_90; its row of the CSV."""
    import stn_triton  # noqa: F401  (creates the tuned kernels)
    from stn_triton.tuning import REGISTRY

    label, signature, constexprs, attrs = variant
    kernel = next(tuned.kernel for tuned in REGISTRY if tuned.name == kernel_name)
    row = dict(_identity(kernel_name, label, config), note="")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints its own ptxas log (TRITON_DUMP_PTXAS_LOG)
        compiled = compile_for_sm90(kernel, signature, constexprs, attrs, config)
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


def _jobs(kernels: list[str] | None) -> list[tuple]:
    import stn_triton  # noqa: F401
    from stn_triton.tuning import REGISTRY

    tuned = {k.name: k for k in REGISTRY}
    unknown = set(kernels or ()) - set(tuned)
    if unknown:
        raise SystemExit(f"unknown kernels {sorted(unknown)}; known: {sorted(tuned)}")
    found = variants(kernels)
    return [(name, variant, config) for name in sorted(found) for variant in found[name]
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
    parser.add_argument("--kernel", action="append", help="only these tuned kernels (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    args = parser.parse_args(argv)
    jobs = _jobs(args.kernel)
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
