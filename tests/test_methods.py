"""Distillation losses, projectors, methods and DistillModel (tiny models, CPU, seconds)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featkd.distillation import (
    METHOD_INFO, DistillModel, OnlineTeacher, SingleLayerConv, ThreeLayerConv, align_spatial,
    build_method, ce, feature_mse, kd_loss, kd_std_loss, list_methods, make_projector, semckd_loss,
    similarity_preserving_loss, standardize_logits,
)
from featkd.distillation.losses import batch_gram
from featkd.layers import extract, resolve_layers, tail
from featkd.models import PAPER_STUDENT_LAYERS, STANDARD_TEACHER_LAYERS, create_model

NUM_CLASSES = 10
WIDTH = 1 / 16
PAIRS = [("resnet34", "resnet9"), ("vit_b", "vit_et"), ("vgg19_bn", "vgg11_bn"),
         ("resnet34", "mobilenetv2")]
EXPECTED_LOSSES = {
    "ce": {"ce"}, "kd": {"ce", "kd"}, "kd_std": {"ce", "kd"}, "fitnet": {"ce", "kd", "feat"},
    "fitnet_fc": {"ce", "kd", "feat"}, "sp": {"ce", "kd", "sp"}, "simkd": {"ce", "kd"},
    "semckd": {"ce", "kd", "semckd"}, "featkd": {"ce", "feat"}, "featkd_ce": {"ce", "feat"},
    "featkd_ce_kd": {"ce", "kd", "feat"}, "featkd_std": {"ce", "feat"},
}


def make_pair(teacher_name, student_name, seed=0):
    torch.manual_seed(seed)
    teacher = create_model(teacher_name, NUM_CLASSES, width=WIDTH).eval()
    student = create_model(student_name, NUM_CLASSES, width=WIDTH)
    return teacher, student


def batch(seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 3, 32, 32, generator=g)
    return x, torch.randint(0, NUM_CLASSES, (size,), generator=g)


def build(name, teacher, student, teacher_name, student_name, x, **kw):
    return build_method(name, teacher, student,
                        teacher_layers=STANDARD_TEACHER_LAYERS[teacher_name],
                        student_layers=PAPER_STUDENT_LAYERS[student_name],
                        num_classes=NUM_CLASSES, sample_input=x, **kw)


def teacher_outputs(method, teacher, x):
    return OnlineTeacher(teacher, method.teacher_layers, method.needs_teacher_logits)(x)


def no_grad(params):
    return all(p.grad is None or not p.grad.any() for p in params)


def split_params(student, deepest):
    tail_ids = {id(p) for p in tail(student, deepest).parameters()}
    tail_params = [p for p in student.parameters() if id(p) in tail_ids]
    backbone = [p for p in student.parameters() if id(p) not in tail_ids]
    assert tail_params and backbone
    return backbone, tail_params


# ----------------------------------------------------------------------------- losses

def test_ce_and_kd_match_their_definitions():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.allclose(ce(s, labels), -F.log_softmax(s, 1)[torch.arange(4), labels].mean())
    p_t, p_s = F.softmax(t / 4, 1), F.softmax(s / 4, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * 16
    assert torch.allclose(kd_loss(s, t), expected, atol=1e-6)
    assert kd_loss(t, t).abs() < 1e-6
    p_t1 = F.softmax(t, 1)
    expected_t1 = (p_t1 * (p_t1.log() - F.log_softmax(s, 1))).sum(1).mean()
    assert torch.allclose(kd_loss(s, t, temperature=1.0), expected_t1, atol=1e-6)


def test_kd_loss_gives_no_gradient_to_the_teacher():
    s, t = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_standardized_kd_equals_kd_on_prestandardised_logits():
    s, t = torch.randn(6, 10) * 3 + 1, torch.randn(6, 10) * 7 - 2
    z = standardize_logits(s)
    assert torch.allclose(z.mean(1), torch.zeros(6), atol=1e-5)
    assert torch.allclose(z.std(1, correction=0), torch.ones(6), atol=1e-5)
    assert torch.allclose(kd_std_loss(s, t), kd_loss(standardize_logits(s), standardize_logits(t)))
    # invariant to per-sample shift and scale of either side
    assert torch.allclose(kd_std_loss(s * 5 + 3, t * 0.5 - 1), kd_std_loss(s, t), atol=1e-5)
    assert not torch.allclose(kd_loss(s * 5, t), kd_loss(s, t))


def test_feature_mse_is_the_elementwise_mean_and_checks_shapes():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.allclose(feature_mse(a, b), ((a - b) ** 2).mean())
    with pytest.raises(ValueError, match="shapes differ"):
        feature_mse(a, b[:, :2])


def test_similarity_preserving_loss_matches_hand_computation():
    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]])    # G = [[1, 1], [1, 2]]
    teacher = torch.tensor([[0.0, 2.0], [1.0, 0.0]])    # G = [[4, 0], [0, 1]]
    r2, r5 = 1 / math.sqrt(2), 1 / math.sqrt(5)
    expected = ((r2 - 1) ** 2 + r2 ** 2 + r5 ** 2 + (2 * r5 - 1) ** 2) / 4
    loss = similarity_preserving_loss([student], [teacher])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # maps are flattened; pairs are summed
    maps = student.reshape(2, 1, 1, 2)
    loss = similarity_preserving_loss([maps, maps], [teacher, teacher])
    assert loss.item() == pytest.approx(2 * expected, rel=1e-6)
    with pytest.raises(ValueError):
        similarity_preserving_loss([student], [])


def test_batch_gram_is_float32_under_autocast():
    feat = torch.randn(3, 2, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram = batch_gram(feat)
    assert gram.dtype == torch.float32
    assert torch.allclose(gram, feat.flatten(1) @ feat.flatten(1).t())


def test_semckd_loss_matches_hand_computation():
    zeros = torch.zeros(2, 1)
    targets = [[torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [0.0]])]]
    attention = torch.tensor([[[0.25, 0.75]], [[1.0, 0.0]]])
    # per-sample mse: t0 -> [1, 4], t1 -> [9, 0]; (0.25 + 6.75 + 4 + 0) / (B=2 * S=1)
    assert semckd_loss([[zeros, zeros]], targets, attention).item() == pytest.approx(5.5)
    with pytest.raises(ValueError, match="attention shape"):
        semckd_loss([[zeros, zeros]], targets, attention[:, :, :1])


def test_align_spatial_pools_the_larger_map():
    s, t = align_spatial(torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4))
    assert s.shape == (2, 4, 4, 4) and t.shape == (2, 6, 4, 4)
    big = torch.randn(2, 6, 8, 8)
    s, t = align_spatial(torch.randn(2, 4, 2, 2), big)
    assert torch.allclose(t, F.adaptive_avg_pool2d(big, 2))
    s, t = align_spatial(torch.randn(2, 5), torch.randn(2, 6, 4, 4))      # vector = 1x1 map
    assert s.shape == (2, 5, 1, 1) and t.shape == (2, 6, 1, 1)
    tokens = torch.randn(2, 65, 12)
    s, t = align_spatial(tokens, torch.randn(2, 17, 8))                    # (B, T, d) -> (B, d, T)
    assert s.shape == (2, 12, 17) and t.shape == (2, 8, 17)
    s, t = align_spatial(tokens, torch.randn(2, 65, 8))
    assert torch.equal(s, tokens.transpose(1, 2))
    s, t = align_spatial(torch.randn(2, 4, 4, 4), tokens)                  # map -> (B, C, H*W)
    assert s.shape == (2, 4, 16) and t.shape == (2, 12, 16)
    with pytest.raises(ValueError):
        align_spatial(torch.randn(2, 3, 4, 4, 4), tokens)


# ----------------------------------------------------------------------------- projectors

def test_projector_modules():
    single = SingleLayerConv(4, 6)
    assert isinstance(single[0], nn.Conv2d) and single[0].kernel_size == (1, 1)
    assert single[0].bias is None
    assert isinstance(SingleLayerConv(4, 6, dims=1)[0], nn.Conv1d)
    three = ThreeLayerConv(4, 6)
    convs = [m for m in three if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    assert [c.out_channels for c in convs] == [12, 12, 6]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in three) == 2
    assert three(torch.randn(2, 4, 3, 3)).shape == (2, 6, 3, 3)
    assert ThreeLayerConv(4, 6, dims=1)(torch.randn(2, 4, 9)).shape == (2, 6, 9)


@pytest.mark.parametrize("kind", ["single", "three"])
@pytest.mark.parametrize("s_shape,t_shape,out_shape", [
    ((8, 16, 16), (32, 4, 4), (32, 4, 4)),
    ((8, 2, 2), (32, 4, 4), (32, 2, 2)),
    ((8,), (32, 4, 4), (32, 1, 1)),
    ((65, 12), (65, 48), (48, 65)),
    ((8, 4, 4), (65, 48), (48, 16)),
])
def test_make_projector_aligns_and_projects(kind, s_shape, t_shape, out_shape):
    projector = make_projector(s_shape, t_shape, kind)
    projected, target = projector(torch.randn(2, *s_shape), torch.randn(2, *t_shape))
    assert projected.shape == target.shape == (2, *out_shape)


def test_make_projector_rejects_bad_shapes_and_kinds():
    with pytest.raises(ValueError, match="cannot align"):
        make_projector((4, 2, 2, 2), (8, 4, 4))
    with pytest.raises(ValueError, match="unknown projector"):
        make_projector((4, 2, 2), (8, 4, 4), "five")


# ----------------------------------------------------------------------------- methods

def test_registry_lists_every_method_of_the_spec():
    assert list_methods() == list(EXPECTED_LOSSES)
    assert set(METHOD_INFO) == set(EXPECTED_LOSSES)
    assert {n for n, i in METHOD_INFO.items() if i.teacher_layers == "q"} == {
        "featkd", "featkd_ce", "featkd_ce_kd"}
    assert METHOD_INFO["featkd_std"].teacher_layers == "standard"
    assert METHOD_INFO["ce"].teacher_layers is None and not METHOD_INFO["ce"].teacher_logits


# every method on the ResNet pair; on the other pairs the methods whose layout handling differs
LAYOUT_METHODS = ["fitnet_fc", "sp", "simkd", "semckd", "featkd"]
METHOD_CASES = ([("resnet34", "resnet9", m) for m in EXPECTED_LOSSES]
                + [(t, s, m) for t, s in PAIRS[1:] for m in LAYOUT_METHODS])


@pytest.mark.parametrize("teacher_name,student_name,name", METHOD_CASES)
def test_method_runs_forward_and_backward(teacher_name, student_name, name):
    teacher, student = make_pair(teacher_name, student_name)
    x, y = batch()
    method = build(name, teacher, student, teacher_name, student_name, x)
    info = METHOD_INFO[name]
    assert method.name == name
    assert method.needs_teacher_logits == info.teacher_logits
    assert method.needs_teacher_features == info.teacher_features
    model = DistillModel(student, method).train()
    logits, losses = model(x, y, teacher_outputs(method, teacher, x))
    assert logits.shape == (8, NUM_CLASSES)
    assert set(losses) == EXPECTED_LOSSES[name]
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert any(p.grad is not None and p.grad.any() for p in student.parameters())
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad)


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_featkd_backbone_learns_only_from_features_tail_only_from_ce(teacher_name, student_name):
    teacher, student = make_pair(teacher_name, student_name)
    x, y = batch()
    method = build("featkd", teacher, student, teacher_name, student_name, x)
    assert method.detach_after == method.student_layers[-1]
    backbone, tail_params = split_params(student, method.detach_after)
    model = DistillModel(student, method)
    _, losses = model(x, y, teacher_outputs(method, teacher, x))

    losses["feat"].backward(retain_graph=True)
    assert no_grad(tail_params)
    assert all(p.grad is not None for p in backbone) and any(p.grad.any() for p in backbone)
    assert all(p.grad is not None for p in method.projectors.parameters())

    model.zero_grad()
    losses["ce"].backward()
    assert no_grad(backbone)
    assert no_grad(method.parameters())
    assert all(p.grad is not None for p in tail_params) and any(p.grad.any() for p in tail_params)


@pytest.mark.parametrize("name", ["featkd_ce", "featkd_ce_kd"])
def test_featkd_ablations_let_logit_losses_reach_the_backbone(name):
    teacher, student = make_pair("resnet34", "resnet9")
    x, y = batch()
    method = build(name, teacher, student, "resnet34", "resnet9", x)
    assert method.detach_after is None
    backbone, _ = split_params(student, method.student_layers[-1])
    _, losses = DistillModel(student, method)(x, y, teacher_outputs(method, teacher, x))
    losses["ce"].backward()
    assert any(p.grad is not None and p.grad.any() for p in backbone)


def test_simkd_classifies_with_the_frozen_teacher_tail():
    teacher, student = make_pair("resnet34", "mobilenetv2")
    x, y = batch()
    method = build("simkd", teacher, student, "resnet34", "mobilenetv2", x)
    assert method.teacher_layers == [] and not method.needs_teacher_features
    assert method.teacher_tail_layer == resolve_layers(teacher, [16])[0]
    model = DistillModel(student, method).train()
    assert not method.teacher_tail.training and method.projector.training
    tail_layer = method.teacher_tail_layer
    with torch.no_grad():   # the tail is the teacher's rest after its last distilled layer
        feat = extract(teacher, x, [tail_layer])[0]
        assert torch.allclose(method.teacher_tail(feat), teacher(x), atol=1e-5)
    logits, losses = model(x, y, teacher_outputs(method, teacher, x))
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher_tail.parameters())
    assert method.find_unused_parameters          # the student's own head gets no gradient
    assert no_grad(tail(student, method.student_layers[-1]).parameters())
    assert all(p.requires_grad for p in teacher.parameters())          # the teacher is untouched
    assert all(p.grad is not None for p in method.projector.parameters())
    assert not method.teacher_tail.training
    model.eval()
    with torch.no_grad():
        logits, losses = model(x)
        student_feat = extract(student, x, method.student_layers)[0]
        expected = method.teacher_tail(method.project(student_feat))
    assert losses == {} and torch.allclose(logits, expected)


def test_semckd_embeddings_take_the_training_batch_size():
    teacher, student = make_pair("resnet34", "resnet9")
    x, y = batch(size=8)
    method = build("semckd", teacher, student, "resnet34", "resnet9", x[:2], batch_size=8)
    assert method.requires_full_batches
    mlp = method.queries[0].mlp
    assert mlp[0].in_features == 8 and mlp[0].out_features == 256 and mlp[2].out_features == 128
    model = DistillModel(student, method)
    out = teacher_outputs(method, teacher, x)
    attention = method.attention(extract(student, x, method.student_layers), out.features)
    assert attention.shape == (8, 4, 4)
    assert torch.allclose(attention.sum(-1), torch.ones(8, 4))
    _, losses = model(x[:5], y[:5], teacher_outputs(method, teacher, x[:5]))   # padded
    assert torch.isfinite(losses["semckd"])
    x_big, y_big = batch(size=9)
    with pytest.raises(ValueError, match="exceeds the SemCKD batch size"):
        model(x_big, y_big, teacher_outputs(method, teacher, x_big))


def test_layers_are_sorted_by_depth_and_build_leaves_models_untouched():
    teacher, student = make_pair("resnet34", "resnet9")
    x, _ = batch()
    student.train()
    stats = {k: v.clone() for k, v in student.state_dict().items()}
    method = build_method("featkd", teacher, student, teacher_layers=[16, 3, 13, 7],
                          student_layers=[4, 2, 3, 1], num_classes=NUM_CLASSES, sample_input=x)
    ordered = build("featkd", teacher, student, "resnet34", "resnet9", x)
    assert method.student_layers == ordered.student_layers
    assert method.teacher_layers == ordered.teacher_layers
    assert method.detach_after == ordered.student_layers[-1]
    assert student.training and all(m.training for m in student.modules())
    assert not teacher.training
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in stats.items())


def test_bad_arguments_raise_clear_errors():
    teacher, student = make_pair("resnet34", "resnet9")
    x, y = batch()
    kw = dict(num_classes=NUM_CLASSES, sample_input=x)
    with pytest.raises(ValueError, match="unknown method.*featkd"):
        build_method("nope", teacher, student, teacher_layers=[1], student_layers=[1], **kw)
    for name in ("fitnet", "featkd", "sp"):
        with pytest.raises(ValueError, match="one-to-one"):
            build_method(name, teacher, student, teacher_layers=[3, 7, 13],
                         student_layers=[1, 2, 3, 4], **kw)
    with pytest.raises(ValueError, match="needs teacher layers"):
        build_method("featkd", teacher, student, teacher_layers=None, student_layers=[1], **kw)
    with pytest.raises(ValueError, match="needs a teacher"):
        build_method("kd", None, student, teacher_layers=None, student_layers=None, **kw)
    with pytest.raises(ValueError, match="repeat"):
        build_method("fitnet", teacher, student, teacher_layers=[3, 3], student_layers=[1, 2], **kw)
    with pytest.raises(ValueError, match="expected logits"):
        build_method("ce", None, student, teacher_layers=None, student_layers=None,
                     num_classes=7, sample_input=x)
    with pytest.raises(IndexError):
        build_method("featkd", teacher, student, teacher_layers=[99], student_layers=[1], **kw)
    # all-to-all methods accept lists of different lengths
    build_method("fitnet_fc", teacher, student, teacher_layers=[3, 7], student_layers=[1, 2, 3],
                 **kw)
    kd = DistillModel(student, build_method("kd", teacher, student, teacher_layers=None,
                                            student_layers=None, **kw))
    with pytest.raises(ValueError, match="needs teacher outputs"):
        kd(x, y, None)


def test_ce_needs_no_teacher_and_eval_returns_no_losses():
    _, student = make_pair("resnet34", "resnet9")
    x, y = batch()
    model = DistillModel(student, build_method("ce", None, student, teacher_layers=None,
                                               student_layers=None, num_classes=NUM_CLASSES,
                                               sample_input=x))
    logits, losses = model(x, y)
    assert set(losses) == {"ce"} and torch.allclose(losses["ce"], F.cross_entropy(logits, y))
    model.eval()
    with torch.no_grad():
        logits, losses = model(x)
        assert losses == {} and torch.allclose(logits, student(x))


def test_feature_weight_override_scales_the_feature_loss():
    teacher, student = make_pair("resnet34", "resnet9")
    x, y = batch()
    student.eval()
    results = []
    for weight in (None, 2.0):
        torch.manual_seed(1)
        method = build("sp", teacher, student, "resnet34", "resnet9", x, feature_weight=weight)
        _, losses = DistillModel(student, method)(x, y, teacher_outputs(method, teacher, x))
        results.append(losses["sp"].item())
    assert results[1] == pytest.approx(results[0] * 2.0 / 3000.0, rel=1e-5)


@pytest.mark.parametrize("name,num_pairs,pair_weight", [("fitnet", 4, 1 / 4), ("fitnet_fc", 16, 1 / 4)])
def test_feature_loss_weights_pairs(name, num_pairs, pair_weight):
    teacher, student = make_pair("resnet34", "resnet9")
    x, y = batch()
    method = build(name, teacher, student, "resnet34", "resnet9", x)
    assert len(method.pairs) == num_pairs
    out = teacher_outputs(method, teacher, x)
    _, losses = DistillModel(student, method)(x, y, out)
    feats = extract(student, x, method.student_layers)
    terms = [F.mse_loss(*proj(feats[s], out.features[t]))
             for (s, t), proj in zip(method.pairs, method.projectors)]
    assert torch.allclose(losses["feat"], pair_weight * torch.stack(terms).sum(), rtol=1e-4)


@pytest.mark.parametrize("name", ["semckd", "sp", "featkd", "simkd"])
def test_methods_stay_finite_under_autocast(name):
    teacher, student = make_pair("resnet34", "resnet9")
    x, y = batch()
    method = build(name, teacher, student, "resnet34", "resnet9", x)
    model = DistillModel(student, method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = model(x, y, teacher_outputs(method, teacher, x))
    assert all(torch.isfinite(v) for v in losses.values())
