"""Pure tensor functions: normalisation statistics, per-sample augmentation, resizing, subsets."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CROP_PADDING = 4


def channel_stats(images: Tensor, chunk_size: int = 2048) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] pixel units.

    Accumulates in float64 over chunks of samples; a constant channel gets std 1.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk_size):
        chunk = images[start:start + chunk_size].to("cpu", torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count / 255.0
    std = (total_sq / count / 255.0**2 - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.float(), std.float()


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel."""
    mean = mean.to(images.device).view(-1, 1, 1)
    std = std.to(images.device).view(-1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def random_crop_flip(images: Tensor, padding: int = CROP_PADDING,
                     generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random crop (zero padding ``padding``) and horizontal flip, by tensor indexing.

    Random numbers are drawn on the CPU from ``generator`` (crop offsets, then flips), so the
    result does not depend on the device the images live on.
    """
    batch, channels, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    rows = offsets[0, :, None] + torch.arange(height)                      # (B, H)
    cols = offsets[1, :, None] + torch.arange(width)                       # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    return padded[torch.arange(batch, device=device)[:, None, None, None],
                  torch.arange(channels, device=device)[None, :, None, None],
                  rows.to(device)[:, None, :, None],
                  cols.to(device)[:, None, None, :]]


def resize_images(images: Tensor, size: int, chunk_size: int = 1024) -> Tensor:
    """Bilinear (antialiased) resize of uint8 (N, C, H, W) images to ``size`` x ``size``."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    chunks = [F.interpolate(images[s:s + chunk_size].float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True).round_().clamp_(0, 255).to(torch.uint8)
              for s in range(0, images.shape[0], chunk_size)]
    return torch.cat(chunks) if chunks else images.new_zeros((0, images.shape[1], size, size))


def convert_channels(images: Tensor, in_channels: int) -> Tensor:
    """Grey -> RGB by repeating the channel; RGB -> grey by ITU-R 601 luminance."""
    have = images.shape[1]
    if have == in_channels:
        return images
    if have == 1:
        return images.repeat(1, in_channels, 1, 1)
    if have == 3 and in_channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
    raise ValueError(f"cannot convert {have}-channel images to in_channels={in_channels}")


def derive_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of non-negative ints (e.g. seed, epoch, rank).

    NumPy's SeedSequence pads the key with zeros, so keys that differ only in trailing zeros
    ((3, 1) and (3, 1, 0)) give the same stream: end the key of each kind of stream with its own
    non-zero tag, as the augmentation's (seed, epoch, rank, 1) does beside the shuffle's
    (seed, epoch). (Kept so: every recorded run's shuffles and crops come from these streams.)
    """
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _as_generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))


def label_tensor(labels: Any) -> Tensor:
    """Labels as a flat int64 tensor; ValueError for negative values."""
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("labels must be non-negative class indices")
    return labels


def _take_per_class(labels: Tensor, quota: Tensor, generator: torch.Generator) -> Tensor:
    """Random ``quota[c]`` indices of each class c, sorted; vectorised (rank within class)."""
    perm = torch.randperm(labels.numel(), generator=generator)
    shuffled = labels[perm]
    order = torch.argsort(shuffled, stable=True)
    grouped, grouped_labels = perm[order], shuffled[order]
    counts = torch.bincount(grouped_labels, minlength=quota.numel())
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(labels.numel()) - starts[grouped_labels]
    return grouped[rank < quota[grouped_labels]].sort().values


def class_balanced_subset(labels: Tensor, per_class: int, seed: int | torch.Generator,
                          *, num_classes: int | None = None) -> Tensor:
    """Sorted indices of ``per_class`` random samples of every class.

    Classes are those present in ``labels`` (or ``range(num_classes)`` when given).
    Raises ValueError when a class has fewer than ``per_class`` samples.
    """
    labels = label_tensor(labels)
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    counts = torch.bincount(labels, minlength=num_classes or 0)
    classes = range(num_classes) if num_classes is not None else labels.unique().tolist()
    short = [(c, int(counts[c])) for c in classes if counts[c] < per_class]
    if short:
        listed = ", ".join(f"class {c}: {n}" for c, n in short[:10])
        raise ValueError(f"class_balanced_subset: per_class={per_class} but some classes have "
                         f"fewer samples ({listed}{', ...' if len(short) > 10 else ''})")
    quota = torch.full_like(counts, per_class)
    return _take_per_class(labels, quota, _as_generator(seed))


def stratified_subset(labels: Tensor, total: int, seed: int | torch.Generator) -> Tensor:
    """Sorted indices of ``total`` random samples, each class in proportion to its frequency.

    Quotas are floor(n_c * total / N) plus one for the largest remainders (ties: lower class);
    on a balanced set with ``total`` divisible by the class count this is class-balanced.
    """
    labels = label_tensor(labels)
    if not 1 <= total <= labels.numel():
        raise ValueError(f"subset size must be in [1, {labels.numel()}], got {total}")
    counts = torch.bincount(labels).double()
    exact = counts * total / labels.numel()
    quota = exact.floor().long()
    remainder = total - int(quota.sum())
    quota[torch.argsort(quota.double() - exact, stable=True)[:remainder]] += 1
    return _take_per_class(labels, quota, _as_generator(seed))
