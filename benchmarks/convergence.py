"""Is the student budget long enough? ce at the suite's budget against ce at a longer one.

For every pair's student and every regime, the student is trained alone with
cross-entropy (exactly the grid's ``ce`` recipe: same data, validation split,
optimizer, schedule and seed 0) twice: for the scale's epochs, and for
the regime's ``convergence_factor`` times as many (1.5x or 2x). The budget counts as converged
when the longer run's final validation accuracy is at most 0.3 points higher;
the test accuracies are reported beside it but decide nothing. One results file
per (pair, regime): ``convergence_<pair>_<regime>.json``.

Students train from scratch and need no teacher, so this runs while the
teachers train. Both runs resume like every other run (run directories under
``<work>/convergence/``).

    python benchmarks/convergence.py                          # every pair and regime of the default scale
    python benchmarks/convergence.py --pairs vit_b-vit_et --regimes full
    python benchmarks/convergence.py --quick                  # seconds, synthetic data
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import common
from common import PAIRS, Job, Scale

log = logging.getLogger("benchmarks.convergence")



def long_epochs(scale: Scale, student: str, regime: str) -> int:
    """The longer budget of the check: the regime's ``convergence_factor`` (default 2) x the student's
    epochs."""
    factor, epochs = scale.convergence_factor.get(regime, 2.0), scale.budget(student, regime)
    return max(epochs + 1, round(factor * epochs))


def train_ce(scale: Scale, pair_name: str, regime: str, epochs: int, work: Path) -> dict[str, Any]:
    """Train ``pair_name``'s student alone with CE for ``epochs`` (seed 0); its final accuracies."""
    from featkd.api import train_teacher
    from featkd.config import TrainConfig

    pair = PAIRS[pair_name]
    train, val, test = common.load_regime(scale, regime)
    width = scale.student_widths[pair.student]
    config = TrainConfig(
        data=scale.data, data_root=scale.data_root, train_limit=scale.regimes[regime], val_size=scale.val_size,
        data_options=dict(scale.data_options), epochs=epochs, batch_size=scale.batch_size, runs=1, seed=0,
        eval_every=scale.eval_every.get(regime, 1),
        device=scale.device, progress=False, model=pair.student, width=width,
        out=str(work / "convergence" / pair.student / regime / f"epochs-{epochs}"),
    )
    start = time.perf_counter()
    result = train_teacher(lambda: common.create(pair.student, width, train), train, test, config=config,
                           val_set=val)
    run = result.runs[0]
    return {"epochs": epochs, "final_val_acc": run.final_val_acc, "final_test_acc": run.final_test_acc,
            "val_acc_per_epoch": [r.get("val_acc") for r in run.history],
            "test_acc_per_epoch": [r.get("test_acc") for r in run.history],
            "run_dir": config.out, "wall_s": time.perf_counter() - start, "finished": result.finished}


def verdict(budget: dict[str, Any], long: dict[str, Any]) -> dict[str, Any]:
    """Gains of the longer budget (points) and whether the budget counts as converged."""
    val_gain = 100.0 * (long["final_val_acc"] - budget["final_val_acc"])
    test_gain = 100.0 * (long["final_test_acc"] - budget["final_test_acc"])
    return {"val_gain_points": val_gain, "test_gain_points": test_gain,
            "converged": common.budget_converged(val_gain), "threshold_points": common.CONVERGED_POINTS}


def check_cell(scale: Scale, pair_name: str, regime: str, work: Path, results: Path,
               record: dict[str, Any]) -> dict[str, Any]:
    """Both runs of one (pair, regime) and its results file."""
    pair = PAIRS[pair_name]
    budget = train_ce(scale, pair_name, regime, scale.budget(pair.student, regime), work)
    long = train_ce(scale, pair_name, regime, long_epochs(scale, pair.student, regime), work)
    data = {"benchmark": "convergence", "pair": pair.name, "regime": regime, "student": pair.student,
            "student_width": scale.student_widths[pair.student], "seed": 0, "method": "ce",
            "train_images": scale.regimes[regime], "val_images": scale.val_size,
            "budget_epochs": budget["epochs"], "long_epochs": long["epochs"], "budget": budget, "long": long,
            **verdict(budget, long), **record, "finished": common.now()}
    common.write_json(results / f"convergence_{pair.name}_{regime}.json", data)
    log.info("%s %s: ce val %.4f at %d epochs, %.4f at %d (%+.2f points): %s", pair.name, regime,
             budget["final_val_acc"], budget["epochs"], long["final_val_acc"], long["epochs"],
             data["val_gain_points"], "converged" if data["converged"] else "NOT converged")
    return data


def run_checks(scale: Scale, pairs: list[str], regimes: list[str], work: Path, results: Path, workers: int,
               threads: int, argv: list[str]) -> int:
    """Every (pair, regime) check as one job; returns 0 when every budget is converged."""
    record = common.run_record(argv, threads, workers)
    jobs = [Job(f"{p} {r}", check_cell, (scale, p, r, work, results, record)) for p in pairs for r in regimes]
    outcome = common.run_jobs(jobs, workers, threads)
    failed = {name: err for name, err in outcome.items() if isinstance(err, Exception)}
    for name, err in failed.items():
        print(f"FAILED {name}: {err}", file=sys.stderr)
    for name, data in outcome.items():
        if isinstance(data, dict):
            print(f"{name}: ce val {100 * data['budget']['final_val_acc']:.2f} at {data['budget_epochs']} epochs, "
                  f"{100 * data['long']['final_val_acc']:.2f} at {data['long_epochs']} "
                  f"({data['val_gain_points']:+.2f} points): {'converged' if data['converged'] else 'NOT converged'}")
    slow = [name for name, data in outcome.items() if isinstance(data, dict) and not data["converged"]]
    return 1 if failed or slow else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--pairs", help=f"comma-separated pairs or all ({', '.join(PAIRS)})")
    parser.add_argument("--regimes", help="comma-separated regimes or all (default scale: full, low)")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default as accuracy.py)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    common.setup_logging()
    try:
        scale = common.scale_from_args(args)
        pairs = common.parse_choice(args.pairs, scale.pairs, "pair")
        regimes = common.parse_choice(args.regimes, list(scale.regimes), "regime")
    except ValueError as err:
        print(f"convergence.py: error: {err}", file=sys.stderr)
        return 2
    workers, threads, work, results = common.placement(scale, args)
    return run_checks(scale, pairs, regimes, work, results, workers, threads, [str(Path(__file__))] + argv)


if __name__ == "__main__":
    sys.exit(main())
