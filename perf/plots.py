"""Plots from results CSVs: speedup, bandwidth, memory and the scaling sweep, per GPU.

Usage::

    python perf/plots.py [--results perf/results] [--plots perf/plots]

draws ``<plots>/<gpu>/*.png`` for every ``<results>/<gpu>.csv``; no GPU needed. Importable:
``draw_gpu(rows, out_dir)`` and ``draw_all(results_dir, plots_dir)``. Without matplotlib it says
so and draws nothing.

The training-step rows (pass ``step``) get their own panel in the speedup and memory plots; they
have no GB/s, so the bandwidth plot leaves them out. In a step row ours runs as its baseline
does (compiled in the ``compile`` row), so the memory plot names that ours "ours compiled".
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from results_csv import Row, read_rows

PASS_ORDER = ("fwd", "bwd", "fwd+bwd", "step")
PASS_TITLES = {"step": "step: one training step (forward, loss, backward, SGD); ours compiled in the compile rows"}
SWEEP_PREFIX = "sweep_"


def _matplotlib_pyplot():
    """pyplot on the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _number(cell: str) -> float | None:
    return float(cell) if cell not in ("", None) else None


def _title(rows: list[Row], what: str) -> str:
    first = rows[0]
    return f"{what}: {first['gpu']}, torch {first['torch']}, triton {first['triton']}, commit {first['commit']}"


def _passes(rows: list[Row]) -> list[str]:
    present = {row["pass"] for row in rows}
    return [p for p in PASS_ORDER if p in present]


