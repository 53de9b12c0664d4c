"""The numbers that name modes, paddings, transforms and kernel passes: one source for host and device.

Host code uses these ints (and the name tables); device code wraps them as ``tl.constexpr``
(kernels/sampling.py, kernels/transforms.py), so the two can never disagree. Modes and paddings
number as ATen's GridSamplerInterpolation / GridSamplerPadding do.
"""

BILINEAR, NEAREST, BICUBIC = 0, 1, 2
ZEROS, BORDER, REFLECTION = 0, 1, 2
MODES = {"bilinear": BILINEAR, "nearest": NEAREST, "bicubic": BICUBIC}
PADDING_MODES = {"zeros": ZEROS, "border": BORDER, "reflection": REFLECTION}

# Where a sampling kernel's points come from.
GRID = 0  # a grid tensor [N, (D,) H, W, NDIM] of normalized points
AFFINE = 1  # theta [N, NDIM, NDIM + 1] applied to the output pixel's normalized position
PROJECTIVE = 2  # a homography [N, 3, 3] applied, then divided by the third coordinate
TPS = 3  # a thin-plate spline: coefficients [N, K + 3, 2] over control points [K, 2]

# What one launch of the sampling kernel computes.
FORWARD = 0  # the output
BACKWARD = 1  # grad_input (atomically) and/or the points' gradient
LIST_TAPS = 2  # every (output pixel, tap) pair's input pixel and weight, for the deterministic backward

# Which RoI pooling a RoI kernel computes (kernels/roi.py).
ROI_ALIGN = 0  # torchvision's roi_align: the legacy half-pixel rule unless aligned, RoIs at least 1x1
PS_ROI_ALIGN = 1  # torchvision's ps_roi_align: output channel c of bin b reads input channel c * bins + b
DEFORM_ROI_POOL = 2  # mmcv's deform_roi_pool: RoI align (aligned) with each bin shifted by a learnt offset
ROI_KINDS = {"roi_align": ROI_ALIGN, "ps_roi_align": PS_ROI_ALIGN, "deform_roi_pool": DEFORM_ROI_POOL}
