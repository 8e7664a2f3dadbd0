"""The method-agnostic training loop: optimizer, schedule, evaluation, checkpoints, DDP.

The trainer drives any module whose ``forward(x, labels, teacher)`` returns
``(logits, {name: loss})`` (``featkd.distillation.DistillModel``, or
:class:`ClassifierModel` for plain cross-entropy training); it sums the named
losses and never branches on the method.

Checkpoints hold tensors only: model, optimizer and RNG state are tensors, and
the small non-tensor state (schedule, optimizer hyper-parameters, history) is a
JSON text stored as a uint8 tensor in the same file, so one atomic
``featkd.checkpoint.save_tensors`` call writes everything and
``torch.load(weights_only=True)`` reads it back without unpickling objects.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.checkpoint import CheckpointError, load_tensors, save_tensors
from featkd.config import RunConfig

try:
    import fcntl
except ImportError:  # Windows: run directories are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "ClassifierModel",
    "DistContext",
    "RunResult",
    "TrainResult",
    "Trainer",
    "autocast_context",
    "build_optimizer",
    "build_scheduler",
    "channels_last_format",
    "default_lr",
    "evaluate",
    "finish_distributed",
    "init_distributed",
    "is_main_process",
    "pack_state",
    "read_metrics",
    "show_progress",
    "summarize",
    "train_runs",
    "unpack_state",
]

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
TIMING_FIELDS = ("epoch_time_s", "images_per_s")
_FORMAT_VERSION = 1
_SGD_LR = {"resnet": 0.05, "mobilenet": 0.05, "vgg": 0.01, "vit": 0.01, "external": 0.01}

TeacherFeed = Callable[[Tensor, Tensor], Any]  # (x, sample indices) -> TeacherOutputs | None
Callback = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------- models
class ClassifierModel(nn.Module):
    """A classifier with the trainer's interface: ``forward(x, labels, teacher) -> (logits, {"ce": loss})``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, labels: Tensor | None = None, teacher: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.model(x)
        losses = {} if labels is None else {"ce": F.cross_entropy(logits.float(), labels)}
        return logits, losses


# --------------------------------------------------------------------------- devices
@dataclass
class DistContext:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(spec: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; ValueError for a
    device that does not exist here."""
    if isinstance(spec, torch.device):
        return spec
    if spec in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} asked for but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} asked for but only {torch.cuda.device_count()} CUDA device(s) exist")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device: str | torch.device | None = "auto") -> DistContext:
    """Join the process group when started by ``torchrun`` (WORLD_SIZE > 1); else one process.

    The backend is nccl on CUDA and gloo on CPU. An existing process group is reused.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        return DistContext(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, resolved)


def is_main_process() -> bool:
    """True outside DDP and on rank 0."""
    return not dist.is_initialized() or dist.get_rank() == 0


def finish_distributed(wait_for_peers: bool = False) -> None:
    """Leave the process group, if one was joined.

    Garbage the run left is collected first, while the group and the interpreter
    are alive: freed during interpreter shutdown, objects that hold gloo work can
    abort the process after a finished run. ``wait_for_peers`` (when every process
    finished its work) makes each wait for the others, so that none closes its
    connections while a peer still uses them; after a failure on one process the
    others may never arrive, so the default does not wait.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()


def autocast_context(device: torch.device, amp: str = "auto") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``amp`` auto or bf16), on CPU only when ``amp="bf16"``."""
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if amp not in ("auto", "none"):
        raise ValueError(f"amp must be auto, bf16 or none; got {amp!r}")
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- optimisation
def default_lr(model_name: str | None, optimizer: str) -> float:
    """The recipe's learning rate: one-cycle peak (adamw) or SGD initial lr, by model family."""
    from featkd.models import model_family, peak_lr

    if model_name is None:
        raise ValueError("lr is not set and the model is not a zoo model: pass lr=...")
    if optimizer == "adamw":
        return peak_lr(model_name)
    return _SGD_LR[model_family(model_name)]


def build_optimizer(params: Iterable[nn.Parameter], config: RunConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW (weight decay 0.01) or SGD (momentum 0.9, weight decay 5e-4), per ``config.optimizer``."""
    params = list(params)
    if config.optimizer == "adamw":
        wd = 0.01 if config.weight_decay is None else config.weight_decay
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if config.optimizer == "sgd":
        wd = 5e-4 if config.weight_decay is None else config.weight_decay
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    raise ValueError(f"optimizer must be adamw or sgd; got {config.optimizer!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: RunConfig, lr: float, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A schedule stepped once per batch: one-cycle (adamw) or multi-step at epoch milestones (sgd)."""
    if config.optimizer == "adamw":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=lr,
            total_steps=config.epochs * steps_per_epoch,
            pct_start=config.pct_start,
            anneal_strategy="cos",
        )
    milestones = [m * steps_per_epoch for m in config.milestones]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=config.lr_gamma)


