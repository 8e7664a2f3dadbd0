"""Which rule picks the teacher layers that distil best? Three teachers, two protocols.

Teachers are trained ``featkd train-teacher`` run directories (``--teachers DIR``,
default: the scale's committed teachers, ``benchmarks/teachers/<name>/``; a scale
without committed teachers, e.g. ``--quick``, trains them in its work directory):
resnet34 -> resnet9, vgg19_bn -> vgg11_bn, vit_b -> vit_et (the scale's
``lv_pairs``). For each teacher, on the training split of the scale's
``lv_regime``:

* predictors of every candidate GL t (GL 1 to the last before the head):
  Q, S, I, E and sqrt(I*E) in both quality variants, from the training split;
  depth (t); and a linear probe's accuracy (pooled features, fitted on the
  quality subset A and scored on the validation split, as ``auto`` does; the
  same split judges the configurations, which can only favour the probe);
* protocol "one layer": featkd from t alone into (i) the student's deepest
  paper layer ("deepest") and (ii) the student layer at t's relative depth
  ("matched": the candidate range of the teacher mapped onto student GLs
  1 .. its deepest paper layer);
* protocol "sets": featkd from 4 teacher layers onto the student's paper
  layers, one-to-one in depth order: ``lv_subsets`` random 4-subsets (seeded)
  plus the set each rule chooses and the baselines' standard layers.

Every configuration runs ``lv_seeds`` seeds (the sets a rule chooses:
``lv_rule_seeds``) for ``lv_epochs`` epochs, evaluated
after the last; the statistics use the final validation accuracy (held out of
the training data; the test accuracy is recorded beside it). Results:
``layer_validity_<teacher>.json`` per teacher, rewritten after every finished
configuration (``"complete": false`` until all are there); the statistics
(Spearman rho with bootstrap CIs, regret, tests against depth, the held-out
check) are computed from them by ``validity_report.py``.

    python benchmarks/layer_validity.py                       # every teacher of the scale
    python benchmarks/layer_validity.py --pairs vit_b-vit_et --teachers DIR
    python benchmarks/layer_validity.py --quick               # seconds, synthetic data

Resumes: each configuration's runs live in
``<work>/layer_validity/<teacher>/<configuration>/run-<seed>``; finished runs are
kept and skipped.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

import common
from common import PAIRS, Job, Scale
from featkd.selection import VARIANT_FREE, VARIANTS, measure_variant, parse_rule

log = logging.getLogger("benchmarks.layer_validity")

QUALITY_SCORES = ("Q", "S", "I", "E", "sqrtIE")
PLAIN_SCORES = VARIANT_FREE
BAND_SCORES = ("Q", "S")  # quality scores also tried as bands:SCORE
SET_SIZE = 4
PROTOCOLS = ("deepest", "matched", "sets")


# --------------------------------------------------------------------------- predictors and rules
def predictor_ids() -> list[str]:
    """Every per-layer predictor: "Q/paper", ..., "sqrtIE/corrected", "depth", "probe"."""
    return [f"{score}/{variant}" for variant in VARIANTS for score in QUALITY_SCORES] + list(PLAIN_SCORES)


def rule_ids() -> list[str]:
    """Every rule tried: each predictor's top k, and bands:SCORE for some of them."""
    bands = [f"bands:{score}/{variant}" for variant in VARIANTS for score in BAND_SCORES]
    return predictor_ids() + bands + [f"bands:{score}" for score in PLAIN_SCORES]


def predictors(reports: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{predictor id: {GL (as text): value}} from the two variants' quality reports."""
    out: dict[str, dict[str, float]] = {}
    for pid in predictor_ids():
        report = reports[measure_variant(pid)]
        values = report.values(parse_rule(pid).score)
        out[pid] = {str(row.index): value for row, value in zip(report.layers, values)}
    return out


def rule_sets(reports: dict[str, Any], k: int = SET_SIZE) -> dict[str, list[int]]:
    """The k teacher layers every rule chooses."""
    out = {}
    for rid in rule_ids():
        out[rid] = reports[measure_variant(rid)].select(k, rid)
    return out


def candidate_layers(teacher: torch.nn.Module) -> list[int]:
    """GL indices a rule chooses among (GL 1 to the last before the head)."""
    from featkd.selection import candidate_layers as candidates

    return candidates(teacher)


def spread(items: list[int], count: int | None) -> list[int]:
    """``count`` items evenly spread over ``items`` (all of them when count is None or larger)."""
    if count is None or count >= len(items):
        return list(items)
    return sorted({items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)})


