"""The benchmark shapes: one entry per case id of the perf suite, the one place they are written.

``perf/cases.py`` builds its cases from ``SHAPES`` and ``python -m stn_triton.tune`` its
tuning workloads, so the kernels are tuned at the shapes the suite measures. The table lives in
the package because ``stn_triton.tune`` is installed with it and ``perf/`` is not.

Sampling is bilinear (trilinear in 3-D), zero padding, ``align_corners=False`` unless ``mode``
says otherwise; deformable convolutions are C -> C channels, stride 1, "same" padding, with a
mask; multi-scale deformable attention has ``heads`` heads of C channels over ``levels``; RoI
pooling pools ``rois`` boxes per image from the FPN maps ``levels`` of an image of ``size``
into ``out`` bins (op ``roi_align``: ``rois`` boxes in all from N single-level maps); blur pooling
(``blur_pool2d``, ``max_blur_pool2d``) blurs with ``kernel`` binomial taps at stride 2, zero
padding, after a 2 x 2 max at stride 1 for the max variant; DCNv3 / DCNv4 (``dcnv3``, ``dcnv4``)
aggregate a dense [N, H, W, C] map in ``groups`` groups of C / groups channels over a ``kernel`` x
``kernel`` window, stride 1, "same" padding, ``offset_scale`` 1. The two training-step cases (op ``SpatialTransformer`` and ``DeformConv2d``) time a whole
step of a model, and their shape is that of the op inside it.
"""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class BenchShape:
    """One case's shape: the op it measures and the sizes of the tensor that op samples."""

    op: str  # a stn_triton function, or the stn_triton module whose training step is timed
    N: int  # batch
    C: int  # channels of the sampled tensor (in a bottleneck step: its 3x3 conv's; the block has 4 C)
    size: tuple[int, ...]  # spatial size of the input, (H, W) or (D, H, W)
    out: tuple[int, ...] | None = None  # spatial size of the output; None: ``size``
    C_out: int | None = None  # output channels of a convolution; None: ``C``
    mode: str = "bilinear"  # sampling mode
    K: int = 0  # control points of a thin-plate spline
    kernel: int = 0  # side of a deformable convolution's kernel, or of a blur pooling's binomial taps
    levels: tuple[tuple[int, int], ...] = ()  # multi-scale deformable attention: the levels' (H, W)
    heads: int = 0  # attention heads (C is then the channels of one head)
    points: int = 0  # sampling points per head and level
    queries: int = 0  # queries per image
    groups: int = 0  # DCNv3 / DCNv4: channel groups (C is all groups' channels together)
    rois: int = 0  # RoI pooling: RoIs per image (``size`` is then the image, ``levels`` its FPN maps)
    deterministic: bool = False  # fwd+bwd under torch.use_deterministic_algorithms(True)
    sweep: str | None = None  # "side" or "batch": a point of the scaling sweep, id sweep_<axis>_<value>

    @property
    def out_size(self) -> tuple[int, ...]:
        return self.size if self.out is None else self.out

    @property
    def out_channels(self) -> int:
        return self.C if self.C_out is None else self.C_out


def _sweep() -> dict[str, BenchShape]:
    """Fused affine at C=16: image side 64..2048 at N=8, and batch 1..256 at 128x128."""
    sides = {f"sweep_side_{s}": BenchShape("affine_grid_sample", 8, 16, (s, s), sweep="side")
             for s in (64, 128, 256, 512, 1024, 2048)}
    batches = {f"sweep_batch_{n}": BenchShape("affine_grid_sample", n, 16, (128, 128), sweep="batch")
               for n in (1, 4, 16, 64, 256)}
    return sides | batches


_AFFINE2D_C64 = BenchShape("affine_grid_sample", 32, 64, (128, 128))
# Deformable DETR on an 800 x 1333 image: the four levels at strides 8 to 64 (S = 22223 rows),
# 8 heads of 32 channels, 4 points; the encoder's queries are its rows, the decoder's 300 objects.
_DETR_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
_DETR_ENCODER = BenchShape("ms_deform_attn", 2, 32, (), levels=_DETR_LEVELS, heads=8, points=4,
                           queries=sum(h * w for h, w in _DETR_LEVELS))
_GRID2D_C64 = BenchShape("grid_sample", 32, 64, (128, 128))
# Mask R-CNN's poolers on an 800 x 1333 image: FPN P2-P5 (strides 4 to 32) of 256 channels, 512
# sampled RoIs per image, sampling_ratio 2; the box head pools 7 x 7, the mask head 14 x 14.
_MASK_RCNN_BOX = BenchShape("multi_scale_roi_align", 2, 256, (800, 1333), out=(7, 7), rois=512,
                            levels=((200, 334), (100, 167), (50, 84), (25, 42)))
