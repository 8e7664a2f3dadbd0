"""Tests for featkd.models: the zoo, its generalized layers, and ImageNet initialisation."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from featkd.layers import extract, feature_shapes, generalized_layers, head_index, tail
from featkd.models import (
    IMAGENET_MODELS,
    PAPER_Q_LAYERS,
    PAPER_STUDENT_LAYERS,
    STANDARD_TEACHER_LAYERS,
    check_classifier,
    create_model,
    list_models,
    load_imagenet_weights,
    model_family,
    peak_lr,
)
from featkd.models.imagenet import pool_patch_kernel, resize_pos_embedding
from featkd.models.vit import CONFIGS as VIT_CONFIGS
from featkd.models.vit import packed_self_attention, scaled_shape

SMALL = 1 / 16
ALL_MODELS = list_models()


def _run(*blocks: tuple[tuple[int, ...], int]) -> list[tuple[int, ...]]:
    return [shape for shape, count in blocks for _ in range(count)]


# spec/experiments.md, "Generalized layers": (head index, per-GL output shapes) at 32 px, width 1.
SPEC_TABLE = {
    "resnet34": (18, _run(((64, 32, 32), 4), ((128, 16, 16), 4), ((256, 8, 8), 6),
                          ((512, 4, 4), 3), ((512,), 1))),
    "resnet9": (6, _run(((64, 32, 32), 2), ((128, 16, 16), 1), ((256, 8, 8), 1),
                        ((512, 4, 4), 1), ((512,), 1))),
    "resnet18": (10, _run(((64, 32, 32), 3), ((128, 16, 16), 2), ((256, 8, 8), 2),
                          ((512, 4, 4), 2), ((512,), 1))),
    "vgg19_bn": (17, _run(((64, 32, 32), 2), ((128, 16, 16), 2), ((256, 8, 8), 4),
                          ((512, 4, 4), 4), ((512, 2, 2), 4), ((512,), 1), ((4096,), 2))),
    "vgg11_bn": (9, _run(((64, 32, 32), 1), ((128, 16, 16), 1), ((256, 8, 8), 2),
                         ((512, 4, 4), 2), ((512, 2, 2), 2), ((512,), 1), ((4096,), 2))),
    "mobilenetv2": (20, _run(((32, 32, 32), 1), ((16, 32, 32), 1), ((24, 16, 16), 2),
                             ((32, 8, 8), 3), ((64, 4, 4), 4), ((96, 4, 4), 3),
                             ((160, 2, 2), 3), ((320, 2, 2), 1), ((1280, 2, 2), 1),
                             ((1280,), 1))),
    "vit_b": (13, _run(((65, 768), 13))),
    "vit_et": (9, _run(((65, 192), 9))),
}


def test_registry_lists_every_model_with_its_family():
    assert ALL_MODELS == sorted(["resnet9", "resnet18", "resnet34", "vgg11_bn", "vgg19_bn",
                                 "mobilenetv2", "vit_et", "vit_b", "vit_t", "vit_s"])
    assert model_family("resnet34") == "resnet"
    assert model_family("vgg11_bn") == "vgg"
    assert model_family("mobilenetv2") == "mobilenet"
    assert model_family("vit_et") == "vit"


@pytest.mark.parametrize("call", [lambda: create_model("resnet50", 10), lambda: model_family("x"),
                                  lambda: peak_lr("vgg16")])
def test_unknown_name_lists_known_models(call):
    with pytest.raises(ValueError, match="known models: mobilenetv2, resnet18"):
        call()


@pytest.mark.parametrize("kwargs", [dict(num_classes=0), dict(num_classes=10, in_channels=0),
                                    dict(num_classes=10, width=0.0),
                                    dict(num_classes=10, image_size=0)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        create_model("resnet9", **kwargs)


def test_peak_lr_per_family():
    assert peak_lr("resnet9") == peak_lr("resnet34") == peak_lr("mobilenetv2") == 0.0075
    assert peak_lr("vgg11_bn") == peak_lr("vgg19_bn") == 0.005
    assert peak_lr("vit_et") == 0.001
    assert peak_lr("vit_b") == 1e-4


def test_paper_layer_lists_fit_the_models():
    for name, layers in {**PAPER_STUDENT_LAYERS, **STANDARD_TEACHER_LAYERS}.items():
        assert len(layers) == 4 and layers == sorted(layers)
        assert max(layers) < SPEC_TABLE[name][0], name
    for name, per_dataset in PAPER_Q_LAYERS.items():
        assert set(per_dataset) == {"cifar10", "cifar100", "tinyimagenet"}
        for layers in per_dataset.values():
            assert len(layers) == 4 and max(layers) < len(SPEC_TABLE[name][1])
    assert PAPER_Q_LAYERS["vgg19_bn"]["tinyimagenet"] == [11, 12, 13, 16]
    assert PAPER_Q_LAYERS["vit_b"]["cifar100"] == [7, 10, 11, 12]


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_shape(name, image_size, in_channels):
    model = create_model(name, 7, in_channels=in_channels, image_size=image_size, width=SMALL)
    assert isinstance(model, nn.Sequential)
    out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_generalized_layers_match_spec_table(name):
    head, shapes = SPEC_TABLE[name]
    model = create_model(name, 10)
    layers = generalized_layers(model)
    assert len(layers) == len(shapes)
    assert head_index(model) == head
    got = feature_shapes(model, layers, torch.randn(1, 3, 32, 32))
    assert [tuple(s) for s in got] == shapes


def test_gl_kinds_are_the_spec_ones():
    assert generalized_layers(create_model("resnet9", 10, width=SMALL)) == [
        "stem.relu", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "flatten"]
    vit = generalized_layers(create_model("vit_et", 10, width=SMALL))
    assert vit == ["patch_embed"] + [f"blocks.{i}" for i in range(8)]
    mobile = generalized_layers(create_model("mobilenetv2", 10, width=SMALL))
    assert mobile[0] == "stem.relu" and mobile[18] == "last_conv.relu" and mobile[19] == "flatten"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_is_a_chain(name):
    torch.manual_seed(0)
    model = create_model(name, 5, width=SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        out = x
        for child in model.children():
            out = child(out)
        torch.testing.assert_close(out, expected)
        for name_ in generalized_layers(model):
            feat = extract(model, x, [name_])[0]
            torch.testing.assert_close(tail(model, name_)(feat), expected)


@pytest.mark.parametrize("name", ["resnet9", "vgg11_bn", "mobilenetv2", "vit_et"])
def test_seeded_construction_is_deterministic(name):
    def build(seed):
        torch.manual_seed(seed)
        return create_model(name, 10, width=SMALL).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def _reference(name: str) -> nn.Module:
    """torchvision's model of the same shape at width 1, 100 classes, 32 px (spec/experiments.md)."""
    from torchvision.models import mobilenet_v2, resnet18, resnet34, vgg11_bn, vgg19_bn
    from torchvision.models.vision_transformer import VisionTransformer

    if name in ("resnet34", "resnet18"):
        net = {"resnet34": resnet34, "resnet18": resnet18}[name](num_classes=100)
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the 32-px stem
        return net
    if name in ("vgg19_bn", "vgg11_bn"):
        net = {"vgg19_bn": vgg19_bn, "vgg11_bn": vgg11_bn}[name](num_classes=100)
        net.classifier[0] = nn.Linear(512, 4096)  # a 1x1 map after the last pool
        return net
    if name == "mobilenetv2":
        return mobilenet_v2(num_classes=100)
    layers, heads, dim, mlp = {"vit_b": (12, 12, 768, 3072), "vit_et": (8, 6, 192, 576)}[name]
    return VisionTransformer(32, 4, layers, heads, dim, mlp, num_classes=100)


