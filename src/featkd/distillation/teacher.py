"""Teacher outputs for distillation: run online per batch, or cached once by sample index.

Features are kept as tapped: conv maps (B, C, H, W), ViT tokens (B, T, d),
vectors (B, D). The teacher always runs in eval mode without gradients.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no flock, so no cache folder can be told stale; none is removed
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from featkd.layers import FeatureTap, resolve_layers

__all__ = ["OnlineTeacher", "TeacherCache", "TeacherOutputs", "online_beats_cache", "remove_stale_caches"]

log = logging.getLogger(__name__)

CACHE_PREFIX = "featkd-teacher-cache-"
# Held locked (flock) by the process whose cache the folder is; the OS drops the lock when that
# process ends, however it ends, so an unlockable folder belongs to a live process (this one
# included: flock locks of separate opens conflict).
_LOCK_FILE = "owner.lock"


@dataclass
class TeacherOutputs:
    """Teacher features (in the method's teacher-layer order) and logits (None if unused)."""

    features: list[Tensor]
    logits: Tensor | None = None


class OnlineTeacher:
    """Run the teacher on each batch: ``OnlineTeacher(teacher, layers, need_logits)(x)``.

    When logits are not needed the forward pass stops after the deepest tapped layer.
    Outputs are float32, as the cache stores them, so that under autocast a method
    sees the same numbers in both teacher modes.
    """

    def __init__(self, teacher: nn.Module, layers: Sequence[int | str], need_logits: bool) -> None:
        self.teacher = teacher
        self.layers = resolve_layers(teacher, list(layers)) if layers else []
        self.need_logits = bool(need_logits)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> TeacherOutputs:
        if not self.layers and not self.need_logits:
            return TeacherOutputs([], None)
        if any(module.training for module in self.teacher.modules()):  # a BatchNorm left training
            self.teacher.eval()                                          # would update its statistics
        logits = None
        with FeatureTap(self.teacher, self.layers, stop_early=not self.need_logits) as tap:
            logits = self.teacher(x)
        features = [f.float() for f in tap.outputs]
        return TeacherOutputs(features, logits.float() if self.need_logits else None)


def online_beats_cache(online: OnlineTeacher, dataset, device: torch.device | str, budget_bytes: int) -> bool:
    """Whether to run ``online`` per batch rather than cache its outputs over ``dataset``.

    True on an accelerator when the cache would exceed ``budget_bytes`` (memory-mapped files):
    there the teacher is cheap to run, while the files cost disk, a filling pass and a host copy
    per batch (one epoch on an H200 ran 1.5x faster online; BENCHMARKS.md's GPU check). On the
    CPU the teacher is the expensive part, so the cache is always built.
    """
    if torch.device(device).type == "cpu":
        return False
    x, _, _ = dataset.with_augment(False).batch(torch.arange(1))
    needed = TeacherCache.size_bytes(online(x.to(device)), len(dataset))
    if needed <= budget_bytes:
        return False
    log.info("teacher outputs: online (a cache of %.1f GB exceeds the %.1f GB budget on %s)",
             needed / 1e9, budget_bytes / 1e9, device)
    return True


def _remove_directory(directory: Path | None, lock: IO[bytes] | None = None) -> None:
    if lock is not None:
        lock.close()  # releases the flock
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _lock_directory(directory: Path) -> IO[bytes] | None:
    """Lock ``directory`` for this process: the lock holds while the returned file stays open."""
    if fcntl is None:
        return None
    lock = open(directory / _LOCK_FILE, "wb")  # closed by _remove_directory
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        lock.close()
        raise
    return lock


def _in_use(directory: Path) -> bool:
    """Whether ``directory`` is the cache of a live process (this one or another)."""
    if fcntl is None:
        return True  # cannot tell: keep it
    try:
        lock = open(directory / _LOCK_FILE, "rb")
    except FileNotFoundError:
        return False  # never locked: its process died while creating it (or predates the lock)
    except OSError:
        return True  # not ours to judge (permissions): leave it
    with lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        return False


def remove_stale_caches(directory: str | Path) -> list[Path]:
    """Delete the memmap cache folders (``featkd-teacher-cache-*``) in ``directory`` that no live
    process uses: those of a process killed (SIGKILL, a crash, an unhandled signal) before it could
    remove them. A cache is always rebuilt from the teacher, so nothing of value is lost. Caches in
    use, by this process or another, are kept. Returns the folders removed.
    """
    removed = []
    for folder in sorted(Path(directory).glob(f"{CACHE_PREFIX}*")):
        if not folder.is_dir() or folder.is_symlink() or _in_use(folder):
            continue
        log.info("removing the stale teacher cache %s left by an earlier process", folder)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class TeacherCache:
    """Teacher outputs for every sample of a dataset, looked up by sample index.

    Build with :meth:`build`. Arrays live in RAM when they fit ``memory_budget_bytes``,
    otherwise in ``np.memmap`` files inside a fresh sub-directory ``featkd-teacher-cache-*``
    of ``cache_dir`` (a temporary directory when None); the files are removed by
    :meth:`close` or when the cache is garbage-collected. A folder left by a killed
    process is deleted by :func:`remove_stale_caches` (``featkd.train.prepare_output``
    calls it when a run directory is claimed).
    """

    def __init__(self, features: list[Tensor | np.memmap], logits: Tensor | np.memmap | None,
                 directory: Path | None = None, lock: IO[bytes] | None = None) -> None:
        self._features = features
        self._logits = logits
        self._views: dict[tuple, TeacherCache] = {}
        self.directory = directory
        self._finalizer = weakref.finalize(self, _remove_directory, directory, lock)

    @property
    def in_memory(self) -> bool:
        """True when the arrays are held in RAM rather than memory-mapped files."""
        return self.directory is None

    @staticmethod
    def size_bytes(outputs: TeacherOutputs, count: int, dtype: torch.dtype = torch.float32) -> int:
        """Bytes a cache of ``count`` samples takes, from one batch of ``outputs`` (logits float32)."""
        per_sample = sum(math.prod(f.shape[1:]) for f in outputs.features) * (torch.finfo(dtype).bits // 8)
        if outputs.logits is not None:
            per_sample += outputs.logits.shape[1] * 4
        return count * per_sample

    @property
    def nbytes(self) -> int:
        arrays = [*self._features, *([self._logits] if self._logits is not None else [])]
        return sum(int(a.nbytes) for a in arrays)

    def __len__(self) -> int:
        arrays = [*self._features, *([self._logits] if self._logits is not None else [])]
        return int(arrays[0].shape[0]) if arrays else 0

    def close(self) -> None:
        """Drop the arrays and delete any memmap files."""
        self._features, self._logits, self._views = [], None, {}
        self._finalizer()

    def lookup(self, idx: Tensor, device: torch.device | str = "cpu") -> TeacherOutputs:
        """Rows for sample indices ``idx`` as float32 tensors on ``device``."""
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1).cpu()
        features = [self._gather(a, idx, device) for a in self._features]
        logits = self._gather(self._logits, idx, device) if self._logits is not None else None
        return TeacherOutputs(features, logits)

    def view(self, sizes: Sequence[tuple[int, ...] | None], memory_budget_bytes: int) -> TeacherCache:
        """This cache with its maps pooled to ``sizes`` (a method's :meth:`teacher_pool_sizes`), made
        once per sizes and kept until :meth:`close`, when the cache is in RAM and the copies fit
        ``memory_budget_bytes`` beside it; else this cache (the losses then pool on every batch)."""
        sizes = tuple(tuple(size) if size else None for size in sizes)
        if not any(sizes) or len(sizes) != len(self._features) or not self.in_memory:
            return self
        if sizes not in self._views:
            held = self.nbytes + sum(self._pooled_bytes(key) for key, view in self._views.items()
                                     if view is not self)
            extra = self._pooled_bytes(sizes)
            fits = held + extra <= memory_budget_bytes
            self._views[sizes] = self.pooled(sizes) if fits else self
            log.info("teacher cache: %s", f"maps pooled once to {list(sizes)} ({extra / 1e6:.1f} MB)"
                     if fits else "no room to pool the maps once; the losses pool them every batch")
        return self._views[sizes]

    def pooled(self, sizes: Sequence[tuple[int, ...] | None], chunk: int = 4096) -> TeacherCache:
        """A cache of the same samples whose feature maps are average-pooled to ``sizes`` (H, W), in
        RAM as float32, each computed once as :func:`featkd.distillation.losses.resize_to` would on
        every batch; a None size shares the array as it is. Keep this cache open while it is used."""
        if len(sizes) != len(self._features):
            raise ValueError(f"{len(sizes)} sizes for {len(self._features)} cached features")
        features = [array if size is None else self._pool(array, tuple(size), chunk)
                    for array, size in zip(self._features, sizes)]
        return TeacherCache(features, self._logits)

    def _pooled_bytes(self, sizes: Sequence[tuple[int, ...] | None]) -> int:
        """Bytes :meth:`pooled` adds for ``sizes`` (float32 maps)."""
        return sum(len(self) * int(array.shape[1]) * math.prod(size) * 4
                   for array, size in zip(self._features, sizes) if size)

    @staticmethod
    def _pool(array: Tensor | np.memmap, size: tuple[int, ...], chunk: int) -> Tensor:
        from .losses import resize_to

        count = int(array.shape[0])
        out = torch.empty((count, int(array.shape[1]), *size), dtype=torch.float32)
        for start in range(0, count, chunk):
            rows = array[start : start + chunk]
            rows = rows if isinstance(rows, Tensor) else torch.from_numpy(np.ascontiguousarray(rows))
            out[start : start + chunk] = resize_to(rows.float(), size)
        return out

    @staticmethod
    def _gather(array: Tensor | np.memmap, idx: Tensor, device: torch.device | str) -> Tensor:
        rows = array[idx] if isinstance(array, Tensor) else torch.from_numpy(array[idx.numpy()])
        return rows.to(device, non_blocking=True).float()

    @classmethod
    def build(cls, teacher: nn.Module, dataset, layers: Sequence[int | str], need_logits: bool,
              batch_size: int, device: torch.device | str, memory_budget_bytes: int,
              cache_dir: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
              progress: bool = True) -> TeacherCache:
        """Run ``teacher`` once over ``dataset`` in index order (augmentation off).

        ``layers``: teacher layers to store (GL indices or module names); ``dtype``:
        float32 or float16 storage for the features (logits are always float32).
        """
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"cache dtype must be torch.float32 or torch.float16, got {dtype}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        online = OnlineTeacher(teacher, layers, need_logits)
        data = dataset.with_augment(False)
        count = len(data)
        starts = range(0, count, batch_size)
        if count == 0:
            raise ValueError("cannot cache the teacher outputs of an empty dataset")
        storage: _Storage | None = None
        try:
            with tqdm(total=count, desc="teacher cache", unit="img", disable=not progress) as bar:
                for start in starts:
                    indices = torch.arange(start, min(start + batch_size, count))
                    x, _, _ = data.batch(indices)
                    out = online(x.to(device))
                    if storage is None:
                        storage = _Storage(out, count, dtype, memory_budget_bytes, cache_dir)
                    storage.write(start, out)
                    bar.update(len(indices))
            storage.flush()
        except BaseException:
            if storage is not None:
                _remove_directory(storage.directory, storage.lock)
            raise
        return cls(storage.features, storage.logits, storage.directory, storage.lock)


class _Storage:
    """Preallocated arrays (RAM tensors or memmaps) shaped from the first batch."""

    def __init__(self, first: TeacherOutputs, count: int, dtype: torch.dtype, budget: int,
                 cache_dir: str | Path | None) -> None:
        shapes = [tuple(f.shape[1:]) for f in first.features]
        total = TeacherCache.size_bytes(first, count, dtype)
        self.directory: Path | None = None
        self.lock: IO[bytes] | None = None
        if total <= budget:
            log.info("teacher cache: %.1f MB in RAM", total / 1e6)
            self.features = [torch.empty((count, *s), dtype=dtype) for s in shapes]
            self.logits = (torch.empty(count, first.logits.shape[1], dtype=torch.float32)
                           if first.logits is not None else None)
            return
        parent = Path(cache_dir) if cache_dir is not None else None
        self.directory = Path(tempfile.mkdtemp(prefix=CACHE_PREFIX, dir=parent))
        log.info("teacher cache: %.1f MB in memmap files under %s", total / 1e6, self.directory)
        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        try:
            self.lock = _lock_directory(self.directory)
            self.features = [self._memmap(f"feature{i}.bin", (count, *s), np_dtype)
                             for i, s in enumerate(shapes)]
            self.logits = (self._memmap("logits.bin", (count, first.logits.shape[1]), np.float32)
                           if first.logits is not None else None)
        except BaseException:
            _remove_directory(self.directory, self.lock)
            raise

    def _memmap(self, name: str, shape: tuple[int, ...], dtype: type) -> np.memmap:
        return np.memmap(self.directory / name, dtype=dtype, mode="w+", shape=shape)

    def write(self, start: int, out: TeacherOutputs) -> None:
        arrays = [*self.features, *([self.logits] if self.logits is not None else [])]
        values = [*out.features, *([out.logits] if out.logits is not None else [])]
        for array, value in zip(arrays, values):
            stop = start + value.shape[0]
            if isinstance(array, Tensor):
                array[start:stop] = value.to("cpu", array.dtype)
            else:
                array[start:stop] = value.to("cpu", torch.float32).numpy().astype(array.dtype)

    def flush(self) -> None:
        for array in [*self.features, *([self.logits] if self.logits is not None else [])]:
            if isinstance(array, np.memmap):
                array.flush()