_MASK_RCNN_MASK = replace(_MASK_RCNN_BOX, out=(14, 14))
# Mask R-CNN's mask targets (roi_heads.project_masks_on_boxes): 128 positive RoIs pooled to 28 x 28
# from 8 image-size instance masks, sampling_ratio -1 (adaptive), the call torchvision's
# deterministic path runs out of memory on (torchvision #8168).
_MASK_RCNN_TARGETS = BenchShape("roi_align", 8, 1, (800, 1333), out=(28, 28), rois=128)

SHAPES: dict[str, BenchShape] = {
    "affine2d_c3": BenchShape("affine_grid_sample", 64, 3, (224, 224)),
    "affine2d_c64": _AFFINE2D_C64,
    "affine_grid_c3": BenchShape("affine_grid", 64, 3, (224, 224)),  # affine_grid, then grid_sample
    "grid2d_c3": BenchShape("grid_sample", 64, 3, (224, 224)),
    "grid2d_c64": _GRID2D_C64,
    "grid2d_c256_small": BenchShape("grid_sample", 4, 256, (16, 16)),
    "grid2d_c3_bicubic": BenchShape("grid_sample", 64, 3, (224, 224), mode="bicubic"),
    "affine3d_c4": BenchShape("affine_grid_sample", 4, 4, (64, 64, 64)),
    "persp2d_c3": BenchShape("perspective_grid_sample", 64, 3, (224, 224)),
    "tps_text": BenchShape("tps_grid_sample", 256, 3, (64, 200), out=(32, 100), K=20),
    "dcn_r50": BenchShape("deform_conv2d", 8, 256, (56, 56), kernel=3),
    "dcn_wide": BenchShape("deform_conv2d", 16, 64, (112, 112), kernel=3),
    "msda_detr_encoder": _DETR_ENCODER,
    "msda_detr_decoder": replace(_DETR_ENCODER, queries=300),
    # RT-DETR's decoder on 640 x 640: three levels at strides 8 to 32.
    "msda_rtdetr_decoder": BenchShape("ms_deform_attn", 2, 32, (), levels=((80, 80), (40, 40), (20, 20)), heads=8,
                                      points=4, queries=300),
    "roi_maskrcnn_box": _MASK_RCNN_BOX,
    "roi_maskrcnn_mask": _MASK_RCNN_MASK,
    "roi_maskrcnn_targets": _MASK_RCNN_TARGETS,
    "affine2d_c64_det": replace(_AFFINE2D_C64, deterministic=True),
    "grid2d_c64_det": replace(_GRID2D_C64, deterministic=True),
    "msda_detr_encoder_det": replace(_DETR_ENCODER, deterministic=True),
    "roi_maskrcnn_box_det": replace(_MASK_RCNN_BOX, deterministic=True),
    "roi_maskrcnn_mask_det": replace(_MASK_RCNN_MASK, deterministic=True),
    "roi_maskrcnn_targets_det": replace(_MASK_RCNN_TARGETS, deterministic=True),
    # Anti-aliased ResNet-50 (antialiased-cnns): the stem's MaxBlurPool on 64 x 112 x 112 and the
    # downsampling BlurPools of layers 2 and 3 (256 x 56 x 56, 512 x 28 x 28), at batch 32; each
    # also as the other op at the same shape.
    **{f"{name}_r50_c{c}": BenchShape(op, 32, c, (side, side), kernel=3)
       for name, op in (("blur", "blur_pool2d"), ("maxblur", "max_blur_pool2d"))
       for c, side in ((64, 112), (256, 56), (512, 28))},
    # FlashInternImage-T's DCNv4 at 224 x 224, batch 64: its four stages (56^2 x 64 ... 7^2 x 512) with
    # InternImage's 16 channels a group, 3 x 3; and C = 512 at 14 x 14 (stage 4 of a 448 input).
    **{f"dcnv4_flash_s{stage}": BenchShape("dcnv4", 64, c, (side, side), kernel=3, groups=c // 16)
       for stage, c, side in ((1, 64, 56), (2, 128, 28), (3, 256, 14), (4, 512, 7))},
    "dcnv4_c512_14": BenchShape("dcnv4", 64, 512, (14, 14), kernel=3, groups=32),
    # InternImage-T's DCNv3 at the same shapes: stages 1 and 3.
    "dcnv3_internimage_s1": BenchShape("dcnv3", 64, 64, (56, 56), kernel=3, groups=4),
    "dcnv3_internimage_s3": BenchShape("dcnv3", 64, 256, (14, 14), kernel=3, groups=16),
    # The notebook's classifier (notebooks/stn_distorted_mnist.ipynb) on 42x42 digits, at batch 256.
    "stn_mnist_step": BenchShape("SpatialTransformer", 256, 1, (42, 42)),
    # A ResNet-50 bottleneck (1024 -> 256 -> 256 -> 1024) with a DCNv2 3x3 conv: dcn_r50's op in a block.
    "dcn_block_step": BenchShape("DeformConv2d", 8, 256, (56, 56), kernel=3),
    **_sweep(),
}
