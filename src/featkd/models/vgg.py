"""VGG11-BN / VGG19-BN for small images, as chains.

``features`` uses torchvision's indices and convs with bias (conv, bn, relu,
..., max-pool), so ImageNet weights map one to one. After the last max-pool an adaptive average
pool to 1x1 (a no-op at 32 px, where the map is already 1x1) keeps the
classifier's first Linear at 512 inputs for any image size.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .common import conv_bn_act, init_cnn, scaled

POOL = "M"
CONFIGS = {
    "vgg11_bn": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    "vgg19_bn": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
                 512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL),
}
HIDDEN = 4096


def build_vgg(name: str, num_classes: int, in_channels: int, image_size: int,
              width: float) -> nn.Sequential:
    """VGG-BN with classifier Linear(512, 4096)-ReLU-Dropout-Linear(4096, 4096)-ReLU-Dropout-Linear."""
    smallest = 2 ** CONFIGS[name].count(POOL)  # each max-pool halves the map; below this one ends at 0x0
    if image_size < smallest:
        raise ValueError(f"{name} needs image_size >= {smallest} (its {CONFIGS[name].count(POOL)} max-pools "
                         f"halve the map), got {image_size}; pass a larger image size")
    layers: list[nn.Module] = []
    in_ch = in_channels
    for item in CONFIGS[name]:
        if item == POOL:
            layers.append(nn.MaxPool2d(2, 2))
        else:
            out_ch = scaled(item, width)
            layers += conv_bn_act(in_ch, out_ch, 3, 1, nn.ReLU, bias=True)
            in_ch = out_ch
    hidden = scaled(HIDDEN, width)
    classifier = nn.Sequential(
        nn.Linear(in_ch, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(hidden, num_classes),
    )
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(*layers),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        classifier=classifier,
    ))
    return init_cnn(model)
