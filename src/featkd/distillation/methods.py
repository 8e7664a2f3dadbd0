"""Distillation methods: each owns its trainable extras and names its losses.

A :class:`Method` turns the student's logits and tapped features plus the
teacher's outputs into the logits to predict with and a dict of named, already
weighted losses. The trainer sums them; :class:`DistillModel` wraps student +
method into one module so the optimizer and DDP see every trainable parameter.
Loss names: ``ce``, ``kd``, ``feat``, ``sp``, ``semckd``.

Loss weights: CE 1. KD = kd_weight * T**2 * KL(teacher || student) at
temperature T: ``kd`` T = 4, kd_weight 1 (factor 16, spec/experiments.md);
``kd_std`` T = 2, kd_weight 9 on z-scored logits (factor 36, Sun et al. 2024);
both configurable (``build_method(..., kd_temperature=..., kd_weight=...)``).
Feature terms: FitNet / featkd ``feat`` weight 1 (the per-pair elementwise MSE,
mean over pairs; fitnet_fc weights each of its all-to-all pairs 1/n_teacher);
SimKD ``feat`` weight 1 (one pair); ``sp`` weight 3000 (Tung & Mori 2019,
summed over layer pairs); ``semckd`` weight 400 (Chen et al. 2021). Every
feature weight can be overridden with ``build_method(..., feature_weight=...)``.

A method that predicts through modules of its own (SimKD: projector + the
teacher's classifier) says so in :meth:`Method.deployed`: the network used at
inference, which is what a run saves as ``model.pt``.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from featkd.layers import (
    FeatureTap, canonical_shape, classifier_input, eval_mode, feature_layout, from_canonical,
    resolve_layers, tail, to_canonical,
)

from .losses import (
    KD_STD_TEMPERATURE, KD_TEMPERATURE, batch_gram, ce, feature_mse, kd_loss, kd_std_loss,
    layout_dims, resize_to, semckd_loss, similarity_preserving_loss, to_layout,
)
from .guarantee import check_gradient_split
from .projectors import PROJECTORS, from_layout, layout_channels, layout_size, make_projector
from .teacher import TeacherOutputs

__all__ = [
    "KD_DEFAULTS", "METHOD_INFO", "DistillModel", "FeatureMSE", "Method", "MethodInfo",
    "ReusedClassifier", "SemCKD", "SimKD", "SimilarityEmbed", "SimilarityPreserving",
    "TappedNetwork", "build_method", "list_methods", "used_parameter_count",
]

log = logging.getLogger(__name__)

KD_LOSSES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "kd": kd_loss, "kd_std": kd_std_loss,
}
#: (temperature, kd_weight) of each KD loss; the term is kd_weight * T**2 * KL
KD_DEFAULTS: dict[str, tuple[float, float]] = {"kd": (KD_TEMPERATURE, 1.0),
                                               "kd_std": (KD_STD_TEMPERATURE, 9.0)}
SIMKD_WEIGHT = 1.0
SP_WEIGHT = 3000.0
SEMCKD_WEIGHT = 400.0
SEMCKD_HIDDEN = 256
SEMCKD_EMBED = 128


@dataclass(frozen=True)
class MethodInfo:
    """What a method needs from the caller.

    ``teacher_layers``: which teacher-layer list the caller passes by default:
    "standard" (evenly spread baseline layers), "q" (chosen by knowledge
    quality), "classifier" (the input of the classifier, on both sides:
    :func:`featkd.layers.classifier_input`) or None (no teacher layers).
    ``teacher_logits`` / ``teacher_features``: whether the teacher outputs must
    include them. ``deploys_teacher_part``: whether the deployed network holds a
    part of the teacher (SimKD's reused classifier), so rebuilding it needs the teacher.
    """

    teacher_layers: str | None
    teacher_logits: bool
    teacher_features: bool
    description: str
    deploys_teacher_part: bool = False


class Method(nn.Module):
    """Base method: CE on the logits, plus KD (``kd`` = "kd" or "kd_std") when set.

    Used as is for ``ce``, ``kd`` and ``kd_std``. Subclasses add feature losses
    and trainable extras. ``kd_temperature`` / ``kd_weight`` default to the KD
    loss's published values (:data:`KD_DEFAULTS`); a method without KD takes neither.
    """

    #: the trainer must drop the last incomplete batch (the method's size depends on B)
    requires_full_batches: bool = False
    #: some student parameters never get a gradient (DDP needs find_unused_parameters)
    find_unused_parameters: bool = False
    #: the student's own logits are used (False: its forward stops after the last tapped layer)
    uses_student_logits: bool = True

    def __init__(self, name: str, *, kd: str | None = None, student_layers: Sequence[str] = (),
                 teacher_layers: Sequence[str] = (), needs_teacher_features: bool = False,
                 detach_after: str | None = None, kd_temperature: float | None = None,
                 kd_weight: float | None = None) -> None:
        super().__init__()
        if kd is not None and kd not in KD_LOSSES:
            raise ValueError(f"unknown KD loss {kd!r}; valid: {sorted(KD_LOSSES)}")
        if kd is None and (kd_temperature is not None or kd_weight is not None):
            raise ValueError(f"method {name!r} has no KD term: kd_temperature and kd_weight do "
                             "not apply to it")
        self.name = name
        self.kd = kd
        default_temperature, default_weight = KD_DEFAULTS.get(kd, (None, None))
        self.kd_temperature = default_temperature if kd_temperature is None else kd_temperature
        self.kd_weight = default_weight if kd_weight is None else kd_weight
        self.student_layers = list(student_layers)
        self.teacher_layers = list(teacher_layers)
        self.needs_teacher_logits = kd is not None
        self.needs_teacher_features = needs_teacher_features
        self.detach_after = detach_after

    def extra_repr(self) -> str:
        kd = (f", kd_temperature={self.kd_temperature}, kd_weight={self.kd_weight}"
              if self.kd is not None else "")
        return (f"name={self.name!r}, kd={self.kd!r}{kd}, student_layers={self.student_layers}, "
                f"teacher_layers={self.teacher_layers}, detach_after={self.detach_after!r}")

    def check_teacher(self, teacher: TeacherOutputs | None) -> None:
        """Raise ValueError when ``teacher`` lacks what this method needs."""
        if not (self.needs_teacher_logits or self.needs_teacher_features):
            return
        if teacher is None:
            raise ValueError(f"method {self.name!r} needs teacher outputs, got None")
        if self.needs_teacher_logits and teacher.logits is None:
            raise ValueError(f"method {self.name!r} needs teacher logits")
        if self.needs_teacher_features and len(teacher.features) != len(self.teacher_layers):
            raise ValueError(f"method {self.name!r} needs {len(self.teacher_layers)} teacher "
                             f"features ({self.teacher_layers}), got {len(teacher.features)}")

    def forward(self, student_logits: Tensor | None, student_feats: list[Tensor],
                teacher: TeacherOutputs | None = None, labels: Tensor | None = None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        """(logits to predict with, named losses); no losses when ``labels`` is None."""
        logits = self.predict(student_logits, student_feats)
        if labels is None:
            return logits, {}
        self.check_teacher(teacher)
        return logits, self.losses(logits, student_feats, teacher, labels)

    def logit_losses(self, logits: Tensor, teacher: TeacherOutputs | None,
                     labels: Tensor) -> dict[str, Tensor]:
        """``ce`` (weight 1) and, when the method uses KD, ``kd``."""
        losses = {"ce": ce(logits, labels)}
        if self.kd is not None:
            kd = KD_LOSSES[self.kd](logits, teacher.logits, self.kd_temperature)
            losses["kd"] = self.kd_weight * kd
        return losses

    def losses(self, logits: Tensor, student_feats: list[Tensor], teacher: TeacherOutputs | None,
               labels: Tensor) -> dict[str, Tensor]:
        """Named, weighted losses. ``logits`` is the output of :meth:`predict`."""
        return self.logit_losses(logits, teacher, labels)

    def predict(self, logits: Tensor | None, student_feats: list[Tensor]) -> Tensor:
        """Logits used for accuracy and for the logit losses (the student's own by default)."""
        return logits

    def deployed(self, student: nn.Module) -> nn.Module:
        """The network used at inference (the student itself, by default); shares parameters."""
        return student

    def teacher_pool_sizes(self) -> list[tuple[int, ...] | None]:
        """Per teacher layer, the (H, W) every use of its feature average-pools it to first (None:
        used as it is). A teacher cache can pool once (:meth:`TeacherCache.pooled`) and the losses do not
        change: pooling a pooled map to its own size does nothing."""
        return [None] * len(self.teacher_layers)


class FeatureMSE(Method):
    """Projected-feature MSE: FitNet, FitNet-FC and the featkd family.

    ``pairs`` are (student index, teacher index) into the layer lists; each pair
    has a bias-free 1x1-conv projector, and ``feat`` = feature_weight *
    pair_weight * sum over pairs of the elementwise MSE.
    """

    def __init__(self, name: str, *, pairs: Sequence[tuple[int, int]],
                 student_shapes: Sequence[torch.Size], teacher_shapes: Sequence[torch.Size],
                 pair_weight: float, feature_weight: float = 1.0,
                 student_layouts: Sequence[str | None] | None = None,
                 teacher_layouts: Sequence[str | None] | None = None, **kwargs) -> None:
        super().__init__(name, needs_teacher_features=True, **kwargs)
        self.pairs = [tuple(p) for p in pairs]
        self.pair_weight = pair_weight
        self.feature_weight = feature_weight
        s_layouts = student_layouts or [None] * len(student_shapes)
        t_layouts = teacher_layouts or [None] * len(teacher_shapes)
        self.projectors = nn.ModuleList(
            make_projector(student_shapes[s], teacher_shapes[t], "single", s_layouts[s], t_layouts[t])
            for s, t in self.pairs)

    def teacher_pool_sizes(self) -> list[tuple[int, ...] | None]:
        found: list[set] = [set() for _ in self.teacher_layers]
        for (_, t), projector in zip(self.pairs, self.projectors):
            found[t].add(projector.teacher_pool_size())
        return [next(iter(sizes)) if len(sizes) == 1 else None for sizes in found]

    def losses(self, logits, student_feats, teacher, labels):
        losses = self.logit_losses(logits, teacher, labels)
        terms = [feature_mse(*projector(student_feats[s], teacher.features[t]))
                 for (s, t), projector in zip(self.pairs, self.projectors)]
        losses["feat"] = self.feature_weight * self.pair_weight * torch.stack(terms).sum()
        return losses


class SimilarityPreserving(Method):
    """SP (Tung & Mori 2019): batch-similarity matching on one-to-one layer pairs."""

    def __init__(self, name: str, *, feature_weight: float = SP_WEIGHT, **kwargs) -> None:
        super().__init__(name, needs_teacher_features=True, **kwargs)
        self.feature_weight = feature_weight

    def losses(self, logits, student_feats, teacher, labels):
        losses = self.logit_losses(logits, teacher, labels)
        losses["sp"] = self.feature_weight * similarity_preserving_loss(student_feats,
                                                                        teacher.features)
        return losses


class ReusedClassifier(nn.Module):
    """SimKD's prediction head: a projector onto a teacher feature, then the teacher's frozen classifier.

    ``project`` lays the student feature out channels-first, pools it when its
    map or token count is larger than the teacher's and projects it onto the
    teacher's channels; ``classify`` resizes the projection to the teacher
    feature's size, restores the teacher's layout and applies ``classifier``
    (the teacher's modules after that feature), which stays frozen and in eval mode.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int],
                 classifier: nn.Module, projector: str, *, student_layout: str | None = None,
                 teacher_layout: str | None = None) -> None:
        super().__init__()
        self.student_layout = student_layout or feature_layout(student_shape)
        self.teacher_layout = teacher_layout or feature_layout(teacher_shape)
        student_shape = canonical_shape(student_shape, self.student_layout)
        teacher_shape = canonical_shape(teacher_shape, self.teacher_layout)
        self.dims = layout_dims(student_shape, teacher_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.teacher_size = layout_size(teacher_shape, self.dims)
        self.projector = PROJECTORS[projector](layout_channels(student_shape, self.dims),
                                               layout_channels(teacher_shape, self.dims), self.dims)
        self.classifier = classifier.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> ReusedClassifier:
        super().train(mode)
        self.classifier.eval()
        return self

    def project(self, student_feat: Tensor) -> Tensor:
        """Channels-first projection, at the smaller of the student's and the teacher's sizes."""
        x = to_layout(to_canonical(student_feat, self.student_layout), self.dims)
        x = resize_to(x, [min(s, t) for s, t in zip(x.shape[2:], self.teacher_size)])
        return self.projector(x)

    def target(self, teacher_feat: Tensor, projected: Tensor) -> Tensor:
        """The teacher feature laid out and pooled like ``projected`` (what the projection must match)."""
        return resize_to(to_layout(to_canonical(teacher_feat, self.teacher_layout), self.dims),
                         projected.shape[2:])

    def classify(self, projected: Tensor) -> Tensor:
        """Logits of the teacher's classifier on a projection."""
        x = resize_to(projected, self.teacher_size)
        return self.classifier(from_canonical(from_layout(x, self.teacher_shape), self.teacher_layout))

    def forward(self, student_feat: Tensor) -> Tensor:
        return self.classify(self.project(student_feat))


class TappedNetwork(nn.Module):
    """``head(backbone's output at layer)``; the backbone's forward stops after ``layer``.

    The deployed network of a method that predicts through its own head (SimKD).
    The backbone's later modules (e.g. the student's unused classifier) stay in
    the module, untouched and never run.
    """

    def __init__(self, backbone: nn.Module, layer: str, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.layer = layer
        self.head = head

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}"

    def forward(self, x: Tensor) -> Tensor:
        with FeatureTap(self.backbone, [self.layer], stop_early=True) as tap:
            self.backbone(x)
        return self.head(tap.outputs[0])


class SimKD(Method):
    """SimKD (Chen et al. 2022): the teacher's frozen classifier predicts from the projected student feature.

    The student's forward stops after ``student_layer``; a :class:`ReusedClassifier`
    projects that feature onto the teacher's feature at ``teacher_layer`` and the
    teacher's modules after that layer give the logits. As published
    (``feature_loss=True``): one loss, ``feat`` = weight * MSE(projection, the
    teacher's feature at ``teacher_layer``; the larger pooled to the smaller size),
    with no CE and no KD. The released-code variant (``feature_loss=False``):
    CE + KD on the reused classifier's logits, no teacher feature. The deployed
    network is student backbone + projector + teacher classifier (:meth:`deployed`).
    """

    find_unused_parameters = True        # the student's own head is never used
    uses_student_logits = False

    def __init__(self, name: str, *, student_layer: str, teacher_layer: str,
                 head: ReusedClassifier, feature_loss: bool = True,
                 feature_weight: float = SIMKD_WEIGHT, **kwargs) -> None:
        super().__init__(name, student_layers=[student_layer],
                         teacher_layers=[teacher_layer] if feature_loss else [],
                         needs_teacher_features=feature_loss, **kwargs)
        self.teacher_tail_layer = teacher_layer      # the reused classifier starts after it
        self.head = head
        self.feature_loss = feature_loss
        self.feature_weight = feature_weight

    def forward(self, student_logits, student_feats, teacher=None, labels=None):
        projected = self.head.project(student_feats[-1])
        logits = self.head.classify(projected)
        if labels is None:
            return logits, {}
        self.check_teacher(teacher)
        if not self.feature_loss:
            return logits, self.logit_losses(logits, teacher, labels)
        target = self.head.target(teacher.features[-1], projected)
        return logits, {"feat": self.feature_weight * feature_mse(projected, target)}

    def predict(self, logits, student_feats):
        return self.head(student_feats[-1])

    def deployed(self, student: nn.Module) -> TappedNetwork:
        return TappedNetwork(student, self.student_layers[-1], self.head)


class SimilarityEmbed(nn.Module):
    """SemCKD embedding: a sample's row of the batch Gram -> MLP (B->256->128) -> unit vector.

    The MLP input is fixed to ``batch_size``; a smaller batch's Gram rows are
    zero-padded (a missing sample has similarity 0), a larger batch is an error.
    The MLP runs in float32 (raw Gram entries can exceed the float16 range).
    """

    def __init__(self, batch_size: int, hidden: int = SEMCKD_HIDDEN,
                 out: int = SEMCKD_EMBED) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.mlp = nn.Sequential(nn.Linear(batch_size, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out))

    def forward(self, feat: Tensor) -> Tensor:
        gram = batch_gram(feat)
        batch = gram.shape[0]
        if batch > self.batch_size:
            raise ValueError(f"batch of {batch} exceeds the SemCKD batch size {self.batch_size} "
                             "(build_method(..., batch_size=...))")
        gram = F.pad(gram, (0, self.batch_size - batch))
        with torch.autocast(device_type=gram.device.type, enabled=False):
            return F.normalize(self.mlp(gram), dim=1)


class SemCKD(Method):
    """SemCKD (Chen et al. 2021): per-sample attention over all teacher layers.

    Each student layer s has a query embedding, each teacher layer t a key
    embedding (:class:`SimilarityEmbed`); att[b, s, :] = softmax_t(q_bs . k_bt)
    on unit vectors, as in the authors' code (a 1/sqrt(128) scale on unit
    vectors would flatten the attention to near-uniform). Every (s, t) pair has a
    ThreeLayerConv projector after spatial alignment. ``semckd`` =
    weight * sum_{b,s,t} att * mse_b(s, t) / (B * S).
    """

    requires_full_batches = True

    def __init__(self, name: str, *, student_shapes: Sequence[torch.Size],
                 teacher_shapes: Sequence[torch.Size], batch_size: int,
                 feature_weight: float = SEMCKD_WEIGHT,
                 student_layouts: Sequence[str | None] | None = None,
                 teacher_layouts: Sequence[str | None] | None = None, **kwargs) -> None:
        super().__init__(name, needs_teacher_features=True, **kwargs)
        self.feature_weight = feature_weight
        self.batch_size = batch_size
        self.queries = nn.ModuleList(SimilarityEmbed(batch_size) for _ in student_shapes)
        self.keys = nn.ModuleList(SimilarityEmbed(batch_size) for _ in teacher_shapes)
        s_layouts = student_layouts or [None] * len(student_shapes)
        t_layouts = teacher_layouts or [None] * len(teacher_shapes)
        self.projectors = nn.ModuleList(
            nn.ModuleList(make_projector(s, t, "three", s_layout, t_layout)
                          for t, t_layout in zip(teacher_shapes, t_layouts))
            for s, s_layout in zip(student_shapes, s_layouts))

    def attention(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """(B, S, T) attention of each sample's student layers over the teacher layers."""
        query = torch.stack([embed(f) for embed, f in zip(self.queries, student_feats)], dim=1)
        key = torch.stack([embed(f.detach()) for embed, f in zip(self.keys, teacher_feats)], dim=1)
        with torch.autocast(device_type=query.device.type, enabled=False):  # float32, as the embeddings
            return torch.softmax(query @ key.transpose(1, 2), dim=-1)

    def losses(self, logits, student_feats, teacher, labels):
        losses = self.logit_losses(logits, teacher, labels)
        attention = self.attention(student_feats, teacher.features)
        aligned = [[projector(s_feat, t_feat) for projector, t_feat in zip(row, teacher.features)]
                   for row, s_feat in zip(self.projectors, student_feats)]
        projected = [[p for p, _ in row] for row in aligned]
        targets = [[t for _, t in row] for row in aligned]
        losses["semckd"] = self.feature_weight * semckd_loss(projected, targets, attention)
        return losses


class DistillModel(nn.Module):
    """Student + method in one module; ``forward(x, labels, teacher) -> (logits, losses)``.

    The student runs inside a FeatureTap on ``method.student_layers`` (detaching
    after ``method.detach_after``); ``losses`` is empty when ``labels`` is None.
    """

    def __init__(self, student: nn.Module, method: Method) -> None:
        super().__init__()
        self.student = student
        self.method = method

    def forward(self, x: Tensor, labels: Tensor | None = None,
                teacher: TeacherOutputs | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        method = self.method
        raw_logits = None
        with FeatureTap(self.student, method.student_layers, detach_after=method.detach_after,
                        stop_early=not method.uses_student_logits) as tap:
            raw_logits = self.student(x)
        return method(raw_logits, tap.outputs, teacher, labels)

    def deployed(self) -> nn.Module:
        """The network used at inference (:meth:`Method.deployed`); shares parameters."""
        return self.method.deployed(self.student)


# ----------------------------------------------------------------------------- building

@dataclass
class _Setup:
    """Everything a method builder needs, layers resolved and shapes probed."""

    name: str
    teacher: nn.Module | None
    student_layers: list[str]
    teacher_layers: list[str]
    student_shapes: list[torch.Size]
    teacher_shapes: list[torch.Size]
    batch_size: int
    feature_weight: float | None
    student_layouts: list[str]
    teacher_layouts: list[str]
    kd_temperature: float | None = None
    kd_weight: float | None = None

    def kd_options(self) -> dict[str, float | None]:
        """The caller's KD temperature and weight (None: the KD loss's own)."""
        return {"kd_temperature": self.kd_temperature, "kd_weight": self.kd_weight}


def _weight(setup: _Setup, default: float) -> float:
    return default if setup.feature_weight is None else setup.feature_weight


def _check_one_to_one(setup: _Setup) -> None:
    if len(setup.student_layers) != len(setup.teacher_layers):
        raise ValueError(f"method {setup.name!r} pairs layers one-to-one: got "
                         f"{len(setup.student_layers)} student layers {setup.student_layers} and "
                         f"{len(setup.teacher_layers)} teacher layers {setup.teacher_layers}")


def _build_logit_only(setup: _Setup, *, kd: str | None) -> Method:
    return Method(setup.name, kd=kd, **setup.kd_options())


def _build_feature_mse(setup: _Setup, *, all_to_all: bool, kd: str | None,
                       detach: bool) -> FeatureMSE:
    num_s, num_t = len(setup.student_layers), len(setup.teacher_layers)
    if all_to_all:
        pairs = [(s, t) for s in range(num_s) for t in range(num_t)]
        pair_weight = 1.0 / num_t
    else:
        _check_one_to_one(setup)
        pairs = [(i, i) for i in range(num_s)]
        pair_weight = 1.0 / num_s
    return FeatureMSE(setup.name, pairs=pairs, student_shapes=setup.student_shapes,
                      teacher_shapes=setup.teacher_shapes, pair_weight=pair_weight,
                      feature_weight=_weight(setup, 1.0), kd=kd, **setup.kd_options(),
                      student_layouts=setup.student_layouts, teacher_layouts=setup.teacher_layouts,
                      student_layers=setup.student_layers, teacher_layers=setup.teacher_layers,
                      detach_after=setup.student_layers[-1] if detach else None)


def _build_sp(setup: _Setup) -> SimilarityPreserving:
    _check_one_to_one(setup)
    return SimilarityPreserving(setup.name, feature_weight=_weight(setup, SP_WEIGHT), kd="kd",
                                **setup.kd_options(), student_layers=setup.student_layers,
                                teacher_layers=setup.teacher_layers)


def _build_simkd(setup: _Setup, *, feature_loss: bool) -> SimKD:
    """SimKD on the deepest layer of each list; published: bottleneck projector, ``feat`` only."""
    teacher_layer = setup.teacher_layers[-1]
    classifier = copy.deepcopy(tail(setup.teacher, teacher_layer))
    head = ReusedClassifier(setup.student_shapes[-1], setup.teacher_shapes[-1], classifier,
                            "bottleneck" if feature_loss else "three",
                            student_layout=setup.student_layouts[-1], teacher_layout=setup.teacher_layouts[-1])
    return SimKD(setup.name, student_layer=setup.student_layers[-1], teacher_layer=teacher_layer,
                 head=head, feature_loss=feature_loss, feature_weight=_weight(setup, SIMKD_WEIGHT),
                 kd=None if feature_loss else "kd", **setup.kd_options())


def _build_semckd(setup: _Setup) -> SemCKD:
    return SemCKD(setup.name, student_shapes=setup.student_shapes,
                  teacher_shapes=setup.teacher_shapes, batch_size=setup.batch_size,
                  feature_weight=_weight(setup, SEMCKD_WEIGHT), kd="kd", **setup.kd_options(),
                  student_layouts=setup.student_layouts, teacher_layouts=setup.teacher_layouts,
                  student_layers=setup.student_layers, teacher_layers=setup.teacher_layers)


@dataclass(frozen=True)
class _Entry:
    info: MethodInfo
    build: Callable[[_Setup], Method]


def _feature_entry(layers: str, kd: str | None, detach: bool, description: str,
                   all_to_all: bool = False) -> _Entry:
    info = MethodInfo(layers, kd is not None, True, description)
    return _Entry(info, functools.partial(_build_feature_mse, all_to_all=all_to_all, kd=kd,
                                          detach=detach))


_REGISTRY: dict[str, _Entry] = {
    "ce": _Entry(MethodInfo(None, False, False, "CE only (the scratch student)"),
                 functools.partial(_build_logit_only, kd=None)),
    "kd": _Entry(MethodInfo(None, True, False, "CE + Hinton KD"),
                 functools.partial(_build_logit_only, kd="kd")),
    "kd_std": _Entry(MethodInfo(None, True, False, "CE + KD on z-scored logits"),
                     functools.partial(_build_logit_only, kd="kd_std")),
    "fitnet": _feature_entry("standard", "kd", False, "CE + KD + 1x1-projected feature MSE, "
                             "one-to-one"),
    "fitnet_fc": _feature_entry("standard", "kd", False, "CE + KD + feature MSE, every student "
                                "layer from every teacher layer (weight 1/n_teacher)",
                                all_to_all=True),
    "sp": _Entry(MethodInfo("standard", True, True, "CE + KD + similarity-preserving loss"),
                 _build_sp),
    "simkd": _Entry(MethodInfo("classifier", False, True, "feature MSE only between the "
                               "projected student feature and the teacher's classifier input; "
                               "the teacher's frozen classifier predicts", deploys_teacher_part=True),
                    functools.partial(_build_simkd, feature_loss=True)),
    "simkd_ce_kd": _Entry(MethodInfo("standard", True, False, "CE + KD on the logits of the "
                                     "teacher's frozen tail after its last standard layer, "
                                     "applied to the projected last student feature",
                                     deploys_teacher_part=True),
                          functools.partial(_build_simkd, feature_loss=False)),
    "semckd": _Entry(MethodInfo("standard", True, True, "CE + KD + attention-weighted "
                                "all-to-all feature MSE"), _build_semckd),
    "featkd": _feature_entry("q", None, True, "feature MSE only on the backbone; CE trains the "
                             "tail on detached features"),
    "featkd_ce": _feature_entry("q", None, False, "CE + feature MSE on the backbone"),
    "featkd_ce_kd": _feature_entry("q", "kd", False, "CE + KD + feature MSE on the backbone"),
    "featkd_std": _feature_entry("standard", None, True, "featkd with the standard teacher "
                                 "layers"),
}

METHOD_INFO: dict[str, MethodInfo] = {name: entry.info for name, entry in _REGISTRY.items()}


def list_methods() -> list[str]:
    """Names accepted by :func:`build_method`, in the spec's table order."""
    return list(_REGISTRY)


@dataclass
class _Probe:
    """One dry forward of a model: tapped layers in forward order, their features, the output."""

    names: list[str]
    features: list[Tensor]
    output: Tensor

    def shapes(self) -> list[torch.Size]:
        return [f.shape[1:] for f in self.features]

    def layouts(self, sample_input: Tensor) -> list[str]:
        return [feature_layout(f.shape[1:], sample_input.shape[-2:]) for f in self.features]


@torch.no_grad()
def _probe(model: nn.Module, names: list[str], sample_input: Tensor, role: str) -> _Probe:
    """One dry forward in eval mode; ``names`` sorted into forward order."""
    try:
        with eval_mode(model), FeatureTap(model, names) as tap:
            output = model(sample_input)
        features = tap.outputs
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:
        raise ValueError(f"the {role} ({type(model).__name__}) fails on a sample batch of shape "
                         f"{tuple(sample_input.shape)}: {err}") from err
    by_name = dict(zip(names, features))
    ordered = sorted(names, key=tap.fired.index)
    return _Probe(ordered, [by_name[n] for n in ordered], output)


def _resolve(model: nn.Module, layers: Sequence[int | str] | None, role: str, method: str
             ) -> list[str]:
    if layers is None or len(layers) == 0:
        raise ValueError(f"method {method!r} needs {role} layers")
    names = resolve_layers(model, layers)
    if len(set(names)) != len(names):
        raise ValueError(f"{role} layers repeat a layer: {names}")
    return names


def _check_logits(output: Tensor, num_classes: int, role: str) -> None:
    if output.dim() != 2 or output.shape[1] != num_classes:
        raise ValueError(f"the {role} outputs shape {tuple(output.shape)}, expected logits "
                         f"(batch, {num_classes})")


def _classifier_layers(model: nn.Module, layers: Sequence[int | str] | None,
                       sample_input: Tensor) -> Sequence[int | str]:
    """``layers`` as given, or [the GL at the classifier's input] when None or empty."""
    return layers if layers else [classifier_input(model, sample_input)]


def build_method(name: str, teacher: nn.Module | None, student: nn.Module, *,
                 teacher_layers: Sequence[int | str] | None,
                 student_layers: Sequence[int | str] | None,
                 num_classes: int, sample_input: Tensor, batch_size: int | None = None,
                 feature_weight: float | None = None, kd_temperature: float | None = None,
                 kd_weight: float | None = None) -> Method:
    """Build method ``name`` for a (teacher, student) pair.

    Layers are GL indices or module names (keywords such as "standard" are the
    caller's to resolve); methods without teacher layers ignore both lists.
    Lists are sorted into forward order and one-to-one methods pair them in that
    order. SimKD uses the deepest entry of each list; ``simkd`` takes None for
    either list as the input of that model's classifier
    (:func:`featkd.layers.classifier_input`). ``sample_input`` (a small batch on
    the models' device) gives feature shapes by one dry forward in eval mode;
    ``batch_size`` (default: the sample batch size) is the training batch size
    SemCKD's embeddings take; ``feature_weight`` overrides the method's
    feature-loss weight; ``kd_temperature`` / ``kd_weight`` its KD term's
    (:data:`KD_DEFAULTS`). Raises ValueError for an unknown method, missing or
    mismatched layers, shapes that cannot be aligned, KD settings for a method
    without KD, or logits without ``num_classes`` classes.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(list_methods())}")
    entry = _REGISTRY[name]
    info = entry.info
    needs_teacher = info.teacher_logits or info.teacher_layers is not None
    if needs_teacher and teacher is None:
        raise ValueError(f"method {name!r} needs a teacher model")
    if info.teacher_layers == "classifier":
        student_layers = _classifier_layers(student, student_layers, sample_input)
        teacher_layers = _classifier_layers(teacher, teacher_layers, sample_input)
    s_names: list[str] = []
    t_names: list[str] = []
    if info.teacher_layers is not None:
        s_names = _resolve(student, student_layers, "student", name)
        t_names = _resolve(teacher, teacher_layers, "teacher", name)
    s_probe = _probe(student, s_names, sample_input, "student")
    _check_logits(s_probe.output, num_classes, "student")
    t_probe = _Probe([], [], None)
    if needs_teacher:
        t_probe = _probe(teacher, t_names, sample_input, "teacher")
        _check_logits(t_probe.output, num_classes, "teacher")
    setup = _Setup(name, teacher, s_probe.names, t_probe.names, s_probe.shapes(),
                   t_probe.shapes(), batch_size or sample_input.shape[0], feature_weight,
                   s_probe.layouts(sample_input), t_probe.layouts(sample_input),
                   kd_temperature=kd_temperature, kd_weight=kd_weight)
    method = entry.build(setup).to(sample_input.device)  # its projectors beside the models
    if method.detach_after is not None:
        teacher_outputs = TeacherOutputs(t_probe.features,
                                         t_probe.output if method.needs_teacher_logits else None)
        check_gradient_split(DistillModel(student, method), sample_input, teacher_outputs)
    log.info("built method %s: student layers %s, teacher layers %s", name,
             method.student_layers, method.teacher_layers)
    return method


def used_parameter_count(network: nn.Module, sample_input: Tensor) -> int:
    """Number of parameters that ``network``'s output depends on (eval mode, each tensor once).

    Frozen parameters count too; parameters a forward pass never reaches (such
    as the unused student head inside a SimKD network) do not. One forward and
    backward of ``sample_input``; no ``.grad``, mode or ``requires_grad`` is changed.
    """
    params = list(network.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with eval_mode(network), torch.enable_grad():
            output = network(sample_input)
        grads = torch.autograd.grad(output.float().sum(), params, allow_unused=True)
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return sum(p.numel() for p, grad in zip(params, grads) if grad is not None)