@pytest.mark.parametrize("name", ["resnet34", "resnet18", "vgg19_bn", "vgg11_bn", "mobilenetv2", "vit_b", "vit_et"])
def test_parameter_counts_equal_torchvisions_at_width_1(name):
    with torch.device("meta"):  # shapes only: no memory, no init time
        ours, reference = create_model(name, 100, image_size=32), _reference(name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_init_schemes_are_pinned():
    """Every benchmark result was trained with these; a change must be deliberate."""
    torch.manual_seed(0)
    resnet = create_model("resnet34", 100)
    assert resnet.fc.weight.std().item() == pytest.approx(0.01, rel=0.05) and not resnet.fc.bias.any()
    conv = resnet.layer1[0].conv1.weight  # Kaiming normal, fan_out
    assert conv.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    vit = create_model("vit_et", 100)
    attention = vit.blocks[0].self_attention
    bound = 1 / 192 ** 0.5  # nn.Linear's default, re-drawn after the attention module zeroed it
    assert attention.out_proj.bias.abs().max() <= bound and attention.out_proj.bias.abs().max() > bound / 2
    assert attention.out_proj.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    assert not vit.patch_embed.cls_token.any()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_width_scales_channels_not_depth(name):
    narrow = create_model(name, 10, width=0.25)
    wide = create_model(name, 10, width=0.5)
    assert generalized_layers(narrow) == generalized_layers(wide)
    x = torch.randn(1, 3, 32, 32)
    layers = generalized_layers(wide)
    narrow_shapes = feature_shapes(narrow, layers, x)
    wide_shapes = feature_shapes(wide, layers, x)
    channel_axis = -1 if model_family(name) == "vit" else 0
    for n, w in zip(narrow_shapes, wide_shapes):
        assert n[channel_axis] < w[channel_axis]
        if model_family(name) != "vit" and len(n) == 3:
            assert 2 * n[0] == w[0] and n[1:] == w[1:]  # halved channels, same map size
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in wide.parameters())


