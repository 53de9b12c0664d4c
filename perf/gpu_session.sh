#!/usr/bin/env bash
# The one script a GPU session runs on the device machine, from the repository root:
#
#   STN_TRITON_COMMIT=<sha> bash perf/gpu_session.sh [perf/run.py options, e.g. --quick, --op grid_sample]
#
# It installs the package, runs the tests (output in $OUT/tests.log), with STN_TUNE=quick or
# STN_TUNE=full tunes every kernel (`python -m stn_triton.tune --ship [--quick]`; the table goes to
# $OUT/configs-<gpu>.json, to commit as stn_triton/configs/<gpu>.json), then runs the perf suite,
# which writes $OUT/<gpu>.csv and $OUT/plots/*.png (at most four). That is at most seven files,
# two folder levels under $OUT, within what a device run brings back (eight files).
#
# The device machine has torch 2.11 and triton 3.6 preinstalled and no internet, so the package
# goes in with --no-deps and without build isolation (pip could not fetch setuptools). pandas,
# matplotlib and tqdm may be missing there: the suite then writes the CSV with the csv module,
# prints plain progress lines and skips the plots with a message (redraw them later with
# `python perf/plots.py` from the CSV).
#
# A device command runs 10 minutes at most: split long runs with --op or --quick, and set
# STN_SKIP_TESTS=1 on the later calls (STN_SKIP_PERF=1 stops after the tests and the tuning). The
# tuned table lives in the device's working copy only until the machine is given back: a later
# call on a fresh machine must carry it (commit it first). STN_TRITON_COMMIT names the commit in the CSV, since the
# device's copy of the tree may have no .git.
set -uo pipefail
: "${OUT:?OUT must name the folder whose files come back}"
cd "$(dirname "$0")/.."
export MPLCONFIGDIR="${TMPDIR:-/tmp}/matplotlib"

pip install --quiet --no-deps --no-build-isolation -e '.[test,perf]'
python -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')"

tests_status=0
if [ "${STN_SKIP_TESTS:-0}" != 1 ]; then
    python -m pytest -x -q tests 2>&1 | tee "$OUT/tests.log"
    tests_status=${PIPESTATUS[0]}
fi

tune_status=0
case "${STN_TUNE:-}" in
    "") ;;
    quick|full)
        python -m stn_triton.tune --ship $([ "$STN_TUNE" = quick ] && echo --quick)
        tune_status=$?
        gpu=$(python -c "from stn_triton.tuning import gpu_name; print(gpu_name())")
        cp "stn_triton/configs/$gpu.json" "$OUT/configs-$gpu.json" || tune_status=1
        ;;
    *) echo "STN_TUNE must be quick or full, not '$STN_TUNE'" >&2; tune_status=2 ;;
esac

perf_status=0
if [ "${STN_SKIP_PERF:-0}" != 1 ]; then
    python perf/run.py --out "$OUT" "$@"
    perf_status=$?
fi

echo "tests exit status: $tests_status, tune exit status: $tune_status, perf exit status: $perf_status"
[ "$tests_status" -eq 0 ] && [ "$tune_status" -eq 0 ] && [ "$perf_status" -eq 0 ]
