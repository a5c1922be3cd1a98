"""ResNet backbones in plain PyTorch, with torchvision's parameter names.

The module tree (``conv1``, ``bn1``, ``layer1``..``layer4`` of ``BasicBlock``/``Bottleneck``
blocks with ``conv1``/``bn1``/.../``downsample.0``/``downsample.1``) matches torchvision's
``ResNet`` minus ``fc``, so an ImageNet state dict saved by torchvision loads with
:func:`load_torchvision_weights` without torchvision being installed. Strides sit on the 3x3
conv of a ``Bottleneck``, as in torchvision (ResNet v1.5), so those weights fit.

Dilation follows DeepLab-v2: for output stride 8, ``layer3`` and ``layer4`` keep stride 1 and
every 3x3 conv in them is dilated by 2 and 4 respectively.

With ``activation_checkpointing`` the stem and every residual block keep only their input for the
backward and recompute the rest there: activations are what limits resolution and batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

#: Output strides the dilation scheme supports, with the dilation of ``layer3`` and ``layer4``.
OUTPUT_STRIDE_DILATIONS: dict[int, tuple[int, int]] = {8: (2, 4), 16: (1, 2), 32: (1, 1)}

_MAX_LISTED_KEYS = 10


class WeightsError(ValueError):
    """A weights file cannot be loaded into the backbone (unreadable, wrong keys or shapes)."""


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    # padding = dilation keeps the spatial size at stride 1 for any dilation.
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or projected) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward_pre_activation(self, x: Tensor) -> Tensor:
        """The residual sum, before the block's final ReLU."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out)) + identity

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.forward_pre_activation(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided/dilated), 1x1 expand, with a shortcut; ResNet-50/101/152."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward_pre_activation(self, x: Tensor) -> Tensor:
        """The residual sum, before the block's final ReLU."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + identity

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.forward_pre_activation(x))


#: Block type and blocks per stage for each depth (torchvision's definitions).
RESNET_SPECS: dict[int, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """ResNet trunk without ``fc``, dilated to a chosen output stride, with optional frozen BN.

    ``width`` is the stem's channel count (64 in the standard nets); stage ``i`` has
    ``width * 2**i * expansion`` output channels, so a smaller width gives a cheap CPU model.
    With ``freeze_bn`` every BatchNorm stays in eval mode (running statistics are used and
    never updated, even under ``model.train()``) and its affine parameters get no gradient:
    UDA training with batch 1 cannot estimate batch statistics.

    ``activation_checkpointing`` (an attribute, may be switched at any time) trades compute for
    memory when gradients are on: see :meth:`forward_features`.
    """

    def __init__(
        self,
        depth: int,
        *,
        width: int = 64,
        output_stride: int = 8,
        freeze_bn: bool = False,
        in_channels: int = 3,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if depth not in RESNET_SPECS:
            raise ValueError(f"unsupported ResNet depth {depth}; choose from {sorted(RESNET_SPECS)}")
        if output_stride not in OUTPUT_STRIDE_DILATIONS:
            raise ValueError(
                f"unsupported output_stride {output_stride}; choose from {sorted(OUTPUT_STRIDE_DILATIONS)}"
            )
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        block, layers = RESNET_SPECS[depth]
        dil3, dil4 = OUTPUT_STRIDE_DILATIONS[output_stride]
        self.depth = depth
        self.output_stride = output_stride
        self.freeze_bn = freeze_bn
        self.activation_checkpointing = activation_checkpointing
        self._inplanes = width

        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2, dilation=1)
        # A dilated stage replaces its stride 2 by stride 1, so the resolution is kept.
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2 if dil3 == 1 else 1, dilation=dil3)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2 if dil4 == 1 else 1, dilation=dil4)
        #: Channels of the backbone output (the features entering a classifier).
        self.out_channels = width * 8 * block.expansion
        del self._inplanes

        self._init_weights()
        if freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)
                    m.eval()

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int, dilation: int
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # DeepLab-v2 dilates every block of a stage, the first one included.
        modules = [block(self._inplanes, planes, stride, dilation, downsample)]
        self._inplanes = planes * block.expansion
        modules += [block(self._inplanes, planes, 1, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> ResNet:
        """Set train/eval mode; frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(pre_activation, output)``: the last block's residual sum and its ReLU.

        With ``activation_checkpointing`` and gradients on, the stem and each block run under
        ``torch.utils.checkpoint``: the backward recomputes them from their saved input, with
        the batch statistics the first pass used, and the running statistics it updates again
        are put back, so gradients and BatchNorm buffers are those of a plain run.

        The blocks are called one by one, so forward hooks on a block fire, but hooks on the
        ``layer1``..``layer4`` containers and on layer4's last block (run through its
        ``forward_pre_activation``) do not: hook a block, or read ``SegmentationOutput``.
        """
        *head_blocks, last = self.layer4
        x = self._run(self._stem, x, self.bn1)
        for block in (*self.layer1, *self.layer2, *self.layer3, *head_blocks):
            x = self._run(block, x, block)
        last = cast(BasicBlock | Bottleneck, last)
        pre = self._run(last.forward_pre_activation, x, last)
        # Out of place: ``pre`` is returned and must keep its negative values.
        return pre, torch.relu(pre)

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _run(self, segment: Callable[[Tensor], Tensor], x: Tensor, owner: nn.Module) -> Tensor:
        """``segment(x)``, checkpointed when asked; ``owner`` holds the segment's BatchNorms."""
        if not (self.activation_checkpointing and torch.is_grad_enabled()):
            return segment(x)
        # The blocks draw no random numbers, so the RNG state need not be saved and restored.
        return checkpoint(
            segment, x, use_reentrant=False, preserve_rng_state=False,
            context_fn=lambda: (nullcontext(), _RunningStatsKept(owner)),
        )

    def forward(self, x: Tensor) -> Tensor:
        """The backbone output (after the last ReLU), ``B x out_channels x H/os x W/os``."""
        return self.forward_features(x)[1]


