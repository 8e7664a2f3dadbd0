"""High-level Python API: ``featkd.train_teacher(...)`` and ``featkd.distill(...)``.

Both take models and datasets (``featkd.data.ImageDataset``) and return a
:class:`featkd.train.TrainResult`; the ``*_from_config`` variants build models
and data from a :class:`featkd.config.TrainConfig` / :class:`DistillConfig`, as
the command line does.

Layer lists: ``teacher_layers="auto"`` measures knowledge quality on the
training split and keeps the ``len(student_layers)`` layers that the selection
rule ``select_by`` chooses (default :data:`featkd.selection.DEFAULT_RULE`);
``"standard"`` is the paper's evenly spread list for the teacher
(``featkd.models.STANDARD_TEACHER_LAYERS``) and ``student_layers="paper"`` the
paper's fixed student layers (``PAPER_STUDENT_LAYERS``). For models outside
those tables (custom models, or when the zoo name is not given),
``"paper"`` picks 4 generalized layers evenly spread over GLs 1 .. head-2
(the stem/input GL and the GL just below the head left out) and ``"standard"``
as many as the student has,
see :func:`spread_layers`. ``simkd`` distils at the input of each model's
classifier (:func:`featkd.layers.classifier_input`) unless given lists, of
which it uses the deepest entries.

Every result records ``deployed_params`` (the parameters the network used at
inference holds) and the data's ``num_classes`` / ``image_shape``;
:func:`load_trained_model` rebuilds that network from a finished run directory and
:func:`evaluate_run` measures it on a dataset split.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featkd.config import DistillConfig, RunConfig, TrainConfig, apply_overrides
from featkd.experiment_log import experiment_logs
from featkd.train import (
    Callback,
    ClassifierModel,
    DistContext,
    TrainResult,
    autocast_context,
    channels_last_format,
    check_output,
    default_lr,
    held_exclusively,
    init_distributed,
    prepare_output,
    resolve_device,
    show_progress,
    sigterm_as_exit,
    train_runs,
)

__all__ = [
    "check_teacher_inputs",
    "data_source",
    "distill",
    "complete_train_config",
    "distill_from_config",
    "evaluate_run",
    "load_data",
    "load_trained_model",
    "resolve_student_layers",
    "resolve_teacher_layers",
    "run_config_file",
    "sample_input",
    "spread_layers",
    "TeacherFeed",
    "train_teacher",
    "train_teacher_from_config",
]

log = logging.getLogger(__name__)

QUALITY_FILE = "quality.json"
QUALITY_PLOT = "quality.png"
ModelSpec = nn.Module | Callable[[], nn.Module]


# --------------------------------------------------------------------------- data and models
def load_data(config: RunConfig, val_seed: int = 0) -> Any:
    """``DataSplits(train, val, test)`` named by ``config`` (augmentation on the training split only;
    ``val`` is None unless ``config.val_size`` is set, and drawn with ``val_seed``)."""
    from featkd.data import check_data_options, load_splits

    check_data_options(config.data_options)
    return load_splits(config.data, root=config.data_root, image_size=config.image_size, augment=config.augment,
                       train_limit=config.train_limit, seed=config.data_seed, val_size=config.val_size,
                       val_seed=val_seed, **config.data_options)


# The config fields that say which images a run learns from (ImageDataset.source holds them, and val_seed).
DATA_FIELDS = ("data", "data_root", "image_size", "data_options", "train_limit", "data_seed", "val_size")


def data_source(train_set: Any, val_set: Any, test_set: Any) -> dict[str, Any] | None:
    """The :func:`featkd.data.load_splits` settings that load these splits again (``source``
    without ``split``), or None unless all of them are the splits of one such call."""
    sets = {"train": train_set, "val": val_set, "test": test_set}
    sources = {split: getattr(dataset, "source", None) for split, dataset in sets.items() if dataset is not None}
    if any(source is None or source.get("split") != split for split, source in sources.items()):
        return None
    settings = [{k: v for k, v in source.items() if k != "split"} for source in sources.values()]
    return copy.deepcopy(settings[0]) if all(s == settings[0] for s in settings) else None


def _describe_data(config: RunConfig, source: dict[str, Any]) -> None:
    """Set ``config``'s data fields to those of ``source`` (a split's, or a run's data_source)."""
    for name in DATA_FIELDS:
        setattr(config, name, copy.deepcopy(source[name]))


def _instantiate(spec: ModelSpec, seed: int) -> nn.Module:
    """A fresh model for one run: a factory called under ``seed``, or a deep copy of a module."""
    if isinstance(spec, nn.Module):
        return copy.deepcopy(spec)
    torch.manual_seed(seed)
    return spec()


def sample_input(dataset: Any) -> torch.Tensor:
    """Up to two un-augmented images of ``dataset``: the batch models are tried on before training."""
    x, _, _ = dataset.with_augment(False).batch(torch.arange(min(2, len(dataset))))
    return x


