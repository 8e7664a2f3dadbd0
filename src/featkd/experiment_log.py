"""Experiment logs besides metrics.jsonl, as trainer callbacks: ``log: tensorboard``.

The trainer calls each callback with every epoch's record (the line it writes
to metrics.jsonl); a logger writes each field of it, so the loop knows nothing
about loggers. TensorBoard events (``torch.utils.tensorboard``; the optional
extra ``pip install 'featkd[tensorboard]'``) go to ``<run dir>/tensorboard``,
one scalar per field with the epoch as step: ``tensorboard --logdir OUT``.
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
            writer = self._writer_class(str(Path(self._run_dir(seed)) / TENSORBOARD_DIR))
            self._writers[seed] = writer
        step = int(record["epoch"])
        for key, value in record.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                writer.add_scalar(key, float(value), step)
            else:
                writer.add_text(key, str(value), step)
        writer.flush()

    def close(self) -> None:
        """Close every writer."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


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
