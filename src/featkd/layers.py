"""Generalized layers (GLs) of any ``nn.Module``, taps on their outputs, feature layouts.

The GLs are found on the model's traced graph (:mod:`featkd.graph`): main-path
points after activations, after blocks and at the flattened representation
before the head, in forward order; the list index of a GL is the paper's layer
index (see spec/experiments.md). When the model cannot be traced, the model is
read as a chain of leaf modules instead (containers expanded, blocks kept
whole), with a warning: a GL then ends at every activation, every block, the
ViT input layer and the ``nn.Flatten`` before the head.

A layer is named after the module call that returns it (``layer3.1``), the
k-th call of a module that runs several times (``act#2``) or the input of a
module call (``fc:in``); any other module name is accepted too.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from featkd.graph import (
    GraphLayers, Point, TraceFailed, head_position, is_activation_module, tail_module, trace_layers,
)

__all__ = [
    "LAYOUTS",
    "FeatureTap",
    "classifier_input",
    "extract",
    "feature_layout",
    "feature_shapes",
    "canonical_shape",
    "eval_mode",
    "from_canonical",
    "generalized_layers",
    "head_index",
    "layer_index",
    "register_block",
    "resolve_layers",
    "tail",
    "to_canonical",
    "to_channels_first",
]

log = logging.getLogger(__name__)

# Class names kept whole: ours, torchvision's and timm's residual/transformer blocks.
BLOCK_CLASSES = {
    "BasicBlock",
    "Bottleneck",
    "InvertedResidual",
    "TransformerBlock",
    "EncoderBlock",
    "Block",
}
INPUT_CLASSES = {"PatchEmbedding", "PatchEmbed"}


def register_block(cls: type[nn.Module]) -> type[nn.Module]:
    """Keep ``cls`` whole: each call is one GL, nothing inside it is. Usable as a decorator.

    Needed only for a block without a residual or other merge of two paths in
    its own code (those are found on the graph), e.g. an inverted-residual block
    whose stride-2 instances have no skip but should count as one layer.
    """
    BLOCK_CLASSES.add(cls.__name__)
    _INFO.clear()
    return cls


def _kept_whole(module: nn.Module) -> bool:
    name = type(module).__name__
    return name in BLOCK_CLASSES or name in INPUT_CLASSES


def leaf_chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's leaf modules in registration order, blocks kept whole."""

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if _kept_whole(child) or not any(True for _ in child.children()):
                yield full, child
            else:
                yield from walk(child, full + ".")

    return list(walk(model, ""))


def _ends_layer(module: nn.Module) -> bool:
    return is_activation_module(module) or isinstance(module, nn.Flatten) or _kept_whole(module)


@dataclass
class _LayerInfo:
    """The GLs of one model: names, head index, calls per module, the graph (None: chain rule)."""

    names: list[str]
    head: int
    calls: Counter
    graph: GraphLayers | None


def _chain_info(model: nn.Module) -> _LayerInfo:
    names, head, last_conv = [], None, None
    for name, module in leaf_chain(model):
        if head is None and isinstance(module, nn.Linear):
            head = len(names)
        elif isinstance(module, nn.modules.conv._ConvNd):
            last_conv = len(names)
        if _ends_layer(module):
            names.append(name)
    return _LayerInfo(names, head_position(head, last_conv, len(names)), Counter(), None)


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_info(model: nn.Module) -> _LayerInfo:
    """The GL analysis of ``model``, traced once per model (redone when its modules change)."""
    signature = tuple((name, type(m)) for name, m in model.named_modules())
    cached = _INFO.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    try:
        graph = trace_layers(model, _kept_whole)
        info = _LayerInfo(graph.names, graph.head, graph.calls, graph)
    except TraceFailed as err:
        log.warning("%s cannot be traced with torch.fx (%s): its generalized layers are read from "
                    "its chain of leaf modules, which is right only when its forward runs them in "
                    "order", type(model).__name__, err)
        info = _chain_info(model)
    _INFO[model] = (signature, info)
    return info


