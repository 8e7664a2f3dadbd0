"""Independent float64 NumPy check of featkd.quality.layer_quality against spec/quality.md.

The reference below is written straight from the spec's definitions (separate cosine
matrix, explicit pairwise distances, numpy.linalg.svd), deliberately without the Gram-matrix
shortcuts the library uses, so that the two computations share no code path.
"""

import math

import numpy as np
import pytest
import torch

from featkd.quality import layer_quality

VARIANTS = ("paper", "corrected")
KEYS = ("S", "I", "E", "Q", "sqrtIE")
RTOL = 1e-4


# ---------------------------------------------------------------- reference


def _unit_rows(x):
    norms = np.linalg.norm(x, axis=1)
    units = np.zeros_like(x)
    nonzero = norms > 0
    units[nonzero] = x[nonzero] / norms[nonzero, None]
    return norms, units


def _entropy(p):
    p = p / p.sum()
    p = p[p > 0]  # 0 ln 0 = 0
    return float(-(p * np.log(p)).sum())


def _first_reaching(cumulative, threshold):
    """Smallest k >= 1 with cumulative[k-1] >= threshold."""
    return int(np.argmax(cumulative >= threshold)) + 1


def _class_rows(xb, yb):
    """Normalised squared singular values of each centred class matrix, zero-padded to W."""
    classes = np.unique(yb)
    width = max(int((yb == c).sum()) for c in classes)
    rows = []
    for c in classes:
        xc = xb[yb == c]
        xc = xc - xc.mean(axis=0)
        sq = np.linalg.svd(xc, compute_uv=False) ** 2
        row = np.zeros(width)
        row[: len(sq)] = sq / sq.sum()
        rows.append(row)
    return np.array(rows), width


def reference_quality(xa, ya, xb, yb, num_train, variant):
    """Spec/quality.md, literally, in float64."""
    xa = np.asarray(xa, dtype=np.float64).reshape(len(xa), -1)
    xb = np.asarray(xb, dtype=np.float64).reshape(len(xb), -1)
    ya, yb = np.asarray(ya), np.asarray(yb)
    paper = variant == "paper"
    classes = np.unique(ya)

    # ---- subset A
    norms, units = _unit_rows(xa)
    cos = np.abs(units @ units.T)
    intra_avg, intra_min, nu, min_inter = [], [], [], []
    for c in classes:
        inside = ya == c
        block = cos[np.ix_(inside, inside)]
        upper = block[np.triu_indices(len(block), k=1)]
        intra_min.append(upper.min())
        intra_avg.append(block.mean() if paper else upper.mean())
        nu.append(norms[inside].mean())
        diff = xa[inside][:, None, :] - xa[~inside][None, :, :]
        dist = np.sqrt(np.maximum((diff**2).sum(-1), 0.0))
        min_inter.append(dist.min())
    inter_avg = [
        cos[np.ix_(ya == c, ya == c2)].mean() for c in classes for c2 in classes if c != c2
    ]
    separation = np.mean(intra_avg) - np.mean(inter_avg)

    if paper:
        global_len = len(np.linalg.svd(xa, compute_uv=False))
    else:
        sq = np.linalg.svd(xa - xa.mean(axis=0), compute_uv=False) ** 2
        global_len = _first_reaching(np.cumsum(sq / sq.sum()), 0.90)
    k_factor = (num_train / math.pi) ** (1.0 / global_len)
    efficiency = k_factor * 2.0 * np.mean(min_inter) / np.mean(nu)

    # ---- subset B
    rows, width = _class_rows(xb, yb)
    dims = [min(_first_reaching(np.cumsum(row), 0.95), width - 1) for row in rows]
    total = sum(dims)
    entropies, normalised = [], []
    for row, d in zip(rows, dims):
        h = _entropy(row[: min(total, width)] if paper else row[:d])
        entropies.append(h)
        normalised.append(h / math.log(d) if d > 1 else 0.0)
    hbar = np.mean(entropies) if paper else np.mean(normalised)
    scale = math.log(5) if paper else 1.0
    information = (1.0 - np.mean(intra_min)) * hbar / scale

    sqrt_ie = math.sqrt(information * efficiency)
    return {
        "S": separation,
        "I": information,
        "E": efficiency,
        "Q": separation + sqrt_ie,
        "sqrtIE": sqrt_ie,
        "intra_avg": np.mean(intra_avg),
        "intra_min": np.mean(intra_min),
        "inter_avg": np.mean(inter_avg),
        "nu": np.mean(nu),
        "min_inter": np.mean(min_inter),
        "Hbar": hbar,
        "G": global_len,
        "K": k_factor,
        "d": dims,
        "H": entropies,
    }


