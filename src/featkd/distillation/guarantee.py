"""The logit-free guarantee of the featkd family, checked on the real model.

featkd detaches the student's forward pass after its deepest distilled layer:
the backbone before that point learns from feature losses only, the tail after
it from cross-entropy only. That holds only when the detach point lies on the
main path (every path from the input to the logits passes through it); inside a
residual branch, cross-entropy reaches the backbone through the skip path. It
also needs the backbone and the tail to share no parameters: a module called on
both sides of the point (CoaT's shared position encodings) takes gradients from
both. :func:`check_gradient_split` proves the split with one dry backward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from featkd.layers import FeatureTap, eval_mode

__all__ = ["LOGIT_LOSSES", "check_gradient_split"]

#: losses computed on the logits; every other named loss is a feature loss
LOGIT_LOSSES = ("ce", "kd")
_EXAMPLES = 3


def _reached(loss: Tensor | None, params: dict[int, str]) -> set[str]:
    """Names of the parameters ``loss`` has a gradient path to (a walk of its autograd graph)."""
    found: set[str] = set()
    seen: set = set()
    stack = [loss.grad_fn] if loss is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor
        if variable is not None and id(variable) in params:
            found.add(params[id(variable)])
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _total(losses: Iterable[Tensor]) -> Tensor | None:
    losses = list(losses)
    return torch.stack([loss.float() for loss in losses]).sum() if losses else None


def _examples(names: set[str]) -> str:
    shown = sorted(names)[:_EXAMPLES]
    return ", ".join(shown) + (", ..." if len(names) > _EXAMPLES else "")


def _called_more_than_once(model: nn.Module, sample_input: Tensor) -> set[str]:
    """Names of the parameters of modules that one forward pass of ``model`` calls more than once."""
    calls: dict[nn.Module, int] = {}

    def count(module: nn.Module, args: tuple, output: object) -> None:
        calls[module] = calls.get(module, 0) + 1

    handles = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with eval_mode(model), torch.no_grad():  # no running statistics change
            model(sample_input)
    finally:
        for handle in handles:
            handle.remove()
    return {f"{name}.{p}" if name else p for name, m in model.named_modules() if calls.get(m, 0) > 1
            for p, _ in m.named_parameters(recurse=False)}


def check_gradient_split(model: nn.Module, sample_input: Tensor, teacher) -> None:
    """Raise ValueError unless ``model.method`` splits the student's gradients at its detach point.

    ``model`` is a :class:`~featkd.distillation.DistillModel` whose method has
    ``detach_after``; ``teacher`` the teacher outputs for ``sample_input``. In
    eval mode (no running statistics change), one forward pass; its autograd
    graph shows which student parameters the detach point's feature, the logit
    losses (CE, KD) and the feature losses reach: the logit losses must reach
    none of the first, the feature losses nothing else.
    """
    student, method = model.student, model.method
    layer = method.detach_after
    params = {id(p): n for n, p in student.named_parameters() if p.requires_grad}
    labels = torch.zeros(sample_input.shape[0], dtype=torch.long, device=sample_input.device)
    with eval_mode(model), torch.enable_grad():
        with FeatureTap(student, method.student_layers, detach_after=layer) as tap:
            raw_logits = student(sample_input)
        feats = tap.outputs
        losses = method.losses(method.predict(raw_logits, feats), feats, teacher, labels)
        backbone = _reached(feats[method.student_layers.index(layer)], params)
        logit_leak = backbone & _reached(_total(v for k, v in losses.items() if k in LOGIT_LOSSES),
                                         params)
        feature_leak = _reached(_total(v for k, v in losses.items() if k not in LOGIT_LOSSES),
                                params) - backbone
    where = f"student layer {layer!r} of {type(student).__name__}"
    if logit_leak:
        if logit_leak <= _called_more_than_once(student, sample_input):  # all of them: sharing explains it
            raise ValueError(
                f"the logit-free split does not hold at {where}: {len(logit_leak)} parameters before it "
                f"({_examples(logit_leak)}) belong to modules the network calls again after it (shared "
                "between layers), so cross-entropy reaches them; choose a generalized layer after "
                "their last use")
        raise ValueError(
            f"the logit-free split does not hold at {where}: cross-entropy reaches "
            f"{len(logit_leak)} parameters before it ({_examples(logit_leak)}), so the layer is not "
            "on the main path (inside a residual branch?); choose a generalized layer "
            "(featkd.layers.generalized_layers)")
    if feature_leak:
        raise ValueError(
            f"the logit-free split does not hold at {where}: the feature loss reaches "
            f"{len(feature_leak)} parameters of the tail after it ({_examples(feature_leak)}); "
            "the deepest student layer must be the detach point")
