"""What a run actually used: effective settings, software versions and the code's git commit.

``config.yaml`` keeps the settings as given (``lr: null`` means "the recipe's
default"); ``run.json`` (:func:`run_record`) holds the values they resolved to,
so a run can be reproduced without knowing the defaults of the version that
made it.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["git_state", "run_record", "software_versions"]

_PACKAGES = ("featkd", "torch", "torchvision")
_SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding src/featkd, when run from one


def software_versions() -> dict[str, str | None]:
    """Versions of featkd, torch, torchvision (None when not installed) and Python."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions["featkd"] is None:  # run from a source tree that is not installed
        from featkd import __version__

        versions["featkd"] = __version__
    versions["python"] = platform.python_version()
    return versions


def git_state(root: Path = _SOURCE_ROOT) -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it) of the git checkout featkd runs from; (None, None) otherwise."""
    if not (root / ".git").exists() or not (root / "src" / "featkd").is_dir():
        return None, None
    try:
        head = _git(root, "rev-parse", "HEAD")
        changed = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None, None
    if head is None:
        return None, None
    return head, None if changed is None else bool(changed)


def _git(root: Path, *args: str) -> str | None:
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    return done.stdout.strip() if done.returncode == 0 else None


def run_record(config: Any, lr: float, settings: dict[str, Any] | None = None, *,
               world_size: int = 1, device: str = "cpu") -> dict[str, Any]:
    """The effective values of a run: lr, widths, ``settings`` (e.g. resolved layers), device, execution
    options (channels_last, compile), versions, git commit."""
    commit, dirty = git_state()
    widths = {name: getattr(config, name) for name in ("width", "teacher_width", "student_width")
              if getattr(config, name, None) is not None}
    return {
        "lr": lr,
        "widths": widths,
        **(settings or {}),
        "world_size": world_size,
        "device": device,
        # how it ran: these change float rounding (not what is computed), so a resume may switch them
        "execution": {name: getattr(config, name) for name in ("channels_last", "compile") if hasattr(config, name)},
        "versions": software_versions(),
        "git_commit": commit,
        "git_dirty": dirty,
    }
