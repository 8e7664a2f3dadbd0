"""Does knowledge quality Q pick the teacher layers that distil best?

One trained teacher (resnet34 at the benchmark width, the same one accuracy.py
trains). For every generalized layer t from the first residual stage on, a
resnet9 student is distilled with featkd from t alone (mapped to the student's
deepest standard layer) for a short fixed budget, ``lv_seeds`` seeds. Per layer:
Q, S, I, E and sqrt(I*E) in both variants ("paper", "corrected") on the same
training split; the Spearman correlation of each with the student's final test
accuracy; whether the top layer by Q is within the noise of the best layer.

    python benchmarks/layer_validity.py                  # default scale (low-data regime, 8 epochs, 2 seeds)
    python benchmarks/layer_validity.py --layers 4,8,12,16
    python benchmarks/layer_validity.py --quick          # seconds, synthetic data

Resumes: each layer's runs live in ``<work>/layer_validity/gl<t>``; the results
file ``layer_validity.json`` is rewritten after every finished layer.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import common
from common import PAIRS, Job, Scale

log = logging.getLogger("benchmarks.layer_validity")

METRICS = ("Q", "S", "I", "E", "sqrtIE")
VARIANTS = ("paper", "corrected")


def candidate_layers(teacher: torch.nn.Module) -> list[int]:
    """GL indices from the first residual stage (GL 1) up to the last one before the head."""
    from featkd.layers import generalized_layers, head_index

    head = head_index(teacher) or len(generalized_layers(teacher))
    return list(range(1, head))


def student_layer(student_name: str) -> int:
    """The student's deepest standard (paper) layer."""
    from featkd.models import PAPER_STUDENT_LAYERS

    return PAPER_STUDENT_LAYERS[student_name][-1]


def layer_job(scale: Scale, layer: int, work: Path) -> dict[str, Any]:
    """Distil the student from teacher GL ``layer`` alone; returns that layer's runs and summary."""
    from featkd.api import distill
    from featkd.config import DistillConfig

    pair = PAIRS[scale.lv_pair]
    train, _, test = common.load_regime(scale, scale.lv_regime)
    teacher = common.load_teacher(scale, pair.teacher, work, train)
    feed = common.SharedTeacherFeed(teacher, train, common.resolve_device(scale.device), cache_dir=work / "cache")
    s_layer = student_layer(pair.student)
    config = DistillConfig(
        data=scale.data, data_root=scale.data_root, train_limit=scale.regimes[scale.lv_regime],
        data_options=dict(scale.data_options), epochs=scale.lv_epochs, batch_size=scale.batch_size,
        runs=scale.lv_seeds, seed=0, device=scale.device, progress=False,
        out=str(work / "layer_validity" / f"gl{layer}"),
        teacher=pair.teacher, teacher_width=scale.teacher_widths[pair.teacher],
        teacher_checkpoint=str(common.teacher_dir(work, pair.teacher, scale)),
        student=pair.student, student_width=scale.student_widths[pair.student], method="featkd",
        teacher_layers=[layer], student_layers=[s_layer], teacher_mode="cache",
    )
    start = time.perf_counter()
    try:
        result = distill(
            teacher, lambda: common.create(pair.student, scale.student_widths[pair.student], train),
            train, test, config=config, method=config.method, teacher_layers=config.teacher_layers,
            student_layers=config.student_layers, teacher_name=pair.teacher, student_name=pair.student,
            teacher_feed=feed)
    finally:
        feed.close()
    return {"layer": layer, "student_layer": s_layer, **common.run_summary(result),
            "wall_s": time.perf_counter() - start, "cache_builds": feed.build_seconds}


def quality_table(reports: dict[str, Any], layers: list[int]) -> dict[str, dict[str, list[float]]]:
    """{variant: {metric: values at ``layers``}}."""
    return {variant: {metric: [getattr(report[t], metric) for t in layers] for metric in METRICS}
            for variant, report in reports.items()}


def correlations(table: dict[str, dict[str, list[float]]], accuracy: list[float]) -> dict[str, dict[str, Any]]:
    """Spearman correlation of every metric (both variants) with the per-layer accuracy."""
    return {variant: {metric: common.spearman(values, accuracy) for metric, values in metrics.items()}
            for variant, metrics in table.items()}


def top_layer_check(layers: list[int], values: list[float], acc: list[dict[str, Any]]) -> dict[str, Any]:
    """Is the layer with the highest ``values`` within the noise of the most accurate layer?

    Noise: the combined sample std over seeds, sqrt(s_best^2 + s_top^2). Ties in
    ``values`` go to the deeper layer (as QualityReport.select does).
    """
    means = [a["mean"] for a in acc]
    top = max(range(len(layers)), key=lambda i: (-math.inf if math.isnan(values[i]) else values[i], layers[i]))
    best = max(range(len(layers)), key=lambda i: means[i])
    gap = 100.0 * (means[best] - means[top])
    stds = [acc[i]["std"] for i in (best, top)]
    noise = 100.0 * math.sqrt(sum(s * s for s in stds)) if all(s is not None for s in stds) else None
    order = sorted(range(len(layers)), key=lambda i: -means[i])
    return {"top_layer": layers[top], "best_layer": layers[best], "gap_points": gap, "noise_points": noise,
            "within_noise": None if noise is None else gap <= noise,
            "top_layer_accuracy_rank": order.index(top) + 1, "layers": len(layers)}


