"""Projectors that map a student feature onto a teacher feature's channels.

A :class:`PairProjector` owns one (student layer, teacher layer) pair: it lays
both features out channels-first (channels-last maps (B, H, W, C) -> (B, C, H, W),
ViT tokens (B, T, d) -> (B, d, T), vectors -> 1x1 maps), pools the larger one
to the smaller one's spatial size and projects the student side. Conv2d is used
for map/vector pairs, Conv1d as soon as either side is a token sequence.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from featkd.layers import canonical_shape, feature_layout, to_canonical

from .losses import align_spatial, layout_dims

__all__ = ["PROJECTORS", "BottleneckConv", "PairProjector", "SingleLayerConv", "ThreeLayerConv",
           "from_layout", "layout_channels", "layout_size", "make_projector"]


def _conv(dims: int, in_channels: int, out_channels: int, kernel: int) -> nn.Module:
    conv = nn.Conv1d if dims == 1 else nn.Conv2d
    return conv(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)


def _batch_norm(dims: int, channels: int) -> nn.Module:
    return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)


class SingleLayerConv(nn.Sequential):
    """Bias-free 1x1 convolution (Conv1d when ``dims`` = 1)."""

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2) -> None:
        super().__init__(_conv(dims, in_channels, out_channels, 1))


class ThreeLayerConv(nn.Sequential):
    """1x1 conv -> 2*C_out, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv -> C_out; bias-free."""

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2) -> None:
        mid = 2 * out_channels
        super().__init__(
            _conv(dims, in_channels, mid, 1), _batch_norm(dims, mid), nn.ReLU(inplace=True),
            _conv(dims, mid, mid, 3), _batch_norm(dims, mid), nn.ReLU(inplace=True),
            _conv(dims, mid, out_channels, 1),
        )


class BottleneckConv(nn.Sequential):
    """SimKD's projector (Chen et al. 2022): 1x1 conv -> C_out/2, BN, ReLU, 3x3 conv, BN, ReLU,
    1x1 conv -> C_out, BN, ReLU; convolutions bias-free."""

    def __init__(self, in_channels: int, out_channels: int, dims: int = 2) -> None:
        mid = max(1, out_channels // 2)
        super().__init__(
            _conv(dims, in_channels, mid, 1), _batch_norm(dims, mid), nn.ReLU(inplace=True),
            _conv(dims, mid, mid, 3), _batch_norm(dims, mid), nn.ReLU(inplace=True),
            _conv(dims, mid, out_channels, 1), _batch_norm(dims, out_channels), nn.ReLU(inplace=True),
        )


PROJECTORS: dict[str, type[nn.Module]] = {
    "single": SingleLayerConv, "three": ThreeLayerConv, "bottleneck": BottleneckConv,
}


def layout_channels(shape: Sequence[int], dims: int) -> int:
    """Channel count of a per-sample feature ``shape`` in the ``dims``-d layout."""
    if len(shape) == 2 and dims == 1:      # tokens (T, d)
        return int(shape[1])
    if len(shape) == 2:
        raise ValueError(f"a token feature {tuple(shape)} needs the 1-d layout")
    return int(shape[0])


def layout_size(shape: Sequence[int], dims: int) -> tuple[int, ...]:
    """Spatial size of a per-sample feature ``shape`` in the ``dims``-d layout."""
    if len(shape) == 1:
        return (1,) * dims
    if len(shape) == 2:
        return (int(shape[0]),)
    return tuple(int(s) for s in shape[1:]) if dims == 2 else (int(shape[1]) * int(shape[2]),)


def from_layout(feat: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of the channels-first layout: back to per-sample ``shape`` as tapped."""
    if len(shape) == 2:                    # tokens (T, d)
        return feat.transpose(1, 2)
    return feat.reshape(feat.shape[0], *shape)


class PairProjector(nn.Module):
    """Align one (student, teacher) feature pair and project the student side.

    ``forward(student_feat, teacher_feat) -> (projected_student, aligned_teacher)``,
    both channels-first with equal shapes. Shapes are per sample as tapped, in
    the given layouts (:func:`featkd.layers.feature_layout`; default: inferred
    from the shape alone).
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int],
                 kind: str = "single", student_layout: str | None = None,
                 teacher_layout: str | None = None) -> None:
        super().__init__()
        if kind not in PROJECTORS:
            raise ValueError(f"unknown projector {kind!r}; valid: {sorted(PROJECTORS)}")
        self.student_layout = student_layout or feature_layout(student_shape)
        self.teacher_layout = teacher_layout or feature_layout(teacher_shape)
        student_shape = canonical_shape(student_shape, self.student_layout)
        teacher_shape = canonical_shape(teacher_shape, self.teacher_layout)
        self.dims = layout_dims(student_shape, teacher_shape)
        self.student_shape = tuple(student_shape)
        self.teacher_shape = tuple(teacher_shape)
        in_channels = layout_channels(student_shape, self.dims)
        out_channels = layout_channels(teacher_shape, self.dims)
        self.projector = PROJECTORS[kind](in_channels, out_channels, self.dims)

    def forward(self, student_feat: Tensor, teacher_feat: Tensor) -> tuple[Tensor, Tensor]:
        student, teacher = align_spatial(to_canonical(student_feat, self.student_layout),
                                         to_canonical(teacher_feat, self.teacher_layout))
        return self.projector(student), teacher

    def teacher_pool_size(self) -> tuple[int, ...] | None:
        """The (H, W) :meth:`forward` pools a channels-first teacher map to, when smaller than the
        map (None otherwise): pooled ahead of time, the teacher's feature passes through unchanged."""
        if self.dims != 2 or self.teacher_layout != "channels_first" or len(self.student_shape) != 3:
            return None
        size = tuple(min(s, t) for s, t in zip(self.student_shape[1:], self.teacher_shape[1:]))
        return size if size != self.teacher_shape[1:] else None


def make_projector(student_shape: Sequence[int], teacher_shape: Sequence[int],
                   kind: str = "single", student_layout: str | None = None,
                   teacher_layout: str | None = None) -> PairProjector:
    """Projector for per-sample feature shapes (no batch dim), e.g. from a dry forward.

    Raises ValueError when the two shapes cannot be aligned.
    """
    return PairProjector(student_shape, teacher_shape, kind, student_layout, teacher_layout)
