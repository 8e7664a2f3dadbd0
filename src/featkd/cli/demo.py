"""``featkd demo``: the whole pipeline on the bundled digits data, in a few minutes on a CPU.

1. train a teacher (ResNet34, narrow) with cross-entropy;
2. measure the knowledge quality of every candidate teacher layer (GL 1 to the
   last before the head) and pick 4 by the
   default selection rule (printed beside the paper's Q choice);
3. distil a small student (ResNet9, narrower) with ``featkd`` and train the
   baselines (``ce``, ``kd``, ``fitnet``) on the same data, budget and seed;
4. print the comparison and write ``report.md`` (table, curves, quality plot).

Every step writes a normal run directory under ``--out``; rerunning resumes and
skips finished steps. ``--quick`` is a reduced size for tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featkd.cli.common import CliError

__all__ = ["DemoPlan", "QUICK", "add_parser", "paper_q_layers", "run", "run_demo"]

log = logging.getLogger(__name__)


@dataclass
class DemoPlan:
    """Sizes of the demo (configs/demo.yaml holds the same defaults)."""

    data: str = "digits"
    image_size: int = 16
    train_limit: int | None = None
    val_size: int | None = 200
    teacher: str = "resnet34"
    teacher_width: float = 0.125
    teacher_epochs: int = 8
    student: str = "resnet9"
    student_width: float = 0.03125
    epochs: int = 10
    batch_size: int = 64
    methods: list[str] = field(default_factory=lambda: ["featkd", "ce", "kd", "fitnet"])
    quality_subset: int = 500
    seed: int = 0


QUICK = dict(image_size=8, train_limit=100, val_size=20, teacher_width=0.0625, teacher_epochs=2,
             student_width=0.0625, epochs=2, batch_size=25, methods=["featkd", "ce", "kd"],
             quality_subset=100)


def add_parser(subparsers: Any) -> None:
    """Register ``featkd demo``."""
    parser = subparsers.add_parser(
        "demo", help="train a teacher, select its layers, distil a student and compare (digits, CPU)",
        description="Train a teacher on the bundled digits data, measure the knowledge quality of its "
                    "layers, distil a small student with featkd and the baselines, and write a report.",
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--epochs", type=int, help=f"student epochs (default {DemoPlan.epochs})")
    parser.add_argument("--teacher-epochs", type=int, help=f"teacher epochs (default {DemoPlan.teacher_epochs})")
    parser.add_argument("--methods", help="comma-separated methods to compare (default featkd,ce,kd,fitnet)")
    parser.add_argument("--config", metavar="FILE", help="YAML file with demo sizes (see configs/demo.yaml)")
    parser.add_argument("--quick", action="store_true", help="reduced size (seconds; used by the tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def plan_from_args(args: argparse.Namespace) -> DemoPlan:
    """The demo sizes: defaults, then --quick, --config, then explicit options."""
    import yaml

    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise CliError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise CliError(f"{path} must hold a mapping of setting: value")
        values.update(loaded)
    for key in ("epochs", "teacher_epochs"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.methods:
        values["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    names = {f.name for f in dataclasses.fields(DemoPlan)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise CliError(f"unknown demo setting(s) {unknown}; valid: {', '.join(sorted(names))}")
    from featkd.config import parse_value

    hints = typing.get_type_hints(DemoPlan)
    try:
        plan = DemoPlan(**{key: parse_value(value, hints[key], key) for key, value in values.items()})
    except ValueError as err:
        raise CliError(str(err)) from None
    if plan.epochs < 1 or plan.teacher_epochs < 1:
        raise CliError("epochs and teacher epochs must be >= 1")
    from featkd.distillation import list_methods

    bad = [m for m in plan.methods if m not in list_methods()]
    if bad or not plan.methods:
        raise CliError(f"unknown method(s) {bad}; valid: {', '.join(list_methods())}")
    return plan


def paper_q_layers(run_dir: Path, k: int, teacher_dir: Path) -> list[int]:
    """The ``k`` teacher layers the paper's rule (:data:`featkd.selection.PAPER_RULE`) picks for a
    distill run: read from its quality.json when that was measured in the rule's variant, else
    measured again with the run's data and settings."""
    from featkd.api import load_data
    from featkd.checkpoint import load_model_weights
    from featkd.config import DistillConfig
    from featkd.models import create_model
    from featkd.quality import QualityReport, measure
    from featkd.selection import PAPER_RULE, candidate_layers, measure_variant

    report = QualityReport.from_json(run_dir / "quality.json")
    variant = measure_variant(PAPER_RULE)
    if report.variant != variant:
        config = DistillConfig.from_yaml(run_dir / "config.yaml")
        train = load_data(config).train
        channels, size, _ = train.image_shape
        teacher = create_model(config.teacher, train.num_classes, in_channels=channels, image_size=size,
                               width=config.teacher_width)
        load_model_weights(teacher, teacher_dir)
        report = measure(teacher, train, candidate_layers(teacher, k), variant=variant, seed=config.data_seed,
                         subset_size=config.quality_subset, progress=False)
    return report.select(k, PAPER_RULE)


