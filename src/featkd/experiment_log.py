"""Experiment logs besides metrics.jsonl, as trainer callbacks: ``log: tensorboard``.

The trainer calls each callback with every epoch's record (the line it writes
to metrics.jsonl); a logger writes each field of it, so the loop knows nothing
about loggers. TensorBoard events (``torch.utils.tensorboard``; the optional
extra ``pip install 'featkd[tensorboard]'``) go to ``<run dir>/tensorboard``,
one scalar per field with the epoch as step: ``tensorboard --logdir OUT``.
A resumed run first writes the epochs of its metrics.jsonl that TensorBoard
lacks (those of a call without the log, or cut off by a kill).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["LOGS", "TensorBoardLog", "experiment_logs"]

LOGS = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Callback writing every field of each epoch record to TensorBoard, one writer per run.

    ``run_dir(seed)`` gives the run directory of the run with that seed.
    """

    def __init__(self, run_dir: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("log=tensorboard needs the tensorboard package: "
                             "pip install 'featkd[tensorboard]'") from None
        self._writer_class = SummaryWriter
        self._run_dir = run_dir
        self._writers: dict[int, Any] = {}

    def __call__(self, record: dict[str, Any]) -> None:
        seed = int(record["seed"])
        writer = self._writers.get(seed)
        if writer is None:
            writer = self._writers[seed] = self._open(Path(self._run_dir(seed)), int(record["epoch"]))
        _write(writer, record)
        writer.flush()

    def _open(self, run_dir: Path, epoch: int) -> Any:
        """A writer for ``run_dir``, after the earlier epochs of metrics.jsonl it lacks."""
        from featkd.train import METRICS_FILE, read_metrics

        logged = _logged_epochs(run_dir / TENSORBOARD_DIR)
        writer = self._writer_class(str(run_dir / TENSORBOARD_DIR))
        if (run_dir / METRICS_FILE).is_file():
            for earlier in read_metrics(run_dir):
                if earlier["epoch"] < epoch and earlier["epoch"] not in logged:
                    _write(writer, earlier)
        return writer

    def close(self) -> None:
        """Close every writer."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _write(writer: Any, record: dict[str, Any]) -> None:
    step = int(record["epoch"])
    for key, value in record.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            writer.add_scalar(key, float(value), step)
        else:
            writer.add_text(key, str(value), step)


def _logged_epochs(folder: Path) -> set[int]:
    """The epochs TensorBoard already holds in ``folder``."""
    if not folder.is_dir():
        return set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {e.step for e in events.Scalars("epoch")} if "epoch" in events.Tags()["scalars"] else set()


@contextlib.contextmanager
def experiment_logs(config: Any, is_main: bool) -> Iterator[list[TensorBoardLog]]:
    """The loggers ``config.log`` asks for (on the main process only), closed on exit."""
    from featkd.train import run_directory

    loggers = []
    if config.log == "tensorboard" and is_main:
        out = Path(config.out)
        loggers.append(TensorBoardLog(lambda seed: run_directory(out, seed, config.runs)))
    try:
        yield loggers
    finally:
        for logger in loggers:
            logger.close()