def _data_info(dataset: Any) -> dict[str, Any]:
    """What rebuilding a model for ``dataset`` takes: its class count and (C, H, W); and, for a
    dataset that normalises its images, the per-channel ``input_mean``/``input_std`` (pixel units
    in [0, 1]) that new images must be normalised with."""
    info: dict[str, Any] = {"num_classes": dataset.num_classes, "image_shape": list(dataset.image_shape)}
    mean, std = getattr(dataset, "mean", None), getattr(dataset, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        info.update(input_mean=mean.flatten().tolist(), input_std=std.flatten().tolist())
    return info


def check_teacher_inputs(teacher_run: str | Path, dataset: Any, tolerance: float = 0.05) -> bool:
    """Warn (and return False) when the teacher of run directory ``teacher_run`` (or of the
    ``model.pt`` in it) was trained on images of another shape, or normalised otherwise than
    ``dataset`` normalises them: the teacher would see inputs unlike those it learnt from.
    Tolerance: a shift of mean or std by ``tolerance`` of the teacher's std, in any channel.
    True when they agree or either side is not known."""
    folder = Path(teacher_run) if Path(teacher_run).is_dir() else Path(teacher_run).parent
    path, config_file = folder / "results.json", run_config_file(folder)
    if not path.is_file() and config_file is not None:  # one run of several: the summary beside config.yaml
        path = config_file.parent / "results.json"
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return True  # not a run directory
    info = _data_info(dataset)
    shape = recorded.get("image_shape") if isinstance(recorded, dict) else None
    if isinstance(shape, list) and shape != info["image_shape"]:
        log.warning("the teacher in %s trained on %s images; this data has %s: the teacher sees inputs unlike "
                    "those it learnt from", teacher_run, "×".join(map(str, shape)),
                    "×".join(map(str, info["image_shape"])))
        return False
    shift = _normalisation_shift(recorded, info)
    if shift is None or shift <= tolerance:
        return True
    log.warning("the teacher in %s trained on images normalised with mean %s, std %s; this data normalises "
                "with mean %s, std %s: the teacher sees shifted inputs and may predict worse than it did",
                teacher_run, _rounded(recorded["input_mean"]), _rounded(recorded["input_std"]),
                _rounded(info["input_mean"]), _rounded(info["input_std"]))
    return False


def _normalisation_shift(recorded: dict[str, Any], info: dict[str, Any]) -> float | None:
    """The largest shift of ``info``'s per-channel ``input_mean`` or ``input_std`` from those
    ``recorded`` (a run's results.json), in units of the recorded std; None when either side
    does not give them (runs written before featkd recorded them) or the channels differ."""
    try:
        t_mean, t_std = torch.tensor(recorded["input_mean"]), torch.tensor(recorded["input_std"])
        mean, std = torch.tensor(info["input_mean"]), torch.tensor(info["input_std"])
    except (KeyError, TypeError, ValueError):
        return None
    if t_mean.shape != mean.shape or t_std.shape != std.shape or t_mean.shape != t_std.shape:
        return None
    return float((torch.maximum((mean - t_mean).abs(), (std - t_std).abs()) / t_std.clamp_min(1e-12)).max())


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(v), 4) for v in values]


# --------------------------------------------------------------------------- layers
def spread_layers(model: nn.Module, k: int = 4) -> list[int]:
    """``k`` GL indices evenly spread over GLs 1 .. head-2 (all of them when k or fewer; GLs 0 .. head-1
    when the head is at GL 2 or below)."""
    from featkd.layers import generalized_layers, head_index

    head = head_index(model) or len(generalized_layers(model))
    first, last = (1, head - 2) if head - 2 >= 1 else (0, head - 1)
    count = last - first + 1
    if count <= k:
        return list(range(first, last + 1))
    return sorted({round(first + i * (last - first) / (k - 1)) for i in range(k)}) if k > 1 else [last]


def _require_layers(model: nn.Module, name: str | None, option: str) -> None:
    """ValueError when the GL rule finds no layer before ``model``'s head to choose from."""
    from featkd.layers import head_index

    if head_index(model) == 0:
        raise ValueError(f"no generalized layers found before the head of {name or type(model).__name__} "
                         "(e.g. timm's CrossViT, whose branches pass lists of tensors): give "
                         f"{option} (--{option.replace('_', '-')}) as module names whose outputs lie "
                         "on the main path, e.g. its blocks")


def resolve_student_layers(spec: str | Sequence[int | str], student: nn.Module, name: str | None) -> list[int | str]:
    """``"paper"`` -> the paper's list for zoo model ``name`` (else :func:`spread_layers`); lists pass."""
    from featkd.models import PAPER_STUDENT_LAYERS

    if spec == "paper":
        if name in PAPER_STUDENT_LAYERS:
            return list(PAPER_STUDENT_LAYERS[name])
        _require_layers(student, name, "student_layers")
        layers = spread_layers(student)
        log.info("student %s has no paper layer list: using evenly spread GLs %s", name or "model", layers)
        return layers
    if isinstance(spec, str):
        raise ValueError(f"student_layers must be 'paper' or a list of GL indices / names; got {spec!r}")
    return list(spec)


def resolve_teacher_layers(
    spec: str | Sequence[int | str],
    teacher: nn.Module,
    name: str | None,
    k: int,
    train_set: Any,
    *,
    device: torch.device,
    out: Path | None = None,
    context: DistContext | None = None,
    variant: str | None = None,
    subset_size: int = 5000,
    seed: int = 0,
    progress: bool = True,
    rule: str | None = None,
    probe_set: Any = None,
) -> list[int | str]:
    """``"auto"`` (the k layers ``rule`` chooses, default :data:`featkd.selection.DEFAULT_RULE`,
    among :func:`featkd.selection.candidate_layers`; the quality report goes to
    ``out/quality.json``; measured in ``variant``, default the rule's, else "paper"),
    ``"standard"``, or a list. ``name``: the teacher's zoo name (its standard list),
    ``k``: the number of layers "auto" and a spread "standard" take, ``train_set``
    and ``device``: where "auto" measures. ``probe_set`` (a validation split,
    never the test split) scores the layers' linear probe; without it the probe is scored
    on half of the training subset.

    With ``"auto"`` an existing ``out/quality.json`` is reused (a resumed run).
    """
    from featkd.models import STANDARD_TEACHER_LAYERS

    if spec in ("standard", "auto"):
        _require_layers(teacher, name, "teacher_layers")
    if spec == "standard":
        if name in STANDARD_TEACHER_LAYERS:
            return list(STANDARD_TEACHER_LAYERS[name])
        layers = spread_layers(teacher, k)
        log.info("teacher %s has no standard layer list: using evenly spread GLs %s", name or "model", layers)
        return layers
    if spec == "auto":
        return _quality_layers(teacher, name, k, train_set, device, out, context, variant, subset_size,
                               seed, progress, rule, probe_set)
    if isinstance(spec, str):
        raise ValueError(f"teacher_layers must be auto, standard or a list of GL indices / names; got {spec!r}")
    return list(spec)


