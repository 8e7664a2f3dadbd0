"""The paper's model zoo (ResNet, VGG-BN, MobileNetV2 and ViT for 32/64 px images), and any
torchvision or timm model by name.

Every zoo model is a chain (nested ``nn.Sequential``), so running its leaf
modules in order is its forward pass. ``width`` scales every channel count
(``max(1, round(c * width))``) and the ViT hidden size, MLP width and head
count, never the depth. ``torchvision:NAME`` and ``timm:NAME`` (with the
factory's ``key=value`` arguments, see :mod:`featkd.models.external`) build
those libraries' models with random weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .common import check_args
from .external import check_external, create_external, is_external
from .imagenet import IMAGENET_MODELS, ImageNetLoadReport, load_imagenet_weights
from .mobilenet import build_mobilenetv2
from .resnet import build_resnet
from .vgg import build_vgg
from .vit import build_vit

__all__ = [
    "IMAGENET_MODELS",
    "PAPER_Q_LAYERS",
    "PAPER_STUDENT_LAYERS",
    "STANDARD_TEACHER_LAYERS",
    "ImageNetLoadReport",
    "check_classifier",
    "check_model_name",
    "create_model",
    "list_models",
    "load_imagenet_weights",
    "model_family",
    "peak_lr",
]

Builder = Callable[[str, int, int, int, float], nn.Sequential]

# name -> (family, builder)
_REGISTRY: dict[str, tuple[str, Builder]] = {
    "resnet9": ("resnet", build_resnet),
    "resnet18": ("resnet", build_resnet),
    "resnet34": ("resnet", build_resnet),
    "vgg11_bn": ("vgg", build_vgg),
    "vgg19_bn": ("vgg", build_vgg),
    "mobilenetv2": ("mobilenet", build_mobilenetv2),
    "vit_et": ("vit", build_vit),
    "vit_t": ("vit", build_vit),
    "vit_s": ("vit", build_vit),
    "vit_b": ("vit", build_vit),
}

# Generalized-layer indices (spec/experiments.md "Layer lists").
PAPER_STUDENT_LAYERS: dict[str, list[int]] = {
    "resnet9": [1, 2, 3, 4],
    "mobilenetv2": [3, 6, 13, 17],
    "vgg11_bn": [1, 3, 5, 7],
    "vit_et": [1, 3, 5, 7],
}
STANDARD_TEACHER_LAYERS: dict[str, list[int]] = {
    "resnet34": [3, 7, 13, 16],
    "vgg19_bn": [3, 7, 11, 15],
    "vit_b": [2, 4, 8, 10],
}
# Q-selected teacher layers of the authors' released configs: teacher -> dataset -> layers.
PAPER_Q_LAYERS: dict[str, dict[str, list[int]]] = {
    "resnet34": {"cifar10": [12, 13, 14, 15], "cifar100": [12, 13, 14, 15],
                 "tinyimagenet": [12, 13, 14, 15]},
    "vgg19_bn": {"cifar10": [11, 12, 13, 15], "cifar100": [11, 12, 13, 15],
                 "tinyimagenet": [11, 12, 13, 16]},
    "vit_b": {"cifar10": [9, 10, 11, 12], "cifar100": [7, 10, 11, 12],
              "tinyimagenet": [7, 8, 11, 12]},
}

# One-cycle peak learning rate (AdamW) per family; ViT-B (a fine-tuned teacher) is lower
# than the small ViTs trained from scratch. torchvision/timm models ("external") get
# AdamW's usual 1e-3.
EXTERNAL_FAMILY = "external"
_PEAK_LR = {"resnet": 0.0075, "mobilenet": 0.0075, "vgg": 0.005, "vit": 0.001,
            EXTERNAL_FAMILY: 0.001}
_PEAK_LR_OVERRIDES = {"vit_b": 1e-4}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> tuple[str, Builder]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def check_model_name(name: str) -> None:
    """Raise ValueError unless :func:`create_model` knows ``name`` (nothing is built)."""
    if is_external(name):
        check_external(name)
    else:
        _lookup(name)


def model_family(name: str) -> str:
    """Family of model ``name``: "resnet", "vgg", "mobilenet", "vit", or "external"
    for torchvision/timm models."""
    if is_external(name):
        return EXTERNAL_FAMILY
    return _lookup(name)[0]


def peak_lr(name: str) -> float:
    """The paper's one-cycle peak learning rate for model ``name``."""
    return _PEAK_LR_OVERRIDES.get(name, _PEAK_LR[model_family(name)])


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 width: float = 1.0) -> nn.Module:
    """Build model ``name`` for ``image_size``-px images with ``in_channels`` channels.

    Zoo models: up to 32 px the CNNs use CIFAR stems (ResNet 3x3/1 without
    max-pool, MobileNetV2 stride-1 stem); above, ResNets add a 3x3/2 max-pool
    and MobileNetV2's stem has stride 2. ViTs use patch ``image_size // 8``
    (65 tokens always). ``torchvision:NAME`` / ``timm:NAME[:key=value,...]``:
    that library's factory with random weights; ``image_size`` is not passed
    (give ``img_size=`` or ``image_size=`` in the name where the model needs
    it) and ``width`` must be 1 (give the factory's own width arguments).
    """
    check_args(num_classes, in_channels, image_size, width)
    if is_external(name):
        if width != 1.0:
            raise ValueError(f"width={width} scales zoo models only; give {name.split(':')[0]}'s "
                             "own arguments in the name instead, e.g. timm:resnet10t:channels=[16,32,64,128]")
        return create_external(name, num_classes, in_channels)
    _, builder = _lookup(name)
    return builder(name, num_classes, in_channels, image_size, width)


@torch.no_grad()
def check_classifier(model: nn.Module, sample: torch.Tensor, num_classes: int, role: str = "model",
                     training: bool = True) -> None:
    """Run ``model`` once on ``sample`` in eval mode and, when ``training``, once in training mode (on a
    copy: BatchNorm statistics change); ValueError in one line unless each returns (batch, num_classes)
    logits. So a model that cannot take the data's images fails before any file is written."""
    modes = (False, True) if training else (False,)
    probe = copy.deepcopy(model) if training else model
    was_training = model.training
    try:
        for mode in modes:
            probe.train(mode)
            try:
                output = probe(sample)
            except (RuntimeError, TypeError, ValueError, AssertionError, IndexError) as err:
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ValueError(f"the {role} ({type(model).__name__}) fails on a sample batch of shape "
                                 f"{tuple(sample.shape)}: {reason}") from None
            phase = "training" if mode else "eval"
            if not isinstance(output, torch.Tensor):
                hint = " (pass :aux_logits=False in the name)" if hasattr(model, "aux_logits") else ""
                raise ValueError(f"the {role} returns {type(output).__name__} in {phase} mode, not a logits "
                                 f"tensor{hint}")
            if tuple(output.shape) != (len(sample), num_classes):
                raise ValueError(f"the {role} outputs shape {tuple(output.shape)} in {phase} mode, expected "
                                 f"logits ({len(sample)}, {num_classes}) for the data's {num_classes} classes")
    finally:
        model.train(was_training)
