"""The benchmark shapes have one source: stn_triton.shapes.SHAPES, which the perf suite's cases and
stn_triton.tune's workloads are both built from."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from stn_triton import tune
from stn_triton.shapes import SHAPES

PERF = Path(__file__).resolve().parent.parent / "perf"


@pytest.fixture(scope="module")
def perf_cases():
    """perf/cases.py, imported as the suite imports it (perf/ on the path: it imports perf/training.py)."""
    sys.path.insert(0, str(PERF))
    try:
        spec = importlib.util.spec_from_file_location("perf_cases", PERF / "cases.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(PERF))
    return module


def test_every_perf_case_takes_its_shape_from_the_table(perf_cases):
    assert [case.case for case in perf_cases.CASES] == list(SHAPES)
    for case in perf_cases.CASES:
        shape = SHAPES[case.case]
        assert case.shape is shape, case.case
        assert case.op == shape.op, case.case
        assert case.smoke_shape.op == shape.op, case.case


def test_tune_workloads_cover_every_case_but_the_sweep():
    """A deterministic twin is covered by its base's workload, which tune also runs deterministically."""
    tuned = {SHAPES[name] for name, _ in tune._workloads(torch.float32, "nchw")}
    for case_id, shape in SHAPES.items():
        if shape.sweep is None:
            assert dataclasses.replace(shape, deterministic=False) in tuned, case_id


def _function(call):
    while hasattr(call, "func"):
        call = call.func
    return call


def test_tune_runs_the_perf_cases_own_inputs_and_calls(perf_cases):
    """No copy of the suite's inputs in tune: both take them, and the call, from stn_triton.workloads."""
    from stn_triton.workloads import workload

    for case in perf_cases.CASES:
        if case.training_step:
            continue
        make_inputs, call, grad_inputs = workload(case.shape)
        assert case.make_inputs is make_inputs, case.case
        assert _function(case.ours) is _function(call), case.case
        assert set(grad_inputs) <= set(case.grad_inputs), case.case


def test_single_layout_ops_are_measured_and_tuned_in_one_layout(perf_cases):
    """tune runs an op of workloads.SINGLE_LAYOUT once per dtype: its cases must have one layout."""
    from stn_triton.workloads import SINGLE_LAYOUT

    ops = {case.op for case in perf_cases.CASES}
    assert SINGLE_LAYOUT <= ops
    for case in perf_cases.CASES:
        if case.op in SINGLE_LAYOUT:
            assert len(case.layouts) == 1, case.case
