"""Is ours right? The check that runs before any timing, and the whole of the CPU smoke.

Ours is compared with the case's PyTorch reference run in float64 on float64 copies of the same
inputs: the output and the gradients of an op, or the loss, the gradients and the parameters
after one training step from the same initial state_dict. The allowed error is the larger of
twice the reference's own error in the measured dtype (flash-attention's rule for low precision)
and a per-dtype tolerance relative to the largest reference value.
"""

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from cases import FWD, Case, Inputs, cast
from training import step_results

RELATIVE_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


@contextmanager
def deterministic_algorithms(enabled: bool):
    """Run the block with torch.use_deterministic_algorithms(enabled), then restore the mode."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def output_and_grads(fn, inputs: Inputs, grad_inputs: tuple[str, ...], grad_output) -> dict[str, torch.Tensor]:
    """{"output": output, "grad_<name>": d(output . grad_output)/d(inputs[name]) for name in
    grad_inputs}; only the output when ``grad_output`` is None."""
    leaves = {
        name: t.detach().requires_grad_(grad_output is not None and name in grad_inputs) for name, t in inputs.items()
    }
    output = fn(**leaves)
    if grad_output is None:
        return {"output": output.detach()}
    grads = torch.autograd.grad(output, [leaves[name] for name in grad_inputs], grad_output.to(output.dtype))
    return {"output": output.detach(), **{f"grad_{name}": g for name, g in zip(grad_inputs, grads, strict=True)}}


@dataclass(frozen=True)
class Check:
    """The worst of ours' errors over the tensors compared, against what is allowed."""

    max_error: float  # the largest |ours - reference| over all tensors compared
    reference_error: float  # the largest |reference in the measured dtype - float64 reference|; nan if it cannot run
    worst_ratio: float  # max over tensors of error / allowed; ok when <= 1
    tensors: str  # which tensors were compared

    @property
    def ok(self) -> bool:
        return self.worst_ratio <= 1.0  # False for nan

    def describe(self) -> str:
        return (
            f"max_err={self.max_error:.2e} ref_err={self.reference_error:.2e} "
            f"err/allowed={self.worst_ratio:.2f} [{self.tensors}]"
        )


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.sub(a.double(), b.double()).abs_().max().item() if a.numel() else 0.0


def check(case: Case, inputs: Inputs, dtype: torch.dtype, with_grads: bool) -> Check:
    """Compare ours on ``inputs`` (all in ``dtype``) with the reference: for an op the output and
    (with_grads) the gradients of every ``case.grad_inputs`` for a random grad_output; for a
    training step the loss, the parameters' gradients and the parameters after the step."""
    if case.training_step:
        results = step_results
    else:
        with deterministic_algorithms(case.deterministic):
            output = case.ours(**inputs)
        grad_output = torch.randn(output.shape, device=output.device) if with_grads else None
        results = functools.partial(output_and_grads, grad_inputs=case.grad_inputs, grad_output=grad_output)
    with deterministic_algorithms(case.deterministic):
        ours = results(case.ours, inputs)
    exact = results(case.reference.fn, cast(inputs, torch.float64))
    reference_runs = case.reference.dtypes is None or dtype in case.reference.dtypes
    in_dtype = results(case.reference.fn, inputs) if reference_runs else None

    errors, reference_errors, ratios = [], [], []
    for name, expected in exact.items():
        error = _max_abs_diff(ours[name], expected)
        reference_error = _max_abs_diff(in_dtype[name], expected) if in_dtype is not None else float("nan")
        scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
        allowed = RELATIVE_TOLERANCE[dtype] * scale
        if in_dtype is not None:
            allowed = max(allowed, 2 * reference_error)
        errors.append(error)
        reference_errors.append(reference_error)
        ratios.append(error / allowed)
    parameters = (len(exact) - 1) // 2
    names = f"loss, {parameters} gradients, {parameters} parameters after" if case.training_step else ",".join(exact)
    return Check(_nan_max(errors), _nan_max(reference_errors), _nan_max(ratios), names)


def _nan_max(values: list[float]) -> float:
    """The largest value, or nan if any is nan (a nan must fail the check, never hide)."""
    return float("nan") if any(v != v for v in values) else max(values)


def needs_grads(case: Case) -> bool:
    return any(pass_ != FWD for pass_ in case.passes)
