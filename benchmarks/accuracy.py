"""The paper's comparison: every method on the four teacher -> student pairs, in two data regimes.

For each pair and regime it trains the student with ce, kd, kd_std, fitnet,
fitnet_fc, sp, simkd, semckd, featkd, featkd_ce, featkd_ce_kd and featkd_std
(``--seeds`` runs each) and writes ``accuracy_<pair>_<regime>.json`` with every
run's numbers, the mean ± std of final- and best-epoch test accuracy, the gain
over ce and the paper's ARI. The featkd methods use the teacher layers chosen by
knowledge quality Q on the regime's training split (next to the paper's choice).

Steps (each resumes; finished work is kept and skipped when started again):

1. teachers: ``featkd train-teacher`` (the real command) on the teacher regime's
   training set, into ``<work>/teachers/<name>``; reused by every regime;
2. knowledge quality of every teacher layer, per teacher and regime;
3. students: one job per (pair, regime); run directories
   ``<work>/runs/<pair>/<regime>/<method>``; the results file is rewritten after
   every finished method (``complete: false`` and ``missing`` until all are done).

    python benchmarks/accuracy.py --probe                 # time one step of everything; estimate the suite
    python benchmarks/accuracy.py --re-estimate           # the estimate again, for changed settings (no timing)
    python benchmarks/accuracy.py                         # the default suite (Fashion-MNIST; days of one core)
    python benchmarks/accuracy.py --pairs vgg19_bn-vgg11_bn --regimes low   # one resumable part of it
    python benchmarks/accuracy.py --pairs resnet34-resnet9 --regimes low --methods ce,featkd --seeds 1
    python benchmarks/accuracy.py --quick                 # seconds, synthetic data
    python benchmarks/accuracy.py --scale paper --data cifar100 --data-root DIR   # the paper's settings (GPU)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import common
import layer_validity
from common import PAIRS, Job, Scale
from featkd.selection import measure_variant

log = logging.getLogger("benchmarks.accuracy")

CACHE_BUDGET_BYTES = 6 * 2**30


# --------------------------------------------------------------------------- method order and layers
def method_order(methods: list[str]) -> list[str]:
    """``methods`` (comparison rows) grouped by the teacher outputs they need (logits, standard layers,
    classifier input, Q layers, the default rule's layers).

    Consecutive methods then share one teacher cache; ce comes first.
    """
    from featkd.distillation import METHOD_INFO

    def group(name: str) -> int:
        info = METHOD_INFO[common.row_method(name)]
        if not info.teacher_features:
            return 0
        return {"standard": 1, "classifier": 2}.get(info.teacher_layers, 3 + (name == "featkd_default"))

    order = common.rows()
    return sorted(methods, key=lambda name: (group(name), order.index(name)))


def paper_q_layers(teacher: str) -> dict[str, list[int]]:
    """The Q-selected layers of the authors' released configs for ``teacher`` (by dataset)."""
    from featkd.models import PAPER_Q_LAYERS

    return dict(PAPER_Q_LAYERS.get(teacher, {}))


def layer_lists(scale: Scale, pair: common.Pair, regime: str, work: Path) -> dict[str, Any]:
    """Student layers, standard teacher layers, our Q selection (the paper's rule), the default
    rule's selection and the paper's published choice."""
    from featkd.models import PAPER_STUDENT_LAYERS, STANDARD_TEACHER_LAYERS
    from featkd.selection import DEFAULT_RULE, PAPER_RULE

    k = len(PAPER_STUDENT_LAYERS[pair.student])
    report, seconds = common.quality_report(scale, pair.teacher, regime, work, variant=measure_variant(PAPER_RULE))
    default_report, _ = common.quality_report(scale, pair.teacher, regime, work,
                                              variant=measure_variant(DEFAULT_RULE))
    return {
        "student": list(PAPER_STUDENT_LAYERS[pair.student]),
        "standard": list(STANDARD_TEACHER_LAYERS[pair.teacher]),
        "q_selected": report.select(k, PAPER_RULE),
        "default_rule": DEFAULT_RULE,
        "default_selected": default_report.select(k, DEFAULT_RULE),
        "q_variant": report.variant,
        "q_values": {str(row.index): row.Q for row in report.layers},
        "q_seconds": seconds,
        "paper_q": paper_q_layers(pair.teacher),
    }


def pair_results_path(results: Path, pair: str, regime: str) -> Path:
    return results / f"accuracy_{pair}_{regime}.json"


def write_pair_results(path: Path, head: dict[str, Any], methods: dict[str, Any],
                       unfinished: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write one pair/regime results file; ``complete`` when every method has the cell's seeds.

    ``methods`` holds the rows with all their seeds (or failed); ``unfinished`` the rows whose
    finished seeds are kept while the others train (the report shows them as missing, or, for a
    row that already has the cell's seeds and is getting more, as *extending*).
    """
    seeds = head["settings"]["seeds"]
    rows = common.rows()
    unfinished = unfinished or {}
    done = [m for m in rows if _finished(methods.get(m), seeds)]
    missing = [m for m in rows if m not in done]
    data = {**head, "complete": not missing, "missing": missing, "updated": common.now(),
            "finished": common.now() if not missing else None,
            "methods": {m: methods[m] for m in rows if m in methods},
            "unfinished": {m: unfinished[m] for m in rows if m in unfinished}, **common.derived(methods)}
    common.write_json(path, data)
    return data


@dataclass
class Previous:
    """What an earlier results file of a cell holds (all empty when there is none)."""
    methods: dict[str, Any] = field(default_factory=dict)  # finished rows, failures left out
    unfinished: dict[str, Any] = field(default_factory=dict)  # rows whose finished seeds are kept meanwhile
    builds: list[dict[str, Any]] = field(default_factory=list)  # teacher cache builds
    commands: list[str] = field(default_factory=list)  # every command that wrote the file
    seeds: int | None = None  # the cell's number of seeds
    other_settings: list[str] = field(default_factory=list)  # the settings a file of this cell differs in


def _changed_settings(old: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """The settings a results file's data was written with other values of (its number of seeds may
    differ): none when it is this cell's."""
    found = old.get("settings", {})
    return sorted(k for k in {*found, *settings} - {"seeds"} if found.get(k) != settings.get(k))


def _previous(path: Path, settings: dict[str, Any], keep_errors: bool = False) -> Previous:
    """What an earlier results file with the same settings holds (failed rows left out, so that
    they train again, unless ``keep_errors``).

    The number of seeds may differ: a method with fewer than asked for is continued, one
    with more keeps them all. The finished seeds are read from the file, so a results file
    alone (without the work directory) resumes a grid seed by seed.
    """
    if not path.is_file():
        return Previous()
    old = common.read_json(path)
    changed = _changed_settings(old, settings)
    if changed:
        return Previous(other_settings=changed)
    return Previous(methods={m: e for m, e in old.get("methods", {}).items() if keep_errors or "error" not in e},
                    unfinished=dict(old.get("unfinished", {})), builds=list(old.get("teacher_cache_builds", [])),
                    commands=old.get("commands") or [c for c in [old.get("command")] if c],
                    seeds=old["settings"].get("seeds"))


KEEP: Any = object()  # CellResults.save: leave this slot of the row as the file has it


@dataclass
class CellResults:
    """One cell's results file, shared by every process that trains some of its rows.

    Every write holds the cell's lock and rereads the file first, so what other processes wrote
    meanwhile is kept: a process replaces only the row it trains, and adds its command and its
    teacher-cache builds to the file's. Only a finished seed or a failure writes: a process stopped
    before either leaves the file as it was, so its command is not listed as one that produced it.
    """

    path: Path
    lock: Path
    head: dict[str, Any]

    def read(self, keep_errors: bool = False) -> Previous:
        return _previous(self.path, self.head["settings"], keep_errors)

    def data(self) -> dict[str, Any]:
        """What the file holds now (``complete`` False when there is none with these settings)."""
        if not self.path.is_file():
            return {"complete": False}
        old = common.read_json(self.path)
        return {"complete": False} if _changed_settings(old, self.head["settings"]) else old

    def save(self, row: str, *, done: Any = KEEP, unfinished: Any = KEEP) -> dict[str, Any]:
        """Write the file with ``row``'s finished entry ``done`` and its ``unfinished`` one (None
        removes it, KEEP leaves the file's); returns what was written."""
        with common.file_lock(self.lock):
            now = self.read(keep_errors=True)
            for rows, entry in ((now.methods, done), (now.unfinished, unfinished)):
                if entry is KEEP:
                    continue
                if entry is None:
                    rows.pop(row, None)
                else:
                    rows[row] = entry
            builds = self.head["teacher_cache_builds"]
            head = {**self.head, "commands": list(dict.fromkeys([*now.commands, self.head["command"]])),
                    "teacher_cache_builds": now.builds + [b for b in builds if b not in now.builds]}
            return write_pair_results(self.path, head, now.methods, now.unfinished)


def _finished(entry: dict[str, Any] | None, seeds: int) -> bool:
    return bool(entry) and "error" not in entry and len(_seeds_done(entry)) >= seeds


def _seeds_done(entry: dict[str, Any] | None) -> set[int]:
    return {r["seed"] for r in (entry or {}).get("runs", []) if r["finished"]}


def _with_run(entry: dict[str, Any] | None, run: dict[str, Any], meta: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """A method's entry with one more finished run: its runs, their mean ± std, ``meta`` and the
    summed wall time of the calls that trained them."""
    runs = sorted([*(entry or {}).get("runs", []), run], key=lambda r: r["seed"])
    return {**common.summarize_runs(runs, meta["deployed_params"]), **meta,
            "wall_s": (entry or {}).get("wall_s", 0.0) + wall_s}


# --------------------------------------------------------------------------- one (pair, regime)
def settings_of(scale: Scale, pair: common.Pair, regime: str) -> dict[str, Any]:
    """The settings that decide a pair/regime's numbers."""
    return {
        "scale": scale.name, "data": scale.data, "data_options": scale.data_options,
        "regime": regime, "train_images": scale.regimes[regime], "val_images": scale.val_size,
        "teacher_regime": scale.teacher_regime, "teacher_augment": scale.teacher_augment,
        "teacher": pair.teacher, "teacher_width": scale.teacher_widths[pair.teacher],
        "teacher_epochs": scale.teacher_epochs, "teacher_lr": scale.teacher_lrs.get(pair.teacher, "recipe"),
        "student": pair.student, "student_width": scale.student_widths[pair.student],
        "epochs": scale.budget(pair.student, regime), "eval_every": scale.eval_every.get(regime, 1),
        "seeds": scale.seeds, "batch_size": scale.batch_size,
        "optimizer": "adamw one-cycle (pct_start 0.3), per-family peak lr", "augment": False,
        "teacher_outputs": "cached once per layer list (un-augmented training set)",
        "quality_subset": scale.quality_subset, "quality_variant": scale.quality_variant,
    }


def distill_config(scale: Scale, pair: common.Pair, regime: str, row: str, work: Path,
                   teacher_layers: list[int] | None, seed: int) -> Any:
    """The DistillConfig of one comparison row's run with ``seed`` (``featkd distill`` would take the
    same options). Each seed is its own single run, the same as that seed's run of ``--runs N``."""
    from featkd.config import DistillConfig

    return DistillConfig(
        data=scale.data, data_root=scale.data_root, train_limit=scale.regimes[regime], val_size=scale.val_size,
        data_options=dict(scale.data_options), epochs=scale.budget(pair.student, regime),
        batch_size=scale.batch_size, eval_every=scale.eval_every.get(regime, 1), runs=1, seed=seed,
        device=scale.device, progress=False,
        out=str(work / "runs" / pair.name / regime / row / f"run-{seed}"),
        teacher=pair.teacher, teacher_width=scale.teacher_widths[pair.teacher],
        teacher_checkpoint=str(common.teacher_dir(work, pair.teacher, scale)),
        student=pair.student, student_width=scale.student_widths[pair.student], method=common.row_method(row),
        teacher_layers=teacher_layers, student_layers="paper", teacher_mode="cache",
    )


def run_pair(scale: Scale, pair_name: str, regime: str, methods: list[str], work: Path, results: Path,
             record: dict[str, Any]) -> dict[str, Any]:
    """Train every method of one pair and regime; returns the results file's data."""
    from featkd.api import distill
    from featkd.distillation import METHOD_INFO

    pair = PAIRS[pair_name]
    settings = settings_of(scale, pair, regime)
    path = pair_results_path(results, pair.name, regime)
    previous = _previous(path, settings)
    if previous.other_settings:  # a finished row is worth more than this call: never overwritten
        raise ValueError(f"{path} holds this cell with other settings ({', '.join(previous.other_settings)}): "
                         "move it away (a superseded_* folder keeps it for the report) or give another --results")
    train, val, test = common.load_regime(scale, regime)
    teacher = common.load_teacher(scale, pair.teacher, work, train)
    layers = layer_lists(scale, pair, regime, work)
    head = {"benchmark": "accuracy", "pair": pair.name, "regime": regime, "settings": settings,
            **record, "job_started": common.now(),
            "teacher": common.teacher_summary(scale, pair.teacher, work), "layers": layers,
            "train_images": len(train), "val_images": len(val) if val is not None else 0,
            "test_images": len(test)}
    # the cell's seeds are the fewest it was asked for: more seeds on named rows (where a verdict
    # is close) extend those rows and leave the cell complete
    settings["seeds"] = min(scale.seeds, previous.seeds or scale.seeds)
    device = common.resolve_device(scale.device)
    feed = common.SharedTeacherFeed(teacher, train, device, memory_budget_bytes=CACHE_BUDGET_BYTES,
                                    cache_dir=work / "cache")
    head["teacher_cache_builds"] = feed.build_seconds
    cell = CellResults(path, work / "locks" / f"{path.name}.lock", head)
    data = cell.data()
    runs_dir = work / "runs" / pair.name / regime

    def student() -> torch.nn.Module:
        return common.create(pair.student, scale.student_widths[pair.student], train)

    def train_seed(row: str, seed: int) -> tuple[dict[str, Any], dict[str, Any], float]:
        """One run of ``row``: its numbers, the method's facts and the call's wall time."""
        method = common.row_method(row)
        q_layers = layers["default_selected" if row == "featkd_default" else "q_selected"]
        config = distill_config(scale, pair, regime, row, work,
                                q_layers if METHOD_INFO[method].teacher_layers == "q" else None, seed)
        start = time.perf_counter()
        result = distill(teacher, student, train, test, config=config, method=method,
                         teacher_layers=config.teacher_layers, student_layers=config.student_layers,
                         teacher_name=pair.teacher, student_name=pair.student, teacher_feed=feed, val_set=val)
        if not result.finished:
            raise RuntimeError(f"seed {seed} stopped after epoch {len(result.runs[0].history)} of {config.epochs}")
        meta = {"method": method, "teacher_layers": result.extra.get("teacher_layers"),
                "student_layers": result.extra.get("student_layers"),
                "deployed_params": common.deployed_params(result),
                "config": config.to_dict()}  # of the latest run; the runs differ only in seed and out
        return common.run_info(result.runs[0]), meta, time.perf_counter() - start

    try:
        for row in method_order(methods):
            # a row is trained by one process at a time (its run directories are not shared);
            # another process running the same cell takes the rows this one is not training
            with common.file_lock(runs_dir / f"{row}.lock", wait=False) as ours:
                if not ours:
                    log.info("%s %s %s: another process is training it, skipped", pair.name, regime, row)
                    continue
                data = train_row(row, cell, train_seed, scale.seeds, f"{pair.name} {regime}") or data
    finally:
        feed.close()
    return data


def train_row(row: str, cell: CellResults, train_seed: Any, seeds: int, name: str) -> dict[str, Any] | None:
    """Train the seeds 0..seeds-1 of ``row`` that the cell's file does not hold yet, saving after
    each; returns the file's data after the last save (None when the row was finished already)."""
    now = cell.read()
    if _finished(now.methods.get(row), seeds):
        log.info("%s %s: finished earlier, kept", name, row)
        return None
    entry = now.unfinished.get(row) or now.methods.get(row)  # the seeds finished so far
    try:
        for seed in sorted(set(range(seeds)) - _seeds_done(entry)):
            run, meta, wall_s = train_seed(row, seed)
            log.info("%s %-12s seed %d: %.2f", name, row, seed, 100 * run["final_test_acc"])
            entry = _with_run(entry, run, meta, wall_s)
            cell.save(row, unfinished=entry)
    except Exception as err:  # one method's failure (e.g. a NaN loss) must not stop the others
        log.exception("%s %s failed", name, row)
        error = f"{type(err).__name__}: {err}"
        if now.methods.get(row):  # a finished row getting more seeds keeps its finished set
            return cell.save(row, unfinished={**(entry or {}), "error": error})
        return cell.save(row, done={"error": error})
    log.info("%s %-12s final %s", name, row, _format(entry["final_test_acc"]))
    return cell.save(row, done=entry, unfinished=None)


def _format(stats: dict[str, Any]) -> str:
    if stats.get("mean") is None:
        return "n/a"
    std = f" ± {100 * stats['std']:.2f}" if stats.get("std") is not None else ""
    return f"{100 * stats['mean']:.2f}{std}"


# --------------------------------------------------------------------------- the suite
def job_costs(scale: Scale, methods: list[str], probe_path: Path) -> dict[tuple[str, str], float]:
    """Relative cost of each (pair, regime) job: from the probe's CPU times when there is a probe file,
    else training images x epochs (the ViT pair counted double)."""
    try:
        probe = common.read_json(probe_path).get("pairs", {}) if probe_path.is_file() else {}
    except ValueError as err:  # it only orders the jobs: a damaged probe.json stops nothing
        log.warning("%s; jobs ordered by their training images and epochs", err)
        probe = {}
    costs = {}
    for pair in PAIRS:
        for regime, images in scale.regimes.items():
            volume = (images or 50000) * scale.budget(PAIRS[pair].student, regime)
            timings = probe.get(pair)
            if timings and all(common.row_method(m) in timings for m in methods):
                costs[(pair, regime)] = volume * sum(timings[common.row_method(m)]["cpu"] for m in methods)
            else:
                costs[(pair, regime)] = volume * (2.0 if PAIRS[pair].teacher == "vit_b" else 1.0)
    return costs


def teacher_job(scale: Scale, teacher: str, work: Path, threads: int) -> dict[str, Any]:
    return common.train_teacher_cli(scale, teacher, work, threads)


def quality_job(scale: Scale, teacher: str, regime: str, work: Path, results: Path) -> dict[str, Any]:
    """The knowledge quality the paper's rule and the default rule need (one report per variant)."""
    from featkd.selection import DEFAULT_RULE, PAPER_RULE

    report, seconds = common.quality_report(scale, teacher, regime, work, variant=measure_variant(PAPER_RULE),
                                            results=results)
    common.quality_report(scale, teacher, regime, work, variant=measure_variant(DEFAULT_RULE), results=results)
    return {"selected": report.select(4, PAPER_RULE), "seconds": seconds}


def run_suite(scale: Scale, pairs: list[str], regimes: list[str], methods: list[str], work: Path,
              results: Path, workers: int, threads: int, argv: list[str]) -> int:
    """Every (pair, regime), each started as soon as its teacher and its Q report are ready;
    returns 0 when everything finished."""
    record = common.run_record(argv, threads, workers)
    cost = job_costs(scale, methods, results / "probe.json")
    cells = sorted(((p, r) for r in regimes for p in pairs), key=lambda cell: -cost.get(cell, 0.0))
    teachers = list(dict.fromkeys(PAIRS[p].teacher for p, _ in cells))  # the longest cell's teacher first
    jobs = [Job(f"teacher {t}", teacher_job, (scale, t, work, threads)) for t in teachers]
    jobs += [Job(f"quality {t} {r}", quality_job, (scale, t, r, work, results), after=(f"teacher {t}",))
             for t in teachers for r in regimes]
    jobs += [Job(f"{p} {r}", run_pair, (scale, p, r, methods, work, results, record),
                 after=(f"quality {PAIRS[p].teacher} {r}",)) for p, r in cells]  # longest first

    def on_done(name: str, value: Any) -> None:
        if name.startswith("quality ") and isinstance(value, dict):
            teacher = name.split()[1]
            paper = ", ".join(f"{data} {layers}" for data, layers in paper_q_layers(teacher).items())
            print(f"{name}: top 4 by Q {value['selected']}; the paper's choice: {paper or 'none'}")

    outcome = common.run_jobs(jobs, workers, threads, on_done)
    failed = {k: v for k, v in outcome.items() if isinstance(v, Exception)}
    incomplete = [f"{p} {r}" for p, r in cells if isinstance(outcome[f"{p} {r}"], dict)
                  and not outcome[f"{p} {r}"].get("complete")]
    for name, err in failed.items():
        print(f"FAILED {name}: {err}", file=sys.stderr)
    print(f"results in {results}" + (f"; incomplete: {', '.join(incomplete)}" if incomplete else ""))
    results_flag = f" --results {results}" if results != common.RESULTS_DIR else ""
    print(f"render them with: python benchmarks/report.py{results_flag}")
    return 1 if failed or incomplete else 0


# --------------------------------------------------------------------------- probe
STATISTICS = ("median", "min", "cpu")


def _time_steps(step: Any, steps: int) -> dict[str, float]:
    """Seconds per call of ``step()`` over ``steps`` calls after one warm-up.

    "median" and "min" are wall-clock; "cpu" is the median process CPU time, which
    on a shared machine approximates the wall time the step would take on an idle
    core (exact for one thread, whose CPU time is the work done).
    """
    step()
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return {"median": statistics.median(walls), "min": min(walls), "cpu": statistics.median(cpus)}


def _per_image(timing: dict[str, float], batch: int) -> dict[str, float]:
    return {k: v / batch for k, v in timing.items()}


def probe_pair(scale: Scale, pair: common.Pair, methods: list[str], train: Any, steps: int) -> dict[str, Any]:
    """Seconds per training image of the teacher and of the student under every method.

    Untrained weights (the cost does not depend on them); teacher outputs are
    computed once for the batch, as the suite reads them from a cache.
    """
    from featkd.distillation import METHOD_INFO, DistillModel, OnlineTeacher, build_method
    from featkd.models import PAPER_STUDENT_LAYERS, STANDARD_TEACHER_LAYERS
    from featkd.train import ClassifierModel, default_lr

    batch = scale.batch_size
    x, y, _ = train.batch(torch.arange(batch))
    teacher = common.create(pair.teacher, scale.teacher_widths[pair.teacher], train)
    timings: dict[str, Any] = {"teacher_train": _train_step_time(ClassifierModel(teacher), x, y, None, steps,
                                                                 default_lr(pair.teacher, "adamw"))}
    teacher.eval().requires_grad_(False)
    full = OnlineTeacher(teacher, [], True)
    timings["teacher_forward"] = _per_image(_time_steps(lambda: full(x), steps), batch)
    q_layers = paper_q_layers(pair.teacher).get("cifar100", STANDARD_TEACHER_LAYERS[pair.teacher])
    for method in dict.fromkeys(common.row_method(m) for m in methods):
        student = common.create(pair.student, scale.student_widths[pair.student], train)
        kind = METHOD_INFO[method].teacher_layers
        t_layers = {"q": q_layers, "classifier": None}.get(kind, STANDARD_TEACHER_LAYERS[pair.teacher])
        s_layers = None if kind == "classifier" else PAPER_STUDENT_LAYERS[pair.student]
        built = build_method(method, teacher, student, teacher_layers=t_layers, student_layers=s_layers,
                             num_classes=train.num_classes, sample_input=x[:2], batch_size=batch)
        features = list(built.teacher_layers) if built.needs_teacher_features else []
        outputs = OnlineTeacher(teacher, features, True)(x) if (features or built.needs_teacher_logits) else None
        timings[method] = _train_step_time(DistillModel(student, built), x, y, outputs, steps,
                                           default_lr(pair.student, "adamw"))
    student = common.create(pair.student, scale.student_widths[pair.student], train).eval()
    with torch.no_grad():
        timings["student_eval"] = _per_image(_time_steps(lambda: student(x), steps), batch)
    return timings


def _train_step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, teacher_out: Any, steps: int,
                     lr: float) -> dict[str, float]:
    from featkd.config import RunConfig
    from featkd.train import build_optimizer

    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], RunConfig(), lr)
    model.train()

    def step() -> None:
        _, losses = model(x, y, teacher_out)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return _per_image(_time_steps(step, steps), x.shape[0])


