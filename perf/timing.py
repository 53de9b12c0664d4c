"""GPU measurement: copy bandwidth, pass timings with rotated inputs, peak memory.

Every time is ``triton.testing.do_bench``'s median in milliseconds after its warm-up. When a
pass's working set fits in L2 several copies of its inputs are made and each call takes the next
one, so no call finds its inputs in L2 left warm by the previous call (do_bench also zeroes a
large buffer between calls; rotating keeps timings cold even where that flush falls short).
A training step is timed as a loop runs it: one model and optimizer stepping again and again on
the same batch, its parameters and optimizer state updated in place (a batch is a small part of
what a step reads, so nothing is rotated).
"""

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton.testing

from cases import BWD, FWD, FWD_BWD, Inputs

MAX_COPIES = 32
COPY_BYTES = 1 << 30


def bench_ms(step: Callable[[], object], quick: bool) -> float:
    """Median time of ``step`` in ms (do_bench: warm-up, then repetitions)."""
    warmup, rep = (10, 40) if quick else (25, 100)
    return triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median")


def peak_copy_gbps(quick: bool) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read + written."""
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    ms = bench_ms(lambda: target.copy_(source), quick)
    return 2 * COPY_BYTES / (ms * 1e-3) / 1e9


def copies_needed(working_set_bytes: int) -> int:
    """How many input copies to rotate so that together they are at least twice L2."""
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    if working_set_bytes >= l2_bytes:
        return 1
    return min(MAX_COPIES, math.ceil(2 * l2_bytes / max(working_set_bytes, 1)))


@dataclass(frozen=True)
class PassInputs:
    """One copy of what a pass reads: the inputs (grad_inputs require grad unless fwd) and grad_output."""

    inputs: Inputs
    grad_output: torch.Tensor


def make_copies(inputs: Inputs, grad_output: torch.Tensor, grad_inputs, pass_: str, count: int) -> list[PassInputs]:
    """``count`` independent copies of ``inputs`` (layouts kept) and ``grad_output``."""
    copies = []
    for _ in range(count):
        cloned = {
            name: t.detach().clone().requires_grad_(pass_ != FWD and name in grad_inputs) for name, t in inputs.items()
        }
        copies.append(PassInputs(cloned, grad_output.clone()))
    return copies


def pass_step(fn: Callable, pass_: str, copies: list[PassInputs], grad_inputs: tuple[str, ...]) -> Callable[[], object]:
    """A no-argument callable running one ``pass_`` of ``fn`` on the next copy.

    fwd: fn(**inputs). fwd+bwd: fn, then the gradients of grad_inputs for grad_output.
    bwd: the gradients only, from graphs built once per copy here and kept (retain_graph).
    """

    def grads(output, copy: PassInputs, retain: bool):
        leaves = [copy.inputs[name] for name in grad_inputs]
        return torch.autograd.grad(output, leaves, copy.grad_output, retain_graph=retain, allow_unused=True)

    if pass_ == FWD:
        cycle = itertools.cycle(copies)
        return lambda: fn(**next(cycle).inputs)
    if pass_ == FWD_BWD:
        cycle = itertools.cycle(copies)

        def forward_backward():
            copy = next(cycle)
            return grads(fn(**copy.inputs), copy, retain=False)

        return forward_backward
    assert pass_ == BWD, pass_
    graphs = itertools.cycle([(fn(**copy.inputs), copy) for copy in copies])

    def backward():
        output, copy = next(graphs)
        return grads(output, copy, retain=True)

    return backward


def training_steps(start: Callable, inputs: Inputs) -> Callable[[], object]:
    """A no-argument callable running one step of the Trainer ``start(**inputs)`` on the batch."""
    trainer = start(**inputs)
    return lambda: trainer(inputs["input"], inputs["target"])


def peak_mib(step: Callable[[], object]) -> float:
    """Memory one call of ``step`` allocates at its peak above what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**20


@dataclass(frozen=True)
class Measurement:
    ms: float  # do_bench median
    peak_mib: float  # peak allocation of one call


def measure(step: Callable[[], object], quick: bool) -> Measurement:
    """Warm ``step`` (compiling anything lazy), then its peak memory and its time."""
    step()
    torch.cuda.synchronize()
    memory = peak_mib(step)
    return Measurement(bench_ms(step, quick), memory)
