"""The stn_triton benchmark suite: every case of ``perf/cases.py`` against its baselines.

Usage::

    python perf/run.py                    # all; on a GPU: perf/results/<gpu>.csv, perf/plots/<gpu>/
    python perf/run.py --quick            # float32, nchw, no scaling sweep, shorter timings
    python perf/run.py --op grid_sample   # one op (the CSV keeps the rows of the others)
    python perf/run.py --case grid2d_c64 --dtype bfloat16
    python perf/run.py --out $OUT         # CSV to OUT/<gpu>.csv, plots to OUT/plots/
    python perf/plots.py                  # redraw the plots from perf/results/*.csv, no GPU needed

On a GPU it measures the device-to-device copy bandwidth (``peak_gbps``), then for every
case x dtype x layout checks ours against the float64 reference (a mismatch is recorded and
reported, never timed), and times each pass of ours and of each baseline with
``triton.testing.do_bench`` (median); see ``perf/timing.py`` for the method. The CSV is upserted
after every configuration, so partial and interrupted runs keep the other rows; the plots are
drawn from the whole CSV at the end. torch.compile baselines compile per configuration, which
dominates the run time: on a device with a time limit per command, split with --op or --quick
(``perf/gpu_session.sh`` is the script a GPU session runs).

The training-step cases (``stn_mnist_step``, ``dcn_block_step``: pass ``step``) time one whole
step of a model (forward, loss, backward, SGD step) with ours inside against the same model on
PyTorch's ops. In their rows ours runs as the baseline does: under ``torch.compile`` in the
``compile`` row, eager in the others (``eager``; ``cudnn_conv``, the block with a dense 3x3
conv). Their ``ours_gbps`` and ``pct_of_peak`` stay empty: a step has no fewest-bytes count to
hold it to.

Without a GPU it sets ``TRITON_INTERPRET=1`` and runs every available case but the scaling
sweep at its tiny smoke shape through Triton's interpreter as a correctness check (output and
gradients against the float64 reference), then redraws the plots from the committed CSVs.
Timings need a GPU. The exit status is 1 when any check failed.

A new case is one entry in ``perf/cases.py``; cases whose op stn_triton lacks are skipped.
"""

import argparse
import os
import subprocess
import sys
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton and stn_triton read it

import triton  # noqa: E402

import plots  # noqa: E402
import results_csv  # noqa: E402
import stn_triton  # noqa: E402
from cases import CASES, STEP, Baseline, Case, cast  # noqa: E402
from correctness import check, deterministic_algorithms, needs_grads  # noqa: E402
from results_csv import Row, fmt  # noqa: E402
from timing import (  # noqa: E402
    Measurement,
    copies_needed,
    make_copies,
    measure,
    pass_step,
    peak_copy_gbps,
    training_steps,
)

PERF_DIR = Path(__file__).resolve().parent
GPU = torch.device("cuda")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None


def say(message: str) -> None:
    """Print without breaking a progress bar."""
    if tqdm is not None and sys.stdout.isatty():
        tqdm.write(message)
    else:
        print(message, flush=True)


def progress(items: list, description: str, label):
    """``items`` with a tqdm bar on a terminal; otherwise (a log) a '[i/n] label' line per item."""
    if tqdm is not None and sys.stdout.isatty():
        yield from tqdm(items, desc=description)
        return
    for index, item in enumerate(items, 1):
        print(f"[{index}/{len(items)}] {description}: {label(item)}", flush=True)
        yield item


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def configuration_label(configuration: tuple[Case, torch.dtype, str]) -> str:
    case, dtype, layout = configuration
    return f"{case.case} {dtype_name(dtype)} {layout}"


# ---- what to run --------------------------------------------------------------------------------


def select_cases(args, with_sweep: bool) -> list[Case]:
    """The registered cases the options pick and this machine can run; notes those skipped."""
    chosen, skipped = [], {}
    for case in CASES:
        if (args.op and case.op != args.op) or (args.case and case.case != args.case):
            continue
        if case.sweep_axis and not with_sweep:
            continue
        missing = case.missing()
        if missing:
            skipped.setdefault(missing, []).append(case.case)
        else:
            chosen.append(case)
    for reason, case_ids in skipped.items():
        say(f"skipped ({reason}): {', '.join(case_ids)}")
    return chosen


def configurations(cases: list[Case], args) -> list[tuple[Case, torch.dtype, str]]:
    """(case, dtype, layout) triples: --dtype picks one dtype, --quick float32 and nchw only."""
    triples = []
    for case in cases:
        dtypes = [d for d in case.dtypes if not args.dtype or dtype_name(d) == args.dtype]
        if args.quick and not args.dtype:
            dtypes = dtypes[:1]
        layouts = case.layouts[:1] if args.quick else case.layouts
        triples += [(case, dtype, layout) for dtype in dtypes for layout in layouts]
    return triples


