"""Host-side geometry: the thin-plate-spline solve is done once per control-point set."""

import torch

from conftest import generator, rand
from stn_triton import derived, geometry


def _points(seed, k=9):
    return geometry.regular_control_points(k, torch.float64, "cpu") + rand((k, 2), generator(seed), -0.1, 0.1,
                                                                         device="cpu")


def test_the_solve_interpolates_the_source_points():
    control = _points(0)
    source = control + rand((3, 9, 2), generator(1), -0.2, 0.2, device="cpu")
    coefficients = geometry.tps_coefficients(source, control)
    radial = geometry.tps_radial(((control[:, None] - control[None]) ** 2).sum(-1))
    at_control = radial @ coefficients[:, :9] + coefficients[:, 9:10] + control @ coefficients[:, 10:]
    torch.testing.assert_close(at_control, source, atol=1e-10, rtol=1e-10)
    # The radial weights are orthogonal to the affine functions (least bending energy).
    torch.testing.assert_close(coefficients[:, :9].sum(1), torch.zeros(3, 2, dtype=torch.float64), atol=1e-10, rtol=0)


def test_the_system_is_inverted_once_per_control_point_tensor(monkeypatch):
    calls = []
    solver = geometry.tps_solver
    monkeypatch.setattr(geometry, "tps_solver", lambda c: calls.append(c) or solver(c))
    control = _points(2)
    source = control + rand((2, 9, 2), generator(3), -0.2, 0.2, device="cpu")
    first = geometry.tps_coefficients(source, control)
    again = geometry.tps_coefficients(source * 1.5, control)
    assert len(calls) == 1
    torch.testing.assert_close(again, first * 1.5)
    geometry.tps_coefficients(source.float(), control)
    assert len(calls) == 2, "one inversion per dtype"
    with torch.no_grad():
        control[0, 0] += 0.05  # an in-place change invalidates the cached inverse
    moved = geometry.tps_coefficients(source, control)
    assert len(calls) == 3
    torch.testing.assert_close(moved, solver(control) @ source)
    other = control.clone()
    geometry.tps_coefficients(source, other)
    assert len(calls) == 4, "another tensor gets its own solve"


def test_a_freed_control_point_tensor_leaves_the_cache():
    control = _points(4)
    geometry.tps_coefficients(control[None], control)
    key = id(control)
    assert key in derived._cache
    del control
    assert key not in derived._cache


def test_default_control_points_are_one_tensor_per_size_dtype_and_device():
    a = geometry.default_control_points(16, torch.float32, torch.device("cpu"))
    assert a is geometry.default_control_points(16, torch.float32, torch.device("cpu"))
    torch.testing.assert_close(a, geometry.regular_control_points(16, torch.float32, "cpu"))
