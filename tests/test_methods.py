"""Distillation losses, projectors, methods and DistillModel (tiny models, CPU, seconds)."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from featkd.distillation import (
    METHOD_INFO, BottleneckConv, DistillModel, OnlineTeacher, SingleLayerConv, ThreeLayerConv,
    TeacherOutputs, align_spatial, build_method, ce, feature_mse, kd_loss, kd_std_loss,
    list_methods, make_projector, semckd_loss, similarity_preserving_loss, standardize_logits,
    used_parameter_count,
)
from featkd.distillation.losses import batch_gram
from featkd.layers import (
    classifier_input, extract, generalized_layers, leaf_chain, resolve_layers, tail,
)
from featkd.models import PAPER_STUDENT_LAYERS, STANDARD_TEACHER_LAYERS, create_model

NUM_CLASSES = 10
WIDTH = 1 / 16
PAIRS = [("resnet34", "resnet9"), ("vit_b", "vit_et"), ("vgg19_bn", "vgg11_bn"),
         ("resnet34", "mobilenetv2")]
EXPECTED_LOSSES = {
    "ce": {"ce"}, "kd": {"ce", "kd"}, "kd_std": {"ce", "kd"}, "fitnet": {"ce", "kd", "feat"},
    "fitnet_fc": {"ce", "kd", "feat"}, "sp": {"ce", "kd", "sp"}, "simkd": {"feat"},
    "simkd_ce_kd": {"ce", "kd"}, "semckd": {"ce", "kd", "semckd"}, "featkd": {"ce", "feat"},
    "featkd_ce": {"ce", "feat"},
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
    assert torch.allclose(z.std(1), torch.ones(6), atol=1e-5)              # unbiased std, as Sun et al.
    assert torch.allclose(kd_std_loss(s, t),
                          kd_loss(standardize_logits(s), standardize_logits(t), temperature=2.0))
    # invariant to per-sample shift and scale of either side
    assert torch.allclose(kd_std_loss(s * 5 + 3, t * 0.5 - 1), kd_std_loss(s, t), atol=1e-5)
    assert not torch.allclose(kd_loss(s * 5, t), kd_loss(s, t))


def test_kd_std_term_matches_sun_et_al_by_hand():
    """Sun et al.: z = (l - mean) / (1e-7 + unbiased std), T = 2, KD weight 9, times T**2."""
    student = torch.tensor([[1.0, 2.0, 3.0]])      # mean 2, unbiased std 1 -> z = (-1, 0, 1)
    teacher = torch.tensor([[5.0, 1.0, 3.0]])      # mean 3, unbiased std 2 -> z = (1, -1, 0)
    z_s, z_t = [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]
    p_s = [math.exp(v / 2) / sum(math.exp(u / 2) for u in z_s) for v in z_s]
    p_t = [math.exp(v / 2) / sum(math.exp(u / 2) for u in z_t) for v in z_t]
    kl = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    expected = 9 * 2**2 * kl
    assert standardize_logits(student)[0].tolist() == pytest.approx(z_s, abs=1e-6)
    assert standardize_logits(teacher)[0].tolist() == pytest.approx(z_t, abs=1e-6)

    method = build_method("kd_std", nn.Linear(1, 3), nn.Linear(1, 3), teacher_layers=None,
                          student_layers=None, num_classes=3, sample_input=torch.zeros(2, 1))
    assert (method.kd_temperature, method.kd_weight) == (2.0, 9.0)
    _, losses = method(student, [], TeacherOutputs([], teacher), torch.tensor([2]))
    assert losses["kd"].item() == pytest.approx(expected, rel=1e-5)
    assert losses["ce"].item() == pytest.approx(math.log(sum(math.exp(v) for v in (1, 2, 3))) - 3)


@pytest.mark.parametrize("name,kd,default", [("kd", "kd", (4.0, 1.0)), ("kd_std", "kd_std", (2.0, 9.0)),
                                             ("fitnet", "kd", (4.0, 1.0))])
def test_kd_temperature_and_weight_are_configurable(name, kd, default):
    teacher, student = make_pair("resnet34", "resnet9")
    x, y = batch()
    built = build(name, teacher, student, "resnet34", "resnet9", x)
    assert built.kd == kd and (built.kd_temperature, built.kd_weight) == default
    custom = build(name, teacher, student, "resnet34", "resnet9", x, kd_temperature=3.0, kd_weight=0.5)
    assert (custom.kd_temperature, custom.kd_weight) == (3.0, 0.5)
    student.eval()
    out = teacher_outputs(custom, teacher, x)
    _, losses = DistillModel(student, custom)(x, y, out)
    loss_fn = kd_std_loss if kd == "kd_std" else kd_loss
    assert torch.allclose(losses["kd"], 0.5 * loss_fn(student(x), out.logits, 3.0), rtol=1e-5)


def test_kd_settings_are_refused_by_methods_without_kd():
    teacher, student = make_pair("resnet34", "resnet9")
    x, _ = batch()
    for name in ("ce", "featkd", "simkd"):
        with pytest.raises(ValueError, match="no KD term"):
            build(name, teacher, student, "resnet34", "resnet9", x, kd_weight=2.0)


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
    bottleneck = BottleneckConv(4, 6)                 # SimKD's: C_t/2 inside, BN + ReLU at the end
    convs = [m for m in bottleneck if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    assert [c.out_channels for c in convs] == [3, 3, 6] and all(c.bias is None for c in convs)
    assert [type(m) for m in bottleneck][-2:] == [nn.BatchNorm2d, nn.ReLU]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bottleneck) == 3
    assert (bottleneck(torch.randn(2, 4, 3, 3)) >= 0).all()
    assert isinstance(BottleneckConv(4, 6, dims=1)[0], nn.Conv1d)
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


@pytest.mark.parametrize("name", list(EXPECTED_LOSSES))
def test_a_built_method_lives_on_the_device_of_the_models(name):
    """Projectors and reused classifiers are built beside the models (a GPU run failed without it).

    The meta device stands in for a GPU: a module left on the CPU shows as a CPU tensor.
    """
    teacher, student = (model.to("meta") for model in make_pair("resnet34", "resnet9"))
    x = torch.empty(8, 3, 32, 32, device="meta")
    method = build(name, teacher, student, "resnet34", "resnet9", x)
    tensors = [*method.parameters(), *method.buffers()]
    assert {t.device for t in tensors} <= {x.device}
    if name in ("sp", "semckd"):  # their Gram matrices switch autocast off, which meta cannot do
        return
    # a loss that made a tensor on the CPU would fail here: meta and CPU tensors do not mix
    labels = torch.zeros(8, dtype=torch.long, device="meta")
    logits, losses = DistillModel(student, method).train()(x, labels, teacher_outputs(method, teacher, x))
    assert logits.device == x.device and losses and {loss.device for loss in losses.values()} == {x.device}
    sum(losses.values()).backward()


# every method on the ResNet pair; on the other pairs the methods whose layout handling differs
LAYOUT_METHODS = ["fitnet_fc", "sp", "simkd", "simkd_ce_kd", "semckd", "featkd"]
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


# the input of the classifier (spec: "the teacher's classifier input"), per zoo family
CLASSIFIER_INPUT = {"resnet34": 16, "resnet9": 4, "vgg19_bn": 15, "vgg11_bn": 7, "mobilenetv2": 18,
                    "vit_b": 12, "vit_et": 8}


@pytest.mark.parametrize("name,index", CLASSIFIER_INPUT.items())
def test_classifier_input_is_the_last_map_or_token_layer(name, index):
    model = create_model(name, NUM_CLASSES, width=WIDTH)
    x, _ = batch(size=2)
    assert classifier_input(model, x) == index
    assert extract(model, x, [index])[0].dim() > 2
    if index + 1 < len(generalized_layers(model)):     # CNNs: a vector follows; ViTs: the last GL
        assert extract(model, x, [index + 1])[0].dim() == 2


def test_classifier_input_of_a_convolutional_classifier_is_before_the_class_scores():
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=NUM_CLASSES).eval()
    index = classifier_input(model, torch.randn(2, 3, 32, 32))
    assert generalized_layers(model)[index:] == ["features.12", "classifier.2"]  # not the class-score map


def test_classifier_input_needs_a_map_or_token_layer():
    with pytest.raises(ValueError, match="no generalized layer"):
        classifier_input(nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU()), torch.randn(2, 3, 2, 2))


def deployed_count_by_hand(student, layer, method):
    """Parameters of the student's leaf chain up to ``layer``, the projector and the classifier."""
    chain = leaf_chain(student)
    names = [n for n, _ in chain]
    backbone = chain[:names.index(layer) + 1]
    count = sum(p.numel() for _, m in backbone for p in m.parameters())
    return count + sum(p.numel() for p in method.head.parameters())


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_simkd_as_published(teacher_name, student_name):
    """Feature L2 only at the classifiers' inputs; the frozen teacher classifier predicts."""
    teacher, student = make_pair(teacher_name, student_name)
    x, y = batch()
    method = build_method("simkd", teacher, student, teacher_layers=None, student_layers=None,
                          num_classes=NUM_CLASSES, sample_input=x)
    assert method.teacher_layers == resolve_layers(teacher, [CLASSIFIER_INPUT[teacher_name]])
    assert method.student_layers == resolve_layers(student, [CLASSIFIER_INPUT[student_name]])
    assert method.needs_teacher_features and not method.needs_teacher_logits
    assert isinstance(method.head.projector, BottleneckConv)
    classifier = method.head.classifier
    with torch.no_grad():   # the reused classifier is everything of the teacher after that layer
        feat = extract(teacher, x, method.teacher_layers)[0]
        assert torch.allclose(classifier(feat), teacher(x), atol=1e-5)

    model = DistillModel(student, method).train()
    assert not classifier.training and method.head.projector.training
    out = teacher_outputs(method, teacher, x)
    logits, losses = model(x, y, out)
    assert set(losses) == {"feat"}
    projected = method.head.project(extract(student, x, method.student_layers)[0])
    target = method.head.target(out.features[0], projected)
    assert projected.shape == target.shape
    assert torch.allclose(losses["feat"], F.mse_loss(projected, target), rtol=1e-4)
    losses["feat"].backward()
    assert all(p.grad is None and not p.requires_grad for p in classifier.parameters())
    assert no_grad(tail(student, method.student_layers[-1]).parameters())   # the student's head
    backbone = [p for p in student.parameters() if p.grad is not None]
    assert backbone and any(p.grad.any() for p in backbone)
    assert all(p.grad is not None for p in method.head.projector.parameters())
    assert all(p.requires_grad for p in teacher.parameters())           # the teacher is untouched

    deployed = model.deployed()
    assert deployed.backbone is student and deployed.head is method.head
    model.eval()
    with torch.no_grad():
        logits, losses = model(x)
        assert losses == {} and torch.allclose(logits, deployed(x))
        by_hand = method.head.classify(method.head.project(extract(student, x, method.student_layers)[0]))
        assert torch.allclose(logits, by_hand)
        assert torch.allclose(method.predict(None, extract(student, x, method.student_layers)), by_hand)
    assert f"name='simkd', kd=None, student_layers={method.student_layers}" in repr(method)
    assert "(head): ReusedClassifier" in repr(deployed) and f"layer={method.student_layers[-1]!r}" in repr(deployed)
    count = used_parameter_count(deployed, x)
    assert count == deployed_count_by_hand(student, method.student_layers[-1], method)
    everything = sum(p.numel() for p in student.parameters()) + sum(p.numel() for p in method.parameters())
    assert count < everything                                             # the student's head left out


