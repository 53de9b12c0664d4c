"""Two ways into an op: its ``torch.library`` op under torch.compile, a plain autograd.Function in eager.

Every op family has a small frozen spec (its non-tensor settings: sizes, modes, flags) and one set
of rules written once: the implementation, what the backward saves, the gradient formula, and the
vmap and forward-AD rules. ``OpRules.register`` turns them into both ways in:

- the ``triton_op`` (schema types only, so the spec travels as its ``op_args()`` and is rebuilt
  with ``from_op_args``) gets the gradient formula through ``register_autograd`` and the vmap rule
  through ``register_vmap``: what torch.compile traces;
- an ``autograd.Function`` taking the tensors and the spec itself, which eager calls use: the
  custom-op dispatcher costs several times a kernel launch on the host (measured on the CPU with
  the launch stubbed out), which a small call would feel.

Both run the same implementation and formulas, so they differ in host time only. ``call`` picks
one: the op while torch.compile traces, the Function when autograd, a torch.func transform or
forward-mode AD needs it, else the bare implementation (no autograd bookkeeping at all). Gradient
formulas call their backward through ``call`` too, so a backward run with ``create_graph=True``
records a graph of its own through the backward's Function (double backward).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd import forward_ad

is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def constant(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of host ``values`` for a cache (the ops' device tables): made outside any torch.func
    transform, whose ``torch.tensor`` would wrap it for the transform's level, and a cached wrapper
    outlives its level (the next call outside the transform would get it)."""
    with torch._C._DisableFuncTorch():
        return torch.tensor(values, dtype=dtype, device=device)


def transformed() -> bool:
    """A torch.func transform (vmap, grad, jacrev, ...) or a forward-AD level is active: a call must go
    through its Function, whose vmap and jvp rules handle them (the bare kernels cannot)."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


@dataclass(frozen=True)
class OpRules:
    """One op family's rules, written once for both ways in.

    ``forward(*tensors, spec)`` is the implementation; ``save(ctx, tensors, spec, output)`` keeps what
    the formulas need; ``gradients(ctx, *grads)`` returns one gradient (or None) per tensor argument;
    ``vmap(info, in_dims, tensors, spec)`` returns (output, out_dims) as torch.func takes them;
    ``jvp(ctx, *tangents)`` the output tangent. ``tensors`` counts the leading tensor arguments (None
    allowed); the spec follows them.
    """

    name: str
    tensors: int
    forward: Callable
    save: Callable
    gradients: Callable
    vmap: Callable
    jvp: Callable

    def register(self, op, spec_type) -> type[torch.autograd.Function]:
        """Register the rules on ``op`` (a triton_op taking the tensors, then ``spec_type``'s op_args)
        and return the equivalent autograd.Function (taking the tensors, then a ``spec_type``)."""
        n = self.tensors
        rules = self

        def op_save(ctx, inputs, output):
            ctx.op_arguments = len(inputs) - n
            rules.save(ctx, inputs[:n], spec_type.from_op_args(inputs[n:]), output)

        def op_gradients(ctx, *grads):
            return (*rules.gradients(ctx, *grads), *[None] * ctx.op_arguments)

        def op_vmap(info, in_dims, *args):
            return rules.vmap(info, in_dims[:n], args[:n], spec_type.from_op_args(args[n:]))

        op.register_autograd(op_gradients, setup_context=op_save)
        torch.library.register_vmap(op, op_vmap)

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(*args):
                return rules.forward(*args)

            @staticmethod
            def setup_context(ctx, inputs, output):
                rules.save(ctx, inputs[:n], inputs[n], output)

            @staticmethod
            def backward(ctx, *grads):
                return (*rules.gradients(ctx, *grads), None)

            @staticmethod
            def vmap(info, in_dims, *args):
                return rules.vmap(info, in_dims[:n], args[:n], args[n])

            @staticmethod
            def jvp(ctx, *tangents):
                return rules.jvp(ctx, *tangents[:n])

        Function.__name__ = Function.__qualname__ = self.name
        return Function


def call(op, function, forward, tensors: tuple, spec, differentiable: tuple):
    """``op`` while torch.compile traces; ``function`` when a tensor of ``differentiable`` needs a
    gradient or a transform is active; else ``forward`` alone.

    The op also takes calls on the batched tensors of autograd's own vmap (``torch.autograd.grad(...,
    is_grads_batched=True)``, as gradcheck uses it, batches the grad_output of a backward): that vmap
    knows no Function's rules, and the dispatcher runs an op once per sample under it.
    """
    if torch.compiler.is_compiling() or any(t is not None and is_legacy_batched(t) for t in tensors):
        return op(*tensors, *spec.op_args())
    if transformed() or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)):
        return function.apply(*tensors, spec)
    return forward(*tensors, spec)


def no_forward_ad(op_name: str) -> Callable:
    """The jvp rule of an op without forward-mode AD: the error PyTorch raises for its own such ops."""

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"Trying to use forward AD with {op_name} that does not support it because it has not been "
            f"implemented yet (as for the op it replaces); use reverse-mode autograd instead."
        )

    return jvp


# --- vmap: fold the vmapped dimension into the batch ----------------------------------------------


def batched(tensor: torch.Tensor | None, dim: int | None, size: int) -> torch.Tensor | None:
    """``tensor`` with its vmapped dimension ``dim`` moved to the front, or expanded there when it has
    none: ``[size, *per-sample shape]``."""
    if tensor is None:
        return None
    if dim is None:
        return tensor.expand(size, *tensor.shape)
    return tensor.movedim(dim, 0)


def fold(tensor: torch.Tensor | None, dim: int | None, size: int) -> torch.Tensor | None:
    """``[size * N, ...]``: the vmapped dimension folded into the leading (image) dimension."""
    tensor = batched(tensor, dim, size)
    return None if tensor is None else tensor.reshape(size * tensor.shape[1], *tensor.shape[2:])


def unfold(tensor: torch.Tensor, size: int) -> tuple[torch.Tensor, int | None]:
    """(output, out_dim) of a folded result ``[size * N, ...]``; an empty placeholder (a gradient not
    asked for) stays unbatched."""
    if tensor.dim() == 1 and tensor.numel() == 0:
        return tensor, None
    return tensor.reshape(size, tensor.shape[0] // size, *tensor.shape[1:]), 0


def per_sample(info, in_dims, tensors, call_one):
    """The vmap rule for arguments that cannot be folded into the batch (a batched weight, a batched
    fill value): ``call_one(*tensors of sample b)`` for each b, the results stacked."""
    slices = [tuple(None if t is None else (t if d is None else t.select(d, b)) for t, d in zip(tensors, in_dims))
              for b in range(info.batch_size)]
    results = [call_one(*args) for args in slices]
    if isinstance(results[0], torch.Tensor):
        return torch.stack(results), 0
    outputs, dims = [], []
    for parts in zip(*results):
        empty = parts[0].dim() == 1 and parts[0].numel() == 0
        outputs.append(parts[0] if empty else torch.stack(parts))
        dims.append(None if empty else 0)
    return tuple(outputs), tuple(dims)
