"""The end-to-end cases' models and their training step, as a user's training loop runs them.

Two models, each built with our ops or with PyTorch's, with the same parameters and state_dict
keys, so that one initial state loads into every variant:

- the classifier of ``notebooks/stn_distorted_mnist.ipynb``: a ``SpatialTransformer`` (affine,
  its default localisation net) in front of the notebook's small CNN, on ``[N, C, H, W]`` images,
  cross-entropy over 10 classes;
- a ResNet-50 bottleneck whose 3x3 conv is a modulated deformable one (DCNv2), as detection
  backbones build it (mmdetection's ResNet-DCN): 1x1 conv 4P -> P, 3x3 deformable conv P -> P
  with offsets and mask predicted by a 3x3 conv on its input, 1x1 conv P -> 4P, batch norm
  after each, identity shortcut; mean squared error against a target of the output's shape.

A step is what a loop runs per batch: zero the gradients, forward, loss, backward, optimizer
step. The optimizer is SGD with momentum 0.9, as ResNet and detection recipes train. Its update
is a continuous function of the gradient, so the parameters after a step can be held to the
measured dtype's tolerance; Adam's first step moves every parameter by +-lr whatever its
gradient's size, and a gradient near zero could take either sign in ours and in the reference.
"Compiled" is what users write, ``torch.compile(model)``; the optimizer step stays eager.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import stn_triton
from stn_triton import fallback

LEARNING_RATE = 0.01
MOMENTUM = 0.9
CLASSES = 10
TAPS = 9  # of the bottleneck's 3x3 deformable conv


class Trainer:
    """A model, its loss and its optimizer as a training loop holds them.

    ``trainer(input, target)`` runs one step and returns the loss; ``trainer.module`` is the
    model (uncompiled), whose parameters the step updated.
    """

    def __init__(self, module: nn.Module, loss: Callable, compiled: bool):
        self.module = module
        self.model = torch.compile(module) if compiled else module
        self.loss = loss
        self.optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

    def __call__(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad()
        loss = self.loss(self.model(input), target)
        loss.backward()
        self.optimizer.step()
        return loss


def memory_format_of(input: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels-last ``input`` [N, C, H, W], else contiguous."""
    channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def start_training(build, loss, *, compiled=False, input, target, **state) -> Trainer:
    """A Trainer of the model ``build(input)`` holding ``state`` (a state_dict), in ``input``'s
    dtype, device and memory format; ``target`` is the batch's, unused until the first step."""
    module = build(input).to(device=input.device, dtype=input.dtype, memory_format=memory_format_of(input))
    module.load_state_dict({name: state[name] for name in module.state_dict()})
    return Trainer(module, loss, compiled)


def step_results(start, inputs) -> dict[str, torch.Tensor]:
    """The loss, every parameter's gradient (``grad_<name>``) and every parameter after one step of
    the Trainer ``start(**inputs)`` on the batch. The gradients are what a step's correctness
    rests on: a parameter moves by lr times its gradient, too little to show an error in it."""
    trainer = start(**inputs)
    loss = trainer(inputs["input"], inputs["target"])
    parameters = dict(trainer.module.named_parameters())
    return {
        "loss": loss.detach(),
        **{f"grad_{name}": p.grad for name, p in parameters.items()},
        **{name: p.detach() for name, p in parameters.items()},
    }


