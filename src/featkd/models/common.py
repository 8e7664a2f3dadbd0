"""Helpers shared by the model families: width scaling, argument checks, init."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def scaled(channels: int, width: float) -> int:
    """Channel count ``channels`` scaled by ``width``: ``max(1, round(channels * width))``."""
    return max(1, round(channels * width))


def check_args(num_classes: int, in_channels: int, image_size: int, width: float) -> None:
    """Raise ValueError for arguments no zoo model can take."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")


def conv_bn_act(in_ch: int, out_ch: int, kernel: int, stride: int, act: type[nn.Module],
                groups: int = 1, bias: bool = False) -> list[nn.Module]:
    """Conv (bias-free by default), BatchNorm, activation, as a list to splice into a Sequential."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=bias)
    return [conv, nn.BatchNorm2d(out_ch), act()]


def conv_bn_act_stage(in_ch: int, out_ch: int, kernel: int, stride: int,
                      act: type[nn.Module]) -> nn.Sequential:
    """:func:`conv_bn_act` as a Sequential with children named conv, bn, relu."""
    layers = conv_bn_act(in_ch, out_ch, kernel, stride, act)
    return nn.Sequential(OrderedDict(zip(("conv", "bn", "relu"), layers)))


def init_cnn(model: nn.Module) -> nn.Module:
    """Kaiming-normal convs, unit BatchNorm, Linear layers N(0, 0.01) with zero bias.

    torchvision's scheme for VGG and MobileNetV2; its ResNet keeps nn.Linear's default for
    ``fc`` (uniform, std ~0.026 at 512 inputs), ours uses N(0, 0.01) there too. Kept so: every
    benchmark result was trained with it (tests/test_models.py pins it).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model
