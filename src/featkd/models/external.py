"""Models from torchvision and timm by name: ``torchvision:NAME`` and ``timm:NAME``.

A name may carry the factory's own arguments after a second colon,
``timm:vit_tiny_patch16_224:img_size=32,patch_size=4`` (values read as YAML:
numbers, booleans, lists such as ``channels=[16,32,64,128]``). featkd passes
``num_classes`` (and timm's ``in_chans``) unless the name sets them. Weights
are never downloaded: torchvision models are built with ``weights=None``,
timm models with ``pretrained=False``; load trained weights from a checkpoint.
torchvision models take 3 channels: for other inputs the first 3-channel
``nn.Conv2d`` is rebuilt for ``in_channels``. timm is an optional extra
(``pip install featkd[timm]``).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from torch import nn

__all__ = ["LIBRARIES", "check_external", "create_external", "is_external", "parse_external"]

LIBRARIES = ("torchvision", "timm")
_REFUSED = {"weights": "featkd never downloads weights", "pretrained": "featkd never downloads weights",
            "pretrained_cfg_overlay": "featkd never downloads weights"}
_ARGUMENT = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)", re.DOTALL)


def is_external(name: str) -> bool:
    """Whether ``name`` names a torchvision or timm model (``library:NAME[:key=value,...]``)."""
    return name.partition(":")[0] in LIBRARIES


def _parse_arguments(text: str, name: str) -> dict[str, Any]:
    """``"a=1,b=[2,3],c=x"`` -> ``{"a": 1, "b": [2, 3], "c": "x"}``."""
    arguments: dict[str, Any] = {}
    for part in re.split(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)", text) if text.strip() else []:
        match = _ARGUMENT.fullmatch(part)
        if match is None:
            raise ValueError(f"model {name!r}: arguments must look like key=value,key=value; "
                             f"got {part!r}")
        key, value = match.group(1), match.group(2).strip()
        try:
            arguments[key] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            arguments[key] = value
    return arguments


def parse_external(name: str) -> tuple[str, str, dict[str, Any]]:
    """``"timm:vit_tiny_patch16_224:img_size=32"`` -> ``("timm", "vit_tiny_patch16_224", {...})``."""
    library, _, rest = name.partition(":")
    factory, _, text = rest.partition(":")
    if library not in LIBRARIES or not factory.strip():
        raise ValueError(f"model {name!r}: expected torchvision:NAME or timm:NAME, with optional "
                         ":key=value,... arguments")
    arguments = _parse_arguments(text, name)
    for key, reason in _REFUSED.items():
        value = arguments.pop(key, None)  # no weights (None, false) is what featkd passes anyway
        if value and str(value).lower() != "none":
            raise ValueError(f"model {name!r}: {key}={value!r} is refused ({reason}); "
                             "load trained weights with a checkpoint instead")
    return library, factory.strip(), arguments


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need the timm package: pip install 'featkd[timm]'") from None
    return timm


def _unknown(library: str, factory: str, known: list[str], listing: str) -> ValueError:
    close = difflib.get_close_matches(factory, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown {library} model {factory!r}{hint} (all: {listing})")


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_external(name: str) -> None:
    """Raise ValueError when ``name`` is not a buildable torchvision/timm model name."""
    library, factory, _ = parse_external(name)
    if library == "torchvision":
        known = _torchvision_names()
        if factory not in known:
            raise _unknown(library, factory, known, "torchvision.models.list_models()")
    else:
        timm = _timm()
        if not timm.is_model(factory):
            raise _unknown(library, factory, timm.list_models(), "timm.list_models()")


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    """Rebuild the first 3-channel ``nn.Conv2d`` of ``model`` for ``in_channels`` inputs."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            conv = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, module.dilation, module.groups,
                             module.bias is not None, module.padding_mode)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, conv)
            return
    raise ValueError(f"{type(model).__name__} has no 3-channel nn.Conv2d to rebuild for "
                     f"{in_channels}-channel images")


def create_external(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the torchvision or timm model ``name`` (random weights) for ``num_classes`` classes."""
    check_external(name)
    library, factory, arguments = parse_external(name)
    arguments.setdefault("num_classes", num_classes)
    try:
        if library == "torchvision":
            import torchvision

            model = torchvision.models.get_model(factory, weights=None, **arguments)
            if in_channels != 3:
                _adapt_input_channels(model, in_channels)
        else:
            arguments.setdefault("in_chans", in_channels)
            model = _timm().create_model(factory, pretrained=False, **arguments)
    except (TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"cannot build model {name!r}: {err}") from err
    return model