def probe_quality(scale: Scale, teacher: str, train: Any) -> dict[str, float]:
    """Wall and CPU seconds of one knowledge-quality measurement (all layers) of an untrained ``teacher``."""
    from featkd.quality import measure

    model = common.create(teacher, scale.teacher_widths[teacher], train)
    wall, cpu = time.perf_counter(), time.process_time()
    measure(model, train, "all", subset_size=scale.quality_subset, progress=False)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"median": wall, "min": wall, "cpu": cpu}


def _phase_wall(jobs: list[float], workers: int) -> float:
    """Wall seconds of a phase of independent jobs on ``workers`` processes (longest job or even share)."""
    return max(sum(jobs) / max(1, workers), max(jobs, default=0.0))


def estimate_suite(scale: Scale, probe: dict[str, Any], sizes: dict[str, int], eval_images: int,
                   methods: list[str], workers: int, statistic: str = "median") -> dict[str, Any]:
    """Seconds of each phase of the default suite from the probe's per-image times.

    ``eval_images`` (the validation and test splits) are evaluated every ``eval_every``-th
    epoch of the grid and the convergence check, once per layer-validity run.
    ``<phase>_cpu_s`` sums the phase's jobs (one core each); ``wall_s`` adds up the
    phases, each taking max(total / workers, its longest job). Throughput runs last,
    in one process. ``cells_cpu_s`` gives each (pair, regime) of the grid, the parts it
    can be run in. Setup costs (process start, data loading) are left out.
    """
    pairs = probe["pairs"]
    quality = {t: q[statistic] for t, q in probe["quality_s"].items()}
    jobs: dict[str, list[float]] = {"teachers": [], "quality": [], "convergence": [], "students": []}
    cells: dict[str, float] = {}
    for teacher in sorted({PAIRS[p].teacher for p in pairs}):
        t = pairs[next(p for p in pairs if PAIRS[p].teacher == teacher)]
        jobs["teachers"].append(scale.teacher_epochs * (sizes[scale.teacher_regime] * t["teacher_train"][statistic]
                                                        + eval_images * t["teacher_forward"][statistic]))
        jobs["quality"] += [quality.get(teacher, 0.0)] * len(sizes)
    for p, t in pairs.items():
        for regime, images in sizes.items():
            epochs = scale.budget(PAIRS[p].student, regime)
            evaluations = 1 / scale.eval_every.get(regime, 1)

            def run_cost(method: str, epochs: float) -> float:
                return epochs * (images * t[method][statistic]
                                 + evaluations * eval_images * t["student_eval"][statistic])

            caches = 3 * images * t["teacher_forward"][statistic]
            runs = sum(scale.seeds * run_cost(common.row_method(m), epochs) for m in methods)
            jobs["students"].append(caches + runs)
            cells[f"{p} {regime}"] = caches + runs
            if "ce" in t:
                factor = scale.convergence_factor.get(regime, 2.0)
                jobs["convergence"].append(run_cost("ce", (1 + factor) * epochs))
    lv = pairs.get(scale.lv_pair)
    if lv is not None and all(k in lv for k in ("ce", "kd", "fitnet", "featkd")):
        images, forward = sizes[scale.lv_regime], lv["teacher_forward"][statistic]
        run = scale.lv_epochs * images * lv["featkd"][statistic] + eval_images * lv["student_eval"][statistic]
        layers = probe.get("lv_layers", 0)  # one teacher's configurations: every layer twice, the sets
        configs = ([scale.lv_seeds * run + images * forward] * (2 * layers + scale.lv_subsets)
                   + [scale.lv_rule_seeds * run + images * forward] * (len(layer_validity.rule_ids()) + 1))
        jobs["layer_validity"] = [quality.get(PAIRS[scale.lv_pair].teacher, 0.0)] + configs
        tp = sizes[scale.tp_regime]
        jobs["throughput"] = [tp * (lv["ce"][statistic] + lv["kd"][statistic] + lv["fitnet"][statistic]
                                    + 2 * lv["featkd"][statistic] + 4 * forward)
                              + 5 * eval_images * lv["student_eval"][statistic]]
    out: dict[str, float] = {f"{phase}_cpu_s": sum(times) for phase, times in jobs.items()}
    walls = {phase: (_phase_wall(times, workers) if phase != "throughput" else sum(times))
             for phase, times in jobs.items()}
    out.update({f"{phase}_wall_s": w for phase, w in walls.items()})
    return {**out, "cpu_s": sum(sum(t) for t in jobs.values()), "workers": workers, "wall_s": sum(walls.values()),
            "cells_cpu_s": cells}


