"""Two ways into an op: its ``torch.library`` op under torch.compile, a plain autograd.Function in eager.

The custom-op dispatcher (schema checks, the autograd wrapper, the dynamo-disable frame) costs
several times a kernel launch on the host, measured on the CPU with the launch stubbed out; a
small call feels every microsecond of it. Both ways run the same forward and backward
implementations with the same gradient formula, so they differ in host time only.
"""

import torch
from torch.autograd.function import once_differentiable


def eager_function(name: str, forward, setup_context, gradients, backward):
    """An autograd.Function running ``forward(*inputs)``, then ``gradients(ctx, grad, backward)``.

    ``setup_context`` and ``gradients`` are what the op registers with ``register_autograd``;
    ``backward`` is the implementation its backward op wraps.
    """

    def forward_(ctx, *inputs):
        setup_context(ctx, inputs, None)
        return forward(*inputs)

    def backward_(ctx, *grads):
        return gradients(ctx, *grads, backward)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward_), "backward": staticmethod(once_differentiable(backward_)),
    })


def call(op, function, forward, inputs: tuple, differentiable: tuple):
    """``op`` while torch.compile traces; else ``function`` when a tensor of ``differentiable``
    needs a gradient, else ``forward`` alone (no autograd bookkeeping at all)."""
    if torch.compiler.is_compiling():
        return op(*inputs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        return function.apply(*inputs)
    return forward(*inputs)