def _classifier_layers(spec: str | Sequence[int | str] | None, model: nn.Module,
                       sample: torch.Tensor) -> list[int | str]:
    """simkd's layers: None or a keyword -> [the GL at ``model``'s classifier input]; a list passes."""
    if spec is None or isinstance(spec, str):
        from featkd.layers import classifier_input

        return [classifier_input(model, sample)]
    return list(spec)


def _quality_layers(
    teacher: nn.Module,
    name: str | None,
    k: int,
    train_set: Any,
    device: torch.device,
    out: Path | None,
    context: DistContext | None,
    variant: str | None,
    subset_size: int,
    seed: int,
    progress: bool,
    rule: str | None,
    probe_set: Any,
) -> list[int]:
    from featkd.quality import QualityReport, measure
    from featkd.selection import candidate_layers, measure_variant, resolve_rule

    resolved = resolve_rule(rule, variant)
    variant = measure_variant(resolved, variant)
    rule = resolved.name
    context = context or DistContext(device=device)
    saved = out / QUALITY_FILE if out is not None else None
    selected = None
    # the main process alone decides, reading quality.json or measuring, and tells the others: a rank
    # that looked for the file on its own could find it written and skip the broadcast
    if context.is_main and saved is not None and saved.is_file():
        report = QualityReport.from_json(saved)
        if (report.variant == variant and report.settings.get("n_a", 0) <= subset_size
                and resolved.in_variant(variant).name in report.rules()):
            log.info("teacher layers from %s", saved)
            selected = report.select(k, rule)
    if context.is_main and selected is None:
        layers = candidate_layers(teacher, k)
        log.info("measuring knowledge quality of teacher layers %s on class-balanced subsets of %d "
                 "training images", layers, len(train_set))
        report = measure(teacher, train_set.with_augment(False), layers, variant=variant, seed=seed,
                         device=device, subset_size=subset_size, model_name=name, progress=progress,
                         probe_set=probe_set)
        selected = report.select(k, rule)
        log.info("selected teacher layers by %s: %s\n%s", rule, selected, report.table(k, rule))
        if saved is not None:
            report.to_json(saved, k)
            _try_plot(report, out / QUALITY_PLOT, k, rule)
    if context.distributed:
        box = [selected]
        torch.distributed.broadcast_object_list(box, src=0)
        selected = box[0]
    return selected


def _try_plot(report: Any, path: Path, k: int, rule: str) -> None:
    try:
        report.plot(path, k, rule)
    except ImportError as err:  # matplotlib missing: the JSON still holds everything
        log.warning("quality plot skipped: %s", err)


# --------------------------------------------------------------------------- teacher outputs
class TeacherFeed:
    """``feed(x, idx) -> TeacherOutputs | None`` for the trainer: cached or online teacher outputs.

    Configured from the first built method (which layers, whether logits are needed).
    ``mode`` "cache" computes the outputs once over the un-augmented training set
    (in :meth:`prepare`, which the trainer calls before its first epoch) and looks
    them up by sample index; "online" runs the teacher on every batch; "auto" is
    "online" when the training set is augmented, else "cache", except on an
    accelerator when the cache would not fit ``memory_budget_bytes``
    (:func:`featkd.distillation.online_beats_cache`): "auto" then runs it online.
    """

    def __init__(self, teacher: nn.Module, train_set: Any, mode: str, device: torch.device, *,
                 batch_size: int = 512, memory_budget_bytes: int = 4 * 2**30,
                 cache_dir: Path | None = None, progress: bool = True) -> None:
        if mode not in ("auto", "cache", "online"):
            raise ValueError(f"teacher_mode must be auto, cache or online; got {mode!r}")
        augment = bool(getattr(train_set, "augment", False))
        if mode == "cache" and augment:
            raise ValueError("teacher_mode=cache needs an un-augmented training set")
        self.mode = mode if mode != "auto" else ("online" if augment else "cache")
        self._auto = mode == "auto"
        self.teacher, self.train_set, self.device = teacher, train_set, device
        self.batch_size, self.memory_budget_bytes = batch_size, memory_budget_bytes
        self.cache_dir, self.progress = cache_dir, progress
        self.layers: list[str] = []
        self.need_logits = False
        self.active = False
        self._online: Any = None
        self._cache: Any = None
        self._pool_sizes: tuple = ()

    def configure(self, method: Any) -> None:
        """Take the teacher layers and logit need from ``method`` (first call wins), and the sizes
        its losses pool the teacher's maps to (each call: the method of the run about to train)."""
        self._pool_sizes = tuple(method.teacher_pool_sizes()) if method.needs_teacher_features else ()
        if self._online is not None:
            return
        from featkd.distillation import OnlineTeacher

        self.need_logits = bool(method.needs_teacher_logits)
        self.layers = list(method.teacher_layers) if method.needs_teacher_features else []
        self.active = self.need_logits or bool(self.layers)
        self._online = OnlineTeacher(self.teacher, self.layers, self.need_logits)

    def prepare(self) -> None:
        """Build the cache (mode "cache") unless it exists."""
        if self.mode != "cache" or not self.active or self._cache is not None:
            return
        from featkd.distillation import TeacherCache, online_beats_cache

        if self._auto and online_beats_cache(self._online, self.train_set, self.device,
                                             self.memory_budget_bytes):
            self.mode = "online"
            return

        self._cache = TeacherCache.build(
            self.teacher, self.train_set, self.layers, self.need_logits, self.batch_size, self.device,
            self.memory_budget_bytes, self.cache_dir, progress=self.progress,
        )

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> Any:
        if not self.active:
            return None
        if self.mode == "online":
            return self._online(x)
        self.prepare()
        return self._cache.view(self._pool_sizes, self.memory_budget_bytes).lookup(idx, self.device)

    def close(self) -> None:
        """Free the cache (and delete its memory-mapped files)."""
        if self._cache is not None:
            self._cache.close()
            self._cache = None


