import pytest
import torch
import torchvision
import torch.nn.functional as F
from torch import nn

from featkd.layers import (
    FeatureTap,
    extract,
    feature_shapes,
    generalized_layers,
    head_index,
    layer_index,
    register_block,
    resolve_layers,
    tail,
    to_channels_first,
)


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x + self.conv(x))


register_block(Residual)


def small_chain():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.MaxPool2d(2),
        Residual(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )


def test_rule_on_small_chain():
    model = small_chain()
    # conv-bn-relu | pool+block | avgpool+flatten | linear-relu ; final linear is the head
    assert generalized_layers(model) == ["0.2", "2", "4", "6"]
    assert head_index(model) == 3
    assert layer_index(model, "2") == 1


def test_torchvision_resnet18():
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    names = generalized_layers(model)
    # stem relu + 8 BasicBlocks + the representation torch.flatten makes, tapped as fc's input
    assert names == ["relu"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)] + ["fc:in"]
    assert head_index(model) == 10
    x = torch.randn(2, 3, 64, 64)
    feats = extract(model, x, [8, 0, "layer2.1", "fc:in"])
    assert [tuple(f.shape) for f in feats] == [(2, 512, 2, 2), (2, 64, 32, 32), (2, 128, 8, 8),
                                               (2, 512)]


def test_extract_matches_full_forward_and_stops_early():
    model = small_chain().eval()
    x = torch.randn(2, 3, 8, 8)
    calls = []
    model[5].register_forward_hook(lambda m, i, o: calls.append("linear"))
    (feat,) = extract(model, x, [1])
    assert calls == []  # stopped before the head
    expected = model[2](model[1](model[0](x)))
    torch.testing.assert_close(feat, expected)


def test_extract_respects_grad_mode():
    model = small_chain()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        (f,) = extract(model, x, [0])
    assert not f.requires_grad
    (f,) = extract(model, x, [0])
    assert f.requires_grad


def test_resolve_layers_errors():
    model = small_chain()
    assert resolve_layers(model, [-1, "2"]) == ["6", "2"]
    with pytest.raises(IndexError, match=r"valid indices 0\.\.3"):
        resolve_layers(model, [4])
    with pytest.raises(ValueError, match="generalized layers are: 0.2, 2, 4, 6"):
        resolve_layers(model, ["nope"])
    with pytest.raises(TypeError):
        resolve_layers(model, [1.5])


def test_tap_detach_after_cuts_gradient_path():
    model = small_chain()
    x = torch.randn(2, 3, 8, 8)
    with FeatureTap(model, ["2"], detach_after="2") as tap:
        logits = model(x)
    (feat,) = tap.outputs
    assert feat.requires_grad
    logits.sum().backward()
    first_conv = model[0][0].weight
    assert first_conv.grad is None  # the head's loss never reached the backbone
    assert model[5].weight.grad is not None
    feat.sum().backward()
    assert first_conv.grad is not None


def test_tap_removes_hooks_and_reports_missing():
    model = small_chain()
    with FeatureTap(model, ["6"], stop_early=True) as tap:
        model(torch.randn(1, 3, 8, 8))
    assert all(not m._forward_hooks for m in model.modules())
    tap.clear()
    with pytest.raises(RuntimeError, match="did not run"):
        tap.outputs


def test_tail_runs_rest_of_chain():
    model = small_chain().eval()
    x = torch.randn(2, 3, 8, 8)
    (feat,) = extract(model, x, ["2"])
    torch.testing.assert_close(tail(model, "2")(feat), model(x))


def test_tail_of_a_traced_model_runs_from_a_main_path_point():
    model = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name in ["layer1.0", "layer3.1", "fc:in"]:
            (feat,) = extract(model, x, [name])
            torch.testing.assert_close(tail(model, name)(feat), model(x))
    with pytest.raises(ValueError, match="not on the main path"):
        tail(model, "layer1.0.conv2")


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.relu(self.conv(x))


def test_untraceable_model_falls_back_to_the_chain_rule(caplog):
    model = Untraceable()
    with caplog.at_level("WARNING"):
        assert generalized_layers(model) == ["relu"]
    assert "cannot be traced" in caplog.text
    with pytest.raises(ValueError, match="Untraceable is neither a chain"):
        tail(model, "relu")


