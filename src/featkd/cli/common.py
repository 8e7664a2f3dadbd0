"""Helpers shared by the ``featkd`` commands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from featkd.checkpoint import WeightsFile

__all__ = ["CliError", "DefaultsHelpFormatter", "build_model_from_args", "parse_layers"]

LAYER_KEYWORDS = ("all", "auto", "standard", "paper")


class CliError(Exception):
    """A bad command-line value: reported in one line, exit status 2."""


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
