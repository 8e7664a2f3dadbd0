"""featkd: logit-free feature knowledge distillation of image classifiers.

Implements "Logit-Based Losses Limit the Effectiveness of Feature Knowledge
Distillation" (Cooper et al., NeurReps 2025, arXiv 2511.14981).

    report = featkd.quality.measure(teacher, train_set, variant="corrected")  # S, I, E, Q per layer
    result = featkd.distill(teacher, student, train_set, test_set, method="featkd",
                            teacher_layers=report.select(4), student_layers="paper")  # the default rule

Sub-packages: ``models`` (the paper's zoo), ``data``, ``layers`` (generalized
layers and taps), ``quality``, ``distillation`` (methods, losses, projectors,
teacher outputs), ``train`` (the method-agnostic trainer), ``stats`` (two-sample tests of
per-seed accuracies), ``report``, ``cli``; each is reachable
as ``featkd.<name>`` after ``import featkd`` and imported on first use.
"""

import importlib
from types import ModuleType

from featkd import quality
from featkd.api import distill, train_teacher

__version__ = "0.1.0"
__all__ = ["distill", "quality", "train_teacher"]

#: Sub-packages reachable as ``featkd.<name>`` after ``import featkd``; imported on first
#: use, so ``import featkd`` stays light.
_LAZY_SUBMODULES = frozenset({"api", "checkpoint", "cli", "config", "data", "distillation", "graph",
                              "layers", "models", "report", "selection", "stats", "train"})


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"featkd.{name}")
    raise AttributeError(f"module 'featkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_SUBMODULES})