@pytest.mark.parametrize("name", list(VIT_CONFIGS))
@pytest.mark.parametrize("width", [1 / 16, 0.3, 0.5, 1.0, 2.0])
def test_vit_width_keeps_heads_dividing_dim(name, width):
    config = VIT_CONFIGS[name]
    dim, heads, mlp_dim = scaled_shape(config, width)
    assert dim % heads == 0 and dim >= 4 * heads and mlp_dim >= 1
    if width == 1.0:
        assert (dim, heads, mlp_dim) == (config.dim, config.heads, config.mlp_dim)
    model = create_model(name, 3, width=width if width < 1 else 1 / 16)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_64px_variants():
    x = torch.randn(1, 3, 64, 64)
    resnet = create_model("resnet34", 10, image_size=64, width=SMALL)
    shapes = feature_shapes(resnet, [0, 1, 4], x)
    assert [tuple(s)[1:] for s in shapes] == [(64, 64), (32, 32), (16, 16)]  # max-pool after stem
    assert isinstance(resnet.maxpool, nn.MaxPool2d)
    assert not hasattr(create_model("resnet34", 10, width=SMALL), "maxpool")
    mobile = create_model("mobilenetv2", 10, image_size=64, width=SMALL)
    assert tuple(feature_shapes(mobile, [0], x)[0])[1:] == (32, 32)  # stride-2 stem
    vit = create_model("vit_et", 10, image_size=64, width=SMALL)
    assert vit.patch_embed.proj.kernel_size == (8, 8)
    assert tuple(feature_shapes(vit, [0], x)[0])[0] == 65
    vgg = create_model("vgg11_bn", 10, image_size=64, width=SMALL)
    assert len(generalized_layers(vgg)) == 11 and vgg(x).shape == (1, 10)


def test_vit_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 8"):
        create_model("vit_et", 10, image_size=36)
    vit = create_model("vit_et", 10, image_size=32, width=SMALL)
    with pytest.raises(ValueError, match="32x32"):
        vit(torch.randn(1, 3, 64, 64))


# ---- ImageNet initialisation -------------------------------------------------------------


def _save(tmp_path, module: nn.Module) -> str:
    path = tmp_path / "weights.pth"
    torch.save(module.state_dict(), path)
    return str(path)