def matched_layer(t: int, candidates: list[int], deepest: int) -> int:
    """The student GL at teacher GL t's relative depth: the candidates' range onto GLs 1..deepest."""
    first, last = candidates[0], candidates[-1]
    share = (t - first) / (last - first) if last > first else 1.0
    return int(math.floor(1 + share * (deepest - 1) + 0.5))


def random_sets(candidates: list[int], count: int, seed: int = 0, k: int = SET_SIZE) -> list[list[int]]:
    """``count`` distinct random k-subsets of the candidates (fewer when fewer exist), seeded."""
    possible = math.comb(len(candidates), k)
    rng = random.Random(seed)
    chosen: list[list[int]] = []
    while len(chosen) < min(count, possible):
        subset = sorted(rng.sample(candidates, k))
        if subset not in chosen:
            chosen.append(subset)
    return chosen


def configurations(candidates: list[int], student_layers: list[int], sets: dict[str, list[list[int]]]
                   ) -> dict[str, list[dict[str, list[int]]]]:
    """{protocol: [{"teacher_layers", "student_layers"}, ...]} (the sets protocol without duplicates)."""
    deepest = student_layers[-1]
    out: dict[str, list[dict[str, list[int]]]] = {
        "deepest": [{"teacher_layers": [t], "student_layers": [deepest]} for t in candidates],
        "matched": [{"teacher_layers": [t], "student_layers": [matched_layer(t, candidates, deepest)]}
                    for t in candidates],
        "sets": [],
    }
    for layers in (s for group in sets.values() for s in group):
        entry = {"teacher_layers": layers, "student_layers": list(student_layers)}
        if entry not in out["sets"]:
            out["sets"].append(entry)
    return out


def config_key(entry: dict[str, list[int]]) -> str:
    """A configuration's name: "t12-13-14-15_s1-2-3-4"."""
    return (f"t{'-'.join(map(str, entry['teacher_layers']))}_"
            f"s{'-'.join(map(str, entry['student_layers']))}")


# --------------------------------------------------------------------------- teachers
def teacher_run_dir(scale: Scale, teacher: str, work: Path, teachers: str | None) -> Path:
    """Where ``teacher``'s train-teacher run directory is: in ``teachers`` when given, else where
    the scale keeps it (its committed teachers folder, or the work directory)."""
    if teachers is not None:
        return Path(teachers) / teacher
    return common.teacher_dir(work, teacher, scale)


def ensure_teacher(scale: Scale, teacher: str, work: Path, teachers: str | None, threads: int) -> Path:
    """The teacher's run directory. A missing one is trained when the scale keeps its teachers in
    the work directory (e.g. --quick); a committed or --teachers folder must hold it already."""
    run_dir = teacher_run_dir(scale, teacher, work, teachers)
    if (run_dir / "model.pt").is_file() and (run_dir / "config.yaml").is_file():
        return run_dir
    if teachers is None and scale.teachers_dir is None:
        common.train_teacher_cli(scale, teacher, work, threads)
        return run_dir
    command = "featkd " + " ".join(common.teacher_command(scale, teacher, run_dir)[3:])
    raise FileNotFoundError(f"no trained teacher at {run_dir} (model.pt and config.yaml): train it with "
                            f"`{command}` or point --teachers at a folder of run directories")


def teacher_config(run_dir: Path, scale: Scale) -> Any:
    """The teacher's TrainConfig; its data must be the scale's."""
    from featkd.config import TrainConfig

    config = TrainConfig.from_yaml(run_dir / "config.yaml")
    if config.data != scale.data:
        raise ValueError(f"teacher {run_dir} was trained on {config.data}, the benchmark uses {scale.data}")
    return config


