"""In-memory image datasets and a deterministic, rank-sharded batch loader."""

from __future__ import annotations

import copy
import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .tensors import CROP_PADDING, channel_stats, derive_generator, label_tensor, normalize, random_crop_flip


class ImageDataset(Dataset):
    """Images as uint8 (N, C, H, W), labels int64 (N,); items are (normalised image, label, index).

    ``mean``/``std`` are per-channel in [0, 1] pixel units (default: computed from ``images``;
    :func:`get_datasets` passes the training split's values to both splits).
    ``source``: for a split of :func:`~featkd.data.load_splits`, the settings that load it
    again (``data``, ``data_root``, ``image_size``, ``data_options``, ``train_limit``,
    ``data_seed``, ``val_size``, ``val_seed`` and ``split``); None for other images. Read only.
    """

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str] | None = None,
                 mean: Tensor | None = None, std: Tensor | None = None, augment: bool = False,
                 name: str = "", source: dict[str, Any] | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels = label_tensor(labels)
        if labels.numel() != images.shape[0]:
            raise ValueError(f"{labels.numel()} labels for {images.shape[0]} images")
        self.images, self.labels = images, labels
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
        self.classes = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
        if mean is None or std is None:
            mean, std = channel_stats(images)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).cpu()
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1).cpu()
        if self.mean.numel() != images.shape[1] or self.std.numel() != images.shape[1]:
            raise ValueError(f"mean/std need {images.shape[1]} values, one per channel")
        self.augment = bool(augment)
        self.name = name
        self.source = source

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name or 'unnamed'}: {len(self)} images {self.image_shape}, "
                f"{self.num_classes} classes, augment={self.augment})")

    def batch(self, indices: Tensor, generator: torch.Generator | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
        """(x float (B, C, H, W) normalised, y int64 (B,), indices int64 (B,)) for ``indices``.

        With ``augment``, each sample gets its own random crop and flip drawn from ``generator``
        (the global torch RNG when None).
        """
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        images = self.images[indices.to(self.images.device)]
        if self.augment:
            images = random_crop_flip(images, CROP_PADDING, generator)
        return normalize(images, self.mean, self.std), self.labels[indices], indices

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        x, y, _ = self.batch(torch.tensor([index]))
        return x[0], int(y[0]), index

    def with_augment(self, augment: bool = True) -> "ImageDataset":
        """A view sharing images, labels and statistics, with augmentation switched on or off."""
        view = copy.copy(self)
        view.augment = bool(augment)
        return view

    def subset(self, indices: Tensor) -> "ImageDataset":
        """A dataset of the given samples (copied), keeping classes and normalisation statistics.

        Sample indices yielded by the subset are positions within it, not in the parent. It has
        no ``source``: loading the data again does not give it.
        """
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(self.images[indices], self.labels[indices], self.classes, self.mean,
                            self.std, self.augment, self.name)


class BatchLoader:
    """Batches (x float, y int64, idx int64) on the CPU, without DataLoader workers.

    The order is a permutation drawn from (seed, epoch) (the same on every rank); ranks take
    interleaved slices of it, padded by wrapping around (or truncated with ``drop_last``) so
    that every rank yields ``len(self)`` batches, like DistributedSampler. ``drop_last`` also
    drops an incomplete final batch. Augmentation draws come from (seed, epoch, rank).
    For evaluation use ``shuffle=False`` (and, with several ranks, deduplicate by idx).
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle and augmentation draws the next iteration uses."""
        self.epoch = int(epoch)

    def _samples_per_rank(self) -> int:
        n = len(self.dataset)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        per_rank = self._samples_per_rank()
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    @property
    def last_batch_size(self) -> int:
        """Images in each epoch's last batch on this rank (0 when there is no batch)."""
        if not len(self):
            return 0
        return min(self.batch_size, self._samples_per_rank() - (len(self) - 1) * self.batch_size)

    def indices(self) -> Tensor:
        """This rank's sample indices for the current epoch, in iteration order."""
        n = len(self.dataset)
        total = self._samples_per_rank() * self.world_size
        if total == 0:
            return torch.zeros(0, dtype=torch.int64)
        order = (torch.randperm(n, generator=derive_generator(self.seed, self.epoch)) if self.shuffle
                 else torch.arange(n))
        return order[torch.arange(total) % n][self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        indices = self.indices()
        generator = derive_generator(self.seed, self.epoch, self.rank, 1)
        for b in range(len(self)):
            yield self._fetch(indices[b * self.batch_size:(b + 1) * self.batch_size], generator)

    def _fetch(self, indices: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        if hasattr(self.dataset, "batch"):
            return self.dataset.batch(indices, generator)
        items = [self.dataset[i] for i in indices.tolist()]  # generic Dataset fallback
        x = torch.stack([torch.as_tensor(item[0]) for item in items])
        return x, torch.tensor([int(item[1]) for item in items]), indices