def test_simkd_uses_the_deepest_layers_it_is_given():
    teacher, student = make_pair("resnet34", "resnet9")
    x, _ = batch()
    method = build("simkd", teacher, student, "resnet34", "resnet9", x)      # [3, 7, 13, 16], [1..4]
    assert method.teacher_layers == resolve_layers(teacher, [16])
    assert method.student_layers == resolve_layers(student, [4])
    method = build_method("simkd", teacher, student, teacher_layers=[13, 7], student_layers=[3],
                          num_classes=NUM_CLASSES, sample_input=x)
    assert method.teacher_layers == resolve_layers(teacher, [13])
    assert method.student_layers == resolve_layers(student, [3])


def test_simkd_ce_kd_keeps_the_released_code_variant():
    teacher, student = make_pair("resnet34", "mobilenetv2")
    x, y = batch()
    method = build("simkd_ce_kd", teacher, student, "resnet34", "mobilenetv2", x)
    assert method.teacher_layers == [] and not method.needs_teacher_features
    assert method.needs_teacher_logits and method.kd == "kd"
    assert method.teacher_tail_layer == resolve_layers(teacher, [16])[0]      # standard list's last
    assert method.student_layers == resolve_layers(student, [17])            # paper list's last
    assert isinstance(method.head.projector, ThreeLayerConv)
    model = DistillModel(student, method).train()
    out = teacher_outputs(method, teacher, x)
    logits, losses = model(x, y, out)
    assert set(losses) == {"ce", "kd"}
    assert torch.allclose(losses["ce"], F.cross_entropy(logits, y))
    assert torch.allclose(losses["kd"], kd_loss(logits, out.logits))
    sum(losses.values()).backward()
    assert all(p.grad is None for p in method.head.classifier.parameters())
    assert no_grad(tail(student, method.student_layers[-1]).parameters())
    assert all(p.grad is not None for p in method.head.projector.parameters())