def load_teacher(run_dir: Path, scale: Scale, train: Any) -> torch.nn.Module:
    """The trained teacher (eval mode, frozen) at the width its run directory records."""
    from featkd.checkpoint import load_model_weights

    config = teacher_config(run_dir, scale)
    model = common.create(config.model, config.width, train)
    load_model_weights(model, run_dir)
    return model.eval().requires_grad_(False)


def teacher_quality(scale: Scale, teacher: str, run_dir: Path, work: Path, variant: str) -> Any:
    """Quality (with the probe) of the candidate layers on the training split; cached in work/quality."""
    from featkd.quality import QualityReport, measure

    path = work / "quality" / f"lv_quality_{teacher}_{scale.lv_regime}_{variant}.json"
    if path.is_file():
        return QualityReport.from_json(path)
    splits = common.load_regime(scale, scale.lv_regime)
    model = load_teacher(run_dir, scale, splits.train)
    start = time.perf_counter()
    report = measure(model, splits.train, candidate_layers(model), variant=variant, seed=0,
                     device=common.resolve_device(scale.device), subset_size=scale.quality_subset,
                     model_name=teacher, progress=False, probe_set=splits.val)
    report.settings["seconds"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    report.to_json(path)
    return report


# --------------------------------------------------------------------------- one configuration
def validity_job(scale: Scale, pair_name: str, run_dir: Path, entry: dict[str, list[int]],
                 work: Path, seeds: int) -> dict[str, Any]:
    """Distil the student with featkd from ``entry``'s teacher layers onto its student layers,
    ``seeds`` runs (seeds 0, 1, ...)."""
    from featkd.api import distill
    from featkd.config import DistillConfig

    pair = PAIRS[pair_name]
    splits = common.load_regime(scale, scale.lv_regime)
    train = splits.train
    teacher = load_teacher(run_dir, scale, train)
    width = teacher_config(run_dir, scale).width
    key = config_key(entry)
    feed = common.SharedTeacherFeed(teacher, train, common.resolve_device(scale.device),
                                    cache_dir=work / "cache")
    config = DistillConfig(
        data=scale.data, data_root=scale.data_root, train_limit=scale.regimes[scale.lv_regime],
        data_options=dict(scale.data_options), epochs=scale.lv_epochs, batch_size=scale.batch_size,
        val_size=len(splits.val) if splits.val is not None else None, eval_every=scale.lv_epochs,
        runs=seeds, seed=0, device=scale.device, progress=False,
        out=str(work / "layer_validity" / pair.teacher / key),
        teacher=pair.teacher, teacher_width=width, teacher_checkpoint=str(run_dir),
        student=pair.student, student_width=scale.student_widths[pair.student], method="featkd",
        teacher_layers=list(entry["teacher_layers"]), student_layers=list(entry["student_layers"]),
        teacher_mode="cache",
    )
    start = time.perf_counter()
    try:
        result = distill(
            teacher, lambda: common.create(pair.student, scale.student_widths[pair.student], train),
            train, splits.test, config=config, method=config.method, teacher_layers=config.teacher_layers,
            student_layers=config.student_layers, teacher_name=pair.teacher, student_name=pair.student,
            teacher_feed=feed, val_set=splits.val)
    finally:
        feed.close()
    summary = common.run_summary(result)
    return {"teacher": pair.teacher, "key": key, **entry,
            "final_test_acc": summary["final_test_acc"], "final_val_acc": summary.get("final_val_acc"),
            "test_acc_at_best_val": summary.get("test_acc_at_best_val"),
            "seeds": {str(r["seed"]): r["final_test_acc"] for r in summary["runs"] if r["finished"]},
            "val_seeds": {str(r["seed"]): r["final_val_acc"] for r in summary["runs"] if r["finished"]},
            "train_time_s": summary["train_time_s"], "wall_s": time.perf_counter() - start}


# --------------------------------------------------------------------------- results
def assemble(head: dict[str, Any], protocols: dict[str, list[dict[str, list[int]]]],
             runs: dict[str, Any]) -> dict[str, Any]:
    """One teacher's results file from its finished configurations (missing ones listed)."""
    keys = {config_key(e) for entries in protocols.values() for e in entries}
    missing = sorted(keys - set(runs))
    return {**head, "complete": not missing, "missing": missing, "updated": common.now(),
            "finished": common.now() if not missing else None,
            "protocols": {name: [config_key(e) for e in entries] for name, entries in protocols.items()},
            "runs": {key: runs[key] for key in sorted(runs) if key in keys}}


def teacher_plan(scale: Scale, pair_name: str, run_dir: Path, work: Path, record: dict[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, list[dict[str, list[int]]]]]:
    """The head of a teacher's results file (settings, predictors, sets) and its configurations."""
    from featkd.models import PAPER_STUDENT_LAYERS, STANDARD_TEACHER_LAYERS

    pair = PAIRS[pair_name]
    reports = {v: teacher_quality(scale, pair.teacher, run_dir, work, v) for v in VARIANTS}
    candidates = spread([row.index for row in reports["paper"].layers], scale.lv_max_layers)
    reports = {v: _restricted(report, candidates) for v, report in reports.items()}
    chosen = rule_sets(reports)
    standard = [t for t in STANDARD_TEACHER_LAYERS.get(pair.teacher, []) if t in candidates]
    sets = {"random": random_sets(candidates, scale.lv_subsets), "rules": list(chosen.values()),
            "standard": [standard] if len(standard) == SET_SIZE else []}
    student_layers = list(PAPER_STUDENT_LAYERS[pair.student])
    protocols = configurations(candidates, student_layers, sets)
    config = teacher_config(run_dir, scale)
    head = {
        "benchmark": "layer_validity", **record, "pair": pair.name, "teacher": pair.teacher,
        "student": pair.student,
        "settings": {"scale": scale.name, "data": scale.data, "data_options": scale.data_options,
                     "regime": scale.lv_regime, "train_images": scale.regimes[scale.lv_regime],
                     "epochs": scale.lv_epochs, "seeds": scale.lv_seeds, "rule_seeds": scale.lv_rule_seeds,
                     "batch_size": scale.batch_size,
                     "random_sets": scale.lv_subsets, "max_layers": scale.lv_max_layers,
                     "student_width": scale.student_widths[pair.student], "method": "featkd",
                     "quality_subset": scale.quality_subset},
        "teacher_run": {"dir": str(run_dir), "model": config.model, "width": config.width,
                        "epochs": config.epochs, "train_limit": config.train_limit,
                        **_teacher_accuracy(run_dir)},
        "quality_seconds": {v: r.settings.get("seconds") for v, r in reports.items()},
        "probe": reports["paper"].settings.get("probe"),
        "candidate_layers": candidates, "student_layers": student_layers,
        "matched": {str(t): matched_layer(t, candidates, student_layers[-1]) for t in candidates},
        "predictors": predictors(reports), "rule_sets": chosen, "random_sets": sets["random"],
        "standard_set": standard if len(standard) == SET_SIZE else None,
    }
    return head, protocols


def kept_runs(path: Path, head: dict[str, Any], protocols: dict[str, list[dict[str, list[int]]]]
              ) -> dict[str, Any]:
    """The finished configurations of an earlier results file with the same settings and sets, so
    that a restarted run never writes a file with fewer results than it found."""
    if not path.is_file():
        return {}
    earlier = common.read_json(path)
    same = all(earlier.get(key) == head.get(key) for key in ("settings", "candidate_layers", "student_layers",
                                                             "rule_sets", "random_sets", "standard_set"))
    keys = {config_key(e) for entries in protocols.values() for e in entries}
    return {k: v for k, v in earlier.get("runs", {}).items() if k in keys} if same else {}


def chosen_sets(head: dict[str, Any]) -> list[list[int]]:
    """The sets a rule (or the baselines) chose: they run ``lv_rule_seeds`` seeds, so that a rule can
    beat depth's choice in a paired test (2 seeds on 3 teachers allow no p below 1/64)."""
    return list(head["rule_sets"].values()) + ([head["standard_set"]] if head["standard_set"] else [])


def _restricted(report: Any, layers: list[int]) -> Any:
    """The report with only ``layers`` (rules then choose among them)."""
    from featkd.quality import QualityReport

    return QualityReport([row for row in report.layers if row.index in layers], variant=report.variant,
                         model=report.model, settings=report.settings)


def _teacher_accuracy(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    if not path.is_file():
        return {}
    summary = common.read_json(path)
    return {"final_test_acc": summary.get("final_test_acc"), "final_val_acc": summary.get("final_val_acc")}


def run(scale: Scale, pairs: list[str], teachers: str | None, work: Path, results: Path, workers: int,
        threads: int, argv: list[str]) -> int:
    """Teachers, predictors, one job per configuration; writes layer_validity_<teacher>.json."""
    import validity_report

    record = common.run_record(argv, threads, workers)
    torch.set_num_threads(threads if workers <= 1 else common.default_threads(1))
    plans, jobs = {}, []
    for name in pairs:
        teacher = PAIRS[name].teacher
        run_dir = ensure_teacher(scale, teacher, work, teachers, threads)
        head, protocols = teacher_plan(scale, name, run_dir, work, record)
        path = results / f"layer_validity_{teacher}.json"
        plans[teacher] = {"head": head, "protocols": protocols, "runs": kept_runs(path, head, protocols),
                          "path": path}
        common.write_json(plans[teacher]["path"], assemble(head, protocols, plans[teacher]["runs"]))
        kept = plans[teacher]["runs"]
        entries = {config_key(e): e for group in protocols.values() for e in group if config_key(e) not in kept}
        log.info("%s: %d configurations to run, %d finished ones kept from %s", teacher, len(entries), len(kept),
                 path)
        chosen = {config_key({"teacher_layers": layers, "student_layers": head["student_layers"]})
                  for layers in chosen_sets(head)}
        jobs += [Job(f"{teacher} {key}", validity_job, (scale, name, run_dir, entry, work,
                                                        scale.lv_rule_seeds if key in chosen else scale.lv_seeds))
                 for key, entry in entries.items()]

    def on_done(name: str, outcome: Any) -> None:
        if isinstance(outcome, dict):
            plan = plans[outcome["teacher"]]
            plan["runs"][outcome["key"]] = outcome
            common.write_json(plan["path"], assemble(plan["head"], plan["protocols"], plan["runs"]))

    outcomes = common.run_jobs(jobs, workers, threads, on_done)
    complete = True
    for plan in plans.values():
        data = assemble(plan["head"], plan["protocols"], plan["runs"])
        common.write_json(plan["path"], data)
        complete = complete and data["complete"]
    print(validity_report.markdown(results))
    failed = [n for n, v in outcomes.items() if isinstance(v, Exception)]
    for name in failed:
        print(f"FAILED {name}: {outcomes[name]}", file=sys.stderr)
    return 1 if failed or not complete else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--pairs", help="comma-separated teacher-student pairs (default: the scale's lv_pairs)")
    parser.add_argument("--teachers", help="folder of train-teacher run directories, one per teacher name "
                        "(default benchmarks/teachers; --quick: the work directory's, trained when missing)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel processes (default: 2 on CPU with >= 2 cores, 1 on CUDA or quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    common.setup_logging()
    try:
        scale = common.scale_from_args(args)
        pairs = common.parse_choice(args.pairs, list(scale.lv_pairs), "pair")
    except ValueError as err:
        print(f"layer_validity.py: error: {err}", file=sys.stderr)
        return 2
    if args.seeds is not None:
        scale.lv_seeds = args.seeds
    workers, threads, work, results = common.placement(scale, args)
    try:
        return run(scale, pairs, args.teachers, work, results, workers, threads, [str(Path(__file__))] + argv)
    except (FileNotFoundError, ValueError) as err:
        print(f"layer_validity.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