# --------------------------------------------------------------------------- state packing
def pack_state(obj: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """Split nested state into JSON-able data and ``tensors`` (stored under ``prefix``-derived keys)."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, collections.Counter):
        return {"__counter__": [[k, v] for k, v in obj.items()]}
    if isinstance(obj, dict):
        return {"__dict__": [[k, pack_state(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a tensor-only checkpoint")


def unpack_state(data: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__counter__" in data:
            return collections.Counter({_key(k): v for k, v in data["__counter__"]})
        if "__dict__" in data:
            return {_key(k): unpack_state(v, tensors) for k, v in data["__dict__"]}
        if "__tuple__" in data:
            return tuple(unpack_state(v, tensors) for v in data["__tuple__"])
    if isinstance(data, list):
        return [unpack_state(v, tensors) for v in data]
    return data


def _key(k: Any) -> Any:
    return k if not isinstance(k, list) else tuple(k)


def _text_tensor(text: str) -> Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def _tensor_text(t: Tensor) -> str:
    return t.numpy().tobytes().decode()


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    state = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng.cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(tensors: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: list[dict[str, Any]],
    seed: int,
    device: torch.device,
    world_size: int = 1,
) -> None:
    """Write the training state after ``len(history)`` epochs, atomically, tensors only.

    It records where it ran (device type, number of processes): both change the results, and
    neither is a config field, so :func:`load_checkpoint` refuses to resume elsewhere.
    """
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    tensors.update(_rng_state(device))
    meta = {
        "format": _FORMAT_VERSION,
        "epoch": len(history),
        "seed": seed,
        "runtime": _runtime(device, world_size),
        "optimizer": pack_state(optimizer.state_dict(), tensors, "optim"),
        "scheduler": pack_state(scheduler.state_dict(), tensors, "sched"),
        "history": history,
    }
    tensors["meta"] = _text_tensor(json.dumps(meta))
    save_tensors(path, tensors)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    world_size: int = 1,
) -> list[dict[str, Any]]:
    """Restore state written by :func:`save_checkpoint`; returns the epoch history.

    :class:`featkd.checkpoint.CheckpointError` (one line naming the file) for a file that is
    not a featkd training checkpoint or does not fit the model, and ValueError for one written
    on another device type or number of processes (resuming there would change the results).
    """
    tensors = load_tensors(path)
    try:
        meta = json.loads(_tensor_text(tensors["meta"]))
        if not isinstance(meta, dict):
            raise TypeError("its metadata is not a mapping")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise CheckpointError(f"checkpoint {path} is not a featkd training checkpoint ({_first_line(err)}); "
                              "move it away to restart this run") from None
    if meta.get("format") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    saved, here = meta.get("runtime"), _runtime(device, world_size)
    if saved is not None and saved != here:
        raise ValueError(f"{path} was written on {_describe(saved)}, this command runs on {_describe(here)}: "
                         "resuming would change the results; resume it where it started, or choose a new --out")
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer.load_state_dict(unpack_state(meta["optimizer"], tensors))
        scheduler.load_state_dict(unpack_state(meta["scheduler"], tensors))
        _set_rng_state(tensors, device)
        history = meta["history"]
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this run ({_first_line(err)}); "
                              "move it away to restart this run") from None
    if not isinstance(history, list) or len(history) != meta.get("epoch"):
        raise CheckpointError(f"checkpoint {path} is damaged (its epoch history does not match its epoch count); "
                              "move it away to restart this run")
    return history


def _runtime(device: torch.device, world_size: int) -> dict[str, Any]:
    return {"device": device.type, "world_size": int(world_size)}


def _describe(runtime: dict[str, Any]) -> str:
    n = runtime.get("world_size")
    return f"{runtime.get('device')} with {n} process{'' if n == 1 else 'es'}"


def _first_line(err: BaseException) -> str:
    """``Type: first informative line`` of ``err`` (a heading such as torch's "Error(s) in loading
    state_dict for X:" is skipped for the line that names the keys), at most 160 characters."""
    text = str(err).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip() and not line.strip().endswith(":")),
                 text.splitlines()[0] if text else "")
    first = first if len(first) <= 160 else first[:157] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