# ---------------------------------------------------------------- cases


def _features(rng, sizes, shape, spread=1.5):
    """Gaussian features with a random mean per class, rows shuffled (classes interleaved)."""
    labels = np.concatenate([np.full(m, c) for c, m in enumerate(sizes)])
    centres = rng.normal(size=(len(sizes),) + shape) * spread
    x = centres[labels] + rng.normal(size=(len(labels),) + shape)
    order = rng.permutation(len(labels))
    return x[order].astype(np.float32), labels[order]


# name: (A sizes per class, B sizes per class or None for "B omitted", per-sample shape)
CASES = {
    "2cls_D<n_unequalB": ([8, 8], [9, 4], (5,)),
    "3cls_D>n_maps": ([5, 5, 5], [5, 3, 8], (2, 3, 4)),
    "5cls_Bomitted": ([4, 4, 4, 4, 4], None, (40,)),
    "5cls_maps_D<n": ([6, 6, 6, 6, 6], [7, 3, 5, 9, 2], (1, 2, 3)),
    "3cls_D>n_unequalB": ([6, 6, 6], [12, 2, 6], (30,)),
    "2cls_Bomitted_maps": ([7, 7], None, (3, 2, 2)),
    # one large, high-rank class in B: M = sum d_c < W, so the paper truncation bites
    "2cls_truncation_M<W": ([6, 6], [40, 3], (50,)),
}


def _run_case(name, variant, seed=0, **options):
    sizes_a, sizes_b, shape = CASES[name]
    rng = np.random.default_rng(seed + sum(map(ord, name)))
    xa, ya = _features(rng, sizes_a, shape)
    num_train = 1000 * len(sizes_a)
    if sizes_b is None:
        got = layer_quality(
            torch.from_numpy(xa), torch.from_numpy(ya),
            num_train=num_train, variant=variant, **options,
        )
        want = reference_quality(xa, ya, xa, ya, num_train, variant)
    else:
        xb, yb = _features(rng, sizes_b, shape)
        got = layer_quality(
            torch.from_numpy(xa),
            torch.from_numpy(ya),
            torch.from_numpy(xb),
            torch.from_numpy(yb),
            num_train=num_train,
            variant=variant,
            **options,
        )
        want = reference_quality(xa, ya, xb, yb, num_train, variant)
    return got, want


def _as_float(value):
    if isinstance(value, torch.Tensor):
        return value.double().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _rel_err(got, want):
    got, want = _as_float(got), _as_float(want)
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-12)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_layer_quality_matches_spec_reference(name, variant):
    got, want = _run_case(name, variant)
    for key in KEYS:
        assert _rel_err(got[key], want[key]) < RTOL, (key, float(_as_float(got[key])), want[key])


INTERMEDIATES = ("intra_avg", "intra_min", "inter_avg", "nu", "min_inter", "Hbar", "K")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["5cls_maps_D<n", "3cls_D>n_maps", "2cls_truncation_M<W"])
def test_intermediates_match_spec_reference(name, variant):
    got, want = _run_case(name, variant)
    if name == "2cls_truncation_M<W":
        assert sum(want["d"]) < max(CASES[name][1])  # the case really truncates
    assert int(got["G"]) == want["G"]
    assert [int(d) for d in got["d"]] == want["d"]
    assert _rel_err(got["H"], want["H"]) < RTOL
    for key in INTERMEDIATES:
        assert _rel_err(got[key], want[key]) < RTOL, key


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("options", [{"dtype": torch.float32}, {"memory_budget": 20_000}])
def test_float32_and_blocking_stay_within_tolerance(variant, options):
    """Spec: float32 accumulation and blocked computation must agree with float64 to 1e-4."""
    got, want = _run_case("5cls_maps_D<n", variant, **options)
    for key in KEYS:
        assert _rel_err(got[key], want[key]) < RTOL, key


def test_reference_is_sensitive_to_variant():
    """Guards the reference itself: the two variants must differ on a generic case."""
    _, paper = _run_case("3cls_D>n_maps", "paper")
    _, corrected = _run_case("3cls_D>n_maps", "corrected")
    for key in ("S", "I", "E"):
        assert abs(paper[key] - corrected[key]) > 1e-6 * abs(paper[key])