def assemble(head: dict[str, Any], reports: dict[str, Any], entries: dict[int, Any],
             layers: list[int]) -> dict[str, Any]:
    """The results file's data from the finished layers (a partial file lists the missing ones)."""
    done = [t for t in layers if t in entries]
    missing = [t for t in layers if t not in entries]
    data: dict[str, Any] = {**head, "complete": not missing, "missing_layers": missing, "updated": common.now(),
                            "finished": common.now() if not missing else None,
                            "layers": {str(t): entries[t] for t in done},
                            "quality": {variant: {str(t): {m: getattr(report[t], m) for m in METRICS}
                                                  for t in layers} for variant, report in reports.items()},
                            "quality_selected": {variant: report.select(4) for variant, report in reports.items()}}
    if len(done) >= 3:
        final = [entries[t]["final_test_acc"]["mean"] for t in done]
        table = quality_table(reports, done)
        data["spearman_final"] = correlations(table, final)
        data["spearman_best"] = correlations(table, [entries[t]["test_acc_at_best_val"]["mean"] for t in done])
        acc = [entries[t]["final_test_acc"] for t in done]
        data["top_layer"] = {variant: {m: top_layer_check(done, table[variant][m], acc) for m in METRICS}
                             for variant in reports}
    return data


def run(scale: Scale, layers: list[int] | None, work: Path, results: Path, workers: int, threads: int,
        argv: list[str]) -> int:
    """Teacher, quality in both variants, one job per layer; writes layer_validity.json."""
    pair = PAIRS[scale.lv_pair]
    record = common.run_record(argv, threads, workers)
    common.train_teacher_cli(scale, pair.teacher, work, threads)
    train = common.load_regime(scale, scale.lv_regime).train
    teacher = common.load_teacher(scale, pair.teacher, work, train)
    candidates = candidate_layers(teacher)
    layers = layers or candidates
    bad = [t for t in layers if t not in candidates]
    if bad:
        print(f"layer_validity.py: error: layers {bad} are not candidates; valid: {candidates}", file=sys.stderr)
        return 2
    torch.set_num_threads(threads if workers <= 1 else common.default_threads(1))  # alone for now: every core
    reports = {}
    quality_seconds = {}
    for variant in VARIANTS:
        reports[variant], quality_seconds[variant] = common.quality_report(
            scale, pair.teacher, scale.lv_regime, work, variant=variant, results=results)
    head = {"benchmark": "layer_validity", **record,
            "settings": {"scale": scale.name, "data": scale.data, "data_options": scale.data_options,
                         "pair": pair.name, "regime": scale.lv_regime,
                         "train_images": scale.regimes[scale.lv_regime], "teacher_width": scale.teacher_widths[pair.teacher],
                         "student_width": scale.student_widths[pair.student], "epochs": scale.lv_epochs,
                         "seeds": scale.lv_seeds, "batch_size": scale.batch_size, "method": "featkd",
                         "student_layer": student_layer(pair.student), "quality_subset": scale.quality_subset},
            "teacher": common.teacher_summary(scale, pair.teacher, work), "candidate_layers": layers,
            "quality_seconds": quality_seconds}
    path = results / "layer_validity.json"
    entries: dict[int, Any] = {}
    common.write_json(path, assemble(head, reports, entries, layers))

    def on_done(name: str, outcome: Any) -> None:
        if isinstance(outcome, dict):
            entries[outcome["layer"]] = outcome
            common.write_json(path, assemble(head, reports, entries, layers))

    jobs = [Job(f"layer {t}", layer_job, (scale, t, work)) for t in layers]
    outcomes = common.run_jobs(jobs, workers, threads, on_done)
    data = assemble(head, reports, entries, layers)
    common.write_json(path, data)
    print(format_summary(data))
    failed = [n for n, v in outcomes.items() if isinstance(v, Exception)]
    for name in failed:
        print(f"FAILED {name}: {outcomes[name]}", file=sys.stderr)
    return 1 if failed or not data["complete"] else 0


def format_summary(data: dict[str, Any]) -> str:
    """Per-layer accuracy and the Spearman correlations as text."""
    lines = ["GL  final acc (mean ± std)   Q(paper)   Q(corrected)"]
    for t, entry in data["layers"].items():
        acc = entry["final_test_acc"]
        std = f" ± {100 * acc['std']:.2f}" if acc["std"] is not None else ""
        lines.append(f"{t:>2}  {100 * acc['mean']:6.2f}{std:<10}  {data['quality']['paper'][t]['Q']:9.4f}"
                     f"  {data['quality']['corrected'][t]['Q']:9.4f}")
    for variant, values in data.get("spearman_final", {}).items():
        cells = ", ".join(f"{m} {v:+.2f}" if v is not None else f"{m} n/a" for m, v in values.items())
        lines.append(f"Spearman with final accuracy ({variant}): {cells}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    parser.add_argument("--layers", help="comma-separated teacher GL indices (default: every candidate)")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel processes (default: 2 on CPU with >= 2 cores, 1 on CUDA or quick)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    common.setup_logging()
    try:
        scale = common.scale_from_args(args)
        layers = [int(t) for t in args.layers.split(",")] if args.layers else None
    except ValueError as err:
        print(f"layer_validity.py: error: {err}", file=sys.stderr)
        return 2
    if args.seeds is not None:
        scale.lv_seeds = args.seeds
    workers, threads, work, results = common.placement(scale, args)
    return run(scale, layers, work, results, workers, threads, [str(Path(__file__))] + argv)


if __name__ == "__main__":
    sys.exit(main())
