"""Knowledge quality ``Q = S + sqrt(I * E)`` of teacher layers (spec/quality.md).

The metric is a chain of small pure tensor functions:

* :func:`gram_statistics` -- the centred Gram matrix of one layer's features,
  built from column chunks so memory stays bounded;
* :func:`sample_statistics` -- cosines, distances, norms and the global
  spectrum size on subset A, all read off that one Gram matrix, row block by
  row block;
* :func:`class_spectrum` / :func:`pad_spectra` -- per-class spectra on subset B
  from the small per-class Gram matrices;
* :func:`spectrum_entropy` -- d_c, the truncated rows and their entropies;
* :func:`quality_parts` -- S, I, E, sqrt(I*E) and Q.

:func:`layer_quality` runs the chain on one layer's features; :func:`measure`
draws the subsets, extracts features layer group by layer group within a
memory budget and returns a :class:`QualityReport`. Besides S, I, E and Q,
``measure`` scores every layer with a cheap linear probe
(:func:`probe_accuracy` on :func:`pool_features` of the same subset A), a
predictor the selection rules of :mod:`featkd.selection` can use.

Products are float32 accumulated into float64 by default
(:data:`DEFAULT_DTYPE`); every function that forms products (the Gram and
spectrum functions, :func:`layer_quality`, :func:`measure`) takes
``dtype=torch.float64`` for float64 throughout.

Both variants take 0 * ln 0 = 0. The authors' released code meant to, but its
guard constant underflows in float32, so there a class with an exact zero in
its truncated spectrum row gets entropy 0; we do not reproduce that.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.selection import VARIANTS, candidate_layers

__all__ = [
    "DEFAULT_DTYPE",
    "DEFAULT_MEMORY_BUDGET",
    "GramStatistics",
    "LayerQuality",
    "QualityReport",
    "SELECT_BY",
    "VARIANTS",
    "class_spectra",
    "class_spectrum",
    "flatten_features",
    "gram_statistics",
    "layer_quality",
    "measure",
    "pad_spectra",
    "pool_features",
    "probe_accuracy",
    "probe_halves",
    "quality_parts",
    "sample_statistics",
    "spectrum_entropy",
]

logger = logging.getLogger(__name__)

SELECT_BY = ("Q", "S", "I", "E", "sqrtIE")  # the quality parts a report holds per layer
PROBE_RIDGE = 1e-2  # ridge penalty of the linear probe, relative to the mean eigenvalue of its Gram
MAX_FEATURE_DIM = 262_144
DEFAULT_MEMORY_BUDGET = 4 * 1024**3
CLASS_ENERGY = 0.95  # d_c: share of a class spectrum kept
GLOBAL_ENERGY = 0.90  # G in the corrected variant
THRESHOLD_SLACK = 1e-9  # absorbs rounding in cumulative ratios that hit a threshold exactly
ZERO_SPREAD = 1e-24  # centred energy below this share of the raw energy is rounding: no spread
FLOAT64_BYTES = 8
FLOAT32_BYTES = 4
#: product precision of every quality computation unless a caller asks for float64
DEFAULT_DTYPE = torch.float32
CHUNK_BYTES = 256 * 1024**2  # working size of one column chunk when no budget is given
MIN_CHUNK_COLUMNS = 512
REFINE_PAIRS = 16  # per class and minimum, the closest pairs (one per row) recomputed exactly first
ERROR_MARGIN = 16  # rounding error elsewhere: at most this many times the worst seen on those pairs


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")


def flatten_features(feats: Tensor) -> Tensor:
    """(n, ...) -> (n, D), one row per sample.

    A map (n, C, H, W) with D = C*H*W > 262,144 is max-pooled first with kernel
    ceil(sqrt(D / 262,144)); token matrices and vectors are only flattened.
    """
    n = feats.shape[0]
    dim = math.prod(feats.shape[1:])
    if feats.dim() == 4 and dim > MAX_FEATURE_DIM:
        kernel = math.ceil(math.sqrt(dim / MAX_FEATURE_DIM))
        feats = F.max_pool2d(feats, kernel)
    return feats.reshape(n, -1)


# --------------------------------------------------------------------- Gram


@dataclass
class GramStatistics:
    """Everything subset A's statistics need from the features X (n x D).

    With the column mean mu and Z = X - mu: ``centred`` = Z Z^T (the
    double-centred Gram), ``sq_norms`` = |x_i|^2, and ``cross`` and ``mean_sq``
    restore the plain Gram X X^T = centred + cross_i + cross_j + mean_sq
    (``cross`` is Z mu up to a constant shared by every sample, ``mean_sq``
    |mu|^2 up to twice that constant). Distances come from the centred Gram,
    where cancellation is milder.
    """

    centred: Tensor
    cross: Tensor
    mean_sq: Tensor
    sq_norms: Tensor


def _column_chunk(n: int, dim: int, budget: int | None, dtype: torch.dtype) -> int:
    """Columns per chunk: its working copies fit ``budget`` bytes, or about CHUNK_BYTES without
    a budget (wide enough for efficient products, light on memory)."""
    per_column = 2 * n * (FLOAT32_BYTES if dtype == torch.float32 else FLOAT64_BYTES)  # chunk + centred
    if budget is None:
        columns = max(CHUNK_BYTES // per_column, MIN_CHUNK_COLUMNS)
    else:
        columns = max(budget // per_column, 1)
    return int(min(columns, max(dim, 1)))


def gram_statistics(
    x: Tensor,
    *,
    dtype: torch.dtype = DEFAULT_DTYPE,
    device: torch.device | str | None = None,
    chunk_budget: int | None = None,
) -> GramStatistics:
    """The centred Gram matrix and the terms that restore the plain one.

    ``x`` (n, D) may live on another device than ``device`` (default: its own);
    it is moved ``D``-chunk by ``D``-chunk, the chunk sized so its working copies
    fit ``chunk_budget`` bytes (``None``: about 256 MB). Products are taken in
    ``dtype``: float32 products of float32 columns (the default; no float64 copy
    of the features is made), each chunk's product added into a float64 Gram,
    or float64 throughout. Each chunk is centred on an approximate column mean
    and the Gram double-centred exactly, in float64, at the end; norms and
    every accumulation are float64.
    """
    _check_dtype(dtype)
    device = torch.device(device) if device is not None else x.device
    n, dim = x.shape
    centred = torch.zeros(n, n, dtype=torch.float64, device=device)
    cross = torch.zeros(n, dtype=torch.float64, device=device)
    sq_norms = torch.zeros(n, dtype=torch.float64, device=device)
    mean_sq = torch.zeros((), dtype=torch.float64, device=device)
    step = _column_chunk(n, dim, chunk_budget, dtype)
    ones = torch.full((n,), 1 / n, dtype=dtype, device=device)
    for start in range(0, dim, step):
        cols = x[:, start : start + step].to(device=device, dtype=dtype)
        sq_norms += torch.linalg.vector_norm(cols, dim=1, dtype=torch.float64).square()
        mu = ones @ cols  # about the column mean: the exact centring comes at the end
        low = cols - mu  # a new tensor: the caller's features are never changed
        cross += (low @ mu).to(torch.float64)
        mu = mu.to(torch.float64)
        mean_sq += mu @ mu
        if dtype == torch.float64:
            centred.addmm_(low, low.T)
        else:
            centred += low @ low.T
    _check_finite(sq_norms, centred, dtype)
    _centre_exactly(centred, cross, mean_sq)
    return GramStatistics(centred, cross, mean_sq, sq_norms)


def _check_finite(sq_norms: Tensor, centred: Tensor, dtype: torch.dtype) -> None:
    """ValueError for NaN or infinite features, or for products that overflowed ``dtype``."""
    bad = ~torch.isfinite(sq_norms)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {len(bad)} samples have NaN or infinite features "
                         "(has the model diverged?)")
    if not torch.isfinite(centred).all():
        largest = float(sq_norms.max().sqrt())
        raise ValueError(f"features too large for {str(dtype).replace('torch.', '')} products "
                         f"(largest sample norm {largest:.3g}); measure with dtype=torch.float64")


def _centre_exactly(centred: Tensor, cross: Tensor, mean_sq: Tensor) -> None:
    """Double-centre, in place, a Gram taken about an approximate mean; the plain Gram is kept.

    Each chunk is centred on an approximate column mean m (one cheap product, in
    the product precision), so Z = X - m has column means near, not at, zero.
    H (Z Z^T) H with H = I - 11^T/n is the Gram about the exact mean whatever m
    was; ``cross`` and ``mean_sq`` absorb the difference, so that
    centred + cross_i + cross_j + mean_sq is still X X^T.
    """
    row_mean = centred.mean(1)
    grand_mean = row_mean.mean()
    centred.sub_(row_mean[:, None]).sub_(row_mean[None, :]).add_(grand_mean)
    cross += row_mean
    mean_sq -= grand_mean


# ------------------------------------------------------------ subset A


def _class_index(labels: Tensor, subset: str) -> tuple[Tensor, Tensor, Tensor]:
    """(classes, class position of every sample, samples per class); >= 2 each."""
    if labels.dim() != 1:
        raise ValueError(f"labels of subset {subset} must be 1-D, got shape {tuple(labels.shape)}")
    classes, position, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    small = [(int(c), int(k)) for c, k in zip(classes, counts) if k < 2]
    if small:
        raise ValueError(
            f"every class needs at least 2 samples in subset {subset}; "
            f"(class, samples) too small: {small}"
        )
    return classes, position, counts


def _row_block(n: int, budget: int | None) -> int:
    """Rows per block of the O(n^2) pass (a few n-wide float64 temporaries per row; six allowed)."""
    if budget is None:
        return max(n, 1)
    return int(min(max(budget // (6 * FLOAT64_BYTES * n), 1), n))


def _eigenvalues(matrix: Tensor) -> Tensor:
    """Ascending eigenvalues of a symmetric matrix.

    On CPU the solver runs single-threaded: MKL's threaded symmetric eigensolver
    was measured 10-100x slower than one thread on small matrices (500 x 500) and
    3x slower at 5,000 x 5,000 on a machine whose cores are shared.
    """
    if matrix.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.linalg.eigvalsh(matrix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(matrix)
    finally:
        torch.set_num_threads(threads)


def _global_spectrum_size(gram: GramStatistics, n: int, dim: int, variant: str) -> int:
    """G: min(n, D) (paper, uncentred spectrum length) or the 0.90 rule on the centred spectrum."""
    if variant == "paper":
        return min(n, dim)
    eig = _eigenvalues(gram.centred).clamp(min=0).flip(0)
    total = eig.sum()
    if total <= ZERO_SPREAD * gram.sq_norms.sum():
        warnings.warn("all samples of subset A are identical; global spectrum size G set to 1",
                      RuntimeWarning, stacklevel=3)
        return 1
    ratio = (eig / total).cumsum(0)
    return int((ratio < GLOBAL_ENERGY - THRESHOLD_SLACK).sum()) + 1


def sample_statistics(
    feats: Tensor,
    labels: Tensor,
    *,
    variant: str = "paper",
    memory_budget: int | None = None,
    dtype: torch.dtype = DEFAULT_DTYPE,
    device: torch.device | str | None = None,
) -> dict:
    """Statistics of subset A: per-class intraAvg, intraMin, interAvg (C x C), nu, minInter, G.

    ``feats`` (n, ...) is flattened (see :func:`flatten_features`). One Gram matrix
    gives everything; the O(n^2) pass runs over row blocks. The two minima (intraMin,
    minInter) are then recomputed in float64 straight from the features, so that
    float32 products cannot blur them where pairs nearly coincide: first over each
    class's REFINE_PAIRS closest pairs (one per row); the rounding error seen on
    those pairs, times ERROR_MARGIN, is taken to bound the error of every other
    pair (scaled to its samples' norms), and every pair that could beat the minimum
    found under that bound is recomputed exactly as well. ``memory_budget``
    (bytes, ``None``: unbounded) must hold the n x n float64 Gram; the rest of it
    sizes the column chunks and row blocks. Results do not depend on the blocking.
    """
    _check_variant(variant)
    feats = flatten_features(feats)
    n, dim = feats.shape
    if labels.shape[0] != n:
        raise ValueError(f"subset A has {n} feature rows but {labels.shape[0]} labels")
    device = torch.device(device) if device is not None else feats.device
    _, position, counts = _class_index(labels.to(device), "A")
    num_classes = len(counts)
    if num_classes < 2:
        raise ValueError("subset A needs at least 2 classes for the between-class statistics")
    spare = _spare_budget(n, memory_budget, variant, dtype)
    gram = gram_statistics(feats, dtype=dtype, device=device, chunk_budget=spare)

    norms = gram.sq_norms.sqrt()
    zero = norms == 0
    if zero.any():
        warnings.warn(
            f"{int(zero.sum())} of {n} samples have all-zero features; "
            "their cosine to every sample is taken as 0",
            RuntimeWarning,
            stacklevel=2,
        )
    inv_norm = torch.where(zero, torch.zeros_like(norms), 1 / norms)
    nonzero = (~zero).to(torch.float64)
    pairs = _PairBlocks(gram, inv_norm, nonzero)
    # rounding weights t, an entry's error taken to be at most scale (t_i + t_j) (_certified_minimum):
    # a squared distance's rounding scales with |z_i| |z_j|, a cosine's with w_i w_j, where
    # w = (|z| + |mu|) / r as the plain Gram's rounding scales with |z| + |mu|; a b <= (a^2 + b^2) / 2
    centred_sq = gram.centred.diagonal().clamp(min=0)
    dist_weight = centred_sq
    cos_weight = ((centred_sq.sqrt() + gram.mean_sq.abs().sqrt()) * inv_norm).square() / 2
    eps = torch.finfo(dtype).eps
    cos_sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    intra_min = torch.full((num_classes,), math.inf, dtype=torch.float64, device=device)
    inter_sq = torch.full((num_classes,), math.inf, dtype=torch.float64, device=device)
    everyone = torch.arange(n, device=device)
    step = _row_block(n, spare)
    for c in range(num_classes):
        members = (position == c).nonzero().squeeze(1)
        cos_minima, dist_minima = _RowMinima(), _RowMinima()
        for start in range(0, len(members), step):
            at = torch.arange(start, min(start + step, len(members)), device=device)  # positions in members
            rows = members[at]
            block = gram.centred.index_select(0, rows)
            cos = pairs.cosines(block, rows)
            cos_sums[c].index_add_(0, position, cos.sum(0))
            cos_minima.add(pairs.within(cos, at, members), members)
            dist_minima.add(pairs.between(block, rows, members), everyone)
        # the minima, recomputed exactly (float64, straight from the features) wherever they may lie
        intra_min[c] = _certified_minimum(
            cos_minima, members, members, cos_weight, lambda at: pairs.within_rows(at, members),
            lambda i, j: _exact_pairs(feats, i, j, device, spare)[0], step, eps)
        inter_sq[c] = _certified_minimum(
            dist_minima, members, everyone, dist_weight, lambda at: pairs.between_rows(at, members),
            lambda i, j: _exact_pairs(feats, i, j, device, spare)[1], step, eps)

    counts64 = counts.to(torch.float64)
    block_sums = cos_sums.diagonal()
    if variant == "paper":
        intra_avg = block_sums / counts64**2
    else:
        self_sums = torch.zeros_like(counts64).index_add_(0, position, nonzero)
        intra_avg = (block_sums - self_sums) / (counts64 * (counts64 - 1))
    inter_avg = cos_sums / torch.outer(counts64, counts64)
    return {
        "intra_avg": intra_avg,
        "intra_min": intra_min.clamp(max=1),
        "inter_avg": inter_avg,
        "nu": torch.zeros_like(counts64).index_add_(0, position, norms) / counts64,
        "min_inter": inter_sq.clamp(min=0).sqrt(),
        "G": _global_spectrum_size(gram, n, dim, variant),
        "n": n,
        "D": dim,
    }


class _PairBlocks:
    """Row blocks of subset A's pair matrices read off the Gram (float64 arithmetic): |cosine| and
    squared distance. The O(n^2) pass and the search for the minima both take their approximate
    values, and their excluded pairs, from here."""

    def __init__(self, gram: GramStatistics, inv_norm: Tensor, nonzero: Tensor) -> None:
        # rank-2 terms: plain Gram = centred + [cross + |mu|^2, 1] [1, cross]^T and
        # squared distances = [|z|^2, 1] [1, |z|^2]^T - 2 centred, one fused pass each
        centred_sq = gram.centred.diagonal()[:, None]
        ones = torch.ones_like(centred_sq)
        self.plain_left = torch.cat([gram.cross[:, None] + gram.mean_sq, ones], 1)
        self.plain_right = torch.cat([ones, gram.cross[:, None]], 1).T
        self.dist_left = torch.cat([centred_sq, ones], 1)
        self.dist_right = torch.cat([ones, centred_sq], 1).T
        self.centred = gram.centred
        self.inv_norm = inv_norm
        self.nonzero = nonzero

    def cosines(self, block: Tensor, rows: Tensor) -> Tensor:
        """|cosine| of samples ``rows`` (``block``: their rows of the centred Gram) to every sample;
        a sample's own entry is exactly 1 (0 for a zero-norm sample)."""
        cos = torch.addmm(block, self.plain_left[rows], self.plain_right).abs_()
        cos.mul_(self.inv_norm[rows, None]).mul_(self.inv_norm[None, :])
        cos[torch.arange(len(rows), device=rows.device), rows] = self.nonzero[rows]
        return cos

    def within(self, cos: Tensor, at: Tensor, members: Tensor) -> Tensor:
        """The class's columns of ``cos``, whose rows are members[at]; a row's own entry excluded
        (infinite): pairs i != j only."""
        intra = cos.index_select(1, members)
        intra[torch.arange(len(at), device=at.device), at] = math.inf
        return intra

    def between(self, block: Tensor, rows: Tensor, members: Tensor) -> Tensor:
        """Squared distances of samples ``rows`` (``block`` as for :meth:`cosines`) to every sample;
        the class's own columns excluded (infinite)."""
        sq_dist = torch.addmm(block, self.dist_left[rows], self.dist_right, beta=-2)
        return sq_dist.index_fill_(1, members, math.inf)

    def within_rows(self, at: Tensor, members: Tensor) -> Tensor:
        """:meth:`within` for the rows members[at] alone."""
        rows = members[at]
        return self.within(self.cosines(self.centred.index_select(0, rows), rows), at, members)

    def between_rows(self, at: Tensor, members: Tensor) -> Tensor:
        """:meth:`between` for the rows members[at] alone."""
        rows = members[at]
        return self.between(self.centred.index_select(0, rows), rows, members)


class _RowMinima:
    """The smallest entry of every row of a pair matrix seen in row blocks, and its column."""

    def __init__(self) -> None:
        self.values: list[Tensor] = []
        self.cols: list[Tensor] = []

    def add(self, block: Tensor, cols: Tensor) -> None:
        """Offer the next rows, ``block`` (rows, len(cols)); infinite entries (excluded pairs) never
        count while a row has a finite one."""
        row_min, at = block.min(1)  # one pass, as a plain minimum would take
        self.values.append(row_min)
        self.cols.append(cols[at])

    def result(self) -> tuple[Tensor, Tensor]:
        return torch.cat(self.values), torch.cat(self.cols)


def _certified_minimum(
    minima: _RowMinima,
    members: Tensor,
    cols: Tensor,
    weight: Tensor,
    approx: Callable[[Tensor], Tensor],
    exact: Callable[[Tensor, Tensor], Tensor],
    step: int,
    eps: float,
) -> Tensor:
    """The exact minimum of a pair matrix (rows: samples ``members``, columns: samples ``cols``)
    known approximately: ``minima`` holds every row's smallest approximate entry, ``approx(at)``
    gives the rows members[at] again (a new tensor, which is overwritten), ``exact(first, second)``
    the exact (float64) values of sample pairs.

    The REFINE_PAIRS rows with the smallest minima have that pair recomputed exactly; the smallest
    gives ``best``. An approximate entry (i, j) is taken to be off by at most
    scale * (weight_i + weight_j), scale being ERROR_MARGIN times the largest error seen on those
    pairs per unit of weight (at least ERROR_MARGIN * ``eps``, the product precision's). Every pair
    that could beat ``best`` under that bound is recomputed exactly too: the rows where one can lie
    are gone through again, ``step`` rows at a time.
    """
    row_min, row_col = minima.result()
    first = row_min.topk(min(REFINE_PAIRS, len(row_min)), largest=False).indices
    rows, partner = members[first], row_col[first]
    values = exact(rows, partner)
    best = values.min()
    if best <= 0:  # neither minimum can go lower
        return best
    pair_weight = weight[rows] + weight[partner]
    error = (row_min[first] - values).abs()
    ratio = torch.where(pair_weight > 0, error / torch.where(pair_weight > 0, pair_weight, 1.0), 0.0)
    scale = ERROR_MARGIN * max(ratio.max().item(), eps)
    doubtful = (row_min - scale * (weight[members] + weight.max()) < best).nonzero().squeeze(1)
    for start in range(0, len(doubtful), step):
        at = doubtful[start : start + step]
        rows = members[at]
        lower = approx(at).sub_(scale * weight[rows, None]).sub_(scale * weight[None, cols])
        i, j = (lower < best).nonzero(as_tuple=True)
        del lower
        if len(i):
            best = torch.minimum(best, exact(rows[i], cols[j]).min())
    return best


def _exact_pairs(
    feats: Tensor, first: Tensor, second: Tensor, device: torch.device, budget: int | None = None
) -> tuple[Tensor, Tensor]:
    """(|cosine|, squared distance) of the sample pairs (first[k], second[k]), in float64 from the
    features themselves (a zero-norm sample has cosine 0). The pairs' float64 copies are made a
    chunk at a time, about CHUNK_BYTES (or ``budget`` bytes, if less) each."""
    size = CHUNK_BYTES if budget is None else min(budget, CHUNK_BYTES)
    chunk = max(size // (2 * FLOAT64_BYTES * max(feats.shape[1], 1)), 1)
    cos, sq_dist = [], []
    for start in range(0, len(first), chunk):
        a = feats.index_select(0, first[start : start + chunk].to(feats.device)).to(device, torch.float64)
        b = feats.index_select(0, second[start : start + chunk].to(feats.device)).to(device, torch.float64)
        norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
        dots = torch.linalg.vecdot(a, b).abs_()
        cos.append(torch.where(norms > 0, dots / torch.where(norms > 0, norms, 1.0), 0.0))
        sq_dist.append(a.sub_(b).square_().sum(1))  # a is a copy: the features are not changed
    return torch.cat(cos), torch.cat(sq_dist)


def _spare_budget(n: int, budget: int | None, variant: str, dtype: torch.dtype) -> int | None:
    """Bytes left for subset A's chunks and blocks once its n x n matrices are held."""
    squares = 1 + (variant == "corrected") + (dtype == torch.float32) / 2  # Gram, eigvalsh copy, f32 product
    return _budget_left(n, budget, squares, f"{n} samples")


def _budget_left(n: int, budget: int | None, squares: float, what: str) -> int | None:
    """``budget`` less ``squares`` n x n float64 matrices; ValueError when not even one block of
    eight n-vectors is left (None: unbounded)."""
    if budget is None:
        return None
    fixed = int(squares * FLOAT64_BYTES * n * n)
    if budget - fixed < 8 * FLOAT64_BYTES * n:
        raise ValueError(
            f"memory_budget of {budget:,} bytes is too small for {what}: the n x n "
            f"matrices alone need {fixed:,} bytes plus {8 * FLOAT64_BYTES * n:,} for one block"
        )
    return budget - fixed


# ------------------------------------------------------------ subset B


def _spectrum_budget(m: int, budget: int | None, dtype: torch.dtype) -> int | None:
    """Bytes left for a class's column chunks once its m x m matrices are held."""
    squares = 2 + (dtype == torch.float32) / 2  # Gram, eigvalsh copy, f32 product
    return _budget_left(m, budget, squares, f"a class of {m} samples")


def class_spectrum(
    feats: Tensor,
    *,
    dtype: torch.dtype = DEFAULT_DTYPE,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """Normalised squared singular values of one class's centred features, descending.

    Length min(m, D) for m samples; an all-zero spectrum (identical samples)
    stays zero. Computed from the m x m Gram of the centred class matrix.
    """
    feats = flatten_features(feats)
    m, dim = feats.shape
    spare = _spectrum_budget(m, memory_budget, dtype)
    gram = gram_statistics(feats, dtype=dtype, device=device, chunk_budget=spare)
    eig = _eigenvalues(gram.centred).clamp(min=0).flip(0)[: min(m, dim)]
    total = eig.sum()
    if total <= ZERO_SPREAD * gram.sq_norms.sum():
        return torch.zeros_like(eig)
    return eig / total


def pad_spectra(rows: Sequence[Tensor], width: int) -> Tensor:
    """Stack class spectra into (C, width), zero-padded on the right."""
    out = torch.zeros(len(rows), width, dtype=torch.float64, device=rows[0].device)
    for c, row in enumerate(rows):
        out[c, : len(row)] = row
    return out


def class_spectra(
    feats: Tensor,
    labels: Tensor,
    *,
    dtype: torch.dtype = DEFAULT_DTYPE,
    device: torch.device | str | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """(C, W) padded class spectra of subset B, W = the largest class's sample count."""
    feats = flatten_features(feats)
    if labels.shape[0] != feats.shape[0]:
        raise ValueError(f"subset B has {feats.shape[0]} feature rows but {labels.shape[0]} labels")
    classes, _, counts = _class_index(labels.cpu(), "B")
    labels = labels.to(feats.device)
    rows = [
        class_spectrum(feats[labels == c], dtype=dtype, device=device, memory_budget=memory_budget)
        for c in classes.tolist()
    ]
    return pad_spectra(rows, int(counts.max()))


def spectrum_entropy(spectra: Tensor, *, variant: str = "paper") -> dict:
    """d_c, the truncated-row entropies H_c, Hbar and M from padded spectra (C, W).

    d_c = smallest k with cumulative share >= 0.95, capped at W - 1. Rows are
    truncated at floor(M), M = sum_c d_c (paper) or at d_c (corrected),
    renormalised, and H_c is their Shannon entropy (natural log, 0 ln 0 = 0).
    Hbar = mean H_c (paper) or mean H_c / ln d_c, 0 where d_c = 1 (corrected).
    """
    _check_variant(variant)
    num_classes, width = spectra.shape
    if width < 2:
        raise ValueError("class spectra need a width of at least 2 (2 samples per class)")
    if (spectra.sum(1) == 0).any():
        warnings.warn("a class of subset B has identical samples (zero spectrum); its entropy is 0",
                      RuntimeWarning, stacklevel=2)
    below = spectra.cumsum(1) < CLASS_ENERGY - THRESHOLD_SLACK
    d = (below.sum(1) + 1).clamp(max=width - 1)
    total_d = int(d.sum())
    columns = torch.arange(width, device=spectra.device)
    cut = torch.full_like(d, total_d) if variant == "paper" else d
    kept = spectra * (columns[None, :] < cut[:, None])
    mass = kept.sum(1, keepdim=True)
    p = torch.where(mass > 0, kept / mass.clamp(min=torch.finfo(kept.dtype).tiny), 0.0)
    entropy = -torch.special.xlogy(p, p).sum(1)
    if variant == "paper":
        h_bar = entropy.mean()
    else:
        log_d = d.to(torch.float64).log()
        h_bar = torch.where(d > 1, entropy / log_d.clamp(min=1e-300), 0.0).mean()
    return {"d": d, "H": entropy, "Hbar": float(h_bar), "M": total_d, "W": width}


# ------------------------------------------------------------ the parts


def quality_parts(sample: dict, spectra: dict, *, num_train: int, variant: str = "paper") -> dict:
    """S, I, E, sqrt(I*E), Q and the intermediates, as Python floats and lists."""
    _check_variant(variant)
    if num_train <= 0:
        raise ValueError(f"num_train must be positive, got {num_train}")
    inter = sample["inter_avg"]
    off_diagonal = ~torch.eye(inter.shape[0], dtype=torch.bool, device=inter.device)
    intra_avg = float(sample["intra_avg"].mean())
    inter_avg = float(inter[off_diagonal].mean())
    intra_min = float(sample["intra_min"].mean())
    nu = float(sample["nu"].mean())
    min_inter = float(sample["min_inter"].mean())
    big_g = int(sample["G"])
    k_factor = (num_train / math.pi) ** (1 / big_g)
    log_base = math.log(5) if variant == "paper" else 1.0
    separation = intra_avg - inter_avg
    information = (1 - intra_min) * spectra["Hbar"] / log_base
    efficiency = k_factor * 2 * min_inter / nu if nu > 0 else 0.0
    sqrt_ie = math.sqrt(max(information * efficiency, 0.0))
    return {
        "S": separation,
        "I": information,
        "E": efficiency,
        "sqrtIE": sqrt_ie,
        "Q": separation + sqrt_ie,
        "intra_avg": intra_avg,
        "intra_min": intra_min,
        "inter_avg": inter_avg,
        "nu": nu,
        "min_inter": min_inter,
        "d": [int(v) for v in spectra["d"].tolist()],
        "H": [float(v) for v in spectra["H"].tolist()],
        "Hbar": spectra["Hbar"],
        "M": spectra["M"],
        "W": spectra["W"],
        "G": big_g,
        "K": k_factor,
        "L": log_base,
        "num_classes": int(inter.shape[0]),
        "n_a": int(sample["n"]),
        "D": int(sample["D"]),
        "num_train": int(num_train),
        "variant": variant,
    }


def layer_quality(
    feats_a: Tensor,
    labels_a: Tensor,
    feats_b: Tensor | None = None,
    labels_b: Tensor | None = None,
    *,
    num_train: int,
    variant: str = "paper",
    memory_budget: int | None = None,
    dtype: torch.dtype = DEFAULT_DTYPE,
    device: torch.device | str | None = None,
) -> dict:
    """Knowledge quality of one layer from its features on subsets A and B.

    ``feats_a`` (n_A, ...) and ``labels_a`` (n_A,) give the sample statistics;
    ``feats_b``/``labels_b`` the class spectra (subset A when omitted);
    ``num_train`` is the size of the whole training split. Uses exactly the
    samples given. Returns "S", "I", "E", "sqrtIE", "Q" and the intermediate
    statistics (class means of intraAvg, intraMin, interAvg, nu, minInter;
    d_c and H_c per class; Hbar, M, W, G, K, L).
    """
    _check_variant(variant)
    if (feats_b is None) != (labels_b is None):
        raise ValueError("give both feats_b and labels_b, or neither")
    if feats_b is None:
        feats_b, labels_b = feats_a, labels_a
    sample = sample_statistics(
        feats_a, labels_a, variant=variant, memory_budget=memory_budget, dtype=dtype, device=device
    )
    spectra = class_spectra(feats_b, labels_b, dtype=dtype, device=device, memory_budget=memory_budget)
    return quality_parts(sample, spectrum_entropy(spectra, variant=variant),
                         num_train=num_train, variant=variant)


# ------------------------------------------------------------ linear probe


def pool_features(feats: Tensor) -> Tensor:
    """(n, ...) -> (n, C): a map (n, C, H, W) averaged over its positions, a token matrix
    (n, T, d) over its tokens; vectors are only flattened."""
    if feats.dim() == 4:
        return feats.mean((2, 3))
    if feats.dim() == 3:
        return feats.mean(1)
    return feats.reshape(len(feats), -1)


def probe_halves(labels: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two class-balanced halves (positions into ``labels``) drawn with ``seed``; the odd
    sample of a class goes to the second half."""
    generator = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in torch.unique(labels):
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        first.append(members[: len(members) // 2])
        second.append(members[len(members) // 2 :])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def probe_accuracy(
    fit_feats: Tensor,
    fit_labels: Tensor,
    eval_feats: Tensor,
    eval_labels: Tensor,
    *,
    ridge: float = PROBE_RIDGE,
) -> float:
    """Accuracy on the eval samples of a ridge-regression classifier fitted on the fit samples.

    Features (n, C), e.g. from :func:`pool_features`, are standardised with the fit
    samples' mean and std (constant features left at 0); the targets are one-hot;
    the penalty is ``ridge`` times the mean eigenvalue of the fit Gram. float64, no
    loop over samples.
    """
    x = fit_feats.reshape(len(fit_feats), -1).double()
    z = eval_feats.reshape(len(eval_feats), -1).to(x)
    if x.shape[1] != z.shape[1]:
        raise ValueError(f"fit features have {x.shape[1]} dimensions, eval features {z.shape[1]}")
    classes, fit_index = torch.unique(fit_labels.to(x.device), return_inverse=True)
    if len(classes) < 2:
        raise ValueError("the probe needs at least 2 classes among the fit samples")
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    x, z = (x - mean) / std, (z - mean) / std
    targets = F.one_hot(fit_index, len(classes)).double()
    prior = targets.mean(0)
    gram = x.T @ x
    penalty = ridge * gram.diagonal().mean().clamp(min=torch.finfo(gram.dtype).tiny)
    weights = torch.linalg.solve(gram + penalty * torch.eye(len(gram), dtype=gram.dtype, device=gram.device),
                                 x.T @ (targets - prior))
    predicted = classes[(z @ weights + prior).argmax(1)]
    return float((predicted == eval_labels.to(predicted.device)).double().mean())


def _cross_probe(pooled: Tensor, labels: Tensor, seed: int) -> float:
    """Mean accuracy of the probe fitted on one half of a subset and scored on the other, both ways."""
    first, second = probe_halves(labels, seed)
    return 0.5 * (probe_accuracy(pooled[first], labels[first], pooled[second], labels[second])
                  + probe_accuracy(pooled[second], labels[second], pooled[first], labels[first]))


# ------------------------------------------------------------ the report


@dataclass
class LayerQuality:
    """One layer's row: GL index, module name, per-sample shape, D, the parts and intermediates,
    and the linear probe's accuracy (None when not measured)."""

    index: int
    name: str
    shape: list[int]
    D: int
    S: float
    I: float  # noqa: E741  (the spec's name)
    E: float
    sqrtIE: float
    Q: float
    stats: dict = field(default_factory=dict)
    probe: float | None = None


@dataclass
class QualityReport:
    """Quality of every measured layer, in depth order; ``candidates``: the GL indices a rule may
    choose among (None: every layer; all of them too when fewer than k are candidates, see
    :func:`featkd.selection.choosable`)."""

    layers: list[LayerQuality]
    variant: str = "paper"
    model: str | None = None
    settings: dict = field(default_factory=dict)
    candidates: list[int] | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerQuality:
        """The row of GL ``index``."""
        for row in self.layers:
            if row.index == index:
                return row
        raise KeyError(f"layer {index} was not measured; measured: {[r.index for r in self.layers]}")

    @property
    def has_probe(self) -> bool:
        """Whether every row holds a probe accuracy."""
        return bool(self.layers) and all(row.probe is not None for row in self.layers)

    def values(self, by: str = "Q") -> list[float]:
        """One score per row, in depth order: Q, S, I, E, sqrtIE, depth (the GL index) or probe."""
        from featkd.selection import SCORES

        if by not in SCORES:
            raise ValueError(f"unknown score {by!r}; valid: {', '.join(SCORES)}")
        if by == "depth":
            return [float(row.index) for row in self.layers]
        if by == "probe" and not self.has_probe:
            raise ValueError("this quality report holds no probe accuracies (measured by an older "
                             "featkd): measure it again to select by probe")
        return [getattr(row, by) for row in self.layers]

    def select(self, k: int = 4, by: str | None = None) -> list[int]:
        """GL indices chosen among :attr:`candidates` by rule ``by`` (default
        :data:`featkd.selection.DEFAULT_RULE`, in this report's variant: see
        :func:`featkd.selection.resolve_rule`), in depth order: e.g. "Q" (the k highest Q; ties go
        deeper) or "bands:S" (see featkd.selection)."""
        from featkd.selection import select

        return select(self, k, by)

    def rules(self) -> list[str]:
        """The rules this report can apply, named with its variant (``Q/paper``, ``bands:depth``; rules
        needing the probe only when it was measured)."""
        from featkd.selection import parse_rule, rule_names

        rules = [parse_rule(name).in_variant(self.variant) for name in rule_names()]
        return [rule.name for rule in rules if self.has_probe or rule.score != "probe"]

    def to_dict(self, k: int = 4) -> dict:
        """Plain data; ``selected`` holds the min(k, layers) layers of every rule it can apply;
        ``candidates`` is left out when None (every layer)."""
        k = min(k, len(self.layers))
        candidates = {"candidates": self.candidates} if self.candidates is not None else {}
        return {
            "variant": self.variant,
            "model": self.model,
            "settings": self.settings,
            **candidates,
            "selected": {rule: self.select(k, rule) for rule in self.rules()} if k else {},
            "layers": [asdict(row) for row in self.layers],
        }

    def to_json(self, path: str | Path | None = None, k: int = 4) -> str:
        """JSON text of the report (see :meth:`to_dict`); also written to ``path`` when given."""
        text = json.dumps(self.to_dict(k), indent=2, allow_nan=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> QualityReport:
        """A report from JSON text or from a file holding it."""
        text = str(source)
        if isinstance(source, Path) or not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        data = json.loads(text)
        rows = [LayerQuality(**row) for row in data["layers"]]
        return cls(rows, variant=data["variant"], model=data.get("model"),
                   settings=data.get("settings", {}), candidates=data.get("candidates"))

    def table(self, k: int = 4, by: str | None = None) -> str:
        """The per-layer table as text; ``*`` marks the layers rule ``by`` selects."""
        selected = set(self.select(min(k, len(self.layers)), by)) if self.layers else set()
        columns = ["S", "I", "E", "sqrtIE", "Q"] + (["probe"] if self.has_probe else [])
        header = f"{'GL':>3}  {'module':<16} {'shape':<14} {'D':>8} " + " ".join(
            f"{name:>8}" for name in columns
        )
        lines = [header]
        for row in self.layers:
            shape = "x".join(str(s) for s in row.shape)
            values = " ".join(f"{getattr(row, name):8.4f}" for name in columns)
            mark = " *" if row.index in selected else ""
            lines.append(f"{row.index:>3}  {row.name:<16} {shape:<14} {row.D:>8} {values}{mark}")
        return "\n".join(lines)

    def plot(self, path: str | Path, k: int = 4, by: str | None = None) -> None:
        """PNG of S, I, E and Q (and the probe) against GL index; rule ``by``'s k layers are marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from featkd.selection import resolve_rule

        by = resolve_rule(by, self.variant).name
        index = [row.index for row in self.layers]
        selected = self.select(min(k, len(self.layers)), by)
        names = ["S", "I", "E", "Q"] + (["probe"] if self.has_probe else [])
        fig, axes = plt.subplots(len(names), 1, figsize=(7, 2 * len(names)), sharex=True)
        for ax, name in zip(axes, names):
            values = self.values(name)
            ax.plot(index, values, marker="o", color="tab:blue")
            chosen = [v for i, v in zip(index, values) if i in selected]
            ax.scatter(selected, chosen, s=90, facecolors="none", edgecolors="tab:red",
                       linewidths=2, zorder=3, label=f"{len(selected)} layers by {by}")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[0].legend(loc="best", fontsize=8)
        axes[0].set_title(f"knowledge quality ({self.variant}) of {self.model or 'model'}")
        axes[-1].set_xlabel("generalized layer")
        axes[-1].set_xticks(index)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


# ------------------------------------------------------------ measure


@contextlib.contextmanager
def _naming_layer(index: int, name: str) -> Iterator[None]:
    """Prefix a ValueError raised inside with the layer it concerns."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"layer {index} ({name}): {err}") from err


def _dataset_labels(dataset) -> Tensor:
    labels = getattr(dataset, "labels", None)
    if labels is None:  # torchvision's datasets
        labels = getattr(dataset, "targets", None)
    if labels is None:  # any map-style dataset yielding (image, label, ...)
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    return torch.as_tensor(labels, dtype=torch.long)


def _load_images(dataset, indices: Tensor) -> Tensor:
    if hasattr(dataset, "batch"):
        return dataset.batch(indices)[0]
    return torch.stack([dataset[int(i)][0] for i in indices])


def _draw_subsets(labels: Tensor, subset_size: int, per_class_b: int, seed: int) -> tuple[Tensor, Tensor]:
    """Class-balanced subsets A and B from one seeded generator (A drawn first)."""
    from featkd.data import class_balanced_subset

    _, counts = torch.unique(labels, return_counts=True)
    num_classes, smallest = len(counts), int(counts.min())
    per_a = min(subset_size // num_classes, smallest)
    per_b = min(per_class_b, len(labels) // num_classes, smallest)
    if per_a < subset_size // num_classes or per_b < min(per_class_b, len(labels) // num_classes):
        logger.info("smallest class has %d samples: subsets capped at %d (A) and %d (B) per class",
                    smallest, per_a, per_b)
    if min(per_a, per_b) < 2:
        raise ValueError(
            f"every class needs at least 2 samples in subsets A and B; got {per_a} (A) and "
            f"{per_b} (B) per class from subset_size={subset_size} and {num_classes} classes"
        )
    generator = torch.Generator().manual_seed(seed)
    subset_a = class_balanced_subset(labels, per_a, generator)
    subset_b = class_balanced_subset(labels, per_b, generator)
    return subset_a, subset_b


def _group_layers(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive layer groups whose stored features fit ``budget`` bytes (a layer alone may not)."""
    groups: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if groups and used + size <= budget:
            groups[-1].append(i)
            used += size
            continue
        if size > budget:
            logger.warning("layer %d alone needs %s bytes of stored features, more than half the "
                           "memory budget; it is processed on its own", i, f"{size:,}")
        groups.append([i])
        used = size
    return groups


def _features(model: nn.Module, dataset, indices: Tensor, names: list[str], device: torch.device,
              batch_size: int, bar, layouts: list[str], *,
              keep_flat: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """Float32 host features of every layer in ``names`` (maps brought channels-first from their
    ``layouts`` first): flattened (len(indices), D), an empty list without ``keep_flat``, and
    pooled (len(indices), C) (see :func:`pool_features`)."""
    from featkd.layers import extract, to_canonical

    flat_out: list[Tensor] = []
    pooled_out: list[Tensor] = []
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        feats = extract(model, _load_images(dataset, idx).to(device), names)
        for slot, feat in enumerate(feats):
            feat = to_canonical(feat, layouts[slot])
            pooled = pool_features(feat)
            flat = flatten_features(feat) if keep_flat else None
            if start == 0:
                pooled_out.append(torch.empty(len(indices), pooled.shape[1], dtype=torch.float32))
                if keep_flat:
                    flat_out.append(torch.empty(len(indices), flat.shape[1], dtype=torch.float32))
            pooled_out[slot][start : start + len(idx)] = pooled.float().cpu()
            if keep_flat:
                flat_out[slot][start : start + len(idx)] = flat.float().cpu()
        bar.update(len(idx))
    return flat_out, pooled_out


def measure(
    model: nn.Module,
    dataset,
    layers: str | Sequence[int | str] = "all",
    *,
    variant: str = "paper",
    seed: int = 0,
    device: torch.device | str | None = None,
    batch_size: int = 256,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    subset_size: int = 5000,
    per_class_b: int = 500,
    dtype: torch.dtype = DEFAULT_DTYPE,
    model_name: str | None = None,
    progress: bool = True,
    probe_set=None,
) -> QualityReport:
    """Knowledge quality of ``layers`` (GL indices or names, or "all") of ``model`` on ``dataset``.

    The report's ``candidates`` are the measured layers among
    :func:`featkd.selection.candidate_layers` (None when that is every one), so that its rules
    choose as ``--teacher-layers auto`` does: never the stem or a head layer unless fewer than k
    others were measured.

    ``dataset`` is the training split: labels from ``.labels`` or torchvision's
    ``.targets``, else from each item; ``.batch(indices)`` when present;
    augmentation switched off through ``.with_augment(False)`` when it has one
    (give any other dataset its evaluation transform). Subset A holds floor(subset_size / C)
    samples per class, subset B min(per_class_b, N / C), both capped at the
    smallest class, drawn from one generator seeded with ``seed`` (A first). The
    model runs in eval mode without gradients on ``device`` (it is moved there).
    Layers are taken in groups whose stored features (float32, host memory) fit
    half of ``memory_budget`` bytes, the forward pass stopped after the group's
    deepest layer; subset B runs class by class. The other half bounds each
    layer's computation.

    Every layer also gets a linear probe's accuracy (:func:`probe_accuracy` on
    its pooled features): fitted on one class-balanced half of subset A and
    scored on the other, both ways, averaged; or, when ``probe_set`` (a
    held-out split of the training data, never the test split) is given, fitted
    on subset A and scored on every image of ``probe_set``.
    """
    from tqdm.auto import tqdm

    from featkd.layers import extract, feature_layout, to_canonical

    _check_variant(variant)
    device = torch.device(device) if device is not None else torch.device("cpu")
    indices, names = _measured_layers(model, layers)
    if hasattr(dataset, "with_augment"):
        dataset = dataset.with_augment(False)

    labels = _dataset_labels(dataset)
    if probe_set is not None and hasattr(probe_set, "with_augment"):
        probe_set = probe_set.with_augment(False)
    probe_labels = _dataset_labels(probe_set) if probe_set is not None else None
    subset_a, subset_b = _draw_subsets(labels, subset_size, per_class_b, seed)
    labels_a = labels[subset_a]
    members_b = [subset_b[labels[subset_b] == c] for c in torch.unique(labels[subset_b])]
    width = max(len(m) for m in members_b)
    half_budget = memory_budget // 2
    _spare_budget(len(subset_a), half_budget, variant, dtype)  # too small: fail before any forward
    _spectrum_budget(width, half_budget, dtype)

    was_training = model.training
    model.to(device).eval()
    rows = []
    try:
        with torch.no_grad():
            images = _load_images(dataset, subset_a[:2]).to(device)
            probe = extract(model, images, names)
            shapes = [list(f.shape[1:]) for f in probe]
            layouts = [feature_layout(shape, images.shape[-2:]) for shape in shapes]
            dims = [flatten_features(to_canonical(f, layout)).shape[1]
                    for f, layout in zip(probe, layouts)]
            del probe
            groups = _group_layers([4 * (len(subset_a) + width) * d for d in dims], half_budget)
            held_out = len(probe_labels) if probe_labels is not None else 0
            with tqdm(total=len(groups) * (len(subset_a) + len(subset_b) + held_out), unit="img",
                      desc="quality", disable=not progress) as bar:
                for group in groups:
                    group_names = [names[i] for i in group]
                    group_layouts = [layouts[i] for i in group]
                    spectra = _class_spectra(model, dataset, members_b, [indices[i] for i in group], group_names,
                                             group_layouts, device, batch_size, bar, dtype, half_budget)
                    feats_a, pooled_a = _features(model, dataset, subset_a, group_names, device,
                                                  batch_size, bar, group_layouts)
                    probes = _probes(pooled_a, labels_a, seed, model, probe_set, probe_labels,
                                     group_names, group_layouts, device, batch_size, bar)
                    for slot, i in enumerate(group):
                        bar.set_postfix_str(f"layer {indices[i]}")
                        with _naming_layer(indices[i], names[i]):
                            sample = sample_statistics(feats_a[slot], labels_a, variant=variant,
                                                       memory_budget=half_budget, dtype=dtype,
                                                       device=device)
                        feats_a[slot] = None  # free as we go
                        entropy = spectrum_entropy(pad_spectra(spectra[slot], width), variant=variant)
                        parts = quality_parts(sample, entropy, num_train=len(labels), variant=variant)
                        rows.append(_row(indices[i], names[i], shapes[i], parts, probes[slot]))
                        logger.debug("layer %d (%s): S %.4f I %.4f E %.4f Q %.4f", indices[i],
                                     names[i], parts["S"], parts["I"], parts["E"], parts["Q"])
    finally:
        model.train(was_training)
    settings = {
        "seed": seed,
        "num_train": len(labels),
        "n_a": len(subset_a),
        "n_b": len(subset_b),
        "num_classes": len(members_b),
        "dtype": str(dtype).replace("torch.", ""),
        "probe": ("ridge on pooled features, fitted on one half of subset A and scored on the "
                  "other, both ways" if probe_set is None else
                  f"ridge on pooled features, fitted on subset A, scored on a held-out split of "
                  f"{len(probe_labels)} images"),
    }
    candidates = sorted(set(indices) & set(candidate_layers(model)))
    return QualityReport(rows, variant=variant, model=model_name or type(model).__name__,
                         settings=settings, candidates=None if candidates == indices else candidates)


def _measured_layers(model: nn.Module, layers: str | Sequence[int | str]) -> tuple[list[int], list[str]]:
    """GL indices and names of ``layers`` ("all", or GL indices / names), in model order, each once."""
    from featkd.layers import generalized_layers, resolve_layers

    all_layers = generalized_layers(model)
    if not all_layers:
        raise ValueError(f"{type(model).__name__} has no generalized layers to measure "
                         "(featkd.layers.generalized_layers)")
    names = all_layers if layers == "all" else resolve_layers(model, layers)
    not_gl = [name for name in names if name not in all_layers]
    if not_gl:
        raise ValueError(f"{not_gl} are not generalized layers; valid: {', '.join(all_layers)}")
    indices = sorted({all_layers.index(name) for name in names})
    return indices, [all_layers[i] for i in indices]


def _class_spectra(model: nn.Module, dataset, members_b: list[Tensor], indices: list[int], names: list[str],
                   layouts: list[str], device: torch.device, batch_size: int, bar, dtype: torch.dtype,
                   budget: int) -> list[list[Tensor]]:
    """Per layer of a group, the eigenvalue spectrum of each class of subset B (one class's features
    in memory at a time)."""
    spectra: list[list[Tensor]] = [[] for _ in names]
    for members in members_b:
        class_feats, _ = _features(model, dataset, members, names, device, batch_size, bar, layouts)
        for slot, feats in enumerate(class_feats):
            with _naming_layer(indices[slot], names[slot]):
                spectra[slot].append(class_spectrum(feats, dtype=dtype, device=device, memory_budget=budget))
        del class_feats
    return spectra


def _probes(pooled_a: list[Tensor], labels_a: Tensor, seed: int, model: nn.Module, probe_set,
            probe_labels: Tensor | None, names: list[str], layouts: list[str], device: torch.device,
            batch_size: int, bar) -> list[float]:
    """The probe accuracy of every layer of a group (see :func:`measure`)."""
    if probe_set is None:
        return [_cross_probe(pooled, labels_a, seed) for pooled in pooled_a]
    _, pooled_held = _features(model, probe_set, torch.arange(len(probe_labels)), names, device,
                               batch_size, bar, layouts, keep_flat=False)
    return [probe_accuracy(fit, labels_a, held, probe_labels) for fit, held in zip(pooled_a, pooled_held)]


def _row(index: int, name: str, shape: list[int], parts: dict, probe: float | None) -> LayerQuality:
    stats = {key: value for key, value in parts.items() if key not in SELECT_BY}
    return LayerQuality(index=index, name=name, shape=shape, D=parts["D"], S=parts["S"],
                        I=parts["I"], E=parts["E"], sqrtIE=parts["sqrtIE"], Q=parts["Q"], stats=stats,
                        probe=probe)