# --------------------------------------------------------------------------- files
def _write_atomic(path: Path, content: str | bytes) -> None:
    """Write through a synced temporary file and a rename: after a crash or power loss ``path``
    holds the old content or the new, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    _write_atomic(path, json.dumps(data, indent=2) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The epoch records of a ``metrics.jsonl`` file (or of a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- results
@dataclass
class RunResult:
    """One training run (one seed).

    The headline is the final epoch's test accuracy. With a validation split, the best epoch is
    the one with the highest validation accuracy (the earliest on ties) and
    ``test_acc_at_best_val`` its test accuracy; the test split never picks anything.
    """

    seed: int
    history: list[dict[str, Any]]
    finished: bool
    model: nn.Module | None = None
    run_dir: Path | None = None

    @property
    def final_test_acc(self) -> float:
        return self.history[-1].get("test_acc", float("nan")) if self.history else float("nan")

    @property
    def final_val_acc(self) -> float | None:
        return self.history[-1].get("val_acc") if self.history else None

    @property
    def best_val_epoch(self) -> int | None:
        """1-based epoch of the highest validation accuracy among the evaluated epochs (the earliest
        on ties); None without a validation split."""
        evaluated = [(r["val_acc"], -r["epoch"]) for r in self.history if r.get("val_acc") is not None]
        return -max(evaluated)[1] if evaluated else None

    @property
    def best_val_acc(self) -> float | None:
        epoch = self.best_val_epoch
        return None if epoch is None else self.history[epoch - 1]["val_acc"]

    @property
    def test_acc_at_best_val(self) -> float | None:
        epoch = self.best_val_epoch
        return None if epoch is None else self.history[epoch - 1]["test_acc"]

    def to_dict(self) -> dict[str, Any]:
        """Summary numbers (no history, no model)."""
        times = [r["epoch_time_s"] for r in self.history]
        return {
            "seed": self.seed,
            "epochs": len(self.history),
            "finished": self.finished,
            "final_test_acc": self.final_test_acc,
            "final_val_acc": self.final_val_acc,
            "best_val_epoch": self.best_val_epoch,
            "best_val_acc": self.best_val_acc,
            "test_acc_at_best_val": self.test_acc_at_best_val,
            "train_time_s": sum(times),
            "images_per_s": _mean([r["images_per_s"] for r in self.history]),
        }


@dataclass
class TrainResult:
    """All runs of one configuration, with mean and spread over runs."""

    runs: list[RunResult]
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.runs)

    @property
    def model(self) -> nn.Module | None:
        """The trained model of the first run."""
        return self.runs[0].model if self.runs else None

    def summary(self) -> dict[str, Any]:
        """Mean, std (sample std, ddof=1; None for one value) and n over runs of the final test and
        validation accuracy, the test accuracy at the best-validation epoch and the training time
        (runs without a value, e.g. without a validation split, are left out)."""
        return {
            "final_test_acc": summarize([r.final_test_acc for r in self.runs]),
            "final_val_acc": summarize([r.final_val_acc for r in self.runs]),
            "test_acc_at_best_val": summarize([r.test_acc_at_best_val for r in self.runs]),
            "train_time_s": summarize([r.to_dict()["train_time_s"] for r in self.runs]),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), **self.extra, "runs": [r.to_dict() for r in self.runs]}


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; None when there is one value) of the values
    that are not None (mean None when there are none)."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "std_ddof": None, "n": 0}
    mean = _mean(values)
    std = None if n < 2 else math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "std": std, "std_ddof": 1 if n > 1 else None, "n": n}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --------------------------------------------------------------------------- the loop
def channels_last_format(model: nn.Module, enabled: bool = True, warn: bool = False) -> torch.memory_format:
    """``torch.channels_last`` when ``enabled`` and ``model`` has a 2-d convolution, else contiguous.

    Contiguous for a model with a strided 1x1 convolution of fewer than 8 input channels per
    group: oneDNN's AVX2 kernel for its weight gradient in channels-last writes past its
    workspace (oneDNN issue 6035), giving wrong gradients or a crash. ``warn``: say so (once per
    process), for a model about to train; a model that only predicts (a frozen teacher, a
    finished run) gets the same format as its training had, quietly.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not enabled or not convs:
        return torch.contiguous_format
    if unsafe := [c for c in convs if _hits_onednn_1x1_bug(c)]:
        if warn and (reason := repr(unsafe[0])) not in _CHANNELS_LAST_WARNED:  # once per process, not per run
            _CHANNELS_LAST_WARNED.add(reason)
            log.warning("channels_last off: %d strided 1x1 convolution(s) with fewer than 8 input channels "
                        "(e.g. %s); oneDNN computes their weight gradient wrongly in channels-last on AVX2 "
                        "CPUs", len(unsafe), reason)
        return torch.contiguous_format
    return torch.channels_last


