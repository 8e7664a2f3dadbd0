"""``featkd evaluate RUN``: the accuracy of a finished run's deployed network on a dataset split."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "run"]

_EPILOG = ("example: featkd evaluate runs/featkd (a run of several seeds: runs/featkd/run-0); "
           "featkd evaluate runs/featkd --data imagefolder --data-root photos/")


def add_parser(subparsers: Any) -> None:
    """Register ``featkd evaluate``."""
    parser = subparsers.add_parser(
        "evaluate", help="accuracy of a finished run's model.pt on a dataset split, overall and per class",
        description="Rebuild the network a finished train-teacher or distill run predicts with (its model.pt) "
        "and measure its top-1 accuracy, overall and per class. Without --data the run's own data is rebuilt "
        "from its config.yaml, and the test split gives back the run's final test accuracy. Images are "
        "normalised with the run's own statistics (results.json), as in training.",
        epilog=_EPILOG,
    )
    parser.add_argument("run_dir", metavar="RUN", help="a finished run directory (or one run-<i> folder of it)")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test",
                        help="the split to measure (val: the run's held-out --val-size)")
    parser.add_argument("--data", metavar="NAME",
                        help="another dataset with the run's classes (default: the run's own); images are "
                             "resized to the run's image shape")
    parser.add_argument("--data-root", metavar="DIR",
                        help="folder holding --data's files, or the run's own data when it has moved")
    parser.add_argument("--data-options", metavar="KEY:VALUE,...", help="options of --data, as for distill")
    parser.add_argument("--batch-size", type=int, metavar="N", help="(default: the run's eval batch size)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``featkd evaluate``."""
    from featkd.api import evaluate_run
    from featkd.cli.common import CliError

    if args.batch_size is not None and args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.data is None and args.data_options:
        raise CliError("--data-options goes with --data (the run's own data keeps its options)")
    result = evaluate_run(args.run_dir, args.split, data=args.data, data_root=args.data_root,
                          data_options=args.data_options, batch_size=args.batch_size, device=args.device)
    print(json.dumps(result, indent=2) if args.json else describe(result))
    return 0


def describe(result: dict[str, Any]) -> str:
    """The accuracy, how it compares with the run's record, and one line per class."""
    recorded = result["recorded_accuracy"]
    lines = [f"accuracy {result['accuracy']:.4f} on {result['images']} {result['split']} images of {result['data']}"
             + (f" (the run recorded {recorded:.4f})" if recorded is not None else "")]
    width = max((len(name) for name in result["per_class_accuracy"]), default=0)
    for name, accuracy in result["per_class_accuracy"].items():
        lines.append(f"  {name:<{width}}  {'no images' if accuracy is None else f'{accuracy:.4f}'}")
    return "\n".join(lines)
