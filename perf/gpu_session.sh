#!/usr/bin/env bash
# The one script a GPU session runs on the device machine, from the repository root:
#
#   STN_TRITON_COMMIT=<sha> bash perf/gpu_session.sh [perf/run.py options, e.g. --quick, --op grid_sample]
#
# It installs the package, runs the tests (output in $OUT/tests.log), with STN_TUNE=quick or
# STN_TUNE=full tunes every kernel (`python -m stn_triton.tune --ship [--quick]`; the table goes to
# $OUT/configs-<gpu>.json, to commit as stn_triton/configs/<gpu>.json), then runs the perf suite,
# which writes $OUT/<gpu>.csv and $OUT/plots/*.png (at most four). With the sanitizer's log
# (STN_SANITIZE=1, below) that is at most eight files, two folder levels under $OUT: what a device
# run brings back. At the end it prints how many seconds each part took (install, tests,
# overhead, sanitizer, tune, perf), and after each part its own time, which survives a command cut short by
# the device's time limit.
#
# STN_TEST_ARGS are pytest's arguments, shell-quoted, default `-x -q tests`. A short session runs
# the fast test tier (every test but those marked slow), then the suite's quick set:
#
#   STN_TEST_ARGS='-x -q -m "not slow" tests' bash perf/gpu_session.sh --quick
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
eval "test_args=(${STN_TEST_ARGS:--x -q tests})"  # eval: the quotes inside STN_TEST_ARGS group words

started=$SECONDS
pip install --quiet --no-deps --no-build-isolation -e '.[test,perf]'
python -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}')"
install_s=$((SECONDS - started)); echo "== install took $install_s s"

tests_status=0 tests_s=skipped
if [ "${STN_SKIP_TESTS:-0}" != 1 ]; then
    started=$SECONDS
    python -m pytest "${test_args[@]}" 2>&1 | tee "$OUT/tests.log"
    tests_status=${PIPESTATUS[0]}
    tests_s=$((SECONDS - started)); echo "== tests took $tests_s s"
fi

# Host time per call and the first call at a new shape, printed (perf/overhead.py); the rows go to
# perf/results/overhead/<gpu>.csv of the device's copy, so copy them from the output.
started=$SECONDS
python perf/overhead.py
overhead_s=$((SECONDS - started)); echo "== overhead took $overhead_s s"

# STN_SANITIZE=1: compute-sanitizer's memcheck over the tests that aim coordinates and offsets at
# the edges of memory (non-finite and huge values, the 64-bit index path); its report goes to
# $OUT/sanitizer.log and any error fails the session.
sanitize_status=0 sanitize_s=skipped
if [ "${STN_SANITIZE:-0}" = 1 ]; then
    started=$SECONDS
    compute-sanitizer --tool memcheck --error-exitcode 3 --log-file "$OUT/sanitizer.log" \
        python -m pytest -x -q -k "non_finite or 64_bits" tests/test_grid_sample.py tests/test_warp_validation.py \
        tests/test_deform_conv.py tests/test_gpu.py
    sanitize_status=$?
    sanitize_s=$((SECONDS - started)); echo "== sanitizer took $sanitize_s s (exit $sanitize_status)"
fi

tune_status=0 tune_s=skipped
case "${STN_TUNE:-}" in
    "") ;;
    quick|full)
        started=$SECONDS
        python -m stn_triton.tune --ship $([ "$STN_TUNE" = quick ] && echo --quick)
        tune_status=$?
        gpu=$(python -c "from stn_triton.tuning import gpu_name; print(gpu_name())")
        cp "stn_triton/configs/$gpu.json" "$OUT/configs-$gpu.json" || tune_status=1
        tune_s=$((SECONDS - started)); echo "== tune took $tune_s s"
        ;;
    *) echo "STN_TUNE must be quick or full, not '$STN_TUNE'" >&2; tune_status=2 ;;
esac

perf_status=0 perf_s=skipped
if [ "${STN_SKIP_PERF:-0}" != 1 ]; then
    started=$SECONDS
    python perf/run.py --out "$OUT" "$@"
    perf_status=$?
    perf_s=$((SECONDS - started)); echo "== perf took $perf_s s"
fi

echo "seconds: install $install_s, tests $tests_s, overhead $overhead_s, sanitizer $sanitize_s, tune $tune_s, perf $perf_s"
echo "exit status: tests $tests_status, sanitizer $sanitize_status, tune $tune_status, perf $perf_status"
[ "$tests_status" -eq 0 ] && [ "$sanitize_status" -eq 0 ] && [ "$tune_status" -eq 0 ] && [ "$perf_status" -eq 0 ]
