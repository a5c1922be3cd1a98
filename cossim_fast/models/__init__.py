"""Segmentation networks: DeepLab-v2 on a dilated ResNet, returning logits and loss features."""

from cossim_fast.models.deeplabv2 import (
    ASPP_DILATIONS,
    FEATURE_POINTS,
    MODEL_NAMES,
    ASPPClassifier,
    DeepLabV2,
    SegmentationOutput,
    build_model,
)
from cossim_fast.models.resnet import (
    RESNET_SPECS,
    BasicBlock,
    Bottleneck,
    ResNet,
    WeightLoadReport,
    WeightsError,
    load_torchvision_weights,
)

__all__ = [
    "ASPP_DILATIONS",
    "FEATURE_POINTS",
    "MODEL_NAMES",
    "RESNET_SPECS",
    "ASPPClassifier",
    "BasicBlock",
    "Bottleneck",
    "DeepLabV2",
    "ResNet",
    "SegmentationOutput",
    "WeightLoadReport",
    "WeightsError",
    "build_model",
    "load_torchvision_weights",
]
