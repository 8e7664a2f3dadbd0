"""ResNet9/18/34 for small images, as chains (nn.Sequential of stem, stages, head).

Parameter names of the stages follow torchvision (``layer2.0.downsample.0``) so
ImageNet weights map one to one.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .common import conv_bn_act_stage, init_cnn, scaled

STAGE_CHANNELS = (64, 128, 256, 512)
BLOCKS = {"resnet9": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def build_resnet(name: str, num_classes: int, in_channels: int, image_size: int,
                 width: float) -> nn.Sequential:
    """ResNet with a 3x3/1 stem; inputs larger than 32 px get a 3x3/2 max-pool after it."""
    channels = [scaled(c, width) for c in STAGE_CHANNELS]
    parts: OrderedDict[str, nn.Module] = OrderedDict(
        stem=conv_bn_act_stage(in_channels, channels[0], 3, 1, nn.ReLU)
    )
    if image_size > 32:
        parts["maxpool"] = nn.MaxPool2d(3, 2, 1)
    in_ch = channels[0]
    for stage, (out_ch, count) in enumerate(zip(channels, BLOCKS[name]), start=1):
        stride = 1 if stage == 1 else 2
        blocks = [BasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
                  for i in range(count)]
        parts[f"layer{stage}"] = nn.Sequential(*blocks)
        in_ch = out_ch
    parts["pool"] = nn.AdaptiveAvgPool2d(1)
    parts["flatten"] = nn.Flatten()
    parts["fc"] = nn.Linear(in_ch, num_classes)
    return init_cnn(nn.Sequential(parts))
