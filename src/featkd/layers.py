"""Generalized layers (GLs) of any ``nn.Module`` and taps on their outputs.

A network is read as a chain of leaf modules: containers are expanded,
residual and transformer blocks are kept whole. A generalized layer ends at
every activation, every block, the ViT input layer and the ``nn.Flatten``
before the head; its output is the output of that last module. The list index
of a GL is the paper's layer index (see spec/experiments.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "FeatureTap",
    "classifier_input",
    "extract",
    "feature_shapes",
    "generalized_layers",
    "head_index",
    "layer_index",
    "register_block",
    "resolve_layers",
    "tail",
    "to_channels_first",
]

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
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU)


def register_block(cls: type[nn.Module]) -> type[nn.Module]:
    """Treat ``cls`` as a block (one GL, never split). Usable as a decorator."""
    BLOCK_CLASSES.add(cls.__name__)
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
    return isinstance(module, (*ACTIVATIONS, nn.Flatten)) or _kept_whole(module)


def generalized_layers(model: nn.Module) -> list[str]:
    """Module names whose outputs are the model's GLs, in forward order."""
    return [name for name, module in leaf_chain(model) if _ends_layer(module)]


def head_index(model: nn.Module) -> int:
    """Number of GLs before the first ``nn.Linear`` of the leaf chain."""
    count = 0
    for _, module in leaf_chain(model):
        if isinstance(module, nn.Linear):
            return count
        count += _ends_layer(module)
    return count


def layer_index(model: nn.Module, name: str) -> int:
    """GL index of module ``name``."""
    names = generalized_layers(model)
    if name not in names:
        raise ValueError(f"{name!r} is not a generalized layer; valid names: {names}")
    return names.index(name)


def resolve_layers(model: nn.Module, layers: Sequence[int | str] | int | str,
                   model_name: str | None = None) -> list[str]:
    """GL indices and/or module names -> module names, order kept.

    Any named submodule is accepted by name; indices refer to GLs and may be
    negative (``-1`` is the last GL). Errors call the model ``model_name``
    (default: its class name).
    """
    described = model_name or type(model).__name__
    if isinstance(layers, (int, str)):
        layers = [layers]
    gls = generalized_layers(model)
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
        elif layer in modules and layer != "":
            names.append(layer)
        else:
            raise ValueError(
                f"no module named {layer!r} in {described}; "
                f"generalized layers are: {', '.join(gls)}"
            )
    return names


class _StopForward(Exception):
    """Raised by a hook once every tapped output is in hand."""


class FeatureTap:
    """Capture the outputs of named modules with forward hooks.

    ``stop_early`` ends the forward pass as soon as every tapped module has
    run (use it as a context manager; the stop is swallowed on exit).
    ``detach_after`` continues the forward pass from a detached copy of that
    module's output, so later modules have no gradient path into earlier
    ones; ``outputs`` keeps the attached tensor.
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
        self._captured: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureTap:
        self._captured.clear()
        hooked = set(self.names) | ({self.detach_after} if self.detach_after else set())
        for name in hooked:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return exc_type is _StopForward

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a Tensor")
            if name in self.names:
                self._captured[name] = output
            if self.stop_early and len(self._captured) == len(set(self.names)):
                raise _StopForward
            if name == self.detach_after:
                return output.detach()
            return None

        return hook

    def clear(self) -> None:
        """Forget the outputs of the last forward pass."""
        self._captured.clear()

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


def tail(model: nn.Module, name: str) -> nn.Sequential:
    """The part of a chain model after module ``name`` (shared, not copied)."""
    if not _is_chain(model):
        raise ValueError(
            f"{type(model).__name__} is not a chain of modules (nested nn.Sequential), "
            "so its tail after a layer cannot be run on its own; the featkd zoo models are chains"
        )
    chain = leaf_chain(model)
    names = [n for n, _ in chain]
    if name not in names:
        raise ValueError(f"{name!r} is not in the model's leaf chain; valid: {names}")
    return nn.Sequential(*[m for _, m in chain[names.index(name) + 1 :]])


def classifier_input(model: nn.Module, sample_input: Tensor) -> int:
    """GL index of the input of the model's classifier.

    The last generalized layer whose per-sample output is still a map (C, H, W)
    or a token sequence (T, d), not a vector; what follows it (pooling,
    flatten, fully connected layers; for a ViT the final norm, token mean and
    head) is the classifier. One dry forward of ``sample_input`` in eval mode.
    """
    gls = generalized_layers(model)
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
