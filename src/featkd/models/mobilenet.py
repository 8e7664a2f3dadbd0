"""MobileNetV2 for small images, as a chain.

The stem has stride 1 for inputs up to 32 px and stride 2 above (64 px
TinyImageNet), so both reach the 17 inverted-residual blocks at 32x32.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .common import conv_bn_act, conv_bn_act_stage, init_cnn, scaled

# (expansion t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
            (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when t = 1), 3x3 depthwise, linear 1x1 projection, residual if shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += conv_bn_act(in_ch, hidden, 1, 1, nn.ReLU6)
        layers += conv_bn_act(hidden, hidden, 3, stride, nn.ReLU6, groups=hidden)
        layers += [nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


def build_mobilenetv2(name: str, num_classes: int, in_channels: int, image_size: int,
                      width: float) -> nn.Sequential:
    """MobileNetV2: stem, 17 blocks, 1x1 conv to 1280 (x width), pool, flatten, dropout, fc."""
    del name
    stem_ch = scaled(STEM_CHANNELS, width)
    stem_stride = 1 if image_size <= 32 else 2
    blocks: list[nn.Module] = []
    in_ch = stem_ch
    for expansion, channels, repeats, stride in SETTINGS:
        out_ch = scaled(channels, width)
        for i in range(repeats):
            blocks.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, expansion))
            in_ch = out_ch
    last_ch = scaled(LAST_CHANNELS, width)
    model = nn.Sequential(OrderedDict(
        stem=conv_bn_act_stage(in_channels, stem_ch, 3, stem_stride, nn.ReLU6),
        blocks=nn.Sequential(*blocks),
        last_conv=conv_bn_act_stage(in_ch, last_ch, 1, 1, nn.ReLU6),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        dropout=nn.Dropout(0.2),
        fc=nn.Linear(last_ch, num_classes),
    ))
    return init_cnn(model)