def _grouped_bars(ax, values: dict[str, dict[str, float]], ylabel: str) -> None:
    """Bars for values[group][series]: groups along x, one colour per series."""
    groups = list(values)
    series = list(dict.fromkeys(s for per_group in values.values() for s in per_group))
    width = 0.8 / max(len(series), 1)
    for index, name in enumerate(series):
        xs = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [values[group].get(name, 0.0) for group in groups]
        ax.bar(xs, heights, width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def _main_rows(rows: list[Row], column: str) -> list[Row]:
    """Rows outside the sweep that have a value in ``column``."""
    return [r for r in rows if not r["case"].startswith(SWEEP_PREFIX) and _number(r[column]) is not None]


def _per_pass_figure(plt, rows: list[Row], what: str, ylabel: str, fill, out: Path, log=True, reference_line=None):
    """One panel per pass; ``fill(pass_rows) -> values[group][series]`` gives the bars."""
    passes = _passes(rows)
    figure, axes = plt.subplots(len(passes), 1, figsize=(14, 4.5 * len(passes)), squeeze=False)
    for ax, pass_ in zip(axes[:, 0], passes, strict=True):
        _grouped_bars(ax, fill([r for r in rows if r["pass"] == pass_]), ylabel)
        if reference_line is not None:
            ax.axhline(reference_line, color="black", linewidth=1)
        if log:
            ax.set_yscale("log")
        ax.set_title(PASS_TITLES.get(pass_, pass_))
    figure.suptitle(_title(rows, what))
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def _speedups(rows: list[Row]) -> dict[str, dict[str, float]]:
    values = defaultdict(dict)
    for r in rows:
        values[f"{r['case']} {r['dtype']}"][f"vs {r['baseline']} ({r['layout']})"] = float(r["speedup"])
    return values


def _bandwidths(rows: list[Row]) -> dict[str, dict[str, float]]:
    values = defaultdict(dict)
    for r in rows:
        values[f"{r['case']} {r['dtype']}"][f"ours ({r['layout']})"] = float(r["ours_gbps"])
    return values


def _ours_series(row: Row) -> str:
    """Ours as this row ran it: compiled in a step row against the compiled baseline."""
    return "ours compiled" if row["pass"] == "step" and row["baseline"] == "compile" else "ours"


def _memory(rows: list[Row]) -> dict[str, dict[str, float]]:
    values = defaultdict(dict)
    for r in rows:
        if r["layout"] != "nchw":
            continue
        group = f"{r['case']} {r['dtype']}"
        values[group][_ours_series(r)] = float(r["ours_peak_mib"])
        if _number(r["baseline_peak_mib"]) is not None:
            values[group][r["baseline"]] = float(r["baseline_peak_mib"])
    return values


def _draw_scaling(plt, rows: list[Row], out: Path) -> bool:
    """Time and GB/s against image side and against batch; False when no sweep rows exist."""
    sweep = [r for r in rows if r["case"].startswith(SWEEP_PREFIX) and _number(r["ours_ms"]) is not None]
    axes_present = sorted({r["case"].split("_")[1] for r in sweep})
    if not axes_present:
        return False
    figure, axes = plt.subplots(2, len(axes_present), figsize=(6 * len(axes_present), 8), squeeze=False)
    for column, axis in enumerate(axes_present):
        points = sorted((int(r["case"].split("_")[2]), r) for r in sweep if r["case"].split("_")[1] == axis)
        xs = [x for x, _ in points]
        time_ax, gbps_ax = axes[0, column], axes[1, column]
        time_ax.plot(xs, [float(r["ours_ms"]) for _, r in points], "o-", label="ours")
        for baseline in sorted({r["baseline"] for _, r in points}):
            chosen = [(x, r) for x, r in points if r["baseline"] == baseline]
            time_ax.plot([x for x, _ in chosen], [float(r["baseline_ms"]) for _, r in chosen], "s--", label=baseline)
        gbps_ax.plot(xs, [float(r["ours_gbps"]) for _, r in points], "o-", label="ours")
        gbps_ax.axhline(float(points[0][1]["peak_gbps"]), color="black", linewidth=1, label="measured copy peak")
        for ax, ylabel in ((time_ax, "ms (fwd+bwd)"), (gbps_ax, "GB/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"image {axis}" if axis == "side" else axis)
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7)
        time_ax.set_yscale("log")
    figure.suptitle(_title(sweep, "scaling, fused affine fwd+bwd, C=16"))
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return True


def draw_gpu(rows: list[Row], out_dir: Path) -> list[Path]:
    """Draw one GPU's rows into ``out_dir``; returns the files written (at most four)."""
    plt = _matplotlib_pyplot()
    if plt is None or not rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    speedup_rows = _main_rows(rows, "speedup")
    if speedup_rows:
        path = out_dir / "speedup.png"
        _per_pass_figure(
            plt, speedup_rows, "speedup = baseline_ms / ours_ms", "speedup", _speedups, path, reference_line=1.0
        )
        written.append(path)
    bandwidth_rows = _main_rows(rows, "ours_gbps")
    if bandwidth_rows:
        path = out_dir / "bandwidth.png"
        peak = max(float(r["peak_gbps"]) for r in bandwidth_rows)
        _per_pass_figure(
            plt,
            bandwidth_rows,
            "achieved GB/s (line: measured copy peak)",
            "GB/s",
            _bandwidths,
            path,
            log=False,
            reference_line=peak,
        )
        written.append(path)
    memory_rows = _main_rows(rows, "ours_peak_mib")
    if memory_rows:
        path = out_dir / "memory.png"
        _per_pass_figure(plt, memory_rows, "peak memory of one call (nchw)", "MiB", _memory, path)
        written.append(path)
    if _draw_scaling(plt, rows, out_dir / "scaling.png"):
        written.append(out_dir / "scaling.png")
    return written


def draw_all(results_dir: Path, plots_dir: Path) -> list[Path]:
    """Draw ``plots_dir/<gpu>/`` for every ``results_dir/<gpu>.csv``; says so when there is none."""
    csvs = sorted(Path(results_dir).glob("*.csv"))
    if not csvs:
        print(f"no results CSVs in {results_dir}: nothing to plot (a GPU run writes them)")
        return []
    written = []
    for path in csvs:
        written += draw_gpu(read_rows(path), Path(plots_dir) / path.stem)
    for path in written:
        print(f"plot: {path}")
    return written


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description="Draw the perf plots from results CSVs.")
    parser.add_argument("--results", type=Path, default=here / "results", help="folder of <gpu>.csv files")
    parser.add_argument("--plots", type=Path, default=here / "plots", help="plots go to PLOTS/<gpu>/")
    args = parser.parse_args(argv)
    draw_all(args.results, args.plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
