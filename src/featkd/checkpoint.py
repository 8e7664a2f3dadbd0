"""Tensor-only checkpoints, written atomically, and model weights from common file formats.

Files hold nested dicts/lists of tensors and plain numbers or strings, so they
load with ``torch.load(weights_only=True)``: nothing arbitrary is unpickled.
A file is written to a temporary name in the same folder and renamed, so a
crash never leaves a half-written checkpoint.

:func:`load_model_weights` reads a state dict from a ``.pt``/``.pth`` file
(``torch.save(model.state_dict())``), a ``.safetensors`` file, a Lightning
checkpoint (``{"state_dict": {"model.…": …}}``), a DDP or ``torch.compile``
state dict (``module.``/``_orig_mod.`` prefixes), featkd's own ``checkpoint.pt``
or a run directory (its ``model.pt``). Wrapper prefixes are found by matching
the file's keys against the model's. Any file that is not a readable tensor
file, or whose tensors do not fit the model, raises :class:`CheckpointError`
with one line that names the file.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "MODEL_FILE",
    "CheckpointError",
    "WeightsFile",
    "load_model_weights",
    "load_tensors",
    "read_weights",
    "save_tensors",
    "weights_digest",
    "weights_path",
]

MODEL_FILE = "model.pt"
SAFETENSORS_SUFFIX = ".safetensors"
_PLAIN = (Tensor, int, float, str, bool, type(None))
_SHOWN_KEYS = 3  # keys listed per kind in a does-not-fit error
_PREFIX_DEPTH = 3  # wrapper prefixes tried: up to this many dotted components ("state_dict.model.")
_OPTIONAL_KEY_SUFFIXES = ("num_batches_tracked",)  # BatchNorm fills these in when a file lacks them


class CheckpointError(ValueError):
    """A weights file that cannot be read, or that does not fit the model (one-line message)."""


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; give it the mode open() would
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failed_write = err.__context__  # torch.save reports a failed write (a full disk) as a RuntimeError
        if isinstance(err, RuntimeError) and isinstance(failed_write, OSError):
            raise OSError(failed_write.errno, f"cannot write {path}: {failed_write.strerror}") from err
        raise


@functools.cache
def _umask() -> int:
    """The process umask, read once (reading it means setting it, so not on every write)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def load_tensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a torch file without unpickling objects; :class:`CheckpointError` (one line) when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects ({found.group(1)}), not only tensors; "
                "featkd never unpickles objects (they can run code): save model.state_dict() instead"
            ) from None
        raise CheckpointError(_unreadable(path)) from None
    except Exception:  # torch raises RuntimeError, EOFError, ValueError, ... for damaged files
        raise CheckpointError(_unreadable(path)) from None


def _unreadable(path: Path) -> str:
    return (f"checkpoint {path} is not a readable torch file (corrupt, truncated, or not written by "
            "torch.save); featkd reads .pt/.pth state dicts and .safetensors files")


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({first})") from None


# --------------------------------------------------------------------------- model weights
@dataclass
class WeightsFile:
    """The tensors of one weights file, flattened to dotted keys (read once, loaded into models later)."""

    path: Path
    tensors: dict[str, Tensor]


def weights_path(path_or_run_dir: str | os.PathLike) -> Path:
    """The weights file itself, or ``model.pt`` of a run directory; FileNotFoundError naming the place."""
    path = Path(path_or_run_dir)
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        runs = sorted(p.parent for p in path.glob(f"run-*/{MODEL_FILE}"))
        if runs:
            raise CheckpointError(f"{path} holds {len(runs)} runs; pass one of them: {', '.join(map(str, runs))}")
        raise FileNotFoundError(f"{path} holds no {MODEL_FILE} (is the run finished?)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def read_weights(path_or_run_dir: str | os.PathLike) -> WeightsFile:
    """Read every tensor of a weights file (or of a run directory's ``model.pt``), without unpickling objects.

    Nested dicts become dotted keys (``{"state_dict": {"fc.weight": …}}`` -> ``"state_dict.fc.weight"``);
    values that are not tensors (epochs, hyper-parameters, optimizer lists) are dropped.
    """
    path = weights_path(path_or_run_dir)
    if path.suffix == SAFETENSORS_SUFFIX:
        return WeightsFile(path, _load_safetensors(path))
    content = load_tensors(path)
    if not isinstance(content, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(content).__name__}, not a dict of tensors")
    tensors = _flatten(content)
    if not tensors:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    return WeightsFile(path, tensors)


def _flatten(content: Mapping, prefix: str = "") -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in content.items():
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
    return out


def load_model_weights(
    model: nn.Module, source: str | os.PathLike | WeightsFile, model_name: str | None = None
) -> None:
    """Load weights into ``model`` from a file, a run directory or a :class:`WeightsFile`.

    Wrapper prefixes (``module.``, Lightning's ``state_dict.model.``, ``_orig_mod.``) are
    stripped when that makes the keys match. Raises :class:`CheckpointError` naming
    ``model_name`` (default: the class name) with the counts and first few missing,
    unexpected and differently shaped keys when the tensors do not fit.
    """
    weights = source if isinstance(source, WeightsFile) else read_weights(source)
    name = model_name or type(model).__name__
    expected = model.state_dict()
    state = _strip_wrapper_prefix(weights.tensors, expected)
    problems = _mismatches(state, expected)
    if problems:
        raise CheckpointError(f"checkpoint {weights.path} does not fit {name}: {problems}; "
                              "wrong model name, width or number of classes?")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # e.g. a module's own load hook refusing a value
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"checkpoint {weights.path} does not fit {name}: {first}") from None


def _strip_wrapper_prefix(tensors: dict[str, Tensor], expected: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors under the dotted prefix whose stripped keys match most of ``expected`` (ties: shortest)."""
    counts: dict[str, int] = {"": sum(k in expected for k in tensors)}
    for key in tensors:
        parts = key.split(".")
        for depth in range(1, min(_PREFIX_DEPTH, len(parts) - 1) + 1):
            if ".".join(parts[depth:]) in expected:
                prefix = ".".join(parts[:depth]) + "."
                counts[prefix] = counts.get(prefix, 0) + 1
    best = max(counts, key=lambda p: (counts[p], -len(p)))
    if not best:
        return dict(tensors)
    return {k[len(best):]: v for k, v in tensors.items() if k.startswith(best)}


def _mismatches(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    """``"n missing (e.g. …), m unexpected (e.g. …), j of another shape (e.g. …)"``; "" when they fit."""
    missing = [k for k in expected if k not in state and not k.endswith(_OPTIONAL_KEY_SUFFIXES)]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in state and state[k].shape != v.shape]
    parts = []
    for items, what in ((missing, f"of the model's {len(expected)} tensors missing"),
                        (unexpected, "unexpected"), (reshaped, "of another shape (file vs model)")):
        if items:
            shown = ", ".join(items[:_SHOWN_KEYS]) + (", ..." if len(items) > _SHOWN_KEYS else "")
            parts.append(f"{len(items)} {what} (e.g. {shown})")
    return ", ".join(parts)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state (names, dtypes, shapes and values, in order): the same weights
    give the same digest on every device and file format."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()