def test_resnet34_imagenet_init(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet34(weights=None).eval()
    ours = create_model("resnet34", 10).eval()
    report = load_imagenet_weights(ours, "resnet34", _save(tmp_path, tv))
    assert set(report.new) == {"stem.conv.weight", "fc.weight", "fc.bias"}
    assert set(report.unused) == {"conv1.weight", "fc.weight", "fc.bias"}
    assert "layer3.0.downsample.0.weight" in report.loaded
    torch.testing.assert_close(ours.stem.bn.weight, tv.bn1.weight)
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            torch.testing.assert_close(getattr(ours, stage)(x), getattr(tv, stage)(x))
            x = getattr(tv, stage)(x)
        assert ours(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_vgg19_imagenet_init(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.vgg19_bn(weights=None).eval()
    ours = create_model("vgg19_bn", 100).eval()
    fresh_first = ours.classifier[0].weight.clone()
    report = load_imagenet_weights(ours, "vgg19_bn", _save(tmp_path, tv))
    assert set(report.new) == {"classifier.0.weight", "classifier.0.bias",
                               "classifier.6.weight", "classifier.6.bias"}
    torch.testing.assert_close(ours.classifier[3].weight, tv.classifier[3].weight)
    assert torch.equal(ours.classifier[0].weight, fresh_first)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.features(x), tv.features(x))

    grey = create_model("vgg19_bn", 10, in_channels=1)
    load_imagenet_weights(grey, "vgg19_bn", tv.state_dict())
    torch.testing.assert_close(grey.features[0].weight, tv.features[0].weight.sum(1, keepdim=True))


def test_vit_b_imagenet_init(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.vit_b_16(weights=None).eval()
    state = tv.state_dict()
    # a positional grid that is constant per channel must stay so; CLS must stay first
    state["encoder.pos_embedding"][:, 1:] = torch.linspace(-1, 1, 768)
    state["encoder.pos_embedding"][:, 0] = 5.0
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    del tv
    ours = create_model("vit_b", 10).eval()
    report = load_imagenet_weights(ours, "vit_b", path)
    assert set(report.new) == {"head.weight", "head.bias"}
    assert set(report.unused) == {"heads.head.weight", "heads.head.bias"}
    pos = ours.patch_embed.pos_embedding
    assert pos.shape == (1, 65, 768)
    assert torch.equal(pos[0, 0], torch.full((768,), 5.0))
    torch.testing.assert_close(pos[0, 1:], torch.linspace(-1, 1, 768).expand(64, 768))
    kernel = ours.patch_embed.proj.weight
    assert kernel.shape == (768, 3, 4, 4)
    torch.testing.assert_close(kernel[:, :, 1, 2],
                               state["conv_proj.weight"][:, :, 4:8, 8:12].mean(dim=(-2, -1)))
    torch.testing.assert_close(ours.patch_embed.cls_token, state["class_token"])
    torch.testing.assert_close(ours.norm.weight, state["encoder.ln.weight"])
    torch.testing.assert_close(ours.blocks[11].mlp[2].weight,
                               state["encoder.layers.encoder_layer_11.mlp.3.weight"])

    # our block 0 computes what torchvision's encoder block 0 computes
    tv_block = torchvision.models.vision_transformer.EncoderBlock(12, 768, 3072, 0.0, 0.0).eval()
    prefix = "encoder.layers.encoder_layer_0."
    tv_block.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    tokens = torch.randn(2, 65, 768)
    with torch.no_grad():
        torch.testing.assert_close(ours.blocks[0](tokens), tv_block(tokens), rtol=1e-4, atol=1e-4)
        assert ours(torch.randn(1, 3, 32, 32)).shape == (1, 10)

    with pytest.raises(ValueError, match="width=1"):
        load_imagenet_weights(create_model("vit_b", 10, width=0.5), "vit_b", path)


@pytest.mark.parametrize("heads", [1, 3])
def test_packed_self_attention_is_the_module_call_with_its_gradients(heads):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, heads, batch_first=True)
    tokens = torch.randn(4, 65, 12, requires_grad=True)
    ours = packed_self_attention(mha, tokens)
    reference = mha(tokens, tokens, tokens, need_weights=False)[0]
    torch.testing.assert_close(ours, reference)
    weights = (tokens, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight)
    probe = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * probe).sum(), weights)
    expected = torch.autograd.grad((reference * probe).sum(), weights)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_patch_and_position_transforms():
    weight = torch.randn(5, 3, 16, 16)
    pooled = pool_patch_kernel(weight, 8)
    torch.testing.assert_close(pooled[:, :, 0, 0], weight[:, :, :2, :2].mean(dim=(-2, -1)))
    torch.testing.assert_close(pool_patch_kernel(weight, 4, rescale=True).sum(dim=(-2, -1)),
                               weight.sum(dim=(-2, -1)))
    # a ramp along x survives the 14 -> 8 resize as a monotone ramp; rows stay identical
    ramp = torch.arange(14.0).repeat(14)[:, None]  # (196, 1): value = column index
    pos = torch.cat([torch.tensor([[-7.0]]), ramp])[None]
    resized = resize_pos_embedding(pos, 8)[0, :, 0]
    assert resized[0] == -7.0
    grid = resized[1:].reshape(8, 8)
    torch.testing.assert_close(grid, grid[:1].expand(8, 8))
    assert (grid[0, 1:] > grid[0, :-1]).all()
    with pytest.raises(ValueError, match="square"):
        resize_pos_embedding(torch.zeros(1, 11, 4), 2)


