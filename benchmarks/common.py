"""Shared settings and helpers of the benchmark scripts (accuracy, layer_validity, throughput).

Scales (``--scale``): ``default`` (Fashion-MNIST, reduced widths, sized for about
3 hours on 2 CPU cores; see :data:`SCALES` and benchmarks/README.md for how the
numbers were chosen), ``quick`` (tiny synthetic data, seconds: tests and smoke
runs) and ``paper`` (widths 1, 50 epochs, 3 runs; for a GPU and CIFAR-100).

Layout: ``benchmarks/work/<scale>-<data>/`` holds teachers (trained with the
real ``featkd train-teacher`` command), knowledge-quality reports, student run
directories and logs (git-ignored). Results JSON go to ``benchmarks/results/``
for the default scale (committed), to ``<work>/results/`` otherwise.

The teacher outputs of one (pair, regime) are shared by all of its methods:
:class:`SharedTeacherFeed` keeps one ``featkd.distillation.TeacherCache`` per
teacher-layer list and is passed to ``featkd.api.distill(..., teacher_feed=feed)``
(which otherwise builds a new cache for every call).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from featkd.config import TrainConfig

log = logging.getLogger("benchmarks")

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORK_ROOT = BENCH_DIR / "work"
RESULTS_DIR = BENCH_DIR / "results"

#: every method of the comparison, in the spec's table order
METHODS = ("ce", "kd", "kd_std", "fitnet", "fitnet_fc", "sp", "simkd", "semckd",
           "featkd", "featkd_ce", "featkd_ce_kd", "featkd_std")

#: the logit-based baselines the ARI compares featkd with
BASELINES = ("kd", "kd_std", "fitnet", "fitnet_fc", "sp", "simkd", "semckd")
ARI_MIN_GAIN = 0.5  # percentage points over ce a baseline needs to enter the ARI
CONVERGED_POINTS = 0.3  # validation points a longer ce run may still gain for the budget to count as enough


def budget_converged(val_gain_points: float) -> bool:
    """Whether a longer ce run's validation gain (points) leaves the budget converged; rounded so that
    float noise (0.853 - 0.850 is 0.30000000000000027 points) does not decide."""
    return round(val_gain_points, 6) <= CONVERGED_POINTS


def rows() -> tuple[str, ...]:
    """The rows of the comparison: every method, plus ``featkd_default`` (featkd on the layers of
    the default selection rule) when that rule is not the paper's, whose row ``featkd`` is."""
    from featkd.selection import DEFAULT_RULE, PAPER_RULE

    return METHODS + (("featkd_default",) if DEFAULT_RULE != PAPER_RULE else ())