class _RunningStatsKept:
    """While recomputing, BatchNorm layers in train mode normalize with the batch statistics, as
    the first pass did, and update their running statistics again: put those back (the first
    pass updated them already). Restoring keeps the recomputation's saved tensors the same.
    Reusable: a graph kept with ``retain_graph=True`` recomputes once per backward."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.buffers = [
            buffer
            for m in self.module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
            for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buffer is not None
        ]
        self.saved = [buffer.clone() for buffer in self.buffers]

    def __exit__(self, *exc) -> None:
        for buffer, value in zip(self.buffers, self.saved):
            buffer.copy_(value)
        self.buffers, self.saved = [], []


@dataclass(frozen=True)
class WeightLoadReport:
    """What :func:`load_torchvision_weights` did: keys loaded, ignored (``fc.*``), missing, unexpected."""

    path: Path
    loaded: tuple[str, ...]
    ignored: tuple[str, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f", ... and {more} more" if more > 0 else "")


def load_torchvision_weights(module: nn.Module, path: str | Path, *, strict: bool = True) -> WeightLoadReport:
    """Load a torchvision-format ResNet state dict (a ``.pth`` file) into ``module``.

    ``fc.*`` keys (the ImageNet classifier) are ignored. Shape mismatches always raise
    :class:`WeightsError` naming the file and key, before anything is copied. Missing or
    unexpected keys raise too when ``strict``, otherwise they are logged as a warning and
    listed in the returned report. ``num_batches_tracked`` may be absent (older torchvision
    files omit it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file not found: {path} (model.pretrained: a torchvision-format ImageNet ResNet "
            f"state dict, e.g. torchvision's resnet101 weights saved with torch.save; nothing is downloaded. "
            f"model.pretrained=null trains from random initialization)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read pretrained weights from {path}: {err}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict (a mapping of names to tensors)")

    ignored = sorted(k for k in state if k.startswith("fc."))
    given = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = module.state_dict()
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in given.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        raise WeightsError(f"shape mismatch loading {path}: {_listed(mismatched)}")
    missing = sorted(k for k in expected if k not in given and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in given if k not in expected)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if problems and strict:
        raise WeightsError(f"{path} does not match the model: " + "; ".join(problems))
    if problems:
        logger.warning("loading %s: %s", path, "; ".join(problems))

    module.load_state_dict({k: v for k, v in given.items() if k in expected}, strict=False)
    loaded = tuple(sorted(k for k in given if k in expected))
    logger.info("loaded %d tensors from %s (ignored %d fc.* keys)", len(loaded), path, len(ignored))
    return WeightLoadReport(path, loaded, tuple(ignored), tuple(missing), tuple(unexpected))