def seeded_state(build: Callable[[], nn.Module], gen: torch.Generator, dtype, device) -> dict[str, torch.Tensor]:
    """The state_dict of ``build()`` run under a seed drawn from ``gen`` (modules initialise from
    the global generator), floating-point entries in ``dtype``, all on ``device``."""
    seed = int(torch.randint(2**62, (), generator=gen, device=gen.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return {
        name: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for name, t in module.state_dict().items()
    }


# ---- the spatial-transformer classifier -----------------------------------------------------------


def small_cnn(channels: int, size) -> nn.Sequential:
    """The notebook's classifier: [N, channels, H, W] -> logits [N, 10]."""
    height, width = size
    return nn.Sequential(
        nn.Conv2d(channels, 8, kernel_size=5, padding=2),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=5, padding=2),
        nn.MaxPool2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * (height // 4) * (width // 4), 64),
        nn.ReLU(),
        nn.Linear(64, CLASSES),
    )


class TorchSpatialTransformer(stn_triton.SpatialTransformer):
    """The same module sampling with ``F.affine_grid`` and ``F.grid_sample``: the spatial
    transformer as it is written without this library."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.head(self.localization(x).flatten(1)).view(x.shape[0], *self.params_shape)
        grid = F.affine_grid(theta, [*x.shape[:2], *self.output_size], align_corners=self.align_corners)
        return F.grid_sample(x, grid, mode=self.mode, padding_mode=self.padding_mode, align_corners=self.align_corners)


def stn_classifier(input: torch.Tensor, transformer=stn_triton.SpatialTransformer) -> nn.Sequential:
    """The notebook's model for images like ``input``: ``transformer`` in front of the small CNN."""
    channels, size = input.shape[1], tuple(input.shape[2:])
    return nn.Sequential(transformer(channels, size, transform="affine"), small_cnn(channels, size))


def torch_stn_classifier(input: torch.Tensor) -> nn.Sequential:
    return stn_classifier(input, TorchSpatialTransformer)


def trained_stn_classifier(input: torch.Tensor) -> nn.Sequential:
    """The classifier with its transformer's head moved off the identity it starts at, as after
    training: theta then varies per image, the localisation net gets a gradient (a zero head
    weight passes none), and sample points fall between pixel centres, where bilinear
    sampling is differentiable (at the identity they land on the centres, on its kinks)."""
    model = stn_classifier(input)
    head = model[0].head
    with torch.no_grad():
        head.weight.normal_(0.0, 0.05)
        head.bias.add_(torch.randn_like(head.bias), alpha=0.05)
    return model


# ---- the deformable bottleneck --------------------------------------------------------------------


class ReferenceDeformConv2d(stn_triton.DeformConv2d):
    """``stn_triton.DeformConv2d`` computed by the plain PyTorch implementation (column buffer and
    matmul): the float64 reference, which needs no torchvision."""

    def forward(self, input, offset, mask=None):
        return fallback.deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )


class DeformBottleneck(nn.Module):
    """ResNet-50's bottleneck [N, 4 planes, H, W] -> [N, 4 planes, H, W] with a DCNv2 3x3 conv of
    class ``deform_conv``, or with a dense 3x3 conv and no offset conv when it is None (the floor
    a deformable block cannot beat).

    The offset conv keeps PyTorch's default initialisation rather than mmcv's zeros, so that the
    offsets are a fraction of a pixel, as after training: at zero every tap samples a pixel centre.
    """

    def __init__(self, planes: int, deform_conv: type | None):
        super().__init__()
        self.conv1 = nn.Conv2d(4 * planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        if deform_conv is None:
            self.offset_conv = None
            self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        else:
            self.offset_conv = nn.Conv2d(planes, 3 * TAPS, 3, padding=1)
            self.conv2 = deform_conv(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.offset_conv is None:
            out = self.conv2(out)
        else:
            predicted = self.offset_conv(out)  # [N, 2 taps offsets (dy, dx) + taps mask logits, H, W]
            out = self.conv2(out, predicted[:, : 2 * TAPS], torch.sigmoid(predicted[:, 2 * TAPS :]))
        out = F.relu(self.bn2(out))
        return F.relu(self.bn3(self.conv3(out)) + x)


def deform_bottleneck(input: torch.Tensor, deform_conv: type | None = stn_triton.DeformConv2d) -> DeformBottleneck:
    """The bottleneck for inputs like ``input`` [N, 4 planes, H, W]."""
    return DeformBottleneck(input.shape[1] // 4, deform_conv)


def torchvision_bottleneck(input: torch.Tensor) -> DeformBottleneck:
    import torchvision

    return deform_bottleneck(input, torchvision.ops.DeformConv2d)


def reference_bottleneck(input: torch.Tensor) -> DeformBottleneck:
    return deform_bottleneck(input, ReferenceDeformConv2d)


def dense_bottleneck(input: torch.Tensor) -> DeformBottleneck:
    return deform_bottleneck(input, None)
