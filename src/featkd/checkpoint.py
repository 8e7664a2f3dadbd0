"""Tensor-only checkpoints, written atomically.

Files hold nested dicts/lists of tensors and plain numbers or strings, so they
load with ``torch.load(weights_only=True)``: nothing arbitrary is unpickled.
A file is written to a temporary name in the same folder and renamed, so a
crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["MODEL_FILE", "load_model_weights", "load_tensors", "save_tensors"]

MODEL_FILE = "model.pt"
_PLAIN = (Tensor, int, float, str, bool, type(None))


def _check_plain(obj: Any, where: str = "checkpoint") -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} holds a {type(obj).__name__}; checkpoints hold tensors only")


def save_tensors(path: str | os.PathLike, tensors: dict[str, Any]) -> None:
    """Write ``tensors`` (tensors, numbers, strings, nested dicts/lists) atomically."""
    _check_plain(tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a file written by :func:`save_tensors` without unpickling objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_model_weights(model: nn.Module, path_or_run_dir: str | os.PathLike) -> None:
    """Load a state dict from a file, or from ``model.pt`` in a run directory."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        path = path / MODEL_FILE
    state = load_tensors(path)
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise ValueError(
            f"checkpoint {path} does not fit {type(model).__name__} "
            f"(wrong model name, width or number of classes?): {first[0].strip()}"
        ) from err