def test_imagenet_init_errors(tmp_path):
    assert IMAGENET_MODELS == ("resnet34", "vgg19_bn", "vit_b")
    with pytest.raises(ValueError, match="available: resnet34, vgg19_bn, vit_b"):
        load_imagenet_weights(create_model("resnet9", 10), "resnet9", {})
    resnet18 = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(ValueError, match="lacks weights"):
        load_imagenet_weights(create_model("resnet34", 10), "resnet34", resnet18)
    with pytest.raises(ValueError, match="width=1"):
        load_imagenet_weights(create_model("resnet34", 10, width=0.5), "resnet34",
                              torchvision.models.resnet34(weights=None).state_dict())
    with pytest.raises(ValueError, match="model lacks"):
        load_imagenet_weights(create_model("resnet9", 10), "resnet34", resnet18)
    bad = tmp_path / "bad.pth"
    torch.save([torch.zeros(1)], bad)
    with pytest.raises(ValueError, match="not a state_dict"):
        load_imagenet_weights(create_model("resnet34", 10), "resnet34", bad)


@pytest.mark.parametrize("name", ["vgg11_bn", "vgg19_bn"])
def test_vgg_refuses_images_its_max_pools_would_shrink_to_nothing(name):
    assert create_model(name, 3, image_size=32, width=SMALL)(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match=f"{name} needs image_size >= 32 .* got 28"):
        create_model(name, 3, image_size=28, width=SMALL)


def test_check_classifier_names_outputs_that_are_not_logits_in_either_mode():
    from collections import namedtuple

    Outputs = namedtuple("Outputs", "logits aux_logits")

    class AuxHeads(torch.nn.Module):
        aux_logits = True

        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)
            self.bn = torch.nn.BatchNorm1d(4)

        def forward(self, x):
            logits = self.fc(self.bn(x.flatten(1)))
            return Outputs(logits, logits) if self.training else logits

    model, sample = AuxHeads().train(), torch.randn(2, 4)
    before = model.bn.running_mean.clone()
    check_classifier(model, sample, 3, training=False)  # eval mode alone gives logits
    with pytest.raises(ValueError, match=r"returns Outputs in training mode, not a logits tensor "
                                         r"\(pass :aux_logits=False in the name\)"):
        check_classifier(model, sample, 3, "student")
    assert model.training and torch.equal(model.bn.running_mean, before)  # mode and statistics kept
    with pytest.raises(ValueError, match=r"outputs shape \(2, 3\) in eval mode, expected logits \(2, 4\)"):
        check_classifier(model, sample, 4, training=False)
