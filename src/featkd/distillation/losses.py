"""Distillation losses as pure tensor functions.

Teacher-side arguments are always treated as constants (detached). Gram
matrices are computed in float32 with autocast off: flattened early-layer
features have tens of thousands of dimensions and their dot products overflow
float16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from featkd.layers import to_channels_first

__all__ = [
    "KD_STD_TEMPERATURE",
    "KD_TEMPERATURE",
    "align_spatial",
    "batch_gram",
    "ce",
    "feature_mse",
    "kd_loss",
    "kd_std_loss",
    "layout_dims",
    "per_sample_mse",
    "resize_to",
    "semckd_loss",
    "similarity_preserving_loss",
    "standardize_logits",
    "to_layout",
]

KD_TEMPERATURE = 4.0
KD_STD_TEMPERATURE = 2.0     # Sun et al. (CVPR 2024): base temperature 2


def ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` (B, C) against integer ``labels`` (B,)."""
    return F.cross_entropy(logits, labels)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor,
            temperature: float = KD_TEMPERATURE) -> Tensor:
    """Hinton KD: KL(teacher || student) on logits / T, batch mean, times T**2."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each sample's logits over the classes, in float32.

    Sun et al.'s ``normalize``: (z - mean) / (eps + std), std unbiased (n - 1).
    """
    logits = logits.float()
    mean = logits.mean(dim=1, keepdim=True)
    std = logits.std(dim=1, keepdim=True)
    return (logits - mean) / (eps + std)


def kd_std_loss(student_logits: Tensor, teacher_logits: Tensor,
                temperature: float = KD_STD_TEMPERATURE) -> Tensor:
    """KD on z-scored logits (logit standardisation, Sun et al. CVPR 2024), times T**2."""
    return kd_loss(standardize_logits(student_logits), standardize_logits(teacher_logits.detach()),
                   temperature)


def feature_mse(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Elementwise mean squared error; shapes must match."""
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(f"feature shapes differ: student {tuple(student_feat.shape)}, "
                         f"teacher {tuple(teacher_feat.shape)}")
    return F.mse_loss(student_feat, teacher_feat.detach())


def per_sample_mse(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """Mean squared error of each sample, shape (B,)."""
    diff = student_feat - teacher_feat.detach()
    return diff.square().flatten(1).mean(dim=1)


def batch_gram(feat: Tensor) -> Tensor:
    """(B, B) Gram matrix of the flattened features, in float32."""
    with torch.autocast(device_type=feat.device.type, enabled=False):
        flat = feat.reshape(feat.shape[0], -1).float()
        return flat @ flat.t()


def similarity_preserving_loss(student_feats: Sequence[Tensor],
                               teacher_feats: Sequence[Tensor]) -> Tensor:
    """Similarity-preserving KD (Tung & Mori, ICCV 2019), summed over layer pairs.

    Per pair: G = F F^T over the batch with rows L2-normalised, loss
    ||G_t - G_s||_F^2 / B^2 (the mean over the whole B x B matrix).
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"need matching non-empty feature lists, got {len(student_feats)} "
                         f"student and {len(teacher_feats)} teacher features")
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    for student, teacher in zip(student_feats, teacher_feats):
        g_student = F.normalize(batch_gram(student), p=2, dim=1)
        g_teacher = F.normalize(batch_gram(teacher.detach()), p=2, dim=1)
        total = total + F.mse_loss(g_student, g_teacher)
    return total


def semckd_loss(projected: Sequence[Sequence[Tensor]], targets: Sequence[Sequence[Tensor]],
                attention: Tensor) -> Tensor:
    """SemCKD loss (Chen et al., AAAI 2021).

    ``projected[s][t]`` is student layer s projected onto teacher layer t,
    ``targets[s][t]`` the matching (aligned) teacher feature, ``attention``
    (B, S, T) the per-sample weights. Loss = sum_{b,s,t} att * mse_b / (B * S).
    """
    per_sample = torch.stack([
        torch.stack([per_sample_mse(p, t) for p, t in zip(row_p, row_t)], dim=1)
        for row_p, row_t in zip(projected, targets)
    ], dim=1)                                                     # (B, S, T)
    if per_sample.shape != attention.shape:
        raise ValueError(f"attention shape {tuple(attention.shape)} does not match the "
                         f"(batch, student, teacher) losses {tuple(per_sample.shape)}")
    batch, num_student = attention.shape[:2]
    return (attention * per_sample).sum() / (batch * num_student)


# ----------------------------------------------------------------------------- layouts

def layout_dims(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> int:
    """Spatial dims of the common layout of two per-sample feature shapes.

    1 when either is a token sequence (T, d): features become (B, C, L);
    otherwise 2: maps (C, H, W) stay, vectors (D,) become 1x1 maps.
    """
    for shape in (student_shape, teacher_shape):
        if len(shape) not in (1, 2, 3):
            raise ValueError(f"cannot align a feature of per-sample shape {tuple(shape)}: expected "
                             "a vector (D,), a token sequence (T, d) or a map (C, H, W)")
    return 1 if 2 in (len(student_shape), len(teacher_shape)) else 2


def to_layout(feat: Tensor, dims: int) -> Tensor:
    """Batch of features -> channels-first layout with ``dims`` spatial dims.

    dims=2: maps unchanged, vectors -> (B, D, 1, 1). dims=1: tokens (B, T, d) ->
    (B, d, T), maps -> (B, C, H*W), vectors -> (B, D, 1).
    """
    if feat.dim() == 2:
        return feat.reshape(*feat.shape, *([1] * dims))
    if feat.dim() == 3 and dims == 1:
        return to_channels_first(feat)
    if feat.dim() == 4:
        return feat if dims == 2 else feat.flatten(2)
    raise ValueError(f"cannot lay out a feature of shape {tuple(feat.shape)} "
                     f"with {dims} spatial dims")


def resize_to(feat: Tensor, size: Sequence[int]) -> Tensor:
    """Adaptive-average-pool a channels-first feature to spatial ``size`` (no-op if equal)."""
    size = tuple(size)
    if tuple(feat.shape[2:]) == size:
        return feat
    pool = F.adaptive_avg_pool1d if len(size) == 1 else F.adaptive_avg_pool2d
    return pool(feat, size)


def align_spatial(student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
    """Common channels-first layout, the larger map pooled to the smaller one's size."""
    dims = layout_dims(student_feat.shape[1:], teacher_feat.shape[1:])
    student, teacher = to_layout(student_feat, dims), to_layout(teacher_feat, dims)
    size = [min(s, t) for s, t in zip(student.shape[2:], teacher.shape[2:])]
    return resize_to(student, size), resize_to(teacher, size)