_CHANNELS_LAST_WARNED: set[str] = set()


def _hits_onednn_1x1_bug(conv: nn.Conv2d) -> bool:
    return (tuple(conv.kernel_size) == (1, 1) and any(s > 1 for s in conv.stride)
            and conv.in_channels // conv.groups < 8)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, amp: str = "auto",
             memory_format: torch.memory_format = torch.contiguous_format) -> float:
    """Top-1 accuracy of ``model(x) -> (logits, _)`` over ``loader`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    try:
        for x, y, _ in loader:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with autocast_context(device, amp):
                logits, _ = model(x)
            correct += (logits.argmax(1) == y).sum()
            total += y.numel()
    finally:
        model.train(was_training)
    return int(correct) / max(total, 1)


def show_progress(enabled: bool) -> bool:
    """Whether to draw progress bars: asked for, and stderr is a terminal (not a log file)."""
    return enabled and sys.stderr.isatty()


class Trainer:
    """Trains one model for one seed; resumes from ``run_dir/checkpoint.pt`` when present.

    ``callbacks`` are called with each epoch's record after its checkpoint is written
    (an exception there stops training; rerunning resumes). ``config.stop_after_epochs``
    bounds the epochs trained by this trainer over all its ``fit`` calls (one command).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        context: DistContext | None = None,
        lr: float | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.config = config
        self.context = context or DistContext(device=resolve_device(config.device))
        self.lr = lr if lr is not None else config.lr
        if self.lr is None:
            raise ValueError("Trainer needs a learning rate (config.lr or lr=...)")
        self.callbacks = list(callbacks)
        self.epochs_left = config.stop_after_epochs  # None: no limit

    @property
    def device(self) -> torch.device:
        return self.context.device

    def memory_format(self, model: nn.Module) -> torch.memory_format:
        """channels_last for models with 2-d convolutions when the config asks for it."""
        return channels_last_format(model, self.config.channels_last, warn=True)

    def fit(
        self,
        model: nn.Module,
        train_set: Any,
        test_set: Any,
        *,
        seed: int,
        run_dir: str | Path | None = None,
        export: nn.Module | None = None,
        teacher: TeacherFeed | None = None,
        val_set: Any = None,
    ) -> RunResult:
        """Train ``model`` (forward(x, labels, teacher) -> (logits, losses)) and return the run.

        ``export`` is the module whose weights go to ``model.pt`` (default ``model``);
        ``teacher(x, idx)`` gives the teacher outputs passed to ``model``; ``val_set``, when
        given, is evaluated every epoch (``val_acc``) and picks the best epoch.
        """
        cfg, ctx = self.config, self.context
        for split, dataset in (("test", test_set), ("validation", val_set)):
            if dataset is not None and len(dataset) == 0:  # its accuracy would read 0, not "none"
                raise ValueError(f"the {split} set is empty")
        run_dir = Path(run_dir) if run_dir is not None else None
        torch.manual_seed(seed)
        model.to(self.device, memory_format=self.memory_format(model))
        loader = self._train_loader(train_set, seed, _requires_full_batches(model), _has_batch_norm(model))
        eval_loaders = {"test": _loader(_unaugmented(test_set), cfg.eval_batch_size, shuffle=False)}
        if val_set is not None:
            eval_loaders["val"] = _loader(_unaugmented(val_set), cfg.eval_batch_size, shuffle=False)
        optimizer = build_optimizer((p for p in model.parameters() if p.requires_grad), cfg, self.lr)
        scheduler = build_scheduler(optimizer, cfg, self.lr, len(loader))
        history = self._restore(run_dir, model, optimizer, scheduler, seed)
        train_model = model
        last = cfg.epochs if self.epochs_left is None else min(cfg.epochs, len(history) + self.epochs_left)
        if len(history) < last:
            if hasattr(teacher, "prepare"):  # e.g. build a teacher cache outside the timed epochs
                with torch.no_grad(), autocast_context(self.device, cfg.amp):
                    teacher.prepare()
            train_model = self._wrap(model, loader, teacher)
        for epoch in range(len(history), last):
            record = self._epoch(train_model, model, loader, eval_loaders, optimizer, scheduler, teacher, epoch, seed)
            history.append(record)
            if self.epochs_left is not None:
                self.epochs_left -= 1
            if ctx.is_main and run_dir is not None:
                save_checkpoint(run_dir / CHECKPOINT_FILE, model, optimizer, scheduler, history, seed, self.device,
                                ctx.world_size)
                with open(run_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(record) + "\n")
            for callback in self.callbacks:
                callback(record)
        export = export or model
        result = RunResult(seed, history, len(history) == cfg.epochs, export, run_dir)
        if result.finished and ctx.is_main and run_dir is not None:
            save_tensors(run_dir / MODEL_FILE, {k: v.detach().cpu() for k, v in export.state_dict().items()})
        return result

    def _restore(
        self,
        run_dir: Path | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        seed: int,
    ) -> list[dict[str, Any]]:
        """The epoch history of ``run_dir/checkpoint.pt`` with its state loaded; [] when there is none.

        metrics.jsonl is rewritten from the checkpoint, dropping lines of epochs it lacks; the
        temporary file of a checkpoint write that a killed process left is deleted.
        """
        checkpoint = run_dir / CHECKPOINT_FILE if run_dir is not None else None
        if checkpoint is not None and self.context.is_main:
            for partial in run_dir.glob(f".{CHECKPOINT_FILE}.*.tmp"):  # a write cut short by SIGKILL
                partial.unlink()
        if checkpoint is None or not checkpoint.is_file():
            return []
        history = load_checkpoint(checkpoint, model, optimizer, scheduler, self.device, self.context.world_size)
        if len(history) > self.config.epochs:
            raise ValueError(f"{checkpoint} holds {len(history)} epochs but epochs={self.config.epochs}")
        if self.context.is_main:
            log.info("seed %d: resuming from %s after epoch %d", seed, checkpoint, len(history))
            _write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
        return history

    # -- pieces of fit ---------------------------------------------------------
    def _train_loader(self, train_set: Any, seed: int, drop_last: bool, batch_norm: bool) -> Any:
        """The training batches; with ``batch_norm``, a last batch of one image is dropped (its
        BatchNorm statistics would be undefined, an error where the maps are 1x1)."""
        ctx, cfg = self.context, self.config
        per_rank = cfg.batch_size // ctx.world_size
        if per_rank < 1 or cfg.batch_size % ctx.world_size:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {ctx.world_size} processes")

        def batches(drop: bool) -> Any:
            return _loader(train_set, per_rank, shuffle=True, seed=seed, rank=ctx.rank,
                           world_size=ctx.world_size, drop_last=drop)

        loader = batches(drop_last)
        if batch_norm and not drop_last and len(loader) > 1 and loader.last_batch_size == 1:
            if ctx.is_main:
                log.info("each epoch's last training batch would hold 1 image, which BatchNorm cannot "
                         "normalise: it is dropped")
            loader = batches(True)
        if len(loader) == 0:
            raise ValueError(f"the training set ({len(train_set)} samples) is smaller than one batch of {per_rank}")
        return loader

    def _wrap(self, model: nn.Module, loader: Any, teacher: TeacherFeed | None) -> nn.Module:
        if self.config.compile:
            # Dynamo does not guard on module hooks, and each method taps other layers: code compiled
            # for an earlier run in this process (e.g. ce, no hooks) would be reused and skip the taps
            torch.compiler.reset()
            model = torch.compile(model)
        if not self.context.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        unused = _unused_parameters(model, loader, teacher, self.device, self.config.amp)
        if unused and self.context.is_main:
            log.info("DDP: %d parameter tensors get no gradient (e.g. %s): find_unused_parameters on",
                     len(unused), unused[0])
        return DistributedDataParallel(model, find_unused_parameters=bool(unused))

    def _epoch(
        self,
        train_model: nn.Module,
        model: nn.Module,
        loader: Any,
        eval_loaders: dict[str, Any],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        teacher: TeacherFeed | None,
        epoch: int,
        seed: int,
    ) -> dict[str, Any]:
        cfg, ctx, device = self.config, self.context, self.device
        loader.set_epoch(epoch)
        model.train()
        sums: dict[str, Tensor] = {}
        correct = torch.zeros((), device=device)
        seen = torch.zeros((), device=device)
        start = time.perf_counter()
        batches = _progress(loader, show_progress(cfg.progress) and ctx.is_main,
                            f"seed {seed} epoch {epoch + 1}/{cfg.epochs}")
        memory_format = self.memory_format(model)
        for step, (x, y, idx) in enumerate(batches, start=epoch * len(loader) + 1):
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with autocast_context(device, cfg.amp):
                with torch.no_grad():
                    targets = teacher(x, idx) if teacher is not None else None
                logits, losses = train_model(x, y, targets)
            total = _check_finite(losses, step, epoch, seed, ctx.distributed)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0) + value.detach().float() * y.numel()
            correct += (logits.detach().argmax(1) == y).sum()
            seen += y.numel()
        train_time = time.perf_counter() - start
        names = sorted(sums)
        stats = torch.stack([*(sums[n] for n in names), correct.float(), seen.float()])
        if ctx.distributed:
            dist.all_reduce(stats)
        count = float(stats[-1])
        evaluated = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
        accuracy = {f"{split}_acc": evaluate(model, split_loader, device, cfg.amp, memory_format)
                    for split, split_loader in eval_loaders.items() if evaluated}
        record: dict[str, Any] = {"seed": seed, "epoch": epoch + 1}
        record.update({f"loss_{n}": float(stats[i]) / count for i, n in enumerate(names)})
        record["loss"] = sum(float(stats[i]) for i in range(len(names))) / count
        record.update(
            train_acc=float(stats[-2]) / count,
            **accuracy,
            lr=optimizer.param_groups[0]["lr"],
            images_per_s=count / train_time,
            epoch_time_s=time.perf_counter() - start,
        )
        val = f" val acc {record['val_acc']:.4f}" if "val_acc" in record else ""
        test = f" test acc {record['test_acc']:.4f}" if "test_acc" in record else ""
        (log.info if ctx.is_main else log.debug)(
            "seed %d epoch %d/%d: loss %.4f train acc %.4f%s%s lr %.2e (%.0f img/s, %.1f s)",
            seed, epoch + 1, cfg.epochs, record["loss"], record["train_acc"], val, test,
            record["lr"], record["images_per_s"], record["epoch_time_s"],
        )
        return record


