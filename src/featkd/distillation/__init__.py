"""Distillation methods, losses, projectors and teacher outputs (online or cached).

    method = build_method("featkd", teacher, student, teacher_layers=[12, 13, 14, 15],
                          student_layers=[1, 2, 3, 4], num_classes=10, sample_input=x[:8])
    model = DistillModel(student, method)
    teacher_out = OnlineTeacher(teacher, method.teacher_layers, method.needs_teacher_logits)(x)
    logits, losses = model(x, labels=y, teacher=teacher_out)
    sum(losses.values()).backward()
"""

from .losses import (
    align_spatial, ce, feature_mse, kd_loss, kd_std_loss, semckd_loss, similarity_preserving_loss,
    standardize_logits,
)
from .methods import (
    KD_DEFAULTS, METHOD_INFO, DistillModel, FeatureMSE, Method, MethodInfo, ReusedClassifier, SemCKD,
    SimKD, SimilarityPreserving, TappedNetwork, build_method, list_methods, used_parameter_count,
)
from .projectors import (
    BottleneckConv, PairProjector, SingleLayerConv, ThreeLayerConv, make_projector,
)
from .teacher import OnlineTeacher, TeacherCache, TeacherOutputs, online_beats_cache

__all__ = [
    "KD_DEFAULTS", "METHOD_INFO", "BottleneckConv", "DistillModel", "FeatureMSE", "Method",
    "MethodInfo", "OnlineTeacher", "PairProjector", "ReusedClassifier", "SemCKD", "SimKD",
    "SimilarityPreserving", "SingleLayerConv", "TappedNetwork", "TeacherCache", "TeacherOutputs",
    "ThreeLayerConv", "align_spatial", "build_method", "ce", "feature_mse", "kd_loss",
    "kd_std_loss", "list_methods", "make_projector", "online_beats_cache", "semckd_loss",
    "similarity_preserving_loss", "standardize_logits", "used_parameter_count",
]