def test_used_parameter_count_counts_what_the_output_depends_on():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert used_parameter_count(net, torch.randn(2, 3)) == 3 * 4 + 4 + 4 * 2 + 2
    net[2].requires_grad_(False)
    net.train()
    assert used_parameter_count(net, torch.randn(2, 3)) == 26                  # frozen ones count
    assert not any(p.requires_grad for p in net[2].parameters()) and net.training
    assert all(p.grad is None for p in net.parameters())
    shared = nn.Linear(3, 3)
    tied = nn.Sequential(shared, shared, nn.Linear(3, 1))
    assert used_parameter_count(tied, torch.randn(2, 3)) == 12 + 4             # shared once
    assert used_parameter_count(PartlyUsed(), torch.randn(2, 3)) == 4


class PartlyUsed(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 1), nn.Linear(5, 5)

    def forward(self, x):
        return self.used(x)


def test_semckd_embeddings_take_the_training_batch_size():
    teacher, student = make_pair("resnet34", "resnet9")
    x, y = batch(size=8)
    method = build("semckd", teacher, student, "resnet34", "resnet9", x[:2], batch_size=8)
    assert method.requires_full_batches
    mlp = method.queries[0].mlp
    assert mlp[0].in_features == 8 and mlp[0].out_features == 256 and mlp[2].out_features == 128
    model = DistillModel(student, method)
    out = teacher_outputs(method, teacher, x)
    student_feats = extract(student, x, method.student_layers)
    attention = method.attention(student_feats, out.features)
    assert attention.shape == (8, 4, 4)
    assert torch.allclose(attention.sum(-1), torch.ones(8, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # scores and softmax stay float32
        mixed = method.attention(student_feats, out.features)
    assert torch.allclose(mixed, attention, atol=1e-6)
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