def generalized_layers(model: nn.Module) -> list[str]:
    """Names of the model's GLs, in forward order."""
    return list(_layer_info(model).names)


def head_index(model: nn.Module) -> int:
    """Number of GLs before the head: the first ``nn.Linear`` after the last block, else the
    last convolution there (a convolutional classifier)."""
    return _layer_info(model).head


def layer_index(model: nn.Module, name: str) -> int:
    """GL index of layer ``name``."""
    names = generalized_layers(model)
    if name not in names:
        raise ValueError(f"{name!r} is not a generalized layer; valid names: {names}")
    return names.index(name)


def _check_point(model: nn.Module, name: str, info: _LayerInfo, modules: dict, described: str) -> None:
    point = Point.parse(name)
    if point.module not in modules or point.module == "":
        raise ValueError(f"no module named {point.module!r} in {described}; "
                         f"generalized layers are: {', '.join(info.names)}")
    runs = info.calls.get(point.module, 0)
    if point.call is None and runs > 1:
        calls = ", ".join(f"{point.module}#{k}" for k in range(1, runs + 1))
        raise ValueError(f"module {point.module!r} of {described} runs {runs} times in "
                         f"one forward pass; name one call: {calls}")
    if point.call is not None and info.graph is not None and point.call > runs:
        raise ValueError(f"module {point.module!r} of {described} runs {runs} time(s) "
                         f"in one forward pass, so {name!r} does not exist")


def resolve_layers(model: nn.Module, layers: Sequence[int | str] | int | str,
                   model_name: str | None = None) -> list[str]:
    """GL indices and/or layer names -> layer names, order kept.

    Any named submodule is accepted by name (``name#k`` for the k-th call of a
    module that runs several times, ``name:in`` for its input); indices refer
    to GLs and may be negative (``-1`` is the last GL). Errors call the model
    ``model_name`` (default: its class name).
    """
    described = model_name or type(model).__name__
    if isinstance(layers, (int, str)):
        layers = [layers]
    info = _layer_info(model)
    gls = info.names
    modules = dict(model.named_modules())
    names = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, (int, str)):
            raise TypeError(f"a layer is a GL index or a module name, got {layer!r}")
        if isinstance(layer, int):
            if not -len(gls) <= layer < len(gls):
                raise IndexError(
                    f"layer index {layer} out of range: {described} has "
                    f"{len(gls)} generalized layers, valid indices 0..{len(gls) - 1}"
                )
            names.append(gls[layer])
        else:
            if layer not in gls:
                _check_point(model, layer, info, modules, described)
            names.append(layer)
    return names


class _StopForward(Exception):
    """Raised by a hook once every tapped output is in hand."""