# --------------------------------------------------------------------------- public API
def _config(cls: type, config: RunConfig | None, options: dict[str, Any], train_set: Any) -> Any:
    """``config`` (copied) or a new one, with ``options`` applied. Without a config, the data fields
    come from ``train_set``'s ``source`` (``data: in-memory`` when it has none); a config naming
    other data than it is warned about."""
    source = getattr(train_set, "source", None)
    if config is None:
        config = cls()
        if source is not None:  # config.yaml then names the images the run learns from
            _describe_data(config, source)
        else:  # and never a dataset it did not learn from
            from featkd.data import IN_MEMORY_DATA

            config.data = IN_MEMORY_DATA
    elif not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    else:
        config = copy.deepcopy(config)
        if source is not None and config.data != source["data"]:
            log.warning("the config names data %r but the training images are %s's; results.json records "
                        "where they came from (data_source)", config.data, source["data"])
    apply_overrides(config, {k: v for k, v in options.items() if v is not None})
    config.augment = bool(getattr(train_set, "augment", config.augment))
    config.validate()
    return config


def train_teacher(
    model: ModelSpec,
    train_set: Any,
    test_set: Any,
    *,
    config: TrainConfig | None = None,
    model_name: str | None = None,
    callbacks: Sequence[Callback] = (),
    context: DistContext | None = None,
    val_set: Any = None,
    **options: Any,
) -> TrainResult:
    """Train ``model`` with cross-entropy; ``options`` are :class:`TrainConfig` fields (epochs, lr, out, ...).

    ``model`` is a module (copied for every run) or a factory called under each run's seed.
    ``lr`` defaults to the recipe's value for zoo model ``model_name`` (or ``config.model``).
    ``val_set`` (a validation split held out of the training data) picks the best epoch.
    """
    from featkd.distillation import used_parameter_count
    from featkd.models import check_classifier

    config = _config(TrainConfig, config, options, train_set)
    if model_name is not None:
        config.model = model_name
    context = context or init_distributed(config.device)
    lr = config.lr or default_lr(config.model, config.optimizer)
    sample = sample_input(train_set)
    extra = {**_data_info(train_set), "data_source": data_source(train_set, val_set, test_set)}
    # a model that cannot take the data's images fails before the run directory is claimed
    check_classifier(_instantiate(model, config.seed), sample, train_set.num_classes)

    def build_run(seed: int) -> tuple[nn.Module, nn.Module]:
        net = _instantiate(model, seed)
        extra["deployed_params"] = used_parameter_count(net, sample)  # the same for every run
        return ClassifierModel(net), net

    out = Path(config.out) if config.out else None
    with held_exclusively(out, context), experiment_logs(config, context.is_main) as loggers:
        return train_runs(config, build_run, train_set, test_set, lr=lr, context=context,
                          callbacks=[*callbacks, *loggers], val_set=val_set, extra=extra)


