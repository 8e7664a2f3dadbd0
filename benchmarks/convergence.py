"""Is the student budget long enough? ce at the suite's budget against ce at a longer one.

For every pair's student and every regime, the student is trained alone with
cross-entropy (exactly the grid's ``ce`` recipe: same data, validation split,
optimizer and schedule) twice per seed: for the scale's epochs, and for the
regime's ``convergence_factor`` times as many (1.5x or 2x). The budget counts as
converged when the longer runs' final validation accuracy is, on average over the
seeds, at most 0.3 points higher; the test accuracies are reported beside it but
decide nothing. One seed (0) by default; ``--seeds N`` checks seeds 0..N-1 and gives
the mean gain a 95 % interval, for a verdict near the threshold. One results file
per (pair, regime): ``convergence_<pair>_<regime>.json``.

Students train from scratch and need no teacher, so this runs while the
teachers train. Every run resumes like every other run (run directories under
``<work>/convergence/``), and a seed already in the results file, checked at the
same budgets, is kept rather than trained again (also on a fresh checkout).

    python benchmarks/convergence.py                          # every pair and regime of the default scale
    python benchmarks/convergence.py --pairs vit_b-vit_et --regimes full
    python benchmarks/convergence.py --pairs vgg19_bn-vgg11_bn --regimes low --seeds 3
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
from featkd import stats
from common import PAIRS, Job, Scale

log = logging.getLogger("benchmarks.convergence")



def long_epochs(scale: Scale, student: str, regime: str) -> int:
    """The longer budget of the check: the regime's ``convergence_factor`` (default 2) x the student's
    epochs."""
    factor, epochs = scale.convergence_factor.get(regime, 2.0), scale.budget(student, regime)
    return max(epochs + 1, round(factor * epochs))


def train_ce(scale: Scale, pair_name: str, regime: str, epochs: int, work: Path, seed: int = 0) -> dict[str, Any]:
    """Train ``pair_name``'s student alone with CE for ``epochs`` (one seed); its final accuracies."""
    from featkd.api import train_teacher
    from featkd.config import TrainConfig

    pair = PAIRS[pair_name]
    train, val, test = common.load_regime(scale, regime)
    width = scale.student_widths[pair.student]
    out = work / "convergence" / pair.student / regime / (f"epochs-{epochs}" + (f"-seed-{seed}" if seed else ""))
    config = TrainConfig(
        data=scale.data, data_root=scale.data_root, train_limit=scale.regimes[regime], val_size=scale.val_size,
        data_options=dict(scale.data_options), epochs=epochs, batch_size=scale.batch_size, runs=1, seed=seed,
        eval_every=scale.eval_every.get(regime, 1),
        device=scale.device, progress=False, model=pair.student, width=width, out=str(out),
    )
    start = time.perf_counter()
    result = train_teacher(lambda: common.create(pair.student, width, train), train, test, config=config,
                           val_set=val)
    run = result.runs[0]
    return {"epochs": epochs, "final_val_acc": run.final_val_acc, "final_test_acc": run.final_test_acc,
            "val_acc_per_epoch": [r.get("val_acc") for r in run.history],
            "test_acc_per_epoch": [r.get("test_acc") for r in run.history],
            "run_dir": config.out, "wall_s": time.perf_counter() - start, "finished": result.finished}


def gains(budget: dict[str, Any], long: dict[str, Any]) -> dict[str, float]:
    """What the longer budget gained over the budget in one seed, in points."""
    return {"val_gain_points": 100.0 * (long["final_val_acc"] - budget["final_val_acc"]),
            "test_gain_points": 100.0 * (long["final_test_acc"] - budget["final_test_acc"])}