class FeatureTap:
    """Capture the outputs of layers (names as :func:`resolve_layers` returns them) with hooks.

    ``stop_early`` ends the forward pass as soon as every tapped layer has run
    (use it as a context manager; the stop is swallowed on exit).
    ``detach_after`` continues the forward pass from a detached copy of that
    layer's output, so later modules have no gradient path into earlier
    ones; ``outputs`` keeps the attached tensor. A plain module name taps the
    module's only call: a second call in one forward pass is an error.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        stop_early: bool = False,
        detach_after: str | None = None,
    ) -> None:
        self.model = model
        self.names = list(names)
        self.stop_early = stop_early
        self.detach_after = detach_after
        self._wanted = {Point.parse(n): n for n in self.names}
        self._detach = Point.parse(detach_after) if detach_after else None
        self._captured: dict[str, Tensor] = {}
        self._counts: Counter = Counter()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        #: tapped layer names in the order they ran in the last forward pass
        self.fired: list[str] = []

    def __enter__(self) -> FeatureTap:
        self.clear()
        points = set(self._wanted) | ({self._detach} if self._detach else set())
        sites = {(p.module, p.side) for p in points}
        self._handles.append(self.model.register_forward_pre_hook(self._reset, prepend=True))
        for module_name, side in sorted(sites):
            module = self.model.get_submodule(module_name)
            points_here = [p for p in points if (p.module, p.side) == (module_name, side)]
            if side == "in":
                hook = self._input_hook(module_name, points_here)
                self._handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = self._output_hook(module_name, points_here)
                self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return exc_type is _StopForward

    def _reset(self, module: nn.Module, inputs: tuple) -> None:
        self._counts.clear()
        self.fired.clear()

    def _visit(self, module_name: str, side: str, points: list[Point], value) -> Tensor | None:
        """Count this call; capture / detach the points it is; return the detached value or None."""
        self._counts[module_name, side] += 1
        call = self._counts[module_name, side]
        result = None
        for point in points:
            if point.call is None and call > 1:
                raise RuntimeError(f"layer {point.name!r} ran {call} times in one forward pass; "
                                   f"name one call: {module_name}#1, {module_name}#2, ...")
            if (point.call or 1) != call:
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"layer {point.name!r} gives a {type(value).__name__}, not one tensor: "
                                 "name a module whose output is a tensor (e.g. one inside it)")
            if point in self._wanted:
                name = self._wanted[point]
                self._captured[name] = value
                self.fired.append(name)
            if point == self._detach:
                result = value.detach()
        if self.stop_early and len(self._captured) == len(self._wanted):
            raise _StopForward
        return result

    def _output_hook(self, module_name: str, points: list[Point]):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            return self._visit(module_name, "out", points, output)

        return hook

    def _input_hook(self, module_name: str, points: list[Point]):
        def hook(module: nn.Module, inputs: tuple) -> tuple | None:
            if not inputs:
                raise TypeError(f"module {module_name!r} was called without a positional input")
            detached = self._visit(module_name, "in", points, inputs[0])
            return None if detached is None else (detached, *inputs[1:])

        return hook

    def clear(self) -> None:
        """Forget the outputs of the last forward pass."""
        self._captured.clear()
        self._counts.clear()
        self.fired.clear()

    @property
    def outputs(self) -> list[Tensor]:
        """Captured outputs in the order of ``names``."""
        missing = [n for n in self.names if n not in self._captured]
        if missing:
            raise RuntimeError(f"layers {missing} did not run in the last forward pass")
        return [self._captured[n] for n in self.names]


def extract(model: nn.Module, x: Tensor, layers: Sequence[int | str] | int | str) -> list[Tensor]:
    """Outputs of ``layers`` for input ``x``, in the order asked.

    The forward pass stops after the last requested layer has run. Grad mode
    and train/eval mode are the caller's.
    """
    names = resolve_layers(model, layers)
    with FeatureTap(model, names, stop_early=True) as tap:
        model(x)
    return tap.outputs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's own mode restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


@torch.no_grad()
def feature_shapes(
    model: nn.Module, layers: Sequence[int | str], sample_input: Tensor
) -> list[torch.Size]:
    """Per-sample output shapes of ``layers`` from one dry forward (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        feats = extract(model, sample_input, layers)
    finally:
        model.train(was_training)
    return [f.shape[1:] for f in feats]


def _is_chain(model: nn.Module) -> bool:
    """True when running the leaf chain in order is the model's forward."""

    def plain_sequential(module: nn.Module) -> bool:
        return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward

    def walk(module: nn.Module) -> bool:
        if not plain_sequential(module):
            return False
        for child in module.children():
            if _kept_whole(child) or not any(True for _ in child.children()):
                continue
            if not walk(child):
                return False
        return True

    return walk(model)


def tail(model: nn.Module, name: str) -> nn.Module:
    """The part of ``model`` after layer ``name``, as a module (shared, not copied).

    For a chain model (nested ``nn.Sequential``, as the zoo) the leaf modules
    after ``name``; for a traced model a ``torch.fx.GraphModule`` running the
    graph (traced in eval mode) from that main-path point to the output.
    """
    if _is_chain(model):
        chain = leaf_chain(model)
        names = [n for n, _ in chain]
        if name not in names:
            raise ValueError(f"{name!r} is not in the model's leaf chain; valid: {names}")
        return nn.Sequential(*[m for _, m in chain[names.index(name) + 1 :]])
    info = _layer_info(model)
    if info.graph is None:
        raise ValueError(
            f"{type(model).__name__} is neither a chain of modules (nested nn.Sequential) nor "
            "traceable by torch.fx, so its tail after a layer cannot be run on its own"
        )
    resolve_layers(model, [name])
    return tail_module(model, info.graph, Point.parse(name))


# ----------------------------------------------------------------------------- layouts

LAYOUTS = ("channels_first", "channels_last", "tokens", "vector")


def _spatial(height: int, width: int, image_size: Sequence[int]) -> bool:
    """Whether (height, width) can be the input's (H, W) after striding."""
    image_h, image_w = image_size
    if image_h == image_w:
        return height == width
    return abs(width - image_w * height / image_h) <= 1


def feature_layout(shape: Sequence[int], image_size: Sequence[int] | None = None) -> str:
    """Layout of a per-sample feature ``shape`` (no batch dim) for ``image_size`` (H, W) inputs.

    (D,) "vector"; (T, d) "tokens"; (C, H, W) "channels_first" and (H, W, C)
    "channels_last" (Swin's blocks), told apart by which pair of dims has the
    input's aspect ratio (square inputs: the pair that is square); when both or
    neither fit, or ``image_size`` is None, channels-first.
    """
    if len(shape) == 1:
        return "vector"
    if len(shape) == 2:
        return "tokens"
    if len(shape) == 3:
        if image_size is None:
            return "channels_first"
        first = _spatial(shape[1], shape[2], image_size)
        last = _spatial(shape[0], shape[1], image_size)
        return "channels_last" if last and not first else "channels_first"
    raise ValueError(f"cannot align a feature of per-sample shape {tuple(shape)}: expected a "
                     "vector (D,), tokens (T, d) or a map (C, H, W) or (H, W, C)")


def to_canonical(feat: Tensor, layout: str) -> Tensor:
    """A batch of features in ``layout`` -> the canonical layout (channels-last maps -> B x C x H x W)."""
    return feat.permute(0, 3, 1, 2) if layout == "channels_last" else feat


def from_canonical(feat: Tensor, layout: str) -> Tensor:
    """Inverse of :func:`to_canonical`."""
    return feat.permute(0, 2, 3, 1) if layout == "channels_last" else feat


def canonical_shape(shape: Sequence[int], layout: str) -> torch.Size:
    """Per-sample ``shape`` in the canonical layout."""
    shape = tuple(shape)
    return torch.Size((shape[2], shape[0], shape[1]) if layout == "channels_last" else shape)


def classifier_input(model: nn.Module, sample_input: Tensor) -> int:
    """GL index of the input of the model's classifier.

    The last generalized layer before the head whose per-sample output is still a
    map (C, H, W) or a token sequence (T, d), not a vector; what follows it
    (pooling, flatten, fully connected layers; for a ViT the final norm, token
    mean and head; SqueezeNet's class-score convolution) is the classifier. One
    dry forward of ``sample_input`` in eval mode.
    """
    gls = generalized_layers(model)[:head_index(model)]
    shapes = feature_shapes(model, gls, sample_input)
    spatial = [i for i, shape in enumerate(shapes) if len(shape) >= 2]
    if not spatial:
        raise ValueError(f"no generalized layer of {type(model).__name__} outputs a map or a token "
                         f"sequence, so it has no classifier input to distil at; shapes: "
                         f"{[tuple(s) for s in shapes]}")
    return spatial[-1]


def to_channels_first(feat: Tensor) -> Tensor:
    """(B, T, d) token tensors -> (B, d, T); maps and vectors unchanged."""
    return feat.transpose(1, 2) if feat.dim() == 3 else feat