def estimates(scale: Scale, probe: dict[str, Any], splits: tuple[Any, Any, Any], methods: list[str],
              workers: int) -> dict[str, dict[str, Any]]:
    """:func:`estimate_suite` for every statistic, with the image counts of the (train, val, test) splits."""
    train, val, test = splits
    sizes = {r: (n if n is not None else len(train)) for r, n in scale.regimes.items()}
    eval_images = len(test) + (len(val) if val is not None else 0)
    return {stat: estimate_suite(scale, probe, sizes, eval_images, methods, workers, stat) for stat in STATISTICS}


def run_probe(scale: Scale, pairs: list[str], methods: list[str], steps: int, workers: int, threads: int,
              results: Path, argv: list[str], quality: bool) -> int:
    """Time everything the suite does, write probe.json and print the suite estimate."""
    torch.set_num_threads(threads)
    record = common.run_record(argv, threads, workers)
    train, val, test = common.load_regime(scale, scale.teacher_regime)
    probe: dict[str, Any] = {"benchmark": "probe", **record, "scale": scale.to_dict(), "steps": steps,
                             "batch_size": scale.batch_size, "pairs": {}, "quality_s": {}}
    for name in pairs:
        log.info("probing %s", name)
        probe["pairs"][name] = probe_pair(scale, PAIRS[name], methods, train, steps)
    if quality:
        for teacher in sorted({PAIRS[p].teacher for p in pairs}):
            log.info("probing knowledge quality of %s on %d images", teacher, scale.quality_subset)
            probe["quality_s"][teacher] = probe_quality(scale, teacher, train)
    lv_teacher = PAIRS[scale.lv_pair].teacher
    lv_model = common.create(lv_teacher, scale.teacher_widths[lv_teacher], train)
    probe["lv_layers"] = len(layer_validity.candidate_layers(lv_model))
    probe["estimate"] = estimates(scale, probe, (train, val, test), methods, workers)
    probe["finished"] = common.now()
    probe["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    common.write_json(results / "probe.json", probe)
    print(format_probe(probe))
    return 0


# settings the probe's per-image times depend on; a change in any of them needs a new probe
TIMED_SETTINGS = ("data", "teacher_widths", "student_widths", "batch_size", "data_options")


def re_estimate(scale: Scale, methods: list[str], workers: int, results: Path, argv: list[str]) -> int:
    """Rewrite probe.json's suite estimate for the current settings (budgets, seeds, regimes, layer
    validity) from the per-image times it holds; times nothing."""
    path = results / "probe.json"
    if not path.is_file():
        print(f"accuracy.py: error: no {path}: run --probe first", file=sys.stderr)
        return 2
    try:
        probe = common.read_json(path)
    except ValueError as err:
        print(f"accuracy.py: error: {err}", file=sys.stderr)
        return 2
    current = scale.to_dict()
    changed = [k for k in TIMED_SETTINGS if probe["scale"].get(k) != current[k]]
    if changed:
        print(f"accuracy.py: error: {path} timed other {', '.join(changed)}; its per-image times do not apply: "
              "run --probe again", file=sys.stderr)
        return 2
    untimed = sorted({common.row_method(m) for m in methods} - set.intersection(*map(set, probe["pairs"].values())))
    if untimed:
        print(f"accuracy.py: error: {path} has no times for {', '.join(untimed)}: run --probe with them",
              file=sys.stderr)
        return 2
    train, val, test = common.load_regime(scale, scale.teacher_regime)
    probe["estimate"] = estimates(scale, probe, (train, val, test), methods, workers)
    probe["re_estimated"] = {"command": common.command_line(argv), "at": common.now(),
                             "git_commit": common.git_commit(), "scale": current}
    common.write_json(path, probe)
    print(format_probe(probe))
    return 0


def format_probe(probe: dict[str, Any]) -> str:
    """The probe's per-image timings (ms: wall median / wall min / CPU) and the estimates as text."""
    lines = [f"ms per training image (wall median / wall min / CPU median over {probe['steps']} steps of "
             f"{probe['batch_size']}), {probe['machine']['torch_threads']} thread(s); load average "
             f"{probe['machine']['load_average']}"]
    for pair, timings in probe["pairs"].items():
        cells = ", ".join(f"{k} {1e3 * v['median']:.2f}/{1e3 * v['min']:.2f}/{1e3 * v['cpu']:.2f}"
                          for k, v in timings.items())
        lines.append(f"{pair}: {cells}")
    for teacher, seconds in probe["quality_s"].items():
        lines.append(f"quality {teacher}: {seconds['median']:.0f} s wall, {seconds['cpu']:.0f} s CPU")
    for stat, est in probe["estimate"].items():
        parts = ", ".join(f"{k[:-7]} {v / 60:.0f} min" for k, v in est.items() if k.endswith("_wall_s"))
        lines.append(f"suite estimate from {stat} times: {est['wall_s'] / 3600:.2f} h on {est['workers']} "
                     f"worker(s) ({parts}); {est['cpu_s'] / 3600:.2f} h of one core")
        cells = ", ".join(f"{cell} {seconds / 3600:.1f} h" for cell, seconds in est.get("cells_cpu_s", {}).items())
        lines.append(f"  grid parts (one core each, {stat} times): {cells}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--pairs", help=f"comma-separated pairs or all ({', '.join(PAIRS)})")
    parser.add_argument("--regimes", help="comma-separated regimes or all (default scale: full, low)")
    parser.add_argument("--methods", help=f"comma-separated methods (comparison rows) or all "
                                          f"({', '.join(common.rows())})")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel processes (default: 2 on CPU with >= 2 cores, 1 on CUDA or quick)")
    parser.add_argument("--probe", action="store_true", help="time the steps and estimate the suite; trains nothing")
    parser.add_argument("--probe-steps", type=int, default=5, help="timed steps per measurement in --probe")
    parser.add_argument("--no-probe-quality", action="store_true", help="--probe: skip timing the quality measurement")
    parser.add_argument("--re-estimate", action="store_true",
                        help="recompute the committed probe's suite estimate for the current settings; times nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    common.setup_logging()
    try:
        scale = common.scale_from_args(args)
        pairs = common.parse_choice(args.pairs, scale.pairs, "pair")
        regimes = common.parse_choice(args.regimes, list(scale.regimes), "regime")
        methods = common.parse_choice(args.methods, common.rows(), "method")
        if args.probe_steps < 1:
            raise ValueError(f"probe-steps must be >= 1, got {args.probe_steps}")
    except ValueError as err:
        print(f"accuracy.py: error: {err}", file=sys.stderr)
        return 2
    workers, threads, work, results = common.placement(scale, args)
    script_argv = [str(Path(__file__))] + argv
    if args.re_estimate:
        return re_estimate(scale, methods, workers, results, script_argv)
    if args.probe:
        return run_probe(scale, pairs, methods, args.probe_steps, workers, threads, results, script_argv,
                         not args.no_probe_quality)
    return run_suite(scale, pairs, regimes, methods, work, results, workers, threads, script_argv)


if __name__ == "__main__":
    sys.exit(main())
