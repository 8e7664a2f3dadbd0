"""Training throughput and peak memory of one epoch per method, resnet34 -> resnet9, in one process.

Methods: ce, kd, fitnet, featkd with cached teacher outputs, featkd with an
online teacher (the teacher runs on every batch), and featkd cached with
``compile=True`` (``torch.compile``). Each is one epoch through the public
``featkd.api.distill`` (teacher_mode "cache" or "online"), one after another in
this process, on the same data, teacher and thread count; the compiled case
trains two epochs and reports the second, so its setup holds the compilation
and the first epoch.
Reported per method: training images per second (the trainer's own count, the
training loop only), the epoch's wall time with evaluation, the one-time setup
before the epoch (mostly the teacher cache build), peak memory and the ratio of
each to ce. An untimed warm-up epoch on a few images runs first, so one-time
costs (imports, kernel selection, allocator growth) do not land on ce.

Peak memory: on CUDA the peak allocated by torch; on CPU the growth of the
process's resident set (sampled every 5 ms) over its size when the method
started, after returning freed memory to the OS (``malloc_trim``).

    python benchmarks/throughput.py            # default scale (20,000 Fashion-MNIST images)
    python benchmarks/throughput.py --quick    # seconds, synthetic data
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

import common
from common import PAIRS, Scale

log = logging.getLogger("benchmarks.throughput")

PAIR = "resnet34-resnet9"
#: (label, method, teacher_mode, compile)
CASES = (
    ("ce", "ce", "cache", False),
    ("kd", "kd", "cache", False),
    ("fitnet", "fitnet", "cache", False),
    ("featkd (cached teacher)", "featkd", "cache", False),
    ("featkd (online teacher)", "featkd", "online", False),
    ("featkd (cached, compiled)", "featkd", "cache", True),
)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block: CUDA peak allocation, or sampled RSS growth on CPU."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_bytes = 0
        self.base_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        _release_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_bytes = torch.cuda.memory_allocated(self.device)
            return self
        self.base_bytes = self.peak_bytes = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    @property
    def growth_bytes(self) -> int:
        return max(0, self.peak_bytes - self.base_bytes)


def measure_case(scale: Scale, teacher: torch.nn.Module, train: Any, test: Any, method: str, mode: str,
                 teacher_layers: list[int] | None, compiled: bool = False) -> dict[str, Any]:
    """One epoch of ``method`` through featkd.api.distill (the second of two when compiled, the first
    paying for the compilation); its speed and peak memory."""
    from featkd.api import distill

    pair = PAIRS[PAIR]
    device = common.resolve_device(scale.device)

    def student() -> torch.nn.Module:
        return common.create(pair.student, scale.student_widths[pair.student], train)

    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = distill(teacher, student, train, test, method=method, teacher_layers=teacher_layers,
                         teacher_name=pair.teacher, student_name=pair.student, epochs=2 if compiled else 1, runs=1,
                         seed=0, batch_size=scale.batch_size, teacher_mode=mode, device=scale.device,
                         compile=compiled, progress=False)
        wall = time.perf_counter() - start
    record = result.runs[0].history[-1]
    return {
        "method": method, "teacher_mode": mode, "compiled": compiled,
        "teacher_layers": result.extra.get("teacher_layers"),
        "images_per_s": record["images_per_s"], "epoch_time_s": record["epoch_time_s"],
        "setup_s": wall - record["epoch_time_s"], "wall_s": wall, "test_acc": record["test_acc"],
        "peak_memory_mb": memory.peak_bytes / 2**20, "peak_memory_growth_mb": memory.growth_bytes / 2**20,
    }


def warm_up(scale: Scale, teacher: torch.nn.Module, train: Any, test: Any, images: int = 512) -> None:
    """One untimed fitnet epoch on a few images, so one-time costs (imports, kernels, allocator) fall outside."""
    from featkd.data import ImageDataset

    keep = torch.arange(min(images, len(train)))
    small = ImageDataset(train.images[keep], train.labels[keep], train.classes, train.mean, train.std)
    measure_case(scale, teacher, small, small, "fitnet", "cache", None)


def with_ratios(cases: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Add images/s and peak-memory-growth ratios to ce (None without a ce case)."""
    ce = cases.get("ce")
    for entry in cases.values():
        entry["speed_vs_ce"] = entry["images_per_s"] / ce["images_per_s"] if ce else None
        growth = ce["peak_memory_growth_mb"] if ce else 0
        entry["memory_vs_ce"] = entry["peak_memory_growth_mb"] / growth if growth else None
    return cases


def run(scale: Scale, work: Path, results: Path, threads: int, argv: list[str]) -> int:
    """Time every case of :data:`CASES`; writes throughput.json."""
    pair = PAIRS[PAIR]
    torch.set_num_threads(threads)
    record = common.run_record(argv, threads, 1)
    common.train_teacher_cli(scale, pair.teacher, work, threads)
    train, _, test = common.load_regime(scale, scale.tp_regime)
    teacher = common.load_teacher(scale, pair.teacher, work, train)
    report, _ = common.quality_report(scale, pair.teacher, scale.tp_regime, work)
    q_layers = report.select(4, "Q")  # the paper's rule, in the scale's variant
    warm_up(scale, teacher, train, test)
    cases: dict[str, dict[str, Any]] = {}
    data: dict[str, Any] = {}
    for label, method, mode, compiled in CASES:
        log.info("throughput: %s", label)
        cases[label] = measure_case(scale, teacher, train, test, method, mode,
                                    q_layers if method.startswith("featkd") else None, compiled)
        data = {"benchmark": "throughput", **record,
                "settings": {"scale": scale.name, "data": scale.data, "pair": PAIR, "regime": scale.tp_regime,
                             "train_images": len(train), "test_images": len(test),
                             "teacher_width": scale.teacher_widths[pair.teacher],
                             "student_width": scale.student_widths[pair.student], "batch_size": scale.batch_size,
                             "epochs": 1, "threads": threads, "q_layers": q_layers},
                "complete": len(cases) == len(CASES), "finished": common.now(),
                "cases": with_ratios(cases)}
        common.write_json(results / "throughput.json", data)
    print(format_table(data))
    return 0


def format_table(data: dict[str, Any]) -> str:
    lines = [f"{'method':<26} {'img/s':>8} {'x ce':>6} {'epoch s':>8} {'setup s':>8} {'peak MB':>8} {'+MB':>8}"]
    for label, c in data["cases"].items():
        ratio = f"{c['speed_vs_ce']:.2f}" if c["speed_vs_ce"] is not None else "n/a"
        lines.append(f"{label:<26} {c['images_per_s']:8.0f} {ratio:>6} {c['epoch_time_s']:8.1f} {c['setup_s']:8.1f} "
                     f"{c['peak_memory_mb']:8.0f} {c['peak_memory_growth_mb']:8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser)
    args = parser.parse_args(argv)
    common.setup_logging()
    try:
        scale = common.scale_from_args(args)
    except ValueError as err:
        print(f"throughput.py: error: {err}", file=sys.stderr)
        return 2
    _, threads, work, results = common.placement(scale, args, workers=1)
    return run(scale, work, results, threads, [str(Path(__file__))] + argv)


if __name__ == "__main__":
    sys.exit(main())
