"""Reports of finished runs: a comparison table, training curves and the quality plot, as Markdown.

A *run directory* is what ``featkd train-teacher`` / ``featkd distill`` write
(config.yaml, metrics.jsonl or run-<seed>/metrics.jsonl, results.json, and
quality.json for ``teacher_layers=auto``). :func:`write_report` turns one or
several of them into ``report.md`` with PNG figures beside it (matplotlib,
Agg backend).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "RunRecord",
    "comparison_rows",
    "compare_to",
    "find_runs",
    "format_mean_std",
    "load_run",
    "markdown_table",
    "plot_curves",
    "seed_accuracies",
    "write_report",
]

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
CURVES_FILE = "curves.png"


@dataclass
class RunRecord:
    """What a run directory holds: config, summary results and per-seed epoch histories."""

    name: str
    path: Path
    config: dict[str, Any]
    results: dict[str, Any] | None
    histories: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # run.json: what the run resolved at its start

    def resolved(self, key: str) -> Any:
        """``key`` from results.json, else from run.json (a run still in progress has only the latter)."""
        value = (self.results or {}).get(key)
        return self.settings.get(key) if value is None else value

    @property
    def is_distill(self) -> bool:
        return "method" in self.config

    @property
    def model(self) -> str:
        name = self.config.get("student") if self.is_distill else self.config.get("model")
        width = self.config.get("student_width") if self.is_distill else self.config.get("width")
        return f"{name} ×{_width(width)}" if width not in (None, 1, 1.0) else str(name)

    @property
    def method(self) -> str:
        return self.config["method"] if self.is_distill else "ce (train-teacher)"

    def mean_curve(self, key: str) -> tuple[list[int], list[float]]:
        """(epochs, means): the epochs at which some seed recorded ``key`` (evaluations may run only
        every few epochs) and the mean of ``key`` over those seeds."""
        values: dict[int, list[float]] = {}
        for history in self.histories.values():
            for record in history:
                if key in record:
                    values.setdefault(record["epoch"], []).append(record[key])
        epochs = sorted(values)
        return epochs, [_mean(values[e]) for e in epochs]


def _width(width: float) -> str:
    inverse = 1 / width
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 else f"{width:g}"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def format_mean_std(stats: dict[str, Any], digits: int = 4) -> str:
    """``0.9123 ± 0.0040`` (sample std over runs), the mean alone for one run, "n/a" for none."""
    if stats.get("mean") is None:
        return "n/a"
    if stats.get("std") is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


# --------------------------------------------------------------------------- reading
def load_run(path: str | Path, name: str | None = None) -> RunRecord:
    """Read a run directory (FileNotFoundError when it holds no config.yaml)."""
    path = Path(path)
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a featkd run directory (no config.yaml)")
    config = _read(config_file) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: not a run's config (a mapping of settings)")
    results_file = path / "results.json"
    results = _read(results_file) if results_file.is_file() else None
    settings_file = path / "run.json"
    settings = _read(settings_file) if settings_file.is_file() else {}
    histories: dict[int, list[dict[str, Any]]] = {}
    metric_files = [path / "metrics.jsonl"] if (path / "metrics.jsonl").is_file() else sorted(
        path.glob("run-*/metrics.jsonl"))
    for metric_file in metric_files:
        for record in _read_metrics(metric_file):
            histories.setdefault(int(record["seed"]), []).append(record)
    return RunRecord(name or path.name, path, config, results, histories, settings)


def _read(path: Path) -> Any:
    """A run's YAML or JSON file; ValueError naming it when it does not parse."""
    try:
        return yaml.safe_load(path.read_text()) if path.suffix == ".yaml" else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: damaged, does not parse ({' '.join(str(err).split())})") from None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a cut-off last line (a run killed while writing it) is
    skipped with a warning, a bad line before it is an error."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not a JSON record ({err})") from err
            log.warning("%s: skipped its last line, cut off (%s)", path, err)
    return records