class Branchy(nn.Module):
    """A residual block whose own code branches on data: fx cannot trace into it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            x = 2 * x
        return self.relu(self.conv(x)) + x


class WithBranchyBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.block, self.block2 = Branchy(), Branchy()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.block2(self.block(self.stem(x)))).flatten(1))


def test_a_submodule_that_cannot_be_traced_is_kept_whole(monkeypatch):
    """The model's own forward traces; the block whose code cannot is one layer, and tail runs past it."""
    from featkd import graph

    model = WithBranchyBlocks().eval()
    assert generalized_layers(model) == ["stem.1", "block", "block2", "fc:in"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(tail(model, "block")(model.block(model.stem(x))), model(x), atol=1e-6)
    monkeypatch.setattr(graph, "_MAX_RETRIES", 1)  # no retry left after keeping Branchy whole
    with pytest.raises(graph.TraceFailed, match="more than 1 module classes could not be traced"):
        graph.trace_layers(model, lambda m: False)


class ConvClassifier(nn.Module):
    """Convolutions end to end, SqueezeNet style: a 1x1 convolution makes the class scores."""

    def __init__(self, traceable: bool = True):
        super().__init__()
        self.traceable = traceable
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Conv2d(8, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        if not self.traceable and x.sum() > 0:  # data-dependent: read by the chain rule
            x = -x
        return self.classifier(self.features(x))


@pytest.mark.parametrize("traceable", [True, False], ids=["graph", "chain"])
def test_a_convolutional_classifier_starts_the_head(traceable):
    model = ConvClassifier(traceable)
    layers = generalized_layers(model)
    assert layers[:3] == ["features.1", "features.3", "classifier.1"]
    assert head_index(model) == 2  # the class-score map is not a feature to distil


class TracedLinear(nn.Linear):
    """A Linear subclass (as timm's): the tracer runs through it to F.linear."""


def test_a_linear_classifier_after_a_1x1_convolution_keeps_the_convolution_before_the_head():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Flatten(), TracedLinear(8, 3))
    assert generalized_layers(model) == ["1", "4", "5"]
    assert head_index(model) == 3


class ScaledGelu(nn.Module):
    """An activation scaled before it is returned (timm's nfnet GammaAct): its GELU output is no
    module's output or input, so it cannot be tapped."""

    def forward(self, x):
        return F.gelu(x) * 1.7


class UntappedActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.a1, self.c2, self.a2 = nn.Conv2d(3, 8, 3, 2, 1), ScaledGelu(), nn.Conv2d(8, 8, 3), ScaledGelu()
        self.c3, self.r3, self.c4, self.a4 = nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), ScaledGelu()
        self.flat = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        x = self.a4(self.c4(self.r3(self.c3(self.a2(self.c2(self.a1(self.c1(x))))))))
        return self.classifier(self.flat(F.adaptive_avg_pool2d(x, 1)))


def test_untapped_points_before_the_head_do_not_shift_it_into_the_classifier():
    model = UntappedActivations()
    assert generalized_layers(model) == ["r3", "flat", "classifier.1"]
    assert head_index(model) == 2  # three untapped GELUs come before it: the classifier's ReLU is head


def test_squeezenet_class_scores_are_in_the_head():
    model = torchvision.models.squeezenet1_1(weights=None, num_classes=10).eval()
    layers = generalized_layers(model)
    assert layers[-1] == "classifier.2" and head_index(model) == len(layers) - 1


class TokenStage(nn.Module):
    """Carries a class token beside the feature map and returns both, as timm's PiT stages do."""

    def __init__(self, c):
        super().__init__()
        self.block = Residual(c)

    def forward(self, inputs):
        x, token = inputs
        both = self.block(torch.cat([token, x], dim=2))  # the token rides along as an extra row
        return both[:, :, 1:], both[:, :, :1]


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.stages = nn.Sequential(TokenStage(4), TokenStage(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        x, token = self.stages((x, x.mean(2, keepdim=True)))
        return self.head(token.mean((2, 3)))


def test_layers_are_read_inside_modules_that_return_several_tensors():
    model = TokenNet().eval()
    assert generalized_layers(model) == ["stem.1", "stages.0.block", "stages.1.block"]
    x = torch.randn(2, 3, 8, 8)
    (feat,) = extract(model, x, ["stages.1.block"])
    assert feat.shape == (2, 4, 9, 8)  # the map and its token row


@register_block
class PairBlock(nn.Module):
    """A block kept whole that returns two tensors (as timm's TNT blocks do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y, y.mean((2, 3))


class PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pair = PairBlock()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        maps, pooled = self.pair(self.stem(x))
        return self.head(maps.mean((2, 3)) + pooled)


def test_a_block_that_returns_a_tuple_is_no_layer_and_naming_it_is_a_clear_error():
    model = PairNet().eval()
    assert generalized_layers(model) == ["stem.1"]
    with pytest.raises(ValueError, match="layer 'pair' gives a tuple, not one tensor"):
        extract(model, torch.randn(2, 3, 8, 8), ["pair"])


def test_feature_shapes_and_layout():
    model = small_chain()
    model.train()
    shapes = feature_shapes(model, [0, 3], torch.randn(2, 3, 8, 8))
    assert shapes == [torch.Size([4, 8, 8]), torch.Size([8])]
    assert model.training
    tokens = torch.randn(2, 5, 7)
    assert to_channels_first(tokens).shape == (2, 7, 5)
    maps = torch.randn(2, 3, 4, 4)
    assert to_channels_first(maps) is maps
