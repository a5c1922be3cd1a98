"""DeepLab-v2: a dilated ResNet (output stride 8) and the ASPP classifier, plus the model factory.

The forward pass returns :class:`SegmentationOutput` ``(logits, features)``: logits at feature
resolution (the trainer upsamples them) and the features the cosine loss uses, taken at
``feature_point``:

- ``"backbone"``: the backbone output entering the classifier (after the last ReLU, so >= 0);
- ``"pre_activation"``: the last block's residual sum before that ReLU. Post-ReLU features
  are non-negative, so their cosines crowd near 1 and a threshold ``tau`` barely selects.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor, nn

from cossim_fast.models.resnet import ResNet, load_torchvision_weights

logger = logging.getLogger(__name__)

FEATURE_POINTS: tuple[str, ...] = ("backbone", "pre_activation")

#: ASPP dilation rates of DeepLab-v2.
ASPP_DILATIONS: tuple[int, ...] = (6, 12, 18, 24)

#: Model name -> (ResNet depth, default stem width).
MODEL_SPECS: dict[str, tuple[int, int]] = {
    "deeplabv2_resnet18": (18, 64),
    "deeplabv2_resnet34": (34, 64),
    "deeplabv2_resnet50": (50, 64),
    "deeplabv2_resnet101": (101, 64),
    "deeplabv2_resnet152": (152, 64),
    # ResNet-18 at a quarter width: a training step on small crops runs fast on a CPU.
    "deeplabv2_small": (18, 16),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_SPECS)


class SegmentationOutput(NamedTuple):
    """Logits ``B x K x h x w`` and features ``B x C x h x w``, both at feature resolution."""

    logits: Tensor
    features: Tensor


class ASPPClassifier(nn.Module):
    """DeepLab-v2 ASPP: parallel dilated 3x3 convs to ``num_classes``, outputs summed."""

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = ASPP_DILATIONS) -> None:
        super().__init__()
        if not dilations:
            raise ValueError("ASPP needs at least one dilation rate")
        convs = [nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations]
        for conv in convs:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        return out


class DeepLabV2(nn.Module):
    """A dilated :class:`ResNet` backbone followed by an :class:`ASPPClassifier` head."""

    def __init__(
        self,
        backbone: ResNet,
        num_classes: int,
        *,
        feature_point: str = "backbone",
        aspp_dilations: Sequence[int] = ASPP_DILATIONS,
    ) -> None:
        super().__init__()
        if feature_point not in FEATURE_POINTS:
            raise ValueError(f"unknown feature_point {feature_point!r}; choose from {FEATURE_POINTS}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.backbone = backbone
        self.classifier = ASPPClassifier(backbone.out_channels, num_classes, aspp_dilations)
        self.feature_point = feature_point
        self.num_classes = num_classes

    @property
    def output_stride(self) -> int:
        """Input size / feature size (rounded up), e.g. 8."""
        return self.backbone.output_stride

    @property
    def feature_channels(self) -> int:
        """Channels of ``SegmentationOutput.features``."""
        return self.backbone.out_channels

    def forward(self, x: Tensor) -> SegmentationOutput:
        pre, post = self.backbone.forward_features(x)
        features = post if self.feature_point == "backbone" else pre
        return SegmentationOutput(self.classifier(post), features)

    def parameter_groups(self, lr: float, head_lr_mult: float = 10.0) -> list[dict[str, Any]]:
        """Optimizer groups of trainable parameters: backbone at ``lr``, head at ``lr * head_lr_mult``.

        Each group also carries ``name`` and ``lr_mult``, so a schedule can set
        ``group["lr"] = base_lr * factor * group["lr_mult"]``.
        """
        return [
            {
                "name": "backbone",
                "params": [p for p in self.backbone.parameters() if p.requires_grad],
                "lr": lr,
                "lr_mult": 1.0,
            },
            {
                "name": "head",
                "params": [p for p in self.classifier.parameters() if p.requires_grad],
                "lr": lr * head_lr_mult,
                "lr_mult": head_lr_mult,
            },
        ]


def build_model(
    name: str,
    num_classes: int,
    *,
    pretrained: str | Path | None = None,
    feature_point: str = "backbone",
    freeze_bn: bool | None = None,
    output_stride: int = 8,
    width: int | None = None,
    aspp_dilations: Sequence[int] = ASPP_DILATIONS,
    activation_checkpointing: bool = False,
    random_init_notice: bool = True,
) -> DeepLabV2:
    """Build a DeepLab-v2 model by name (see :data:`MODEL_NAMES`).

    ``pretrained`` is a local torchvision-format ResNet state dict loaded into the backbone
    (nothing is ever downloaded); without it the weights are random and a notice is logged,
    unless ``random_init_notice`` is False (the caller loads a checkpoint's weights next).
    ``freeze_bn=None`` freezes BatchNorm exactly when pretrained weights are given: frozen
    statistics of a random init would be meaningless. ``width`` overrides the stem width.
    ``activation_checkpointing`` recomputes the backbone's blocks in the backward instead of
    keeping their activations (same gradients, less memory, more time).
    """
    if name not in MODEL_SPECS:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    depth, default_width = MODEL_SPECS[name]
    if freeze_bn is None:
        freeze_bn = pretrained is not None
    backbone = ResNet(
        depth, width=default_width if width is None else width, output_stride=output_stride, freeze_bn=freeze_bn,
        activation_checkpointing=activation_checkpointing,
    )
    if pretrained is not None:
        load_torchvision_weights(backbone, pretrained)
    elif random_init_notice:
        logger.warning("%s: no pretrained weights given, the model is randomly initialized", name)
    return DeepLabV2(backbone, num_classes, feature_point=feature_point, aspp_dilations=aspp_dilations)