def _loader(dataset: Any, batch_size: int, **kw: Any) -> Any:
    from featkd.data import BatchLoader

    return BatchLoader(dataset, batch_size, **kw)


def _progress(iterable: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=len(iterable), desc=desc, leave=False, dynamic_ncols=True)


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _unaugmented(dataset: Any) -> Any:
    """``dataset`` with its augmentation off (evaluation never augments), where it has the switch."""
    return dataset.with_augment(False) if hasattr(dataset, "with_augment") else dataset


def _requires_full_batches(model: nn.Module) -> bool:
    """True when a submodule (e.g. a method whose layers depend on B) declares it."""
    return any(getattr(m, "requires_full_batches", False) for m in model.modules())


def _check_finite(losses: dict[str, Tensor], step: int, epoch: int, seed: int, distributed: bool = False) -> Tensor:
    """The sum of the losses; FloatingPointError naming the first NaN/Inf loss.

    Under DDP the flags are all-reduced first, so that every process stops at the
    same step with the same message (none is left waiting in a collective).
    """
    if not losses:
        raise ValueError("the model returned no losses in training mode")
    values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
    nan, inf = torch.isnan(values), torch.isinf(values)
    flags = torch.cat([nan, inf, (nan | inf).any().reshape(1)]).float()
    if distributed:
        dist.all_reduce(flags)  # counts over processes
    if flags[-1] > 0:
        n = len(losses)
        first = int((flags[:n] + flags[n:2 * n]).nonzero()[0])
        kind = "nan" if flags[first] > 0 else "inf"
        where = f" on {int(flags[-1])} of {dist.get_world_size()} processes" if distributed else ""
        raise FloatingPointError(
            f"loss {list(losses)[first]!r} is {kind}{where} at step {step} (epoch {epoch + 1}, seed {seed}); "
            "training stopped, the last good checkpoint is kept"
        )
    return sum(losses.values())


