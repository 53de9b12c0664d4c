"""The results table: ``<gpu>.csv``, one row per (op, case, dtype, layout, pass, baseline).

Written with the csv module so that a machine without pandas can write it. Rows are upserted:
a partial run (``--op``) replaces its own rows and keeps every other.
"""

import csv
import re
from pathlib import Path

COLUMNS = (
    "op", "case", "dtype", "layout", "pass", "baseline", "baseline_ms", "ours_ms", "speedup",
    "ours_gbps", "peak_gbps", "pct_of_peak", "gpu", "torch", "triton", "commit",
    "ours_peak_mib", "baseline_peak_mib", "note",
)  # fmt: skip
KEY = ("op", "case", "dtype", "layout", "pass", "baseline")

Row = dict[str, str]


def gpu_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def read_rows(path: Path) -> list[Row]:
    """The rows of a results CSV, or [] when there is none."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def upsert(rows: list[Row], new_rows: list[Row]) -> list[Row]:
    """``rows`` with each row of ``new_rows`` replacing the one of the same KEY, or appended."""
    merged = {tuple(row[k] for k in KEY): row for row in rows}
    for row in new_rows:
        merged[tuple(row[k] for k in KEY)] = row
    return list(merged.values())


def write_rows(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({column: row.get(column, "") for column in COLUMNS} for row in rows)


def fmt(value: float | None, digits: int = 4) -> str:
    """A number as a CSV cell: ``digits`` significant digits, '' for None."""
    return "" if value is None else f"{value:.{digits}g}"