def distill(
    teacher: nn.Module,
    student: ModelSpec,
    train_set: Any,
    test_set: Any,
    *,
    method: str | None = None,
    teacher_layers: str | Sequence[int | str] | None = None,
    student_layers: str | Sequence[int | str] | None = None,
    config: DistillConfig | None = None,
    teacher_name: str | None = None,
    student_name: str | None = None,
    callbacks: Sequence[Callback] = (),
    context: DistContext | None = None,
    teacher_feed: Any | None = None,
    val_set: Any = None,
    **options: Any,
) -> TrainResult:
    """Distil ``student`` from the trained ``teacher``; returns every run's history and the summary.

    ``config`` (a :class:`DistillConfig`) gives every setting; ``method``,
    ``teacher_layers``, ``student_layers``, the names and ``options`` (its fields:
    epochs, runs, out, teacher_mode, ...) override it where given (not None).
    Without either, ``method`` is "featkd" and ``student_layers`` "paper".
    ``teacher_layers``: None (the method's default: "auto" for featkd, featkd_ce and
    featkd_ce_kd; the input of the teacher's classifier for simkd; none for ce, kd
    and kd_std; else "standard"), "auto", "standard" or GL indices / module names.
    ``student_layers``: "paper" or GL indices / module names. ``teacher_name`` /
    ``student_name`` are zoo names for the layer tables and the default lr.
    ``val_set`` (a validation split held out of the training data) picks the best epoch.

    ``teacher_feed``: the teacher outputs to train from, instead of a new
    :class:`TeacherFeed` (whose cache lives for this call only), e.g. one cache
    shared by many calls on the same training set. It needs TeacherFeed's
    interface: ``configure(method)`` (called with every run's method),
    ``prepare()`` (before the first epoch) and ``feed(x, idx) -> TeacherOutputs | None``.
    ``teacher_mode`` and ``cache_memory_mb`` are then not used, and the caller
    owns the feed: ``distill`` does not close it.

    Each run's ``model`` (and ``model.pt``) is the network used at inference:
    the student, or for SimKD the student's backbone + projector + the
    teacher's frozen classifier; ``extra["deployed_params"]`` counts its parameters.
    """
    from featkd.distillation import DistillModel, build_method, used_parameter_count
    from featkd.layers import resolve_layers
    from featkd.models import check_classifier

    if teacher_feed is not None:
        _check_feed(teacher_feed)

    config = _config(DistillConfig, config, {
        **options, "method": method, "teacher": teacher_name, "student": student_name,
        "teacher_layers": teacher_layers, "student_layers": student_layers,
    }, train_set)
    context = context or init_distributed(config.device)
    device = context.device
    out = Path(config.out) if config.out else None
    lr = config.lr or default_lr(config.student, config.optimizer)

    _pin_teacher(config, teacher)
    teacher = teacher.to(device, memory_format=channels_last_format(teacher, config.channels_last)).eval()
    teacher.requires_grad_(False)
    if out is not None:
        check_output(out, config)  # refuse a different run's directory (or teacher) before any work
    sample = sample_input(train_set).to(device)
    # Everything that can fail cheaply fails before the run directory is claimed.
    probe_student = _instantiate(student, config.seed).to(device)
    check_classifier(teacher, sample, train_set.num_classes, "teacher", training=False)  # never trains here
    check_classifier(probe_student, sample, train_set.num_classes, "student")
    s_layers, t_layers, t_spec = _method_layers(config, teacher, probe_student, sample, train_set)
    if t_spec != "auto":
        build_method(config.method, teacher, probe_student, teacher_layers=t_layers, student_layers=s_layers,
                     num_classes=train_set.num_classes, sample_input=sample,
                     batch_size=config.batch_size // context.world_size,
                     kd_temperature=config.kd_temperature, kd_weight=config.kd_weight)
    with held_exclusively(out, context):  # from the claim to the end: one process per run directory
        if out is not None:
            prepare_output(out, config, context)  # setup succeeded: claim the directory
        if t_spec == "auto":
            t_layers = resolve_teacher_layers(
                t_spec, teacher, config.teacher, len(s_layers), train_set,
                device=device, out=out, context=context, variant=config.quality_variant,
                subset_size=config.quality_subset, seed=config.data_seed, progress=show_progress(config.progress),
                rule=config.select_by, probe_set=val_set,
            )
        feed = teacher_feed if teacher_feed is not None else TeacherFeed(
            teacher, train_set, config.teacher_mode, device, batch_size=config.eval_batch_size,
            memory_budget_bytes=config.cache_memory_mb * 2**20, cache_dir=out,
            progress=show_progress(config.progress) and context.is_main,
        )

        def build_run(seed: int) -> tuple[nn.Module, nn.Module]:
            net = _instantiate(student, seed).to(device)
            distill_method = build_method(
                config.method, teacher, net, teacher_layers=t_layers, student_layers=s_layers,
                num_classes=train_set.num_classes, sample_input=sample,
                batch_size=config.batch_size // context.world_size,
                kd_temperature=config.kd_temperature, kd_weight=config.kd_weight,
            )
            feed.configure(distill_method)
            model = DistillModel(net, distill_method)
            deployed = model.deployed()
            extra["deployed_params"] = used_parameter_count(deployed, sample)  # the same for every run
            return model, deployed

        extra = {"method": config.method, "teacher_layers": t_layers, "student_layers": s_layers,
                 **_data_info(train_set), "data_source": data_source(train_set, val_set, test_set)}
        settings = {"method": config.method, "teacher_layers": t_layers, "student_layers": s_layers,
                    "teacher_layer_names": resolve_layers(teacher, t_layers) if t_layers else [],
                    "student_layer_names": resolve_layers(probe_student, s_layers) if s_layers else []}
        if t_spec == "auto":
            from featkd.selection import resolve_rule

            extra["selected_by"] = settings["selected_by"] = resolve_rule(config.select_by, config.quality_variant).name
        with sigterm_as_exit():  # SIGTERM unwinds like SIGINT, so the cache's files are deleted
            try:
                with experiment_logs(config, context.is_main) as loggers:
                    return train_runs(config, build_run, train_set, test_set, lr=lr, context=context,
                                      teacher=feed, callbacks=[*callbacks, *loggers], extra=extra,
                                      settings=settings, val_set=val_set)
            finally:
                if teacher_feed is None:  # a feed passed in belongs to the caller
                    feed.close()


def _method_layers(config: DistillConfig, teacher: nn.Module, student: nn.Module, sample: torch.Tensor,
                   train_set: Any) -> tuple[list[int | str], list[int | str], Any]:
    """The method's student and teacher layers, checked, and the teacher layers' spec; an "auto" spec
    leaves the teacher layers to select later (their measurement writes into the run directory)."""
    from featkd.distillation import METHOD_INFO

    if METHOD_INFO[config.method].teacher_layers == "classifier":
        return (_classifier_layers(config.student_layers, student, sample),
                _classifier_layers(config.teacher_layers, teacher, sample), None)
    if not method_uses_layers(config.method):
        return [], [], None
    s_layers = resolve_student_layers(config.student_layers, student, config.student)
    _check_layers(student, s_layers, "student", config.student)
    t_spec = config.teacher_layers or default_teacher_layers(config.method)
    if t_spec == "auto":
        return s_layers, [], t_spec
    t_layers = resolve_teacher_layers(t_spec, teacher, config.teacher, len(s_layers), train_set,
                                      device=sample.device)
    _check_layers(teacher, t_layers, "teacher", config.teacher)
    return s_layers, t_layers, t_spec