# ---- without a GPU: the interpreter smoke ---------------------------------------------------------


def smoke(configs: list[tuple[Case, torch.dtype, str]]) -> int:
    """Check each configuration at its smoke shape on the CPU; returns the number of failures."""
    failures = 0
    for case, dtype, layout in progress(configs, "interpreter smoke", configuration_label):
        label = configuration_label((case, dtype, layout))
        case = case.at(case.smoke_shape)
        generator = torch.Generator().manual_seed(0)
        inputs = case.make_inputs(case.shape, dtype, torch.device("cpu"), layout, generator)
        backend = stn_triton.backend(next(t for t in inputs.values() if t.is_floating_point()))
        try:
            verdict = check(case, inputs, dtype, needs_grads(case))
        except Exception as error:  # report it as a failure and check the other cases
            failures += 1
            say(f"FAIL {label}: {type(error).__name__}: {error}")
            continue
        passed = verdict.ok and backend == "interpreter"
        failures += not passed
        backend_note = "" if backend == "interpreter" else f" (ran on backend {backend!r}, not the interpreter)"
        say(f"{'PASS' if passed else 'FAIL'} {label}: {verdict.describe()}{backend_note}")
    return failures


# ---- on a GPU: measurement ---------------------------------------------------------------------


def commit_id() -> str:
    """STN_TRITON_COMMIT if set (a device copy may lack .git), else git describe, else 'unknown'."""
    if os.environ.get("STN_TRITON_COMMIT"):
        return os.environ["STN_TRITON_COMMIT"]
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=PERF_DIR, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return described.stdout.strip() or "unknown"


def environment_columns(peak_gbps: float) -> Row:
    """The columns every row of this run shares."""
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit_id(),
        "peak_gbps": fmt(peak_gbps),
    }


def runnable(baseline: Baseline, dtype: torch.dtype) -> tuple[object, torch.dtype, str]:
    """(callable, dtype it runs in, note): compiled when asked, float32 where it lacks ``dtype``."""
    fn = torch.compile(baseline.fn, dynamic=False) if baseline.compiled else baseline.fn
    if baseline.dtypes is None or dtype in baseline.dtypes:
        return fn, dtype, ""
    return fn, torch.float32, f"baseline lacks {dtype_name(dtype)}: its float32 time"


def time_pass(fn, case: Case, inputs, pass_: str, quick: bool, deterministic=False) -> tuple[Measurement, int | None]:
    """Time one pass of ``fn`` on rotated copies of ``inputs``: (measurement, minimal bytes), the
    bytes None for a training step."""
    with deterministic_algorithms(deterministic):
        if pass_ == STEP:
            return measure(training_steps(fn, inputs), quick), None
        output = fn(**inputs)
        moved = case.bytes_moved(inputs, output, case.grad_inputs, pass_)
        grad_output = torch.randn(output.shape, device=output.device).to(output.dtype)
        del output
        copies = make_copies(inputs, grad_output, case.grad_inputs, pass_, copies_needed(moved))
        return measure(pass_step(fn, pass_, copies, case.grad_inputs), quick), moved


def result_row(case: Case, dtype, layout, pass_, baseline: str, shared: Row, **columns) -> Row:
    return {
        **dict.fromkeys(results_csv.COLUMNS, ""),
        "op": case.op,
        "case": case.case,
        "dtype": dtype_name(dtype),
        "layout": layout,
        "pass": pass_,
        "baseline": baseline,
        **shared,
        **columns,
    }


def measured_row(ours: Measurement, moved: int | None, other: Measurement, peak_gbps: float) -> Row:
    """The timing columns of a row from ours and a baseline's measurement; no GB/s without ``moved``."""
    ours_gbps = None if moved is None else moved / ours.ms / 1e6
    return {
        "baseline_ms": fmt(other.ms),
        "ours_ms": fmt(ours.ms),
        "speedup": fmt(other.ms / ours.ms, 3),
        "ours_gbps": fmt(ours_gbps),
        "pct_of_peak": fmt(None if ours_gbps is None else 100 * ours_gbps / peak_gbps, 3),
        "ours_peak_mib": fmt(ours.peak_mib),
        "baseline_peak_mib": fmt(other.peak_mib),
    }


