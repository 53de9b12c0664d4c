"""The exceptions stn_triton raises for bad arguments, typed so that code written for the op it
replaces keeps catching them.

PyTorch and torchvision raise ``RuntimeError`` for most malformed tensors (shapes, dtypes, sizes)
and ``ValueError`` or ``TypeError`` for some options; stn_triton's messages name the argument
and what it expects. Each class below derives from both kinds, so ``except RuntimeError`` written
against PyTorch and ``except ValueError`` written against stn_triton catch the same error.
"""


class ArgumentError(ValueError, RuntimeError):
    """A tensor of the wrong shape or size, or an option outside its choices."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type, or a tensor of the wrong dtype or device."""


class UnsupportedArgumentError(ValueError, NotImplementedError):
    """A well-formed request that the replaced op does not implement either (PyTorch's affine_grid
    raises NotImplementedError for sizes that are neither 4-D nor 5-D)."""


class AssertedArgumentError(ArgumentError, AssertionError):
    """A malformed argument that the replaced op rejects by assertion (torchvision's and mmcv's
    checks of the boxes' shape): catchable as AssertionError too."""