def find_runs(root: str | Path) -> list[RunRecord]:
    """``root`` itself when it is a run directory, else its sub-directories that are (by name)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such directory: {root}")
    if (root / "config.yaml").is_file():
        return [load_run(root)]
    runs = [load_run(d) for d in sorted(root.iterdir()) if (d / "config.yaml").is_file()]
    if not runs:
        raise FileNotFoundError(f"{root} holds no run directories (folders with config.yaml)")
    return runs


# --------------------------------------------------------------------------- table
def comparison_rows(runs: Sequence[RunRecord]) -> list[dict[str, str]]:
    """One row per run: model, method, layers, epochs, final accuracy, accuracy at the best
    validation epoch, deployed parameters, time, throughput."""
    rows = []
    for run in runs:
        res = run.results or {}
        final, best = res.get("final_test_acc"), res.get("test_acc_at_best_val")
        per_run = res.get("runs", [])
        rows.append({
            "run": run.name,
            "model": run.model,
            "method": run.method,
            "teacher layers": _layers(run.resolved("teacher_layers")),
            "student layers": _layers(run.resolved("student_layers")),
            "epochs": str(run.config.get("epochs", "")),
            "runs": str(len(per_run) or len(run.histories)),
            "final acc": format_mean_std(final) if final else "unfinished",
            "acc at best val epoch": format_mean_std(best) if best and best.get("n") else "",
            "params": f"{res['deployed_params']:,}" if "deployed_params" in res else "",
            "time (s)": f"{_mean([r['train_time_s'] for r in per_run]):.1f}" if per_run else "",
            "img/s": f"{_mean([r['images_per_s'] for r in per_run]):.0f}" if per_run else "",
        })
    return rows


def seed_accuracies(results: dict[str, Any] | None, key: str = "final_test_acc") -> list[float]:
    """``key`` in percent for each finished run (one per seed) listed under ``results["runs"]`` (a
    results.json, or a benchmark's entry of the same shape), where it is a finite number."""
    return [100 * r[key] for r in (results or {}).get("runs", [])
            if r.get("finished", True) and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def compare_to(runs: Sequence[RunRecord], reference: str, test: str = "welch") -> list[dict[str, str]]:
    """One row per other run directory: its final test accuracy minus ``reference``'s (the name of
    one of ``runs``, fixed before looking), in percentage points over seeds, with the 95 %
    confidence interval, the two-sided p of ``test`` ("welch" or "bootstrap", :mod:`featkd.stats`),
    Holm's adjusted p over these comparisons, and the verdict: better or worse only when p < 0.05,
    n/a without a test (one seed a side has no variance estimate)."""
    from featkd import stats

    names = [run.name for run in runs]
    if reference not in names:
        raise ValueError(f"no run directory named {reference!r} to compare with; there are: {', '.join(names)}")
    if test not in stats.TESTS:
        raise ValueError(f"test must be one of {sorted(stats.TESTS)}, got {test!r}")
    base = seed_accuracies(runs[names.index(reference)].results)
    others = [(run.name, seed_accuracies(run.results)) for run in runs if run.name != reference]
    results = [stats.TESTS[test](values, base) if values and base else None for _, values in others]
    adjusted = stats.holm([c.p if c is not None else None for c in results])
    rows = []
    for (name, values), c, holm_p in zip(others, results, adjusted):
        seeds = f"{len(values)} vs {len(base)}"
        if c is None:
            rows.append({"run": name, "vs": reference, "seeds": seeds, "difference (points)": "—",
                         "95 % CI": "—", "p": "—", "Holm p": "—",
                         "verdict": "no finished run" if not values else f"{reference} has no finished run"})
            continue
        rows.append({"run": name, "vs": reference, "seeds": seeds, "difference (points)": f"{c.diff:+.2f}",
                     "95 % CI": stats.format_interval(c, "—"), "p": stats.format_p(c.p, "—"),
                     "Holm p": stats.format_p(holm_p, "—"),
                     "verdict": _verdict(c)})
    return rows


def _verdict(c: Any) -> str:
    from featkd import stats

    if c.p is None:
        return f"n/a ({c.note})"
    close = f" (close: {stats.SEEDS_WHEN_CLOSE} seeds a side could move it)" if c.wants_seeds else ""
    return c.verdict + close


def _layers(layers: Any) -> str:
    return ", ".join(str(x) for x in layers) if layers else "–"


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """A GitHub Markdown table of ``rows`` (columns from the first row)."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures
def plot_curves(runs: Sequence[RunRecord], path: str | Path) -> Path:
    """PNG of test accuracy and training loss per epoch (mean over seeds), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        label = f"{run.name} ({run.method})"
        acc_ax.plot(*run.mean_curve("test_acc"), marker=".", label=label)
        loss_ax.plot(*run.mean_curve("loss"), marker=".", label=label)
    acc_ax.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    loss_ax.set(xlabel="epoch", ylabel="training loss (sum of named losses)", title="training loss", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _quality_section(run: RunRecord, out_dir: Path) -> list[str]:
    """Markdown for a run's quality.json: selected layers, the plot and the per-layer table."""
    from featkd.quality import QualityReport

    from featkd.selection import PAPER_RULE, parse_rule, resolve_rule

    report = QualityReport.from_json(run.path / "quality.json")
    k = len(run.resolved("teacher_layers") or []) or 4
    rule = run.resolved("selected_by")
    if rule is None:  # a run in progress from before run.json recorded it
        rule = (resolve_rule(run.config["select_by"], run.config.get("quality_variant")).name
                if "select_by" in run.config else "Q")  # runs from before select_by used Q in their variant
    plot = run.path / "quality.png"
    if not plot.is_file():
        report.plot(plot, k, rule)
    teacher = run.config.get("teacher") or report.model
    chosen = f"Selected teacher layers ({k} by rule `{rule}`, in depth order): **{report.select(k, rule)}**"
    paper = parse_rule(PAPER_RULE)
    if report.variant == paper.variant and parse_rule(rule).in_variant(report.variant) != paper:
        chosen += f"; the paper's rule (`{PAPER_RULE}`) picks {report.select(k, PAPER_RULE)}"
    lines = [
        f"## Knowledge quality of the teacher ({teacher}, variant `{report.variant}`)",
        "",
        chosen,
        "",
        f"![per-layer S, I, E and Q]({_relative(plot, out_dir)})",
        "",
        "```",
        report.table(k, rule),
        "```",
        "",
    ]
    return lines


def _comparison_section(reference: str, test: str, comparisons: Sequence[dict[str, str]]) -> list[str]:
    name = {"welch": "Welch's t-test", "bootstrap": "a studentized bootstrap"}.get(test, test)
    return [
        f"## Compared with `{reference}`",
        "",
        f"Final-epoch test accuracy minus `{reference}`'s, in percentage points, mean over seeds, with "
        f"its 95 % confidence interval and the two-sided p of {name} on the per-seed accuracies; Holm's "
        "correction over the comparisons of this table. *Better* or *worse* needs p < 0.05; otherwise "
        "*no significant difference*. With one seed on a side there is no variance estimate and no "
        "test (n/a): run more seeds (`--runs`).",
        "",
        markdown_table(comparisons) or "No other run directory to compare with.",
        "",
    ]


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start)


def write_report(
    out_dir: str | Path,
    runs: Sequence[RunRecord] | None = None,
    *,
    title: str = "featkd report",
    notes: Sequence[str] = (),
    rows: Sequence[dict[str, str]] | None = None,
    reference: str | None = None,
    test: str = "welch",
    comparisons: Sequence[dict[str, str]] | None = None,
) -> Path:
    """Write ``out_dir/report.md`` (+ curves.png) for ``runs`` (default: :func:`find_runs` of ``out_dir``).

    ``rows``: the results table (default :func:`comparison_rows` of ``runs``). ``reference``: the
    run directory every other one is compared with; ``comparisons``: that table (default
    :func:`compare_to` of ``runs``, with ``test``).
    """
    out_dir = Path(out_dir)
    runs = list(runs) if runs is not None else find_runs(out_dir)
    if reference is not None and comparisons is None:
        comparisons = compare_to(runs, reference, test)  # a bad name fails before anything is written
    compared = _comparison_section(reference, test, comparisons) if reference is not None else []
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = plot_curves(runs, out_dir / CURVES_FILE)
    lines = [f"# {title}", ""]
    lines += [*notes, ""] if notes else []
    lines += [
        "## Results",
        "",
        "Final-epoch test accuracy, and the test accuracy at the epoch with the best validation "
        "accuracy (runs with a validation split); with several runs, mean ± sample standard "
        "deviation (ddof=1) over runs. Time: training seconds per run (evaluation included).",
        "",
        markdown_table(rows if rows is not None else comparison_rows(runs)),
        "",
    ]
    lines += compared
    lines += [
        "## Training curves",
        "",
        f"![test accuracy and training loss per epoch]({_relative(curves, out_dir)})",
        "",
    ]
    for run in runs:
        if (run.path / "quality.json").is_file():
            lines += _quality_section(run, out_dir)
            break
    lines += ["## Runs", ""]
    lines += [f"* `{run.name}`: `{_relative(run.path, out_dir)}/` ({run.method}, {run.model})" for run in runs]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    log.info("report written to %s", path)
    return path