def verdict(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean gains over the seeds' runs, the validation gain's 95 % interval (two seeds or more), and
    whether the budget counts as converged (the mean validation gain is at most the threshold)."""
    val = [run["val_gain_points"] for run in runs]
    test = [run["test_gain_points"] for run in runs]
    mean, interval = stats.mean_interval(val)
    return {"val_gain_points": mean, "val_gain_ci": interval, "test_gain_points": sum(test) / len(test),
            "converged": common.budget_converged(mean), "threshold_points": common.CONVERGED_POINTS}


# what the default scale checked before the results files recorded their data and batch size
LEGACY_SETTINGS = {"scale": "default", "data": "fashion_mnist", "data_options": {}, "batch_size": 128}


def identity_of(scale: Scale, pair_name: str, regime: str) -> dict[str, Any]:
    """What decides a check's numbers: a seed's runs are kept only for a file with the same identity."""
    pair = PAIRS[pair_name]
    return {"pair": pair.name, "regime": regime, "student": pair.student,
            "student_width": scale.student_widths[pair.student], "scale": scale.name, "data": scale.data,
            "data_options": dict(scale.data_options), "train_images": scale.regimes[regime],
            "val_images": scale.val_size, "batch_size": scale.batch_size,
            "budget_epochs": scale.budget(pair.student, regime),
            "long_epochs": long_epochs(scale, pair.student, regime)}


def runs_of(found: dict[str, Any]) -> list[dict[str, Any]]:
    """A results file's runs by seed; a file from before checks had several seeds holds seed 0's at its top level."""
    if "runs" in found:
        return found["runs"]
    return [{"seed": found.get("seed", 0), "budget": found.get("budget") or {}, "long": found.get("long") or {},
             "command": found.get("command"), "git_commit": found.get("git_commit")}]


def kept_runs(path: Path, identity: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The seeds' runs of an earlier results file with the same ``identity``, by seed; ValueError for a
    file of another identity (a check of another budget is kept apart, never replaced)."""
    if not path.is_file():
        return {}
    found = common.read_json(path)
    if not any(flag in found.get("command", "") for flag in ("--data ", "--scale", "--quick")):
        found = {**LEGACY_SETTINGS, **found}  # the default scale's, from before it recorded these
    changed = sorted(key for key, value in identity.items() if found.get(key) != value)
    if changed:
        raise ValueError(f"{path} holds a check with other settings ({', '.join(changed)}): move it away (a "
                         f"rejected budget's into results/convergence_rejected_budgets/) or give another --results")
    return {run["seed"]: {**run, **gains(run["budget"], run["long"])} for run in runs_of(found)}


def check_cell(scale: Scale, pair_name: str, regime: str, work: Path, results: Path,
               record: dict[str, Any], seeds: int = 1) -> dict[str, Any]:
    """Both runs of each seed of one (pair, regime); the results file is rewritten after each seed."""
    pair = PAIRS[pair_name]
    path = results / f"convergence_{pair.name}_{regime}.json"
    identity = identity_of(scale, pair_name, regime)
    runs = kept_runs(path, identity)
    missing = sorted(set(range(seeds)) - set(runs))
    if not missing:
        log.info("%s %s: seeds %s checked earlier, kept", pair.name, regime, sorted(runs))
    for seed in missing:
        budget = train_ce(scale, pair_name, regime, identity["budget_epochs"], work, seed)
        long = train_ce(scale, pair_name, regime, identity["long_epochs"], work, seed)
        runs[seed] = {"seed": seed, "budget": budget, "long": long, **gains(budget, long),
                      "command": record["command"], "git_commit": record["git_commit"]}
        log.info("%s %s seed %d: ce val %.4f at %d epochs, %.4f at %d", pair.name, regime, seed,
                 budget["final_val_acc"], budget["epochs"], long["final_val_acc"], long["epochs"])
        common.write_json(path, cell_data(identity, [runs[s] for s in sorted(runs)], record))
    data = {**common.read_json(path), **verdict([runs[s] for s in sorted(runs)])}  # as written, or as kept
    log.info("%s %s: ce val gain %+.2f points over %d seed(s): %s", pair.name, regime, data["val_gain_points"],
             len(runs), "converged" if data["converged"] else "NOT converged")
    return data


def cell_data(identity: dict[str, Any], runs: list[dict[str, Any]], record: dict[str, Any]) -> dict[str, Any]:
    """The results file of one (pair, regime): its runs by seed and their verdict; ``record`` is the
    latest command's (each run also names the command that trained it)."""
    return {"benchmark": "convergence", **identity, "method": "ce", "seeds": [run["seed"] for run in runs],
            "runs": runs, **verdict(runs), **record, "finished": common.now()}


def run_checks(scale: Scale, pairs: list[str], regimes: list[str], work: Path, results: Path, workers: int,
               threads: int, argv: list[str], seeds: int = 1) -> int:
    """Every (pair, regime) check as one job; returns 0 when every budget is converged."""
    record = common.run_record(argv, threads, workers)
    jobs = [Job(f"{p} {r}", check_cell, (scale, p, r, work, results, record, seeds))
            for p in pairs for r in regimes]
    outcome = common.run_jobs(jobs, workers, threads)
    failed = {name: err for name, err in outcome.items() if isinstance(err, Exception)}
    for name, err in failed.items():
        print(f"FAILED {name}: {err}", file=sys.stderr)
    for name, data in outcome.items():
        if isinstance(data, dict):
            print(f"{name}: {data['budget_epochs']} -> {data['long_epochs']} epochs, ce val gain "
                  f"{describe_gain(data)}: {'converged' if data['converged'] else 'NOT converged'}")
    slow = [name for name, data in outcome.items() if isinstance(data, dict) and not data["converged"]]
    return 1 if failed or slow else 0


def describe_gain(data: dict[str, Any]) -> str:
    """'+0.34 points (seed 0)' or '+0.12 [-0.40, +0.64] points (seeds 0, 1, 2)'."""
    interval = data.get("val_gain_ci")
    ci = f" [{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else ""
    seeds = data.get("seeds") or [data.get("seed", 0)]
    return f"{data['val_gain_points']:+.2f}{ci} points (seed{'s' if len(seeds) > 1 else ''} " \
           f"{', '.join(map(str, seeds))})"


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
    return run_checks(scale, pairs, regimes, work, results, workers, threads, [str(Path(__file__))] + argv,
                      args.seeds or 1)


if __name__ == "__main__":
    sys.exit(main())