def _unused_parameters(
    model: nn.Module, loader: Any, teacher: TeacherFeed | None, device: torch.device, amp: str
) -> list[str]:
    """Names of trainable parameters that one training step leaves without a gradient.

    Probes with the first batch; RNG state and buffers (BatchNorm statistics) are restored.
    """
    x, y, idx = next(iter(loader))
    x, y = x.to(device), y.to(device)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        with autocast_context(device, amp):
            with torch.no_grad():
                targets = teacher(x, idx) if teacher is not None else None
            _, losses = model(x, y, targets)
        sum(losses.values()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])
    return unused


# --------------------------------------------------------------------------- several runs
RunFactory = Callable[[int], tuple[nn.Module, nn.Module]]


def run_directory(out: Path | None, seed: int, runs: int) -> Path | None:
    """``out`` itself for a single run, ``out/run-<seed>`` for several."""
    if out is None:
        return None
    return out if runs == 1 else out / f"run-{seed}"


def has_started(out: Path) -> bool:
    """Whether ``out`` holds training progress: a checkpoint, final weights or results (of any run)."""
    progress = (CHECKPOINT_FILE, MODEL_FILE, RESULTS_FILE)
    return any((d / name).is_file() for d in (out, *out.glob("run-*")) for name in progress)


def check_output(out: Path, config: RunConfig) -> None:
    """Refuse (ValueError) a directory holding a started run of another configuration; writes nothing.

    A directory whose config.yaml never got a checkpoint (setup failed, or it was
    stopped before the first epoch ended) is not refused: :func:`prepare_output`
    replaces it.
    """
    existing = out / CONFIG_FILE
    if not has_started(out):
        return
    if not existing.is_file():
        raise ValueError(f"{out} holds a started run (checkpoint, weights or results) but no {CONFIG_FILE}, "
                         "so its configuration is unknown: choose a new --out")
    diffs = _differences(existing, config)
    if diffs:
        raise ValueError(
            f"{out} holds a run with a different config ({'; '.join(diffs[:3])}); "
            "rerun with the same options to resume, or choose a new --out"
        )


