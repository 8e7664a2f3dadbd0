"""Helpers shared by the ``featkd`` commands."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from featkd.checkpoint import WeightsFile

__all__ = ["CliError", "DefaultsHelpFormatter", "build_model_from_args", "out_of_memory_message", "parse_layers"]

LAYER_KEYWORDS = ("all", "auto", "standard", "paper")


class CliError(Exception):
    """A bad command-line value: reported in one line, exit status 2."""


# The sizes a failed allocation reports: in bytes on the CPU, as "2.00 GiB" on CUDA and MPS.
_HOST_REQUEST = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_DEVICE_REQUEST = re.compile(r"[Tt]ried to allocate (\d+(?:\.\d+)? ?[KMGTP]?i?B|\d+ bytes)")
_MEMORY_OPTIONS = {"quality": "--subset-size, --batch-size or --image-size"}


def out_of_memory_message(err: BaseException, command: str) -> str | None:
    """One line for an allocation that failed on any device, naming the options that lower the
    memory ``command`` needs; None when ``err`` is not an allocation failure."""
    text = str(err)
    host = _HOST_REQUEST.search(text)
    if host:
        memory, request = "host memory", _binary_size(int(host[1]))
    elif isinstance(err, torch.OutOfMemoryError) or " out of memory" in text:
        backend = text.split(" out of memory")[0].strip()  # "CUDA", "MPS backend"
        memory = f"{backend or 'device'} memory"
        found = _DEVICE_REQUEST.search(text)
        request = found[1] if found else None
    else:
        return None
    tried = f": tried to allocate {request}" if request else ""
    options = _MEMORY_OPTIONS.get(command, "--batch-size, --eval-batch-size or --image-size")
    return f"out of {memory}{tried}; lower {options}"


def _binary_size(n: int) -> str:
    exponent = min(4, (n.bit_length() - 1) // 10) if n else 0
    return f"{n} B" if exponent == 0 else f"{n / 1024 ** exponent:.1f} {'KMGT'[exponent - 1]}iB"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where its help already states one or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "(default" in text:
            return text
        return super()._get_help_string(action)


def parse_layers(text: str) -> str | list[int | str]:
    """``"all"``/``"auto"``/``"standard"``/``"paper"`` or ``"3,7,layer3.1"`` -> list."""
    text = text.strip()
    if text in LAYER_KEYWORDS:
        return text
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise CliError(f"empty layer list {text!r}: give GL indices like 1,2,3 or module names")
    return [int(item) if item.lstrip("-").isdigit() else item for item in items]


def build_model_from_args(
    name: str,
    width: float,
    num_classes: int,
    in_channels: int,
    image_size: int,
    checkpoint: str | WeightsFile | None = None,
) -> nn.Module:
    """A zoo model, with weights from a file, a run directory or a :class:`WeightsFile` when given."""
    from featkd.checkpoint import load_model_weights
    from featkd.models import create_model

    try:
        model = create_model(
            name, num_classes, in_channels=in_channels, image_size=image_size, width=width
        )
    except ValueError as err:
        raise CliError(str(err)) from err
    if checkpoint is not None:
        load_model_weights(model, checkpoint, name)
    return model