def row_method(row: str) -> str:
    """The distillation method of a comparison row."""
    return "featkd" if row == "featkd_default" else row


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair of the paper (zoo model names)."""

    teacher: str
    student: str

    @property
    def name(self) -> str:
        return f"{self.teacher}-{self.student}"


PAIRS: dict[str, Pair] = {p.name: p for p in (
    Pair("vgg19_bn", "vgg11_bn"),
    Pair("resnet34", "resnet9"),
    Pair("resnet34", "mobilenetv2"),
    Pair("vit_b", "vit_et"),
)}


@dataclass
class Scale:
    """Every setting a benchmark run depends on (written into each results file)."""

    name: str
    data: str
    regimes: dict[str, int | None]  # regime -> training images (None: all but the validation split)
    teacher_regime: str  # teachers train once on this regime's training set
    teacher_widths: dict[str, float]
    student_widths: dict[str, float]
    teacher_epochs: int
    epochs: dict[str, int]  # student epochs per regime
    seeds: int
    # Teachers train from scratch here, so ViT-B gets the from-scratch ViT peak lr (the
    # recipe's 1e-4 is for fine-tuning ImageNet weights); others use the recipe's lr.
    teacher_lrs: dict[str, float] = field(default_factory=lambda: {"vit_b": 1e-3})
    batch_size: int = 128
    val_size: int | None = None  # validation images held out of the training split (fixed seed 0)
    teacher_augment: bool = False  # random crop + flip while training the teachers
    teachers_dir: str | None = None  # committed teachers (repo-relative); None: <work>/teachers
    # the convergence check's long budget per regime, x the student epochs (1.5-2x)
    convergence_factor: dict[str, float] = field(default_factory=dict)
    # evaluate the validation and test splits every N epochs per regime (default 1; the last always)
    eval_every: dict[str, int] = field(default_factory=dict)
    data_root: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    quality_subset: int = 5000
    quality_variant: str = "paper"
    device: str = "auto"
    threads: int | None = None  # torch threads per process (None: cores / workers)
    pairs: tuple[str, ...] = tuple(PAIRS)
    # layer_validity.py
    lv_pair: str = "resnet34-resnet9"  # the pair accuracy.py's probe times for its estimate
    lv_regime: str = "low"
    lv_epochs: int = 4
    lv_seeds: int = 2
    lv_rule_seeds: int = 5  # seeds of the sets the rules choose (the default rule's test pairs them)
    lv_pairs: tuple[str, ...] = ("resnet34-resnet9", "vgg19_bn-vgg11_bn", "vit_b-vit_et")
    lv_subsets: int = 20  # random 4-subsets of teacher layers per teacher
    lv_max_layers: int | None = None  # candidate layers per teacher (None: all; evenly spread otherwise)
    # throughput.py
    tp_regime: str = "full"
    # student -> regime -> epochs, for a student whose convergence check needs another budget than ``epochs``
    student_epochs: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def budget(self, student: str, regime: str) -> int:
        """The epochs ``student`` trains for in ``regime`` (every method of the grid alike)."""
        return self.student_epochs.get(student, {}).get(regime, self.epochs[regime])


SCALES: dict[str, Scale] = {
    # Fashion-MNIST with a 5,000-image validation split; teachers trained once on the other 55,000
    # with augmentation and committed (benchmarks/teachers/); students from scratch in two regimes,
    # with budgets that the convergence check (benchmarks/convergence.py) shows to be converged for
    # ce. Widths: the students are the smallest widths at which each trains to a sensible model
    # (ViT-ET at 1/8, d = 24: ce >= 85 % in the full regime); see benchmarks/README.md.
    "default": Scale(
        name="default",
        data="fashion_mnist",
        regimes={"full": None, "low": 5000},
        teacher_regime="full",
        teacher_widths={"resnet34": 1 / 8, "vgg19_bn": 1 / 8, "vit_b": 1 / 16},
        student_widths={"resnet9": 1 / 16, "vgg11_bn": 1 / 16, "mobilenetv2": 1 / 16, "vit_et": 1 / 8},
        teacher_epochs=30,
        epochs={"full": 15, "low": 160},
        # Budgets whose first candidates failed their convergence checks (results/convergence_rejected_budgets/):
        # ViT-ET +1.18 validation points from 15 to 30 full-regime epochs, +0.74 from 160 to 240 low-regime ones
        # and +0.56 from 240 to 360 (360 x 5,000 images: about the steps of its 30 full-regime epochs);
        # MobileNetV2 +0.46 from 15 to 30 full-regime epochs, +0.98 from 30 to 60 and +1.24 from 60 to 120;
        # VGG11 +0.47 [+0.14, +0.79] from 160 to 240 low-regime epochs (3 seeds; 240 -> 360: -0.17 [-1.93, +1.58])
        student_epochs={"vit_et": {"full": 30, "low": 360}, "mobilenetv2": {"full": 120}, "vgg11_bn": {"low": 240}},
        seeds=3,
        val_size=5000,
        convergence_factor={"full": 2.0, "low": 1.5},
        eval_every={"low": 4},
        teacher_augment=True,
        teachers_dir="benchmarks/teachers",
        quality_subset=5000,
        lv_epochs=24,  # at 8 the students were far from trained and the seeds differed more than the layers
    ),
    "quick": Scale(
        name="quick",
        data="synthetic",
        regimes={"full": None, "low": 24},
        teacher_regime="full",
        teacher_widths={"resnet34": 1 / 16, "vgg19_bn": 1 / 16, "vit_b": 1 / 32},
        student_widths={"resnet9": 1 / 16, "vgg11_bn": 1 / 16, "mobilenetv2": 1 / 16, "vit_et": 1 / 32},
        teacher_epochs=1,
        epochs={"full": 1, "low": 1},
        seeds=1,
        batch_size=8,
        val_size=8,
        teacher_augment=True,
        data_options={"num_classes": 4, "samples_per_class": 12, "test_per_class": 4, "in_channels": 1},
        quality_subset=32,
        threads=1,
        lv_epochs=1,
        lv_seeds=1,
        lv_rule_seeds=2,
        lv_subsets=2,
        lv_max_layers=5,
    ),
    "paper": Scale(
        name="paper",
        data="cifar100",
        regimes={"full": None},
        teacher_regime="full",
        teacher_widths={"resnet34": 1.0, "vgg19_bn": 1.0, "vit_b": 1.0},
        student_widths={"resnet9": 1.0, "vgg11_bn": 1.0, "mobilenetv2": 1.0, "vit_et": 1.0},
        teacher_epochs=50,
        epochs={"full": 50},
        seeds=3,
        val_size=5000,
        teacher_augment=True,
        lv_regime="full",
        lv_epochs=10,
        tp_regime="full",
    ),
}


def build_scale(name: str, *, data: str | None = None, data_root: str | None = None,
                epochs: int | None = None, teacher_epochs: int | None = None,
                seeds: int | None = None, device: str | None = None) -> Scale:
    """The settings of scale ``name`` with command-line overrides applied."""
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; valid: {', '.join(SCALES)}")
    scale = copy.deepcopy(SCALES[name])
    if data is not None and data != scale.data:
        scale.data = data
        if name == "quick":
            scale.data_options = {}
    if data_root is not None:
        scale.data_root = data_root
    if epochs is not None:
        _check_positive("epochs", epochs)
        scale.epochs = {regime: epochs for regime in scale.epochs}
        scale.student_epochs = {}
        scale.lv_epochs = epochs
    if teacher_epochs is not None:
        _check_positive("teacher_epochs", teacher_epochs)
        scale.teacher_epochs = teacher_epochs
    if seeds is not None:
        _check_positive("seeds", seeds)
        scale.seeds = seeds
    if device is not None:
        scale.device = device
    return scale


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def parse_choice(text: str | None, valid: Sequence[str], what: str) -> list[str]:
    """Comma-separated names (or "all"/None for every valid one), checked against ``valid``."""
    if text is None or text.strip() == "all":
        return list(valid)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ValueError(f"unknown {what} {unknown or text!r}; valid: {', '.join(valid)}")
    return names


def work_dir(scale: Scale, root: str | Path | None = None) -> Path:
    """Where a scale keeps teachers, quality reports, run directories and logs."""
    return Path(root) if root is not None else WORK_ROOT / f"{scale.name}-{scale.data}"


def results_dir(scale: Scale, work: Path, override: str | Path | None = None) -> Path:
    """benchmarks/results for the default scale (committed), else <work>/results."""
    if override is not None:
        return Path(override)
    return RESULTS_DIR if scale.name == "default" else work / "results"


def add_common_arguments(parser: Any) -> None:
    """The options every benchmark script takes."""
    parser.add_argument("--scale", choices=list(SCALES), default="default", help="settings preset")
    parser.add_argument("--quick", action="store_true", help="same as --scale quick")
    parser.add_argument("--data", help="dataset name (default: the scale's)")
    parser.add_argument("--data-root", help="folder holding the dataset files")
    parser.add_argument("--epochs", type=int, help="student epochs in every regime")
    parser.add_argument("--seeds", type=int, help="runs (seeds 0..N-1) per configuration")
    parser.add_argument("--teacher-epochs", type=int, help="teacher training epochs")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--work", help="work directory (default benchmarks/work/<scale>-<data>)")
    parser.add_argument("--results", help="results directory (default: see benchmarks/README.md)")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: cores / workers)")


def scale_from_args(args: Any) -> Scale:
    """The scale named by ``args`` (``--quick`` wins) with its overrides; ValueError for a process
    layout (``--threads``, ``--workers``) below 1."""
    for option in ("threads", "workers"):
        if getattr(args, option, None) is not None:
            _check_positive(option, getattr(args, option))
    return build_scale("quick" if args.quick else args.scale, data=args.data, data_root=args.data_root,
                       epochs=args.epochs, teacher_epochs=args.teacher_epochs, seeds=args.seeds,
                       device=args.device)


# --------------------------------------------------------------------------- run records
def machine_info(threads: int | None = None, workers: int = 1) -> dict[str, Any]:
    """CPU, memory, torch version and the thread/process layout of this run."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD kernels torch uses
        "memory_gb": _memory_gb(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "workers": workers,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        info["load_average"] = None
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gb() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def git_commit() -> str | None:
    """HEAD of the repository, with "-dirty" when the working tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def now() -> str:
    """The local time as ISO-8601 text with its UTC offset."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran this script, as a shell line."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    try:
        argv[0] = str(script.resolve().relative_to(REPO_DIR))
    except ValueError:
        pass
    return "python " + shlex.join(argv)


def run_record(argv: Sequence[str] | None, threads: int | None, workers: int = 1) -> dict[str, Any]:
    """Machine, command, git commit and start time: the head of every results file."""
    return {"machine": machine_info(threads, workers), "command": command_line(argv),
            "git_commit": git_commit(), "started": now()}


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``; ValueError naming the file when it does not parse."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): repair it or move it away") from None


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the block.

    Yields True when this process holds it; with ``wait=False`` a lock held by another process
    yields False at once instead of blocking. The lock dies with its process, so a killed run
    leaves none behind. Where there is no ``fcntl`` (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (ddof 1, None for one value) and n of ``values`` (NaNs dropped)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    n = len(kept)
    mean = sum(kept) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def gain_over(method: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Difference of two means in percentage points, with the combined std sqrt(s1^2 + s2^2)."""
    if method.get("mean") is None or reference.get("mean") is None:
        return {"mean": None, "std": None}
    diff = 100.0 * (method["mean"] - reference["mean"])
    stds = [s for s in (method.get("std"), reference.get("std")) if s is not None]
    std = 100.0 * math.sqrt(sum(s * s for s in stds)) if len(stds) == 2 else None
    return {"mean": diff, "std": std}


def ari(gains: dict[str, float | None], qualify_by: dict[str, float | None] | None = None,
        method: str = "featkd", baselines: Sequence[str] = BASELINES,
        min_gain: float = ARI_MIN_GAIN) -> dict[str, Any]:
    """The paper's ARI (as the authors' Plotfigs.py computes it): mean over the qualifying baselines b
    of gain_method / gain_b.

    ``gains`` are mean test gains over ce in percentage points. A baseline qualifies when its
    gain in ``qualify_by`` (the validation gains; ``gains`` itself when None) is at least
    ``min_gain`` points, so the choice is made on validation, not on test. ``value`` is None
    (n/a, with a ``note``) when no baseline qualifies, when the method's gain is missing, or when
    a qualifying baseline's test gain is not positive (its ratio would flip sign).
    """
    chooser = gains if qualify_by is None else qualify_by
    qualifying = [b for b in baselines if chooser.get(b) is not None and chooser[b] >= min_gain]
    own = gains.get(method)
    flat = [b for b in qualifying if gains.get(b) is None or gains[b] <= 0]
    where = "" if qualify_by is None else " on validation"
    note = (f"no baseline gains {min_gain} points or more over ce{where}" if not qualifying
            else f"{method} not run" if own is None
            else f"qualifying {', '.join(flat)} without a positive test gain" if flat else "")
    ratios = {} if note else {b: own / gains[b] for b in qualifying}
    value = sum(ratios.values()) / len(ratios) if ratios else None
    return {"value": value, "baselines": qualifying, "ratios": ratios, "min_gain": min_gain, "note": note}


def derived(methods: dict[str, Any]) -> dict[str, Any]:
    """Gains over ce in points (final epoch, best-validation epoch, and final validation accuracy;
    no test) and the paper's ARI of featkd, its baselines chosen on the validation gains."""
    out: dict[str, Any] = {"gain_final": {}, "gain_best_val": {}, "gain_val": {}}
    ce = methods.get("ce")
    for key, metric in (("gain_final", "final_test_acc"), ("gain_best_val", "test_acc_at_best_val"),
                        ("gain_val", "final_val_acc")):
        for name, entry in methods.items():
            if ce is not None and metric in entry and metric in ce:
                out[key][name] = gain_over(entry[metric], ce[metric])
    val = {name: g["mean"] for name, g in out["gain_val"].items()}
    for which in ("final", "best_val"):
        gains = {name: g["mean"] for name, g in out[f"gain_{which}"].items()}
        out[f"ari_{which}"] = ari(gains, qualify_by=val)
    return out


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        for position in range(start, stop + 1):
            ranks[order[position]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties averaged) over the pairs without a None or NaN; None when
    undefined (n < 3 or a constant input)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    pairs = [(a, b) for a, b in zip(x, y) if not (a is None or b is None or math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3:
        return None
    rx, ry = _ranks([a for a, _ in pairs]), _ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var > 0 else None


# --------------------------------------------------------------------------- data and teachers
def regime_config(scale: Scale, regime: str, seed: int = 0) -> TrainConfig:
    """A TrainConfig naming the data of ``regime`` (what ``featkd.api.load_data`` reads)."""
    if regime not in scale.regimes:
        raise ValueError(f"unknown regime {regime!r}; valid: {', '.join(scale.regimes)}")
    return TrainConfig(data=scale.data, data_root=scale.data_root, train_limit=scale.regimes[regime],
                       val_size=scale.val_size, data_options=dict(scale.data_options), seed=seed,
                       batch_size=scale.batch_size, device=scale.device, progress=False)


def load_regime(scale: Scale, regime: str) -> Any:
    """``DataSplits(train, val, test)`` of ``regime``: the validation split is held out first (seed 0,
    shared by every regime), then the training subset is drawn with seed 0."""
    from featkd.api import load_data

    return load_data(regime_config(scale, regime))


def teacher_dir(work: Path, teacher: str, scale: Scale | None = None) -> Path:
    """Where ``teacher``'s train-teacher run directory lives: the scale's committed teachers folder
    (default scale: benchmarks/teachers/<name>), else ``<work>/teachers/<name>``."""
    if scale is not None and scale.teachers_dir is not None:
        return REPO_DIR / scale.teachers_dir / teacher
    return work / "teachers" / teacher


def teacher_command(scale: Scale, teacher: str, out: Path) -> list[str]:
    """The ``featkd train-teacher`` command line that trains (or resumes) ``teacher``."""
    train_limit = scale.regimes[scale.teacher_regime]
    command = [sys.executable, "-m", "featkd", "train-teacher", "--model", teacher,
               "--width", repr(scale.teacher_widths[teacher]), "--data", scale.data]
    if scale.val_size is not None:
        command += ["--val-size", str(scale.val_size)]
    if scale.teacher_augment:
        command += ["--augment"]
    command += ["--epochs", str(scale.teacher_epochs), "--batch-size", str(scale.batch_size),
                "--seed", "0", "--device", scale.device, "--out", str(out), "--no-progress"]
    if train_limit is not None:
        command += ["--train-limit", str(train_limit)]
    if teacher in scale.teacher_lrs:
        command += ["--lr", repr(scale.teacher_lrs[teacher])]
    if scale.data_root is not None:
        command += ["--data-root", scale.data_root]
    if scale.data_options:
        command += ["--data-options", ",".join(f"{k}:{v}" for k, v in scale.data_options.items())]
    return command


def train_teacher_cli(scale: Scale, teacher: str, work: Path, threads: int | None = None) -> dict[str, Any]:
    """Train ``teacher`` with the real ``featkd train-teacher`` command (resumes; skips when done).

    The command's output goes to ``<run dir>/train-teacher.log``, its wall time to
    ``benchmark-wall.json``. Returns :func:`teacher_summary`.
    """
    out = teacher_dir(work, teacher, scale)
    if not ((out / "results.json").is_file() and (out / "model.pt").is_file()):
        command = teacher_command(scale, teacher, out)
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR / "src"), env.get("PYTHONPATH")]))
        log.info("training teacher %s: %s", teacher, shlex.join(command))
        start = time.perf_counter()
        with open(out / "train-teacher.log", "a") as logfile:
            done = subprocess.run(command, env=env, stdout=logfile, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = (out / "train-teacher.log").read_text()[-2000:]
            raise RuntimeError(f"featkd train-teacher failed for {teacher} (exit {done.returncode}):\n{tail}")
        write_json(out / "benchmark-wall.json", {"wall_s": time.perf_counter() - start})
    return teacher_summary(scale, teacher, work)


def teacher_summary(scale: Scale, teacher: str, work: Path) -> dict[str, Any]:
    """The trained teacher's command, parameters, accuracy and training time (from its run directory)."""
    out = teacher_dir(work, teacher, scale)
    summary = read_json(out / "results.json")
    wall = out / "benchmark-wall.json"
    command = teacher_command(scale, teacher, out)
    try:
        run_dir = str(out.relative_to(REPO_DIR))
    except ValueError:
        run_dir = str(out)
    command[command.index("--out") + 1] = run_dir
    return {"name": teacher, "width": scale.teacher_widths[teacher], "epochs": scale.teacher_epochs,
            "command": "featkd " + shlex.join(command[3:]), "run_dir": run_dir,
            "params": count_parameters(load_teacher(scale, teacher, work)),
            "wall_s": read_json(wall)["wall_s"] if wall.is_file() else None,
            "final_test_acc": summary["final_test_acc"], "final_val_acc": summary.get("final_val_acc"),
            "test_acc_at_best_val": summary.get("test_acc_at_best_val"),
            "train_time_s": summary.get("train_time_s")}


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def create(name: str, width: float, dataset: Any) -> nn.Module:
    """Zoo model ``name`` at ``width`` shaped for ``dataset`` (classes, channels, image size)."""
    from featkd.models import create_model

    channels, size, _ = dataset.image_shape
    return create_model(name, dataset.num_classes, in_channels=channels, image_size=size, width=width)


def load_teacher(scale: Scale, teacher: str, work: Path, dataset: Any = None) -> nn.Module:
    """The trained teacher (eval mode, frozen); shaped for ``dataset`` (default: the scale's data)."""
    from featkd.checkpoint import load_model_weights

    if dataset is None:
        dataset = load_regime(scale, scale.teacher_regime).test
    model = create(teacher, scale.teacher_widths[teacher], dataset)
    load_model_weights(model, teacher_dir(work, teacher, scale))
    return model.eval().requires_grad_(False)


def quality_path(work: Path, teacher: str, regime: str, variant: str) -> Path:
    return work / "quality" / f"quality_{teacher}_{regime}_{variant}.json"


def teacher_digest(scale: Scale, teacher: str, work: Path) -> str:
    """SHA-256 of the trained ``teacher``'s weights file: names the teacher a quality report measured."""
    from featkd.checkpoint import weights_path

    return hashlib.sha256(weights_path(teacher_dir(work, teacher, scale)).read_bytes()).hexdigest()


def quality_report(scale: Scale, teacher: str, regime: str, work: Path, variant: str | None = None,
                   results: Path | None = None) -> tuple[Any, float]:
    """Knowledge quality of the trained ``teacher``'s candidate layers on ``regime``'s training split.

    The layers and the linear probe's scoring split are those of ``--teacher-layers auto``
    (:func:`featkd.selection.candidate_layers`, the validation split). Cached in
    ``work/quality``; a copy of the JSON and the Q plot (top 4 marked) go to ``results``.
    A stored report (the copy in ``results`` first, then the cache) is reused only when it names
    the teacher's weights (``settings["teacher_sha256"]``): a fresh checkout reuses the committed
    measurement instead of repeating it, and a retrained teacher is measured again.
    Returns (report, seconds the measurement took).
    """
    from featkd.quality import measure
    from featkd.selection import candidate_layers

    variant = variant or scale.quality_variant
    path = quality_path(work, teacher, regime, variant)
    record = results / path.name if results is not None else None
    digest = teacher_digest(scale, teacher, work)
    sources = [source for source in (record, path) if source is not None]  # the committed record first
    stored = {source: _stored_quality(source, digest) for source in sources}
    report = next((found for found in stored.values() if found is not None), None)
    if report is None:
        splits = load_regime(scale, regime)
        model = load_teacher(scale, teacher, work, splits.train)
        start = time.perf_counter()
        report = measure(model, splits.train, candidate_layers(model, 4), variant=variant, seed=0,
                         device=resolve_device(scale.device), subset_size=scale.quality_subset,
                         model_name=teacher, progress=False, probe_set=splits.val)
        report.settings.update(teacher_sha256=digest, seconds=time.perf_counter() - start)
        log.info("quality of %s on %s (%s): %.0f s, top 4 by Q %s", teacher, regime, variant,
                 report.settings["seconds"], report.select(4, "Q"))
    data = report.to_dict()
    for target in sources:  # the cache and the record end up holding the same report
        if stored[target] is None or json.dumps(stored[target].to_dict()) != json.dumps(data):
            write_json(target, data)
    if record is not None:
        plot = record.with_suffix(".png")
        if stored[record] is not report or not plot.is_file():  # drawn again with a new record
            try:
                report.plot(plot, 4, "Q")
            except ImportError as err:
                log.warning("quality plot skipped: %s", err)
    return report, report.settings["seconds"]


def _stored_quality(path: Path, digest: str) -> Any:
    """The quality report stored at ``path`` when it was measured on the teacher with weights
    ``digest``, else None (missing, unreadable, or of other weights)."""
    from featkd.quality import QualityReport

    try:
        report = QualityReport.from_json(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return report if report.settings.get("teacher_sha256") == digest else None


def resolve_device(spec: str) -> torch.device:
    from featkd.train import resolve_device as resolve

    return resolve(spec)


# --------------------------------------------------------------------------- shared teacher outputs
class SharedTeacherFeed:
    """The trainer's teacher feed for many methods on one training set, with shared caches.

    A ``teacher_feed`` for ``featkd.api.distill`` (the interface of ``featkd.api.TeacherFeed``),
    which calls :meth:`configure` with each method before training it; the caller
    closes it after the last method. Methods asking for the same
    teacher layers share one ``TeacherCache`` (those features plus the logits,
    computed once by one pass over the un-augmented training set); one cache is held
    at a time, so run the methods grouped by their layer list. ``build_seconds``
    records every cache build. A cache that ``online_beats_cache`` rejects (too large,
    on an accelerator) is not built: the teacher runs online, as
    ``featkd.api.TeacherFeed``'s "auto" does.
    """

    def __init__(self, teacher: nn.Module, train_set: Any, device: torch.device, *,
                 batch_size: int = 512, memory_budget_bytes: int = 4 * 2**30,
                 cache_dir: Path | None = None) -> None:
        if getattr(train_set, "augment", False):
            raise ValueError("SharedTeacherFeed caches outputs of un-augmented images; got an augmented set")
        self.teacher, self.train_set, self.device = teacher, train_set, device
        self.batch_size, self.memory_budget_bytes, self.cache_dir = batch_size, memory_budget_bytes, cache_dir
        self.build_seconds: list[dict[str, Any]] = []
        self._want: tuple[str, ...] | None = None
        self._need_logits = False
        self._key: tuple[str, ...] | None = None
        self._cache: Any = None
        self._online: Any = None   # instead of a cache too large for memory on an accelerator
        self._pool_sizes: tuple = ()  # the method's (TeacherCache.view: its maps pooled once)

    def configure(self, method: Any) -> None:
        """Serve ``method`` from now on (its teacher layers and whether it needs logits)."""
        self._need_logits = bool(method.needs_teacher_logits)
        layers = tuple(method.teacher_layers) if method.needs_teacher_features else ()
        self._want = layers if (layers or self._need_logits) else None
        self._pool_sizes = tuple(method.teacher_pool_sizes()) if layers else ()

    def prepare(self) -> None:
        """Build the cache for the current method's layers unless it is the one held."""
        if self._want is None or self._key == self._want:
            return
        from featkd.distillation import OnlineTeacher, TeacherCache, online_beats_cache

        self.close()
        online = OnlineTeacher(self.teacher, list(self._want), True)
        if online_beats_cache(online, self.train_set, self.device, self.memory_budget_bytes):
            self._online, self._key = online, self._want
            return
        start = time.perf_counter()
        self._cache = TeacherCache.build(self.teacher, self.train_set, list(self._want), True,
                                         self.batch_size, self.device, self.memory_budget_bytes,
                                         self.cache_dir, progress=False)
        seconds = time.perf_counter() - start
        self._key = self._want
        self.build_seconds.append({"layers": list(self._want), "seconds": seconds,
                                   "images": len(self.train_set), "bytes": self._cache.nbytes})
        log.info("teacher cache for %s: %.1f s, %.0f MB", list(self._want) or "logits", seconds,
                 self._cache.nbytes / 1e6)

    def __call__(self, x: Tensor, idx: Tensor) -> Any:
        if self._want is None:
            return None
        self.prepare()
        out = (self._online(x) if self._online is not None else
               self._cache.view(self._pool_sizes, self.memory_budget_bytes).lookup(idx, self.device))
        if not self._need_logits:
            out.logits = None
        return out

    def close(self) -> None:
        """Free the cache held (and delete its memory-mapped files)."""
        if self._cache is not None:
            self._cache.close()
        self._cache, self._online, self._key = None, None, None


def run_info(run: Any) -> dict[str, Any]:
    """One run's numbers, with its per-epoch test and validation accuracy."""
    return {**run.to_dict(), "test_acc_per_epoch": [r.get("test_acc") for r in run.history],
            "val_acc_per_epoch": [r.get("val_acc") for r in run.history]}


def deployed_params(result: Any) -> int | None:
    """The deployed network's parameter count of a training result."""
    deployed = result.extra.get("deployed_params")
    if deployed is None and result.model is not None:
        deployed = count_parameters(result.model)
    return deployed


def summarize_runs(runs: list[dict[str, Any]], deployed: int | None) -> dict[str, Any]:
    """Mean ± std over the finished runs of ``runs`` (:func:`run_info` dicts), the runs themselves
    and the deployed parameter count."""
    finished = [r for r in runs if r["finished"]]
    return {
        "final_test_acc": mean_std([r["final_test_acc"] for r in finished]),
        "final_val_acc": mean_std([r["final_val_acc"] for r in finished]),
        "test_acc_at_best_val": mean_std([r["test_acc_at_best_val"] for r in finished]),
        "train_time_s": mean_std([r["train_time_s"] for r in finished]),
        "images_per_s": mean_std([r["images_per_s"] for r in finished]),
        "deployed_params": deployed,
        "runs": runs,
    }


def run_summary(result: Any) -> dict[str, Any]:
    """Every run's numbers, the mean ± std over runs and the deployed parameter count."""
    return summarize_runs([run_info(run) for run in result.runs], deployed_params(result))


# --------------------------------------------------------------------------- processes
def default_threads(workers: int) -> int:
    """Cores per worker process (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def default_workers(scale: Scale) -> int:
    """Two one-thread processes on a CPU with >= 2 cores (tiny models use one core well), else 1."""
    if scale.name == "quick" or resolve_device(scale.device).type == "cuda":
        return 1
    return 2 if default_threads(1) >= 2 else 1


def placement(scale: Scale, args: Any, workers: int | None = None) -> tuple[int, int, Path, Path]:
    """Worker processes, threads per process, work and results directories from the common options."""
    workers = workers or getattr(args, "workers", None) or default_workers(scale)
    threads = args.threads or scale.threads or default_threads(workers)
    work = work_dir(scale, args.work)
    return workers, threads, work, results_dir(scale, work, args.results)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)


def _init_worker(threads: int) -> None:
    setup_logging()
    torch.set_num_threads(threads)


@dataclass
class Job:
    """One unit of work for :func:`run_jobs`: ``function(*args)`` (picklable), started only
    once every job named in ``after`` has succeeded."""

    name: str
    function: Callable[..., Any]
    args: tuple = ()
    after: tuple[str, ...] = ()


class DependencyFailed(RuntimeError):
    """A job was skipped because a job it waits for failed."""


def run_jobs(jobs: Sequence[Job], workers: int, threads: int,
             on_done: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Run ``jobs`` in this process (workers=1) or in ``workers`` spawned processes.

    A job starts as soon as the jobs it waits for have succeeded, in list order among the
    ready ones, so a worker never idles while any job could run. Each worker uses ``threads``
    torch threads. ``on_done(name, outcome)`` is called in this process as each job ends.
    Returns {job name: its return value, or the exception it raised} (a failed job does not
    stop the others; the jobs waiting for it end with :class:`DependencyFailed`).
    """
    names = {job.name for job in jobs}
    for job in jobs:
        unknown = set(job.after) - names
        if unknown:
            raise ValueError(f"job {job.name} waits for unknown jobs: {sorted(unknown)}")
    outcomes: dict[str, Any] = {}
    waiting = list(jobs)
    position = {job.name: i for i, job in enumerate(jobs)}

    def finish(name: str, outcome: Any) -> None:
        outcomes[name] = outcome
        if on_done is not None:
            on_done(name, outcome)

    def ready() -> list[Job]:
        """Pop the jobs whose dependencies all ended; fail those whose dependency failed."""
        started: list[Job] = []
        for job in list(waiting):
            if not all(name in outcomes for name in job.after):
                continue
            waiting.remove(job)
            failed = [name for name in job.after if isinstance(outcomes[name], Exception)]
            if failed:
                finish(job.name, DependencyFailed(f"{job.name} skipped: {', '.join(failed)} failed"))
            else:
                started.append(job)
        return started

    if workers <= 1:
        torch.set_num_threads(threads)
        while batch := ready():
            for job in batch:
                try:
                    outcome = job.function(*job.args)
                except Exception as err:  # keep going: the suite resumes the failed job next time
                    log.exception("job %s failed", job.name)
                    outcome = err
                finish(job.name, outcome)
        return outcomes
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        running: dict[Future, str] = {}
        queue: list[Job] = []
        while True:
            queue = sorted(queue + ready(), key=lambda job: position[job.name])
            while queue and len(running) < workers:  # submit only what can start now: order holds
                job = queue.pop(0)
                running[pool.submit(job.function, *job.args)] = job.name
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                name = running.pop(future)
                try:
                    outcome = future.result()
                    log.info("job %s done", name)
                except Exception as err:
                    log.error("job %s failed: %s", name, err)
                    outcome = err
                finish(name, outcome)
    return outcomes
