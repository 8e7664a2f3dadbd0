"""The ``featkd`` command: one sub-command per module in this package."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
from collections.abc import Sequence

from featkd.cli.common import CliError, out_of_memory_message

__all__ = ["build_parser", "main"]

# Each module exposes add_parser(subparsers) or add_parsers(subparsers);
# every sub-command sets `func(args) -> int` as its default.
COMMAND_MODULES = ("quality", "train", "evaluate", "demo", "report")


# A value such as "-1,2" or "-0.5" after an option: argparse would read it as an option.
_NEGATIVE_VALUE = re.compile(r"^-\d[\d.,-]*$")


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command."""
    parser = OneLineParser(
        prog="featkd",
        description="Logit-free feature knowledge distillation with layer selection by knowledge quality.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"featkd.cli.{name}")
        register = getattr(module, "add_parsers", None) or module.add_parser
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``featkd`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except (CliError, OSError, ValueError, IndexError) as err:
        if args.debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"featkd {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        resume = "; the last checkpoint is kept (rerun the same command to resume)" if args.command in (
            "train-teacher", "distill") else ""
        print(f"featkd {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
    except RuntimeError as err:
        message = out_of_memory_message(err, args.command)
        if message is None or args.debug:
            raise
        print(f"featkd {args.command}: error: {message}", file=sys.stderr)
        return 1


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--opt -1,2`` -> ``--opt=-1,2``, so that a negative number or list can follow an option."""
    out: list[str] = []
    for token in argv:
        previous = out[-1] if out else ""
        if _NEGATIVE_VALUE.match(token) and previous.startswith("--") and "=" not in previous:
            out[-1] = f"{previous}={token}"
        else:
            out.append(token)
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
