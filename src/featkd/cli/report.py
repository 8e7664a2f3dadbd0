"""``featkd report DIR``: rebuild the Markdown report of one run directory or a folder of them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register ``featkd report``."""
    parser = subparsers.add_parser(
        "report", help="write report.md (table, curves, quality plot) for finished runs",
        description="Write DIR/report.md for a run directory, or for every run directory inside DIR.",
    )
    parser.add_argument("directory", metavar="DIR", help="a run directory or a folder of them")
    parser.add_argument("--title", default="featkd report", help="report title")
    parser.add_argument("--reference", metavar="NAME",
                        help="compare every other run directory with this one (e.g. ce): difference in "
                             "points, 95%% CI, p and verdict over the seeds of each (--runs)")
    parser.add_argument("--test", choices=("welch", "bootstrap"), default="welch",
                        help="the test of --reference's comparisons")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``featkd report``."""
    from featkd.report import compare_to, comparison_rows, find_runs, markdown_table, write_report

    runs = find_runs(Path(args.directory))
    rows = comparison_rows(runs)
    compared = compare_to(runs, args.reference, args.test) if args.reference is not None else None
    path = write_report(Path(args.directory), runs, title=args.title, rows=rows, reference=args.reference,
                        test=args.test, comparisons=compared)
    print(markdown_table(rows))
    if compared is not None:
        print(f"\ncompared with {args.reference}:")
        print(markdown_table(compared) or "no other run directory")
    print(f"\nreport: {path}")
    return 0