def measure_configuration(case: Case, dtype, layout: str, shared: Row, peak_gbps: float, quick: bool):
    """Check, then time, one (case, dtype, layout); returns (rows, True when ours was right)."""
    case = case.at(case.shape)
    generator = torch.Generator(GPU).manual_seed(0)
    inputs = case.make_inputs(case.shape, dtype, GPU, layout, generator)
    verdict = check(case, inputs, dtype, needs_grads(case))
    label = configuration_label((case, dtype, layout))
    if not verdict.ok:
        say(f"!!! MISMATCH {label}: {verdict.describe()} -- not timed")
        note = f"MISMATCH, not timed: {verdict.describe()}"
        rows = [result_row(case, dtype, layout, p, b, shared, note=note) for p in case.passes for b in case.baselines]
        return rows, False
    torch._dynamo.reset()  # every compiled baseline compiles afresh for this shape, dtype and layout
    baselines = {name: runnable(baseline, dtype) for name, baseline in case.baselines.items()}
    rows = []
    for pass_ in case.passes:
        ours_timings = {}  # per ours callable: the case's, or the one a baseline is timed against
        for name, (fn, run_dtype, note) in baselines.items():
            ours_fn = case.baselines[name].ours or case.ours
            if ours_fn not in ours_timings:
                ours_timings[ours_fn] = time_pass(ours_fn, case, inputs, pass_, quick, case.deterministic)
            ours, moved = ours_timings[ours_fn]
            run_inputs = cast(inputs, run_dtype)
            try:
                other, _ = time_pass(fn, case, run_inputs, pass_, quick, case.baselines[name].deterministic)
            except Exception as error:  # a broken baseline is recorded, the suite goes on
                say(f"baseline {name} failed on {label} {pass_}: {type(error).__name__}: {error}")
                rows.append(
                    result_row(
                        case, dtype, layout, pass_, name, shared, note=f"baseline failed: {type(error).__name__}"
                    )
                )
                continue
            columns = measured_row(ours, moved, other, peak_gbps)
            rows.append(result_row(case, dtype, layout, pass_, name, shared, note=note, **columns))
            bandwidth = "" if moved is None else f"  {columns['ours_gbps']} GB/s ({columns['pct_of_peak']}% of peak)"
            say(
                f"{label} {pass_:8s} ours {ours.ms:8.4f} ms  {name} {other.ms:8.4f} ms  "
                f"x{columns['speedup']}{bandwidth}"
            )
    return rows, True


def output_locations(out: Path | None, slug: str) -> tuple[Path, Path]:
    """(CSV path, plot folder): perf/results/<gpu>.csv and perf/plots/<gpu>/, or OUT/<gpu>.csv and OUT/plots/."""
    if out is None:
        return PERF_DIR / "results" / f"{slug}.csv", PERF_DIR / "plots" / slug
    return out / f"{slug}.csv", out / "plots"


def benchmark(configs, args) -> int:
    """Measure every configuration on the GPU, upserting the CSV after each (a run cut short keeps
    what it measured), then draw the plots; returns the failure count."""
    slug = results_csv.gpu_slug(torch.cuda.get_device_name())
    csv_path, plot_dir = output_locations(args.out, slug)
    committed = PERF_DIR / "results" / f"{slug}.csv"
    rows = results_csv.read_rows(csv_path if csv_path.exists() else committed)

    say(f"measuring copy bandwidth on {torch.cuda.get_device_name()} ...")
    peak_gbps = peak_copy_gbps(args.quick)
    say(f"peak_gbps (device-to-device copy, read + write) = {peak_gbps:.0f}")
    shared = environment_columns(peak_gbps)
    failures = 0
    for case, dtype, layout in progress(configs, "benchmark", configuration_label):
        try:
            new_rows, ok = measure_configuration(case, dtype, layout, shared, peak_gbps, args.quick)
        except Exception:  # record and go on: one broken case must not lose the others' rows
            say(f"!!! ERROR {configuration_label((case, dtype, layout))}:\n{traceback.format_exc()}")
            new_rows, ok = [], False
        failures += not ok
        rows = results_csv.upsert(rows, new_rows)
        results_csv.write_rows(csv_path, rows)
        torch.cuda.empty_cache()

    say(f"wrote {len(rows)} rows to {csv_path}")
    for path in plots.draw_gpu(rows, plot_dir):
        say(f"plot: {path}")
    return failures


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="float32 and nchw only, no scaling sweep, shorter timings")
    parser.add_argument("--op", help="only cases of this stn_triton function, e.g. grid_sample")
    parser.add_argument("--case", help="only this case id, e.g. grid2d_c64")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="only this dtype")
    parser.add_argument(
        "--out", type=Path, help="write OUT/<gpu>.csv and OUT/plots/ instead of perf/results, perf/plots"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    configs = configurations(select_cases(args, with_sweep=on_gpu and not args.quick), args)
    if not configs:
        say("nothing to run: no registered case matches these options and exists in stn_triton")
    if on_gpu:
        failures = benchmark(configs, args)
    else:
        failures = smoke(configs)
        say("no GPU: the above is a correctness smoke through the Triton interpreter; timings need a GPU")
        plots.draw_all(PERF_DIR / "results", args.out / "plots" if args.out else PERF_DIR / "plots")
    say(f"{failures} failure(s)" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
