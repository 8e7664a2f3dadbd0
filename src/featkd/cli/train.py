"""``featkd train-teacher`` and ``featkd distill``.

Every field of :class:`featkd.config.TrainConfig` / :class:`DistillConfig` is an
option (``--teacher-width 1/8``), can come from a YAML file (``--config FILE``)
and can be overridden by ``key=value`` arguments; precedence: defaults < file <
options < ``key=value``. Rerunning a command with the same ``--out`` resumes it.
Under ``torchrun --nproc_per_node=N`` the same command trains with DDP.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

from featkd.cli.common import CliError
from featkd.config import DistillConfig, RunConfig, TrainConfig, apply_overrides

__all__ = ["add_config_arguments", "add_parsers", "config_from_args", "print_result", "run_distill",
           "run_train_teacher"]

# Short help lines for the options shown first; all other fields follow.
_TEACHER_EPILOG = ("example: featkd train-teacher --model resnet34 --width 1/8 --data digits --epochs 10 "
                   "--out runs/teacher")
_DISTILL_EPILOG = (
    "example: featkd distill --teacher-checkpoint runs/teacher --student resnet9 --student-width 1/16 "
    "--method featkd --teacher-layers auto --data digits --epochs 10 --out runs/featkd"
)


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type[RunConfig]) -> None:
    """``--config FILE``, one ``--option`` per config field, and ``key=value`` overrides."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of option: value")
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        if not f.metadata.get("cli", True):
            continue  # filled in by the run (a config file or key=value may still pin it)
        flag = "--" + f.name.replace("_", "-")
        text = _with_known_names(f.name, f.metadata.get("help", ""))
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{text} (default {f.default})")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = text if "default" in text else f"{text} (default {default})"
            parser.add_argument(flag, dest=f.name, metavar=f.name.split("_")[-1].upper(),
                                default=argparse.SUPPRESS, help=shown)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any option")


def _with_known_names(field_name: str, text: str) -> str:
    """Help text with a pointer such as ``(featkd.distillation.list_methods())`` replaced by the names."""
    from featkd.data import list_datasets
    from featkd.distillation import list_methods
    from featkd.models import list_models

    listers = {"data": list_datasets, "method": list_methods, "model": list_models,
               "teacher": list_models, "student": list_models}
    if field_name not in listers:
        return text
    return re.sub(r"\s*\(featkd\.[\w.]+\(\)\)", "", text) + f" (known: {', '.join(listers[field_name]())})"


def config_from_args(config_class: type[RunConfig], args: argparse.Namespace) -> RunConfig:
    """Build and validate the config; bad values raise CliError (exit status 2)."""
    try:
        config = config_class.from_yaml(args.config) if args.config else config_class()
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
        apply_overrides(config, given)
        apply_overrides(config, list(args.overrides))
        config.validate()
    except ValueError as err:
        raise CliError(str(err)) from err
    return config


def add_parsers(subparsers: Any) -> None:
    """Register ``train-teacher`` and ``distill``."""
    teacher = subparsers.add_parser(
        "train-teacher", help="train a model with cross-entropy (a teacher, or a scratch baseline)",
        description="Train a model (zoo, torchvision:NAME or timm:NAME) with cross-entropy on a dataset; "
        "writes a run directory.",
        epilog=_TEACHER_EPILOG,
    )
    add_config_arguments(teacher, TrainConfig)
    teacher.set_defaults(func=run_train_teacher)

    distill = subparsers.add_parser(
        "distill", help="distil a student from a trained teacher",
        description="Distil a student from a trained teacher with any method; writes a run directory.",
        epilog=_DISTILL_EPILOG,
    )
    add_config_arguments(distill, DistillConfig)
    distill.set_defaults(func=run_distill)


def run_train_teacher(args: argparse.Namespace) -> int:
    """``featkd train-teacher``."""
    from featkd.api import complete_train_config, train_teacher_from_config

    config = complete_train_config(config_from_args(TrainConfig, args))
    if config.model is None:
        from featkd.models import list_models

        raise CliError(f"give --model NAME (known: {', '.join(list_models())}, torchvision:NAME or timm:NAME)")
    _require_out(config)
    return _execute(lambda: train_teacher_from_config(config), "train-teacher", config.out)


def run_distill(args: argparse.Namespace) -> int:
    """``featkd distill``."""
    from featkd.api import complete_distill_config, distill_from_config

    config = config_from_args(DistillConfig, args)
    try:
        config = complete_distill_config(config)
    except ValueError as err:
        raise CliError(str(err)) from err
    _require_out(config)
    return _execute(lambda: distill_from_config(config), "distill", config.out)


def _require_out(config: RunConfig) -> None:
    if not config.out:
        raise CliError("give --out DIR: the run directory (rerun with the same DIR to resume)")


def _execute(job: Any, command: str, out: str) -> int:
    from featkd.train import finish_distributed, is_main_process, output_untouched_on_error

    first_rank = os.environ.get("RANK", "0") == "0"  # torchrun's rank: the group is not joined yet
    guard = output_untouched_on_error(Path(out)) if first_rank else contextlib.nullcontext()
    succeeded = False
    try:
        with guard:
            result = job()
        succeeded = True
    except FloatingPointError as err:
        print(f"featkd {command}: error: {err}", file=sys.stderr)
        return 1
    finally:
        main = is_main_process()
        finish_distributed(wait_for_peers=succeeded)
    if main:
        print_result(result)
    return 0


def print_result(result: Any) -> None:
    """Per-run accuracies and the mean ± std over runs, or how to resume."""
    from featkd.report import format_mean_std

    for run in result.runs:
        info = run.to_dict()
        best = (f", test acc {info['test_acc_at_best_val']:.4f} at the best validation epoch "
                f"{info['best_val_epoch']}" if info["best_val_epoch"] is not None else "")
        print(f"seed {info['seed']}: final test acc {info['final_test_acc']:.4f}{best}, {info['epochs']} epochs, "
              f"{info['train_time_s']:.1f} s")
    if not result.finished:
        print("stopped before the last epoch; rerun the same command to resume")
        return
    summary = result.summary()
    best = summary["test_acc_at_best_val"]
    print(f"final test acc {format_mean_std(summary['final_test_acc'])}"
          + (f", at the best validation epoch {format_mean_std(best)}" if best["n"] else "")
          + (f" (mean ± sample std over {summary['final_test_acc']['n']} runs)" if len(result.runs) > 1 else ""))
    if result.out is not None:
        print(f"results in {result.out}")