def _pin_teacher(config: DistillConfig, teacher: nn.Module) -> None:
    """Record the digest of the teacher's weights in ``config``; ValueError when the config pins others."""
    from featkd.checkpoint import weights_digest

    digest = weights_digest(teacher)
    if config.teacher_sha256 not in (None, digest):
        raise ValueError(f"the teacher's weights have SHA-256 {digest}, not the teacher_sha256 "
                         f"{config.teacher_sha256} the config pins")
    config.teacher_sha256 = digest


def _check_layers(model: nn.Module, layers: Sequence[int | str], role: str, name: str | None) -> None:
    """ValueError naming the model when a layer is not in it."""
    from featkd.layers import resolve_layers

    try:
        resolve_layers(model, layers, model_name=name)
    except (IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{role} layers: {err}") from None


def _check_feed(feed: Any) -> None:
    missing = [name for name in ("configure", "prepare", "__call__") if not callable(getattr(feed, name, None))]
    if missing:
        raise TypeError(f"teacher_feed must offer configure(method), prepare() and __call__(x, idx) "
                        f"like featkd.api.TeacherFeed; {type(feed).__name__} lacks {', '.join(missing)}")


def default_teacher_layers(method: str) -> str:
    """The layer list a method uses by default: "auto" (Q-selected, featkd family) or "standard"."""
    from featkd.distillation import METHOD_INFO

    return "auto" if METHOD_INFO[method].teacher_layers == "q" else "standard"


def method_uses_layers(method: str) -> bool:
    """Whether ``method`` takes teacher and student layer lists."""
    from featkd.distillation import METHOD_INFO

    return METHOD_INFO[method].teacher_layers is not None


# --------------------------------------------------------------------------- from configs
def run_config_file(run_dir: str | Path) -> Path | None:
    """The config.yaml of a run directory: its own or, for one run of several (``run-<i>``), its
    parent's; None when there is neither."""
    run_dir = Path(run_dir)
    folders = (run_dir, run_dir.parent) if re.fullmatch(r"run-\d+", run_dir.name) else (run_dir,)
    return next((f / "config.yaml" for f in folders if (f / "config.yaml").is_file()), None)


def _teacher_run_config(checkpoint: str | None) -> TrainConfig | None:
    """The TrainConfig of a train-teacher run directory (or one ``run-<i>`` of it), when ``checkpoint``
    is one."""
    if not checkpoint or not Path(checkpoint).is_dir():
        return None
    path = run_config_file(checkpoint)
    if path is None:
        return None
    try:
        return TrainConfig.from_yaml(path)
    except ValueError:
        return None


def complete_train_config(config: TrainConfig) -> TrainConfig:
    """With no ``model``, take the model and width of the ``init_checkpoint`` run directory."""
    previous = _teacher_run_config(config.init_checkpoint)
    if config.model is None and previous is not None:
        config.model, config.width = previous.model, previous.width
    return config


def complete_distill_config(config: DistillConfig) -> DistillConfig:
    """Fill ``teacher``/``teacher_width`` from the teacher's run directory; check required fields."""
    if config.teacher is None and config.teacher_checkpoint and not Path(config.teacher_checkpoint).exists():
        raise ValueError(f"checkpoint not found: {config.teacher_checkpoint}")
    previous = _teacher_run_config(config.teacher_checkpoint)
    if previous is not None:
        if config.teacher is None:
            config.teacher = previous.model
        if config.teacher_width is None and config.teacher == previous.model:
            config.teacher_width = previous.width
    if config.teacher is None:
        raise ValueError("no teacher model: give --teacher NAME "
                         "(or a train-teacher run directory as --teacher-checkpoint)")
    if config.teacher_width is None:
        config.teacher_width = 1.0
    if config.student is None:
        raise ValueError("no student model: give --student NAME")
    if config.teacher_checkpoint is None and config.method != "ce":
        log.warning("no --teacher-checkpoint: distilling from an untrained teacher")
    config.validate()
    return config


def _data_shape(train_set: Any) -> tuple[int, int, int]:
    channels, size, _ = train_set.image_shape
    return train_set.num_classes, channels, size


def train_teacher_from_config(config: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Load data, build ``config.model`` and train it (what ``featkd train-teacher`` runs).

    The cheap checks come first (run directory, initial weights readable), then the
    data, then the weights' fit; the run directory is claimed only after all of them.
    """
    from featkd.checkpoint import load_model_weights, read_weights
    from featkd.models import create_model

    config = complete_train_config(config)
    if config.model is None:
        raise ValueError("no model: give --model NAME")
    config.validate()
    context = init_distributed(config.device)
    if config.out:
        check_output(Path(config.out), config)
    initial = read_weights(config.init_checkpoint) if config.init_checkpoint else None
    train_set, val_set, test_set = load_data(config)
    num_classes, channels, size = _data_shape(train_set)

    def factory() -> nn.Module:
        net = create_model(config.model, num_classes, in_channels=channels, image_size=size, width=config.width)
        if initial is not None:
            load_model_weights(net, initial, config.model)
        return net

    factory()  # a model that cannot be built, or weights that do not fit, fail before the directory is claimed
    return train_teacher(factory, train_set, test_set, config=config, callbacks=callbacks, context=context,
                         val_set=val_set)


def distill_from_config(config: DistillConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Load data, build teacher and student and distil (what ``featkd distill`` runs).

    The teacher checkpoint is read before the data are loaded, and checked against
    the teacher before anything is written.
    """
    from featkd.checkpoint import load_model_weights, read_weights
    from featkd.models import create_model

    config = complete_distill_config(config)
    context = init_distributed(config.device)
    if config.out:
        check_output(Path(config.out), config)
    weights = read_weights(config.teacher_checkpoint) if config.teacher_checkpoint else None
    train_set, val_set, test_set = load_data(config)
    num_classes, channels, size = _data_shape(train_set)
    with torch.random.fork_rng(devices=[]):  # a teacher without a checkpoint is the same on every call and
        torch.manual_seed(config.seed)     # rank (a resume checks its digest); the global RNG is left as it was
        teacher = create_model(config.teacher, num_classes, in_channels=channels, image_size=size,
                               width=config.teacher_width)
    if weights is not None:
        load_model_weights(teacher, weights, config.teacher)
        if context.is_main:  # one warning, not one per process
            check_teacher_inputs(config.teacher_checkpoint, train_set)

    def student() -> nn.Module:
        return create_model(config.student, num_classes, in_channels=channels, image_size=size,
                            width=config.student_width)

    return distill(teacher, student, train_set, test_set, config=config, method=config.method,
                   teacher_layers=config.teacher_layers, student_layers=config.student_layers,
                   teacher_name=config.teacher, student_name=config.student, callbacks=callbacks,
                   context=context, val_set=val_set)


# --------------------------------------------------------------------------- finished runs
def load_trained_model(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The network a finished run predicts with, in eval mode, weights from its ``model.pt``.

    ``run_dir``: a ``train-teacher`` or ``distill`` run directory (for several runs,
    one ``run-<seed>`` folder in it). The models are rebuilt from ``config.yaml``
    (zoo names and widths) and ``results.json`` (classes, image shape, layers), so
    the data need not be at hand. A distill run gives its deployed network: the
    student, or for SimKD the student's backbone + projector + the teacher's classifier.
    It is in the memory format it trained in (channels-last or not); with inputs in
    that format too, normalised with the ``input_mean``/``input_std`` of ``results.json``,
    it reproduces the run's accuracy exactly. Raises
    FileNotFoundError for an unfinished run, ValueError when the files do not
    describe the weights.
    """
    from featkd.checkpoint import load_model_weights
    from featkd.distillation import METHOD_INFO, build_method
    from featkd.models import create_model

    run_dir = Path(run_dir)
    weights = _finished_model_file(run_dir)
    config_file = run_config_file(run_dir) or run_dir / "config.yaml"
    root = config_file.parent
    config = _run_config(config_file)
    summary = _run_summary(root)
    num_classes = summary["num_classes"]
    channels, size = summary["image_shape"][0], summary["image_shape"][1]

    def build(name: str, width: float | None) -> nn.Module:
        return create_model(name, num_classes, in_channels=channels, image_size=size, width=width or 1.0)

    is_teacher_run = isinstance(config, TrainConfig)
    if (config.model if is_teacher_run else config.student) is None:
        raise ValueError(f"{root / 'config.yaml'} names no {'model' if is_teacher_run else 'student'}; "
                         f"rebuild it yourself and load {weights} with featkd.checkpoint.load_model_weights")
    if is_teacher_run:
        network = build(config.model, config.width)
    elif config.teacher is None and not METHOD_INFO[config.method].deploys_teacher_part:
        network = build(config.student, config.student_width)  # the student is the deployed network
    elif config.teacher is None:
        raise ValueError(f"the deployed {config.method} network holds a part of the teacher, but "
                         f"{root / 'config.yaml'} names no teacher (pass teacher_name= to distill); rebuild "
                         f"it yourself and load {weights} with featkd.checkpoint.load_model_weights")
    else:
        student = build(config.student, config.student_width)
        teacher = build(config.teacher, config.teacher_width)
        method = build_method(
            config.method, teacher, student, teacher_layers=summary.get("teacher_layers"),
            student_layers=summary.get("student_layers"), num_classes=num_classes,
            sample_input=torch.zeros(2, channels, size, size),
            kd_temperature=config.kd_temperature, kd_weight=config.kd_weight,
        )
        network = method.deployed(student)
    load_model_weights(network, weights)
    memory_format = channels_last_format(network, config.channels_last)
    return network.to(device, memory_format=memory_format).eval()


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    *,
    dataset: Any = None,
    data: str | None = None,
    data_root: str | None = None,
    data_options: str | dict[str, Any] | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "auto",
) -> dict[str, Any]:
    """Top-1 accuracy, overall and per class, of a finished run's deployed network on a split.

    ``run_dir`` as for :func:`load_trained_model`. The images are, in order of precedence:
    ``dataset`` (an ImageDataset, e.g. ``load_splits(...).test``); the ``split`` ("test",
    "val" or "train") of another dataset named by ``data``, ``data_root`` and
    ``data_options`` (text as on the command line, or a dict), with the run's classes,
    whole (the run's ``train_limit``/``val_size`` are not applied) and resized to the
    run's image shape; or the ``split`` of the run's own data, rebuilt from its
    ``config.yaml`` (``data_root`` alone: where its files have moved), whose test split
    gives back the run's final test accuracy (``recorded_accuracy``; None otherwise).
    Images are always normalised with the run's ``input_mean``/``input_std``, as in
    training. ``batch_size`` defaults to the run's ``eval_batch_size``. Returns ``data``,
    ``split``, ``images``, ``accuracy``, ``per_class_accuracy`` ({class: accuracy, None
    for a class without images}) and ``recorded_accuracy``.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test; got {split!r}")
    if dataset is not None and (data or data_root or data_options):
        raise ValueError("give dataset= or data=/data_root=/data_options=, not both")
    run_dir = Path(run_dir)
    device = resolve_device(device)
    model = load_trained_model(run_dir, device)  # checks the run is finished before data is loaded
    config_file = run_config_file(run_dir) or run_dir / "config.yaml"
    config, summary = _run_config(config_file), _run_summary(config_file.parent)
    name, same_data = getattr(dataset, "name", "") or "the dataset given", False
    if dataset is None:
        dataset, same_data = _evaluation_split(config, summary, split, data, data_root, data_options)
        name = config.data  # the run's, or data
    dataset = _normalised_as_run(dataset, summary)
    memory_format = channels_last_format(model, config.channels_last)
    predictions = _predict(model, dataset, batch_size or config.eval_batch_size, device, config.amp, memory_format)
    correct = predictions == dataset.labels
    per_class = torch.bincount(dataset.labels[correct], minlength=dataset.num_classes)
    counts = torch.bincount(dataset.labels, minlength=dataset.num_classes)
    return {
        "data": name, "split": split, "images": len(dataset),
        "accuracy": int(correct.sum()) / len(dataset) if len(dataset) else float("nan"),
        "per_class_accuracy": {name: (int(c) / int(n) if n else None)
                               for name, c, n in zip(dataset.classes, per_class, counts)},
        "recorded_accuracy": _recorded_test_accuracy(run_dir) if split == "test" and same_data else None,
    }


def _evaluation_split(config: RunConfig, summary: dict[str, Any], split: str, data: str | None,
                      data_root: str | None, data_options: str | dict[str, Any] | None) -> tuple[Any, bool]:
    """``split`` of the run's own data or of ``data``, and whether it is the run's own data
    (rebuilt as the run normalised it)."""
    overrides: dict[str, Any] = {"data": data, "data_root": data_root, "data_options": data_options}
    source, val_seed = summary.get("data_source"), 0
    if data is None and "data_source" in summary and source is None:
        raise ValueError("the run learnt from images given in Python, which loading data does not give again: "
                         "pass them as dataset=, or name data to evaluate on with data= (--data)")
    if data is None and source is not None:  # the run's own splits, as they were loaded
        _describe_data(config, source)
        val_seed = source["val_seed"]
    if data is not None:
        # the run's root, options, subset and validation split belong to its own dataset
        config.data_root, config.data_options, config.train_limit, config.val_size = None, {}, None, None
        overrides["image_size"] = summary["image_shape"][1]
    apply_overrides(config, {key: value for key, value in overrides.items() if value is not None})
    if data is not None:
        config.data_options.setdefault("in_channels", summary["image_shape"][0])
    config.augment = False
    splits = load_data(config, val_seed)
    if getattr(splits, split) is None:
        raise ValueError(f"{'the run held' if data is None else f'{data} holds'} no validation split "
                         "(val_size is not set)")
    shift = _normalisation_shift(summary, _data_info(splits.train))
    same_data = data is None and (shift is None or shift < 1e-5)  # the same images give the same statistics
    if data is None and not same_data:
        log.warning("the data rebuilt from the run's config.yaml is normalised otherwise than the data it "
                    "trained on: the config may not describe the run's data (an older featkd recorded an API "
                    "run's settings, not its datasets); pass dataset= or data= (--data)")
    return getattr(splits, split), same_data


def _recorded_test_accuracy(run_dir: Path) -> float | None:
    """The final test accuracy recorded beside the run's model.pt (one run's results, or a
    summary of exactly one run)."""
    record = json.loads((_finished_model_file(run_dir).parent / "results.json").read_text())
    runs = record.get("runs", [record])
    return runs[0].get("final_test_acc") if len(runs) == 1 else None


def _normalised_as_run(dataset: Any, summary: dict[str, Any]) -> Any:
    """``dataset`` checked against the run's classes and image shape, normalised with its statistics."""
    from featkd.data import ImageDataset

    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be a featkd.data.ImageDataset, got {type(dataset).__name__}")
    shape, classes = list(dataset.image_shape), dataset.num_classes
    if shape != summary["image_shape"] or classes != summary["num_classes"]:
        raise ValueError(f"the data has {classes} classes of images {shape}; the run learnt "
                         f"{summary['num_classes']} classes of images {summary['image_shape']}")
    if "input_mean" not in summary:
        return dataset
    return ImageDataset(dataset.images, dataset.labels, dataset.classes, torch.tensor(summary["input_mean"]),
                        torch.tensor(summary["input_std"]), name=dataset.name)


@torch.inference_mode()
def _predict(model: nn.Module, dataset: Any, batch_size: int, device: torch.device, amp: str,
             memory_format: torch.memory_format) -> torch.Tensor:
    """The class ``model`` predicts for every image of ``dataset``, in order."""
    from featkd.data import BatchLoader

    predictions = []
    for x, _, _ in BatchLoader(dataset, batch_size, shuffle=False):
        with autocast_context(device, amp):
            predictions.append(model(x.to(device, memory_format=memory_format)).argmax(1).cpu())
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64)


def _finished_model_file(run_dir: Path) -> Path:
    if (run_dir / "model.pt").is_file():
        return run_dir / "model.pt"
    runs = sorted(p.parent for p in run_dir.glob("run-*/model.pt"))
    if runs:
        raise ValueError(f"{run_dir} holds {len(runs)} runs; pass one of them: {', '.join(map(str, runs))}")
    raise FileNotFoundError(f"{run_dir} holds no model.pt (is the run finished?)")


def _run_config(path: Path) -> TrainConfig | DistillConfig:
    """The config of a run directory: a DistillConfig when it names a method, else a TrainConfig."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"no config.yaml beside the run: {path}")
    values = yaml.safe_load(path.read_text()) or {}
    return (DistillConfig if "method" in values else TrainConfig).from_dict(values)


def _run_summary(root: Path) -> dict[str, Any]:
    """results.json of the run's directory, which must give the data's shape."""
    path = root / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the runs in {root} are not all finished")
    summary = json.loads(path.read_text())
    missing = [key for key in ("num_classes", "image_shape") if key not in summary]
    if missing:
        raise ValueError(f"{path} lacks {' and '.join(missing)} (written by an older featkd); rebuild the "
                         f"model yourself and load its model.pt with featkd.checkpoint.load_model_weights")
    return summary
