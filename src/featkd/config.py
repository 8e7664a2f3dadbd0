"""Run configurations: dataclasses, YAML files and ``key=value`` overrides.

A configuration is plain data. ``TrainConfig`` describes training a model with
cross-entropy (``featkd train-teacher``); ``DistillConfig`` training a student
from a teacher (``featkd distill``). Both share the recipe fields of
``RunConfig``. Values given as text (command line, overrides) are converted by
the field's type; every value is checked by ``validate()``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from featkd.selection import DEFAULT_RULE, VARIANTS, measure_variant, resolve_rule

__all__ = [
    "DistillConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "parse_value",
    "RUNTIME_FIELDS",
]

# DistillConfig fields that only matter when knowledge quality chooses the teacher layers.
SELECTION_FIELDS = ("quality_variant", "quality_subset", "select_by")
# Fields that change how a run executes but not what it computes (channels_last and compile change
# float rounding, as another CPU would): ignored when deciding whether an output directory may be
# resumed; run.json's earlier_calls records the execution options of each call that differed.
RUNTIME_FIELDS = frozenset({"out", "progress", "stop_after_epochs", "cache_memory_mb", "eval_batch_size",
                            "channels_last", "compile", "log"})

C = TypeVar("C", bound="RunConfig")


def _recorded(help: str) -> Any:
    """A field the run fills in itself (not a command-line option); a config file may pin it."""
    return field(default=None, metadata={"help": help, "choices": (), "cli": False})


def _opt(default: Any, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with help text (and keyword choices) for the CLI."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """The training recipe shared by teacher training and distillation."""

    data: str = _opt("digits", "dataset name (featkd.data.list_datasets())")  # or featkd.data.IN_MEMORY_DATA
    data_root: str | None = _opt(None, "folder holding the dataset files")
    image_size: int | None = _opt(None, "image size in pixels (default: the dataset's)")
    augment: bool = _opt(False, "random crop (pad 4) + horizontal flip on the training set")
    train_limit: int | None = _opt(None, "keep a stratified subset of this many training images")
    val_size: int | None = _opt(None, "hold out a stratified validation split of this many training images "
                                "(fixed seed 0, before train_limit); it picks the best epoch")
    data_options: dict[str, Any] = _opt({}, "extra dataset options, e.g. samples_per_class:8,num_classes:4")
    data_seed: int = _opt(0, "seed of the data drawn: the train_limit subset, generated datasets and the "
                          "quality subset; the same for every run, so seed k alone is run k of --runs N")
    epochs: int = _opt(50, "training epochs")
    batch_size: int = _opt(128, "global batch size (split across DDP processes)")
    optimizer: str = _opt("adamw", "adamw: one-cycle schedule; sgd: multi-step schedule", ("adamw", "sgd"))
    lr: float | None = _opt(None, "peak (adamw) or initial (sgd) learning rate; default per model family")
    weight_decay: float | None = _opt(None, "default 0.01 (adamw) or 5e-4 (sgd)")
    momentum: float = _opt(0.9, "SGD momentum")
    milestones: list[int] = _opt([150, 180, 210], "SGD: epochs at which the lr is multiplied by lr_gamma")
    lr_gamma: float = _opt(0.1, "SGD: lr factor at each milestone")
    pct_start: float = _opt(0.3, "one-cycle: fraction of steps spent warming up")
    runs: int = _opt(1, "number of runs; run i uses seed + i")
    seed: int = _opt(0, "seed of the first run")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    amp: str = _opt("auto", "mixed precision: auto (bf16 on CUDA), bf16 or none", ("auto", "bf16", "none"))
    eval_batch_size: int = _opt(512, "batch size for evaluation")
    eval_every: int = _opt(1, "evaluate the validation and test splits every N epochs (and after the last)")
    channels_last: bool = _opt(True, "run models with convolutions in the channels-last memory format "
                               "(faster on CPUs and GPUs)")
    compile: bool = _opt(False, "compile the training forward with torch.compile")
    progress: bool = _opt(True, "show tqdm progress bars (only on a terminal)")
    stop_after_epochs: int | None = _opt(None, "stop after this many epochs in this call (resume later)")
    out: str | None = _opt(None, "run directory (rerun the same command to resume)")
    log: str = _opt("none", "experiment log besides metrics.jsonl: none, or tensorboard (<run dir>/tensorboard)",
                    ("none", "tensorboard"))

    # --- files -----------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """A config from a mapping; unknown keys and bad types raise ValueError."""
        config = cls()
        apply_overrides(config, values)
        return config

    @classmethod
    def from_yaml(cls: type[C], path: str | Path) -> C:
        """Read a YAML mapping of field values (missing fields keep their defaults)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of option: value")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """Field values as plain Python data."""
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def identity(self) -> dict[str, Any]:
        """The values that decide a run's results (runtime-only fields left out)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def differences(self, other: RunConfig) -> list[str]:
        """``key: theirs -> mine`` (old -> new) for every result-deciding field that differs."""
        mine, theirs = self.identity(), other.identity()
        keys = sorted(set(mine) | set(theirs))
        return [f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in keys if mine.get(k) != theirs.get(k)]

    # --- checks ----------------------------------------------------------------
    @property
    def seeds(self) -> list[int]:
        """Seeds of the runs, one per run."""
        return [self.seed + i for i in range(self.runs)]

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and isinstance(value, str) and value not in choices:
                if not _is_layer_field(f.name):
                    raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        for name in ("epochs", "batch_size", "runs", "eval_batch_size", "eval_every"):
            _check_positive(name, getattr(self, name))
        for name in ("image_size", "train_limit", "val_size", "stop_after_epochs"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay is not None and not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 < self.lr_gamma < math.inf:
            raise ValueError(f"lr_gamma must be a finite number > 0, got {self.lr_gamma}")
        if not 0 < self.pct_start < 1:
            raise ValueError(f"pct_start must be between 0 and 1, got {self.pct_start}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])) or any(
            m < 1 for m in self.milestones
        ):
            raise ValueError(f"milestones must be increasing positive epochs, got {self.milestones}")
        for name in ("seed", "data_seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.log != "none" and not self.out:
            raise ValueError(f"log={self.log} writes into the run directory: set out")
        from featkd.data import IN_MEMORY_DATA, list_datasets

        if self.data != IN_MEMORY_DATA and self.data not in list_datasets():
            raise ValueError(f"unknown dataset {self.data!r}; known: {', '.join(list_datasets())}")


@dataclass
class TrainConfig(RunConfig):
    """Train one model with cross-entropy (``featkd train-teacher``)."""

    model: str | None = _opt(None, "model name: featkd.models.list_models(), torchvision:NAME or timm:NAME")
    width: float = _opt(1.0, "channel width multiplier, e.g. 0.125 or 1/8")
    init_checkpoint: str | None = _opt(None, "start from these weights (file or run directory)")

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        super().validate()
        if self.model is not None:
            _check_model("model", self.model)
        _check_width("width", self.width)


TEACHER_LAYER_KEYWORDS = ("auto", "standard")
STUDENT_LAYER_KEYWORDS = ("paper",)


@dataclass
class DistillConfig(RunConfig):
    """Distil a student from a trained teacher (``featkd distill``)."""

    teacher: str | None = _opt(None, "teacher model: a zoo name, torchvision:NAME or timm:NAME[:key=value,...] "
                                     "(default: from --teacher-checkpoint's run directory)")
    teacher_width: float | None = _opt(None, "teacher width (default: from its run directory, else 1)")
    teacher_checkpoint: str | None = _opt(None, "teacher weights: a file or a train-teacher run directory")
    teacher_sha256: str | None = _recorded(
        "SHA-256 of the teacher's weights (featkd.checkpoint.weights_digest), written by distill; a resume "
        "with other teacher weights is refused, and a value given in a config file must match")
    student: str | None = _opt(None, "student model: a zoo name, torchvision:NAME or timm:NAME[:key=value,...]")
    student_width: float = _opt(1.0, "student width multiplier")
    method: str = _opt("featkd", "distillation method (featkd.distillation.list_methods())")
    teacher_layers: str | list[int | str] | None = _opt(
        None,
        "auto (k layers chosen by the select_by rule), standard, or GL indices / module names; default "
        "per method",
        TEACHER_LAYER_KEYWORDS,
    )
    student_layers: str | list[int | str] = _opt(
        "paper", "paper (the paper's fixed layers) or GL indices / module names", STUDENT_LAYER_KEYWORDS
    )
    teacher_mode: str = _opt(
        "auto", "teacher outputs: cache (computed once), online, or auto (online when augmenting, or on "
        "a GPU when the cache exceeds cache_memory_mb)",
        ("auto", "cache", "online"),
    )
    cache_memory_mb: int = _opt(4096, "teacher cache larger than this goes to memory-mapped files (on a GPU, "
                                "teacher_mode auto runs the teacher online instead)")
    quality_variant: str | None = _opt(None, "knowledge-quality variant for teacher_layers=auto (default: the "
                                       "select_by rule's, else paper)", VARIANTS)
    quality_subset: int = _opt(5000, "teacher_layers=auto: size of the class-balanced subset A")
    kd_temperature: float | None = _opt(None, "KD temperature T (default: the method's, 4; kd_std 2)")
    kd_weight: float | None = _opt(None, "factor on the T^2-scaled KD term (default: the method's, 1; kd_std 9)")
    select_by: str | None = _opt(None, "teacher_layers=auto: the selection rule: Q, S, I, E, sqrtIE, depth, "
                                 "probe, or bands:SCORE (the best layer by SCORE in each depth band); a quality "
                                 "score may name its variant, e.g. Q/paper (the paper's rule) or bands:Q/corrected "
                                 f"(default: {DEFAULT_RULE}, in quality_variant when that is given)")

    def selects_teacher_layers(self) -> bool:
        """Whether knowledge quality chooses the teacher layers (teacher_layers auto, given or the
        method's default)."""
        from featkd.api import default_teacher_layers, method_uses_layers
        from featkd.distillation import list_methods

        if self.method not in list_methods() or not method_uses_layers(self.method):
            return False
        return (self.teacher_layers or default_teacher_layers(self.method)) == "auto"

    def identity(self) -> dict[str, Any]:
        """As a RunConfig's, and the selection options only when they choose the layers (so that a
        changed default of theirs does not stop a run on fixed layers from resuming)."""
        values = super().identity()
        if not self.selects_teacher_layers():
            for name in SELECTION_FIELDS:
                values.pop(name)
        return values

    def validate(self) -> None:
        """Raise ValueError naming the first bad value."""
        super().validate()
        if self.teacher is not None:
            _check_model("teacher", self.teacher)
        if self.student is not None:
            _check_model("student", self.student)
        for name in ("teacher_width", "student_width"):
            if getattr(self, name) is not None:
                _check_width(name, getattr(self, name))
        _check_positive("cache_memory_mb", self.cache_memory_mb)
        _check_positive("quality_subset", self.quality_subset)
        if self.kd_temperature is not None and not 0 < self.kd_temperature < math.inf:
            raise ValueError(f"kd_temperature must be a finite number > 0, got {self.kd_temperature}")
        if self.kd_weight is not None and not 0 <= self.kd_weight < math.inf:
            raise ValueError(f"kd_weight must be a finite number >= 0, got {self.kd_weight}")
        measure_variant(resolve_rule(self.select_by, self.quality_variant), self.quality_variant)
        from featkd.distillation import METHOD_INFO, list_methods

        if self.method not in list_methods():
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(list_methods())}")
        if (self.kd_temperature, self.kd_weight) != (None, None) and not METHOD_INFO[self.method].teacher_logits:
            raise ValueError(f"kd_temperature and kd_weight do not apply to method {self.method!r} (it has no KD term)")
        if METHOD_INFO[self.method].teacher_layers == "classifier" and self.teacher_layers == "auto":
            raise ValueError(f"teacher_layers=auto does not apply to {self.method}: it distils at the input of the "
                             "teacher's classifier (give no layers, or a list whose deepest entry is used)")
        _check_layers("teacher_layers", self.teacher_layers, TEACHER_LAYER_KEYWORDS)
        _check_layers("student_layers", self.student_layers, STUDENT_LAYER_KEYWORDS)
        if self.teacher_mode == "cache" and self.augment:
            raise ValueError("teacher_mode=cache needs augment=false (cached outputs are of un-augmented images)")


# --- checks ---------------------------------------------------------------------
def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_width(name: str, value: float) -> None:
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _check_model(name: str, value: str) -> None:
    from featkd.models import check_model_name, list_models

    try:
        check_model_name(value)
    except ValueError as err:
        if ":" in value:
            raise ValueError(f"{name}: {err}") from None
        role = "" if name == "model" else f"{name} "
        raise ValueError(f"unknown {role}model {value!r}; known: {', '.join(list_models())}, "
                         "or torchvision:NAME / timm:NAME") from None


def _is_layer_field(name: str) -> bool:
    return name.endswith("_layers")


def _check_layers(name: str, value: Any, keywords: tuple[str, ...]) -> None:
    if value is None or isinstance(value, list):
        if isinstance(value, list) and not value:
            raise ValueError(f"{name} is an empty list")
        misplaced = [v for v in value or [] if v in (*TEACHER_LAYER_KEYWORDS, *STUDENT_LAYER_KEYWORDS)]
        if misplaced:  # parsed as a module name, since it is not a keyword of this field
            raise ValueError(f"{name}: {misplaced[0]!r} is a keyword of the other model's layers; {name} takes "
                             f"{' or '.join(keywords)} or a list of GL indices / module names")
        return
    if value not in keywords:
        raise ValueError(
            f"{name} must be {' or '.join(keywords)} or a list of GL indices / module names; got {value!r}"
        )


# --- overrides ------------------------------------------------------------------
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def apply_overrides(config: RunConfig, overrides: dict[str, Any] | list[str]) -> RunConfig:
    """Set fields from ``{"key": value}`` or ``["key=value", ...]`` in place; returns ``config``.

    Text values are converted by the field's type (``width=1/8``, ``milestones=150,180``,
    ``teacher_layers=12,13,14,15``, ``lr=none``). Unknown keys and values of the
    wrong type raise ValueError.
    """
    if isinstance(overrides, (list, tuple)):
        pairs: dict[str, Any] = {}
        for item in overrides:
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise ValueError(f"override {item!r} is not key=value")
            pairs[key.strip().replace("-", "_")] = value.strip()
        overrides = pairs
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = _field_types(type(config))
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(
                f"unknown option {key!r} for {type(config).__name__}; valid: {', '.join(fields)}"
            )
        setattr(config, key, parse_value(value, hints[key], key, fields[key].metadata.get("choices", ())))
    return config


def parse_value(value: Any, tp: Any, key: str = "value", keywords: tuple[str, ...] = ()) -> Any:
    """Convert ``value`` (text or YAML data) to type ``tp`` or raise ValueError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            if type(None) in options:
                return None
            raise ValueError(f"{key} cannot be empty")
        if isinstance(value, str) and value.strip() in keywords:
            return value.strip()
        errors = []
        for option in (o for o in options if o is not type(None)):
            if option is str and any(typing.get_origin(o) is list for o in options):
                continue  # text for a "keyword or list" field is a list unless it is a keyword
            try:
                return parse_value(value, option, key, keywords)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"bad value for {key}: {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip().strip("[]")
            value = [v.strip() for v in text.split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [parse_value(v, item_type, key) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = _parse_mapping(value, key)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"{key} must be a mapping of name: value, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        return _parse_float(str(value).strip(), key)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{key} must be text, got {value!r}")
        return str(value)
    raise ValueError(f"{key}: unsupported option type {tp!r}")


def _parse_float(text: str, key: str) -> float:
    num, slash, den = text.partition("/")
    try:
        return float(num) / float(den) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{key} must be a number (or a fraction like 1/8), got {text!r}") from None


def _parse_mapping(text: str, key: str) -> dict[str, Any]:
    """``"a:1,b:x"`` (or a YAML flow mapping ``{a: 1}``) -> ``{"a": 1, "b": "x"}``."""
    text = text.strip()
    if not text or text in ("{}", "none", "null"):
        return {}
    if not text.startswith("{"):
        text = "{" + ", ".join(part.replace(":", ": ", 1) for part in text.split(",")) + "}"
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValueError(f"{key} must look like name:value,name:value; got {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{key} must look like name:value,name:value; got {text!r}")
    return value