# Config fields a run fills in itself: compared only when both sides know them (a directory from an
# earlier featkd lacks them; a command checks its --out before it has loaded the teacher).
RECORDED_FIELDS = ("teacher_sha256",)


def _differences(existing: Path, config: RunConfig) -> list[str]:
    import yaml

    from featkd.config import apply_overrides

    old = type(config)()
    try:
        apply_overrides(old, yaml.safe_load(existing.read_text()) or {})
    except (ValueError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [f"{existing} is not a {type(config).__name__}: {first}"]
    if 1 < old.runs < config.runs:
        old.runs = config.runs  # more seeds of the same runs: the finished ones are kept, the new ones added
    for name in RECORDED_FIELDS:
        if getattr(old, name, None) is None or getattr(config, name, None) is None:
            setattr(old, name, getattr(config, name, None))  # unknown on one side: not a difference
    return config.differences(old)


# Files a run writes before its first checkpoint; cleared when an unstarted directory is reused.
UNSTARTED_FILES = (CONFIG_FILE, METRICS_FILE, RUN_FILE, "quality.json", "quality.png")


def prepare_output(out: Path, config: RunConfig, context: DistContext) -> None:
    """Claim ``out`` for ``config``: check it (:func:`check_output`) and write config.yaml.

    Call it once setup has succeeded. An unstarted directory of another
    configuration is cleared of its files and reused without asking. Teacher-cache
    folders left there by a killed process are deleted (those in use are kept).
    """
    from featkd.distillation.teacher import remove_stale_caches

    check_output(out, config)
    context.barrier()
    if context.is_main:
        existing = out / CONFIG_FILE
        if existing.is_file() and not has_started(out) and _differences(existing, config):
            log.info("%s held an unstarted run of another config: replacing it", out)
            _remove_unstarted_files(out)
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(existing, config.to_yaml())
        remove_stale_caches(out)  # a killed run's teacher cache; no cache of this run exists yet
    context.barrier()


#: what each call that trained part of a run records (its software, code, machine and execution options)
CALL_FIELDS = ("versions", "git_commit", "git_dirty", "device", "world_size", "execution")


def _with_earlier_calls(record: dict[str, Any], path: Path) -> dict[str, Any]:
    """``record`` with ``earlier_calls``: the software, code, machine and execution options of the
    calls before this one in a started directory (consecutive identical ones once), so a resumed run
    says what trained it."""
    old = json.loads(path.read_text()) if path.is_file() and has_started(path.parent) else {}
    calls = list(old.get("earlier_calls", []))
    previous = {k: old[k] for k in CALL_FIELDS if k in old}
    if previous and (not calls or calls[-1] != previous):
        calls.append(previous)
    if calls and calls[-1] == {k: record[k] for k in CALL_FIELDS if k in calls[-1]}:
        calls.pop()  # the same as this call (in what an older featkd recorded)
    return {**record, "earlier_calls": calls} if calls else record


def _drop_summary_of_fewer_runs(path: Path, runs: int) -> None:
    """Delete the summary of a directory whose runs this command extends (``--runs 2`` -> 3): it
    would describe the old set until the new runs finish and it is written again."""
    if path.is_file() and len(json.loads(path.read_text()).get("runs", [])) < runs:
        path.unlink()


def _unstarted_files(out: Path) -> list[Path]:
    return [f for d in (out, *out.glob("run-*")) for f in map(d.joinpath, UNSTARTED_FILES)]


def _remove_unstarted_files(out: Path) -> None:
    for path in _unstarted_files(out):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def output_untouched_on_error(out: Path) -> Iterator[None]:
    """When the body fails before any run of ``out`` saved progress (bad input found late: a
    training set smaller than a batch, subsets too small for the quality report), remove what it
    wrote there and the folders it created and put back the files it replaced (an earlier
    ``featkd quality --out``, a config.yaml given with ``--config``), so a failed command leaves
    ``out`` as it found it. A started directory is never touched. Call it on the main process only."""
    created = [d for d in (out, *out.parents) if not d.exists()]
    found = {path: path.read_bytes() for path in _unstarted_files(out) if path.is_file()}  # small files
    try:
        yield
    except Exception:
        if not has_started(out):
            _remove_unstarted_files(out)
            for path, content in found.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_atomic(path, content)
            for folder in [*out.glob("run-*"), *created]:  # deepest first
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        raise


@contextlib.contextmanager
def held_exclusively(out: Path | None, context: DistContext) -> Iterator[None]:
    """Hold the run directory ``out`` for this process (the main one) during the block: an advisory
    lock (flock) on the folder itself, so no file is left behind and the OS drops it with the
    process. ValueError when another process holds it. Nothing is locked where the platform or
    file system cannot lock."""
    if out is None or not context.is_main or fcntl is None:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    handle = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out} is in use: another featkd process is training there; wait for it "
                             "to finish (or stop it), or choose another --out") from None
        except OSError as err:  # a file system without locks
            log.debug("cannot lock %s (%s): not locked", out, err)
        yield
    finally:
        os.close(handle)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """In the body, SIGTERM raises ``SystemExit(143)`` as SIGINT raises KeyboardInterrupt, so that
    ``finally`` blocks and context managers run before the process ends (the teacher cache's
    memmap files are deleted; the last checkpoint stays for the resume). A second SIGTERM ends
    the process at once. Only on the main thread, and only while SIGTERM has its default action:
    a handler the program installed is left alone.
    """
    import signal
    import threading

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        log.warning("SIGTERM: stopping; rerun the same command to resume from the last checkpoint")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is stop:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def train_runs(
    config: RunConfig,
    build_run: RunFactory,
    train_set: Any,
    test_set: Any,
    *,
    lr: float,
    context: DistContext | None = None,
    teacher: TeacherFeed | None = None,
    callbacks: Sequence[Callback] = (),
    extra: dict[str, Any] | None = None,
    val_set: Any = None,
    settings: dict[str, Any] | None = None,
) -> TrainResult:
    """Train one model per seed of ``config`` and write the run directories under ``config.out``.

    ``build_run(seed)`` returns ``(model to train, module exported to model.pt)``; it is
    called after ``torch.manual_seed(seed)``. Finished runs are loaded, not retrained.
    ``extra`` goes into results.json; run.json records the effective lr, widths,
    ``settings`` (e.g. resolved layers), software versions and git commit.
    """
    from featkd.provenance import run_record

    context = context or init_distributed(config.device)
    out = Path(config.out) if config.out else None
    if out is not None:
        prepare_output(out, config, context)
        if context.is_main:
            record = run_record(config, lr, settings, world_size=context.world_size, device=str(context.device))
            write_json(out / RUN_FILE, _with_earlier_calls(record, out / RUN_FILE))
    if out is not None and context.is_main:
        _drop_summary_of_fewer_runs(out / RESULTS_FILE, config.runs)
    trainer = Trainer(config, context=context, lr=lr, callbacks=callbacks)
    results = []
    for seed in config.seeds:
        run_dir = run_directory(out, seed, config.runs)
        if trainer.epochs_left == 0 and (run_dir is None or not (run_dir / CHECKPOINT_FILE).is_file()):
            result = RunResult(seed, [], False, None, run_dir)  # stop_after_epochs spent before this run began
        else:
            if run_dir is not None and context.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(seed)
            model, export = build_run(seed)
            result = trainer.fit(model, train_set, test_set, seed=seed, run_dir=run_dir, export=export,
                                 teacher=teacher, val_set=val_set)
        results.append(result)
        if run_dir is not None and context.is_main and result.finished and config.runs > 1:
            write_json(run_dir / RESULTS_FILE, result.to_dict())
        if not result.finished:
            log.info("stopped after epoch %d of %d; rerun the same command to resume",
                     len(result.history), config.epochs)
            break
    summary = TrainResult(results, out, dict(extra or {}))
    if out is not None and context.is_main and summary.finished and len(results) == config.runs:
        write_json(out / RESULTS_FILE, summary.to_dict())
    return summary
