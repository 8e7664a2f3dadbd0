"""ImageNet initialisation of the zoo's teachers from LOCAL torchvision state_dict files.

* resnet34 <- torchvision ``resnet34``: every block and the stem BatchNorm are copied;
  the 7x7/2 stem conv is replaced by our new 3x3/1 conv and ``fc`` is new.
* vgg19_bn <- torchvision ``vgg19_bn``: all conv/BN ``features`` and the middle
  Linear(4096, 4096) are copied; the first classifier Linear (25088 -> 4096 there,
  512 -> 4096 here) and the last Linear are new.
* vit_b <- torchvision ``vit_b_16``: the 16x16 patch kernel is average-pooled to our
  patch size (4x4 at 32 px), the 14x14 positional grid is resized bicubically to 8x8
  with the CLS position kept first; blocks and the final LayerNorm map directly; the
  head is new.

Average pooling divides the patch response by (16 / patch)^2 on smooth images;
``rescale_patch=True`` multiplies that factor back (sum pooling). The default follows
the spec ("average-pooled"); the pre-LN blocks and fine-tuning absorb the scale.
A 1-channel model gets the RGB kernel of its first conv summed over colours, which
equals feeding the grey image replicated to three channels.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["IMAGENET_MODELS", "ImageNetLoadReport", "load_imagenet_weights",
           "pool_patch_kernel", "resize_pos_embedding"]


@dataclass
class ImageNetLoadReport:
    """Which of our keys were filled from the checkpoint, which stay new, which source keys went unused."""

    loaded: list[str]
    new: list[str]
    unused: list[str]


def _resnet34_key(key: str) -> str | None:
    if key.startswith("layer"):
        return key
    if key.startswith("bn1."):
        return "stem.bn." + key[len("bn1."):]
    return None  # conv1: 7x7/2 stem replaced; fc: new head


def _vgg19_bn_key(key: str) -> str | None:
    return key if key.startswith(("features.", "classifier.3.")) else None


_VIT_BLOCK = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)")
_VIT_MLP = {"mlp.0.": "mlp.0.", "mlp.3.": "mlp.2.", "mlp.linear_1.": "mlp.0.", "mlp.linear_2.": "mlp.2."}


def _vit_b_key(key: str) -> str | None:
    if key == "class_token":
        return "patch_embed.cls_token"
    if key == "encoder.pos_embedding":
        return "patch_embed.pos_embedding"
    if key.startswith("conv_proj."):
        return "patch_embed.proj." + key[len("conv_proj."):]
    if key.startswith("encoder.ln."):
        return "norm." + key[len("encoder.ln."):]
    match = _VIT_BLOCK.fullmatch(key)
    if match:
        index, rest = match.groups()
        for old, new in _VIT_MLP.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
        return f"blocks.{index}.{rest}"
    return None  # heads: new


# name -> (source key -> our key or None, prefixes of our keys that are meant to stay new)
_MAPPINGS: dict[str, tuple[Callable[[str], str | None], tuple[str, ...]]] = {
    "resnet34": (_resnet34_key, ("stem.conv.", "fc.")),
    "vgg19_bn": (_vgg19_bn_key, ("classifier.0.", "classifier.6.")),
    "vit_b": (_vit_b_key, ("head.",)),
}
IMAGENET_MODELS = tuple(_MAPPINGS)


def pool_patch_kernel(weight: Tensor, patch: int, rescale: bool = False) -> Tensor:
    """Average-pool a (d, C, k, k) patch kernel to (d, C, patch, patch); ``rescale`` keeps its sum."""
    pooled = F.adaptive_avg_pool2d(weight, (patch, patch))
    if rescale:
        pooled = pooled * (weight.shape[-2] * weight.shape[-1]) / (patch * patch)
    return pooled


def resize_pos_embedding(pos: Tensor, grid: int) -> Tensor:
    """(1, 1 + g^2, d) positional embedding -> (1, 1 + grid^2, d): bicubic resize, CLS kept first."""
    cls, patches = pos[:, :1], pos[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ValueError(f"positional embedding has {patches.shape[1]} patch tokens, not a square grid")
    dim = pos.shape[-1]
    image = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False,
                            antialias=grid < old)
    return torch.cat([cls, resized.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def _fit(key: str, src: Tensor, dst: Tensor, rescale_patch: bool) -> Tensor:
    """Transform checkpoint tensor ``src`` to the shape of our tensor ``dst``."""
    if key == "patch_embed.proj.weight":
        src = pool_patch_kernel(src, dst.shape[-1], rescale_patch)
    elif key == "patch_embed.pos_embedding" and src.shape != dst.shape:
        src = resize_pos_embedding(src, math.isqrt(dst.shape[1] - 1))
    if src.dim() == 4 and src.shape[1] == 3 and dst.shape[1] == 1:
        src = src.sum(dim=1, keepdim=True)  # grey input: RGB kernels summed
    if src.shape != dst.shape:
        raise ValueError(
            f"{key}: checkpoint gives shape {tuple(src.shape)}, the model has {tuple(dst.shape)}; "
            "ImageNet weights fit only width=1 models with 1 or 3 input channels"
        )
    return src.to(dst.dtype)


def _read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{source!r} is not a state_dict (a mapping of names to tensors)")
    return dict(state)


@torch.no_grad()
def load_imagenet_weights(model: nn.Module, name: str,
                          path: str | os.PathLike | Mapping[str, Tensor], *,
                          rescale_patch: bool = False) -> ImageNetLoadReport:
    """Initialise zoo model ``name`` (built by create_model, width 1) from a local torchvision
    ImageNet state_dict file (or an already loaded state_dict). Never downloads."""
    if name not in _MAPPINGS:
        raise ValueError(f"no ImageNet mapping for {name!r}; available: {', '.join(IMAGENET_MODELS)}")
    rename, new_prefixes = _MAPPINGS[name]
    source = _read_state_dict(path)
    target = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unused: list[str] = []
    for key, tensor in source.items():
        ours = rename(key)
        if ours is None:
            unused.append(key)
        elif ours not in target:
            raise ValueError(f"checkpoint key {key!r} maps to {ours!r}, which the model lacks: "
                             f"is the model a {name} from featkd.models.create_model?")
        else:
            mapped[ours] = _fit(ours, tensor, target[ours], rescale_patch)
    new = [k for k in target if k not in mapped]
    missing = [k for k in new if not k.startswith(new_prefixes)]
    if missing:
        raise ValueError(f"the checkpoint is not a torchvision {name} state_dict: it lacks "
                         f"weights for {len(missing)} layers, e.g. {missing[:3]}")
    model.load_state_dict({**target, **mapped})
    logger.info("ImageNet init of %s: %d tensors loaded, %d new, %d checkpoint tensors unused",
                name, len(mapped), len(new), len(unused))
    return ImageNetLoadReport(loaded=list(mapped), new=new, unused=unused)
