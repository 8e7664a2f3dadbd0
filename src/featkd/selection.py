"""Rules that choose the teacher layers to distil from.

A rule has a name usable on the command line (``featkd quality --by RULE``,
``featkd distill --teacher-layers auto --select-by RULE``) and in configs:

* ``SCORE``: the k layers with the highest score, in depth order. Scores:
  ``Q``, ``S``, ``I``, ``E``, ``sqrtIE`` (knowledge quality and its parts, in
  the variant the report was measured in), ``depth`` (the GL index: deeper
  is better) and ``probe`` (the accuracy of a linear probe on the layer's
  pooled features, fitted on the quality subset and scored on the validation
  split when one is held out, else on two halves of the subset; never the
  test split).
* ``bands:SCORE``: the candidate layers, in depth order, cut into k bands of
  (nearly) equal size; the best layer by SCORE in each band. A set that spans
  the teacher's depth, as the student's fixed layers span the student's.
* ``.../VARIANT`` after a knowledge-quality score (``Q/paper``,
  ``bands:Q/corrected``): the score measured in that variant of the metric
  ("paper" or "corrected"). Without it, the variant the report was measured in.

Ties break towards the deeper layer; a missing score (NaN) ranks last, and
:func:`select` leaves such layers out (with a warning) while k others remain.
Each rule is a small pure function of (layers, scores, k).

:data:`DEFAULT_RULE` is what ``auto`` uses; :data:`PAPER_RULE` reproduces the
paper's choice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BUILDERS",
    "DEFAULT_RULE",
    "PAPER_RULE",
    "Rule",
    "SCORES",
    "band_edges",
    "bands",
    "VARIANT_FREE",
    "candidate_layers",
    "choosable",
    "measure_variant",
    "parse_rule",
    "resolve_rule",
    "rule_names",
    "select",
    "set_score",
    "top_k",
]

#: the rule ``--teacher-layers auto`` uses unless told otherwise: the rule that beat depth's choice
#: in benchmarks/layer_validity.py on three teachers (validity_report.default_verdict states the
#: criterion, fixed before the results; BENCHMARKS.md the evidence)
DEFAULT_RULE = "bands:Q/corrected"
#: the paper's rule: Q in the "paper" variant of the metric reproduces its choices
PAPER_RULE = "Q/paper"
SCORES = ("Q", "S", "I", "E", "sqrtIE", "depth", "probe")
VARIANT_FREE = ("depth", "probe")  # scores that do not depend on the knowledge-quality variant
VARIANTS = ("paper", "corrected")  # the knowledge-quality variants (featkd.quality, spec/quality.md)
DEFAULT_VARIANT = "paper"

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ set builders
def _rank_key(value: float, layer: int) -> tuple[bool, float, int]:
    """Sort key, best first when sorted in reverse: a score (NaN last, below -inf), higher score,
    then deeper layer."""
    missing = math.isnan(value)
    return (not missing, 0.0 if missing else value, layer)


def top_k(layers: Sequence[int], scores: Sequence[float], k: int) -> list[int]:
    """The ``k`` layers with the highest scores, in depth order; ties go to the deeper layer."""
    _check_k(layers, scores, k)
    ranked = sorted(zip(scores, layers), key=lambda pair: _rank_key(*pair), reverse=True)
    return sorted(layer for _, layer in ranked[:k])


def band_edges(count: int, k: int) -> list[tuple[int, int]]:
    """(start, stop) positions of ``k`` consecutive bands of nearly equal size over ``count`` items."""
    if not 1 <= k <= count:
        raise ValueError(f"k must be between 1 and {count} (the layers to choose from), got {k}")
    cuts = [b * count // k for b in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def bands(layers: Sequence[int], scores: Sequence[float], k: int) -> list[int]:
    """The best layer by score in each of ``k`` depth bands of the layers (sorted by depth)."""
    _check_k(layers, scores, k)
    order = sorted(range(len(layers)), key=lambda i: layers[i])
    chosen = []
    for start, stop in band_edges(len(order), k):
        band = order[start:stop]
        chosen.append(max(band, key=lambda i: _rank_key(scores[i], layers[i])))
    return [layers[i] for i in chosen]


BUILDERS: dict[str, Callable[[Sequence[int], Sequence[float], int], list[int]]] = {
    "top": top_k,
    "bands": bands,
}


def _check_k(layers: Sequence[int], scores: Sequence[float], k: int) -> None:
    if len(layers) != len(scores):
        raise ValueError(f"{len(layers)} layers but {len(scores)} scores")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {list(layers)}")
    if not 1 <= k <= len(layers):
        raise ValueError(f"k must be between 1 and {len(layers)} (layers measured), got {k}")


# ------------------------------------------------------------------ named rules
@dataclass(frozen=True)
class Rule:
    """A score, the way a set is built from it ("top": the k best; "bands": the best per band) and,
    for a knowledge-quality score, the variant it is measured in (None: the report's)."""

    score: str
    build: str = "top"
    variant: str | None = None

    @property
    def name(self) -> str:
        name = self.score if self.build == "top" else f"{self.build}:{self.score}"
        return name if self.variant is None else f"{name}/{self.variant}"

    def choose(self, layers: Sequence[int], scores: Sequence[float], k: int) -> list[int]:
        """The rule's ``k`` layers given every candidate layer's score."""
        return BUILDERS[self.build](layers, scores, k)

    def in_variant(self, variant: str) -> Rule:
        """This rule with its score's variant fixed: ``variant`` unless it names one (or needs none)."""
        if self.variant is not None or self.score in VARIANT_FREE:
            return self
        return Rule(self.score, self.build, variant)


def rule_names() -> list[str]:
    """Every valid rule name without a variant (each quality score also takes ``/paper`` or ``/corrected``)."""
    return [Rule(score, build).name for build in BUILDERS for score in SCORES]


def parse_rule(text: str | Rule) -> Rule:
    """``"S"`` -> Rule("S"), ``"bands:Q/corrected"`` -> Rule("Q", "bands", "corrected");
    ValueError naming the valid ones."""
    if isinstance(text, Rule):
        return text
    rest, slash, variant = str(text).strip().partition("/")
    build, sep, score = rest.rpartition(":")
    build = build if sep else "top"
    if build not in BUILDERS or score not in SCORES or (sep and build == "top"):
        raise ValueError(f"unknown selection rule {text!r}; valid: {', '.join(rule_names())}, each quality "
                         f"score optionally with /{' or /'.join(VARIANTS)} (e.g. bands:Q/corrected)")
    if slash and variant not in VARIANTS:
        raise ValueError(f"unknown knowledge-quality variant {variant!r} in rule {text!r}; valid: "
                         f"{', '.join(VARIANTS)}")
    if slash and score in VARIANT_FREE:
        raise ValueError(f"rule {text!r}: {score} does not depend on the knowledge-quality variant; drop /{variant}")
    return Rule(score, build, variant or None)


def resolve_rule(rule: str | Rule | None, variant: str | None = None) -> Rule:
    """``rule``, or when None the default rule, measured in ``variant`` if one is given (the default
    rule's score and bands in that variant: ``bands:Q/paper`` for a paper-variant report)."""
    if rule is not None:
        return parse_rule(rule)
    default = parse_rule(DEFAULT_RULE)
    if variant is None or default.variant in (None, variant):
        return default
    return Rule(default.score, default.build, variant)


def measure_variant(rule: str | Rule, variant: str | None = None) -> str:
    """The knowledge-quality variant to measure for ``rule``: ``variant`` when given, else the rule's,
    else the default ("paper"). ValueError when ``variant`` contradicts the rule's."""
    rule = parse_rule(rule)
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown knowledge-quality variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if variant is not None and rule.variant not in (None, variant):
        raise ValueError(f"rule {rule.name} ranks by knowledge quality in the {rule.variant} variant, "
                         f"but variant {variant} was asked for: drop one of them")
    return variant or rule.variant or DEFAULT_VARIANT


def select(report: Any, k: int, rule: str | Rule | None = None) -> list[int]:
    """GL indices ``rule`` chooses among the candidate layers of ``report`` (a QualityReport; see
    :func:`choosable`), in depth order (default: :func:`resolve_rule` in the report's variant)."""
    rule = resolve_rule(rule, report.variant)
    if rule.variant not in (None, report.variant):
        raise ValueError(f"rule {rule.name} needs knowledge quality measured in the {rule.variant} variant; "
                         f"this report holds the {report.variant} variant (measure it again with "
                         f"variant {rule.variant})")
    layers = [row.index for row in report.layers]
    scores = dict(zip(layers, report.values(rule.score)))
    pool = _scored(choosable(layers, report.candidates, k), scores, k, rule.score)
    return sorted(rule.choose(pool, [scores[layer] for layer in pool], k))


def _scored(pool: list[int], scores: dict[int, float], k: int, score: str) -> list[int]:
    """``pool`` without the layers whose score is missing (NaN), unless fewer than ``k`` would remain."""
    missing = [layer for layer in pool if math.isnan(scores[layer])]
    if not missing:
        return pool
    kept = [layer for layer in pool if layer not in missing]
    if len(kept) >= k:
        logger.warning("layers %s have no %s score: left out of the selection", missing, score)
        return kept
    logger.warning("layers %s have no %s score, but fewer than k=%d others do: they may be chosen",
                   missing, score, k)
    return pool


def set_score(scores: dict[int, float], layers: Sequence[int]) -> float:
    """The score of a set of layers: the mean of its layers' scores."""
    return sum(scores[t] for t in layers) / len(layers)


# ------------------------------------------------------------------ candidates
def candidate_layers(model: Any, k: int = 1) -> list[int]:
    """GL indices a rule chooses among: GL 1 to the last GL before the head.

    GL 0 (the stem, or a ViT's input embedding) and GLs inside the classifier head
    (VGG's fully connected layers) are left out; every GL when fewer than ``k`` remain.
    """
    from featkd.layers import generalized_layers, head_index

    count = len(generalized_layers(model))
    head = min(head_index(model), count)
    return choosable(range(count), range(1, head), k)


def choosable(layers: Sequence[int], candidates: Sequence[int] | None, k: int) -> list[int]:
    """The layers a rule chooses ``k`` from: those of ``layers`` among ``candidates`` (None: every
    one), or all of ``layers`` when fewer than ``k`` of them are candidates."""
    pool = [layer for layer in layers if candidates is None or layer in candidates]
    return pool if len(pool) >= k else list(layers)
