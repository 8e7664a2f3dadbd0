"""Carry unfinished benchmark runs across fresh checkouts.

``benchmarks/work/`` is ignored by git, so a run interrupted when its machine
goes away would start again from epoch 0 on the next checkout. ``save`` copies
every unfinished run directory under the work root (one holding
``checkpoint.pt`` and no ``model.pt``; about 0.5 MB at the default scale) to
``benchmarks/inflight/`` at the same relative path, and drops the entries whose
run has finished since; commit that folder. ``restore`` copies the entries back
where the work root has no checkpoint or an older one; the benchmark command
then resumes them from their last epoch (a resumed run is the same as an
uninterrupted one). The checkout must be at the same path: a run's config.yaml
names its teacher by absolute path, and a run whose config differs is refused.

    python benchmarks/carry.py save       # before stopping; then commit benchmarks/inflight
    python benchmarks/carry.py restore    # on a fresh checkout, before starting the benchmark again
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from common import BENCH_DIR, WORK_ROOT
from featkd.train import CHECKPOINT_FILE, METRICS_FILE, MODEL_FILE, read_metrics

log = logging.getLogger("benchmarks.carry")

INFLIGHT_ROOT = BENCH_DIR / "inflight"


def unfinished_runs(root: Path) -> list[Path]:
    """Run directories under ``root`` (relative to it) that hold a checkpoint and no final model."""
    checkpoints = root.rglob(CHECKPOINT_FILE)
    return sorted(p.parent.relative_to(root) for p in checkpoints if not (p.parent / MODEL_FILE).exists())


def epochs_done(run_dir: Path) -> int:
    """Epochs recorded in ``run_dir``'s metrics.jsonl (0 when it has none)."""
    return len(read_metrics(run_dir)) if (run_dir / METRICS_FILE).is_file() else 0


def _copy_dir(source: Path, target: Path) -> None:
    """Replace ``target`` by a copy of ``source``, never leaving a half-copied directory behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prune(root: Path) -> None:
    """Remove empty directories under ``root``."""
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def save(work: Path = WORK_ROOT, inflight: Path = INFLIGHT_ROOT) -> dict[str, list[str]]:
    """Copy ``work``'s unfinished runs to ``inflight``; drop entries whose run finished in ``work``.

    An entry whose run is absent from ``work`` (not restored yet) is kept.
    """
    saved = []
    for rel in unfinished_runs(work) if work.is_dir() else []:
        _copy_dir(work / rel, inflight / rel)
        saved.append(str(rel))
        log.info("saved %s (%d epochs)", rel, epochs_done(work / rel))
    dropped = []
    for rel in unfinished_runs(inflight) if inflight.is_dir() else []:
        if (work / rel / MODEL_FILE).exists():
            shutil.rmtree(inflight / rel)
            dropped.append(str(rel))
            log.info("dropped %s: finished", rel)
    if inflight.is_dir():
        _prune(inflight)
    return {"saved": saved, "dropped": dropped}


def restore(work: Path = WORK_ROOT, inflight: Path = INFLIGHT_ROOT) -> dict[str, list[str]]:
    """Copy ``inflight``'s runs into ``work`` where it lacks them or holds fewer epochs of them.

    A run finished in ``work`` (it has model.pt) is left alone.
    """
    restored, kept = [], []
    for rel in unfinished_runs(inflight) if inflight.is_dir() else []:
        here = work / rel
        if (here / MODEL_FILE).exists() or ((here / CHECKPOINT_FILE).exists()
                                       and epochs_done(here) >= epochs_done(inflight / rel)):
            kept.append(str(rel))
            continue
        _copy_dir(inflight / rel, here)
        restored.append(str(rel))
        log.info("restored %s (%d epochs)", rel, epochs_done(here))
    return {"restored": restored, "kept": kept}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["save", "restore"])
    parser.add_argument("--work", type=Path, default=WORK_ROOT, help="work root (default benchmarks/work)")
    parser.add_argument("--inflight", type=Path, default=INFLIGHT_ROOT,
                        help="where the unfinished runs are kept (default benchmarks/inflight)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.action == "save":
        outcome = save(args.work, args.inflight)
        log.info("%d unfinished run(s) saved to %s, %d finished dropped",
                 len(outcome["saved"]), args.inflight, len(outcome["dropped"]))
    else:
        outcome = restore(args.work, args.inflight)
        log.info("%d run(s) restored into %s, %d left as they were",
                 len(outcome["restored"]), args.work, len(outcome["kept"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