def run(args: argparse.Namespace) -> int:
    """``featkd demo``."""
    plan = plan_from_args(args)
    run_demo(plan, Path(args.out), progress=not args.no_progress)
    return 0


def _common(plan: DemoPlan, progress: bool) -> dict[str, Any]:
    return dict(data=plan.data, image_size=plan.image_size, train_limit=plan.train_limit,
                val_size=plan.val_size, batch_size=plan.batch_size, seed=plan.seed, progress=progress, device="auto")


def run_demo(plan: DemoPlan, out: Path, progress: bool = True) -> Path:
    """Run the demo into ``out``; returns the path of the Markdown report."""
    from featkd.api import distill_from_config, train_teacher_from_config
    from featkd.config import DistillConfig, TrainConfig
    from featkd.report import comparison_rows, load_run, markdown_table, write_report
    from featkd.selection import PAPER_RULE

    start = time.perf_counter()
    timings: dict[str, float] = {}
    step = time.perf_counter()
    teacher_dir = out / "teacher"
    print(f"[1/{len(plan.methods) + 1}] teacher {plan.teacher} ×{plan.teacher_width:g}: "
          f"{plan.teacher_epochs} epochs on {plan.data} -> {teacher_dir}", flush=True)
    teacher_config = TrainConfig(model=plan.teacher, width=plan.teacher_width, epochs=plan.teacher_epochs,
                                 out=str(teacher_dir), **_common(plan, progress))
    train_teacher_from_config(teacher_config)
    timings["teacher"] = time.perf_counter() - step

    choice = None
    for i, method in enumerate(plan.methods, start=2):
        step = time.perf_counter()
        run_dir = out / method
        print(f"[{i}/{len(plan.methods) + 1}] {method}: student {plan.student} ×{plan.student_width:g}, "
              f"{plan.epochs} epochs -> {run_dir}", flush=True)
        config = DistillConfig(
            teacher=plan.teacher, teacher_width=plan.teacher_width, teacher_checkpoint=str(teacher_dir),
            student=plan.student, student_width=plan.student_width, method=method, epochs=plan.epochs,
            quality_subset=plan.quality_subset, out=str(run_dir), **_common(plan, progress),
        )
        result = distill_from_config(config)
        timings[method] = time.perf_counter() - step
        if (run_dir / "quality.json").is_file() and choice is None:
            layers = result.extra["teacher_layers"]
            choice = (f"Teacher layers {layers}, chosen by rule `{result.extra['selected_by']}` (the default); the "
                      f"paper's rule (`{PAPER_RULE}`) picks "
                      f"{paper_q_layers(run_dir, len(layers), teacher_dir)}.")
            print(choice, flush=True)

    runs = [load_run(teacher_dir, "teacher")] + [load_run(out / m, m) for m in plan.methods]
    rows = comparison_rows(runs)
    for row, name in zip(rows, ["teacher", *plan.methods]):
        row["wall (s)"] = f"{timings[name]:.1f}"
    total = time.perf_counter() - start
    notes = [
        f"Data: {plan.data} at {plan.image_size}×{plan.image_size} px; teacher {plan.teacher} "
        f"×{plan.teacher_width:g} ({plan.teacher_epochs} epochs), student {plan.student} "
        f"×{plan.student_width:g} ({plan.epochs} epochs), batch {plan.batch_size}, seed {plan.seed}, "
        f"AdamW + one-cycle, no augmentation; {plan.val_size or 0} training images held out for validation.",
        "",
        f"Wall time of the whole demo: {total:.0f} s (this call; resumed steps are not re-run).",
    ] + (["", choice] if choice else [])
    reference = "ce" if "ce" in plan.methods else None  # one seed each: the comparison shows it settles nothing
    report = write_report(out, runs, title="featkd demo", notes=notes, rows=rows, reference=reference)
    columns = ["run", "model", "method", "teacher layers", "final acc", "acc at best val epoch", "params",
               "wall (s)"]
    print()
    print(markdown_table([{c: row[c] for c in columns} for row in rows]))
    print(f"\nreport: {report}  (total {total:.0f} s)")
    return report
