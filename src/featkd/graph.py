"""Generalized layers read from a model's traced graph (torch.fx).

The model is traced once, in eval mode, by a tracer that records the module
calls each graph node belongs to. Modules it keeps whole (graph leaves):
torch.nn's own modules, the blocks and input layers of
:func:`featkd.layers.register_block`, timm's no-trace modules, and any module
whose code cannot be traced (found by retrying).

A point of the graph is on the **main path** when every path from the input
to the output passes through it: the output of a residual block is, nothing
inside its branch is. Shape reads (``x.shape``, ``x.size(0)``) carry no data
and are not paths. A **block** is a module class that merges two data paths
in its own code (a residual add, a concatenation, a gate) in at least one of
its calls and returns one tensor (a stage passing a tuple, as timm's PiT does,
is read inside), a class kept whole, or a graph leaf holding two or more
convolutions or linear layers (``nn.TransformerEncoderLayer``). Generalized layers are the main-path
points that are, outside any block call:

* the output of an activation (module or function: the ReLU family, GELU,
  SiLU/Swish, Hardswish, Mish, ELU, SELU, ...),
* the output of a block call,
* a flatten to (batch, features) (``nn.Flatten``, ``torch.flatten(x, 1)``,
  ``x.view(x.size(0), -1)``): the representation before the head.

The head starts at the first main-path ``nn.Linear`` after the last block; in a
model with none there, at the last main-path convolution after it (a
convolutional classifier, as in SqueezeNet).

A point is tapped with a hook on a module call, so it is named after one:
``name`` is the output of module ``name`` (the innermost block returning it,
else the innermost module returning it that runs once per forward), ``name#k``
the output of the k-th call of a module that runs several times, and
``name:in`` (``name#k:in``) the first input of a module call, for points made
by functions (torchvision's ``torch.flatten`` before ``fc`` is ``fc:in``). A
main-path point that is neither a module's output nor a module's input cannot
be tapped and is left out (logged).
"""

from __future__ import annotations

import logging
import operator
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

from torch import fx, nn

__all__ = ["GraphLayers", "Point", "TraceFailed", "head_position", "is_activation_module", "trace_layers"]

log = logging.getLogger(__name__)

Call = tuple[str, int]  # (module name, 1-based call index)

# Activation kinds, compared after lower-casing and dropping underscores (and a trailing
# "_" of in-place functions): nn.LeakyReLU, F.leaky_relu, x.relu_(), timm's GELU, ...
ACTIVATION_NAMES = frozenset({
    "relu", "relu6", "leakyrelu", "rrelu", "prelu", "elu", "selu", "celu", "gelu", "gelutanh",
    "quickgelu", "silu", "swish", "hardswish", "mish", "softplus", "hardtanh", "sigmoid",
    "hardsigmoid", "logsigmoid", "tanh", "softsign", "tanhshrink", "threshold",
})
_SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"})
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "stride", "type", "get_device",
                            "is_contiguous", "is_floating_point"})
_MAX_RETRIES = 64


class TraceFailed(Exception):
    """The model's own forward cannot be traced by torch.fx."""


def _kind(name: str) -> str:
    return name.lower().rstrip("_").replace("_", "")


def is_activation_module(module: nn.Module) -> bool:
    """True for activation modules: torch.nn's, timm's or any class named after an activation."""
    return any(_kind(cls.__name__) in ACTIVATION_NAMES for cls in type(module).__mro__[:-1])


@dataclass(frozen=True)
class Point:
    """Where a layer is tapped: the output (or first input) of one call of a module.

    ``call`` None means the module's only call; ``side`` is "out" or "in".
    """

    module: str
    call: int | None = None
    side: str = "out"

    @classmethod
    def parse(cls, name: str) -> Point:
        """``"layer1.0"``, ``"act#2"``, ``"fc:in"`` or ``"act#2:in"`` -> Point."""
        side = "out"
        if name.endswith(":in"):
            name, side = name[: -len(":in")], "in"
        match = re.fullmatch(r"(.+)#([0-9]+)", name)
        if match and int(match.group(2)) >= 1:
            return cls(match.group(1), int(match.group(2)), side)
        return cls(name, None, side)

    @property
    def name(self) -> str:
        call = "" if self.call is None else f"#{self.call}"
        return f"{self.module}{call}{':in' if self.side == 'in' else ''}"


@dataclass
class GraphLayers:
    """The generalized layers of a traced model and what tapping them needs."""

    points: list[Point]
    head: int
    calls: Counter
    graph: fx.Graph
    nodes: dict[Point, fx.Node]
    main_path: set[fx.Node] = field(repr=False)
    untappable: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]


# ----------------------------------------------------------------------------- tracing

class _Tracer(fx.Tracer):
    """Records, per node, the module calls around it and the calls it is the output or input of."""

    def __init__(self, keep_whole: Callable[[nn.Module], bool], leaf_types: set[type],
                 autowrap_functions: Iterable[Callable]) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.keep_whole = keep_whole
        self.leaf_types = leaf_types
        self.open_calls: list[Call] = []
        self.call_count: Counter = Counter()
        self.enclosing: dict[fx.Node, tuple[Call, ...]] = {}
        self.returned_by: defaultdict[fx.Node, list[Call]] = defaultdict(list)
        self.taken_by: defaultdict[fx.Node, list[Call]] = defaultdict(list)
        self.returns_several: set[type] = set()  # classes returning a tuple, list or dict
        self.failed_type: type | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (self.keep_whole(m) or type(m) in self.leaf_types
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        self.call_count[name] += 1
        call = (name, self.call_count[name])
        if args and isinstance(args[0], fx.Proxy):
            self.taken_by[args[0].node].append(call)
        self.open_calls.append(call)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_type is None:  # the innermost module whose code failed
                self.failed_type = type(m)
            raise
        finally:
            self.open_calls.pop()
        if isinstance(out, fx.Proxy):
            self.returned_by[out.node].append(call)
        elif isinstance(out, (tuple, list, dict)):
            self.returns_several.add(type(m))
        return out

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        self.enclosing[node] = tuple(self.open_calls)
        return node


def _extra_leaves() -> tuple[set[type], list[Callable]]:
    """timm's no-trace modules and functions, when timm is installed."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return set(), []
    functions = [f for f in timm_fx.get_notrace_functions() if callable(f)]
    return set(timm_fx.get_notrace_modules()), functions


def _trace(model: nn.Module, keep_whole: Callable[[nn.Module], bool]) -> _Tracer:
    """Trace ``model`` in eval mode; modules whose code fails are kept whole and tracing retried."""
    leaf_types, functions = _extra_leaves()
    modes = {m: m.training for m in model.modules()}
    attributes = set(vars(model))
    model.eval()
    try:
        for _ in range(_MAX_RETRIES):
            tracer = _Tracer(keep_whole, leaf_types, functions)
            try:
                tracer.trace(model)
                return tracer
            except Exception as err:
                if tracer.failed_type is None or tracer.failed_type in leaf_types:
                    raise TraceFailed(f"{type(err).__name__}: {err}") from err
                log.debug("keeping %s whole: its code cannot be traced (%s)",
                          tracer.failed_type.__name__, err)
                leaf_types.add(tracer.failed_type)
        raise TraceFailed(f"more than {_MAX_RETRIES} module classes could not be traced")
    finally:
        for module, mode in modes.items():
            module.training = mode
        for added in set(vars(model)) - attributes:  # tensor constants fx stores on the root
            delattr(model, added)


# ----------------------------------------------------------------------------- graph analysis

def _shape_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that carry only shapes or constants, no data (``x.shape[0] * 2``, ``x.size(1)``)."""
    shapes: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target is getattr:
            reads_shape = node.args[1] in _SHAPE_ATTRIBUTES
        elif node.op == "call_method":
            reads_shape = node.target in _SHAPE_METHODS
        else:
            reads_shape = False
        inputs = node.all_input_nodes
        derived = node.op in ("call_function", "call_method") and bool(inputs) and all(
            i in shapes for i in inputs)
        if reads_shape or derived:
            shapes.add(node)
    return shapes


def _reachable(starts: list[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]],
               blocked: Container[fx.Node] = ()) -> set[fx.Node]:
    """Nodes reached from ``starts`` by repeated ``step`` (users or inputs), never entering ``blocked``."""
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node in seen or node in blocked:
            continue
        seen.add(node)
        stack.extend(step(node))
    return seen


def _relevant(graph: fx.Graph, shapes: set[fx.Node]) -> list[fx.Node]:
    """Nodes on some data path from the (first) input to the output, in graph order."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"][:1]
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    forward = _reachable(inputs, lambda n: n.users, shapes)
    backward = _reachable([output], lambda n: n.all_input_nodes, shapes)
    return [n for n in graph.nodes if n in forward and n in backward]


def _main_path(relevant: list[fx.Node]) -> set[fx.Node]:
    """Relevant nodes that every input-output path passes through (no edge jumps over them)."""
    position = {node: i for i, node in enumerate(relevant)}
    cuts: set[fx.Node] = set()
    reach = -1
    for i, node in enumerate(relevant):
        if reach <= i:
            cuts.add(node)
        for user in node.users:
            if user in position:
                reach = max(reach, position[user])
    return cuts


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", "")


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An activation call, or a kept-whole module whose last child is one (timm's BatchNormAct2d)."""
    if node.op == "call_module":
        module = modules[node.target]
        children = list(module.children())
        return is_activation_module(module) or bool(children) and is_activation_module(children[-1])
    if node.op in ("call_function", "call_method"):
        return _kind(_target_name(node)) in ACTIVATION_NAMES
    return False


def _argument(node: fx.Node, index: int, keyword: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(keyword, default)


def _is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A flatten to (batch, features)."""
    if node.op == "call_module":
        module = modules[node.target]
        return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1
    name = _target_name(node)
    if node.op in ("call_function", "call_method") and name == "flatten":
        return (_argument(node, 1, "start_dim", 0) == 1
                and _argument(node, 2, "end_dim", -1) == -1)
    if node.op == "call_method" and name in ("view", "reshape"):
        return len(node.args) == 3 and node.args[2] == -1
    return False


def _opaque_block(module: nn.Module) -> bool:
    """A graph leaf holding two or more convolutions or linear layers: a block we cannot look
    into (timm's NormFreeBlock, nn.TransformerEncoderLayer, a module whose code cannot be traced)."""
    weights = sum(isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) for m in module.modules())
    return weights >= 2


def _block_types(relevant: list[fx.Node], tracer: _Tracer, modules: dict[str, nn.Module],
                 keep_whole: Callable[[nn.Module], bool]) -> set[type]:
    """Module classes kept whole, opaque blocks, and classes whose own code merges two data
    paths in some call, unless they return several tensors (no single output to tap: the
    layers are read inside them, as in timm's PiT, whose stages pass (tokens, class token))."""
    inside = set(relevant)
    types = {type(m) for m in modules.values() if keep_whole(m)}
    merging = set()
    for node in relevant:
        if node.op == "call_module" and _opaque_block(modules[node.target]):
            types.add(type(modules[node.target]))
        scope = tracer.enclosing.get(node, ())
        merged = {i for i in node.all_input_nodes if i in inside}
        if scope and len(merged) >= 2:
            merging.add(type(modules[scope[-1][0]]))
    return types | (merging - tracer.returns_several)


def _is_container(node: fx.Node) -> bool:
    """A node only ever unpacked (``a, b = block(x)``): a tuple or list, not a tensor to tap."""
    return bool(node.users) and all(
        user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)
        for user in node.users)


def _point(node: fx.Node, tracer: _Tracer, is_block: Callable[[Call], bool]) -> Point | None:
    """The tap point of ``node``: the innermost block (else once-run module) returning it, or
    the innermost once-run module taking it, else one call of a module."""
    for calls, side in ((tracer.returned_by.get(node, []), "out"),
                        (list(reversed(tracer.taken_by.get(node, []))), "in")):
        if not calls:
            continue
        calls = [c for c in calls if is_block(c)] or calls
        for name, _ in calls:
            if tracer.call_count[name] == 1:
                return Point(name, None, side)
        name, call = calls[0]
        return Point(name, call, side)
    return None


def _candidates(relevant: list[fx.Node], main: set[fx.Node], tracer: _Tracer,
                modules: dict[str, nn.Module], is_block: Callable[[Call], bool]
                ) -> tuple[list[fx.Node], int]:
    """Main-path GL nodes outside blocks in graph order, and how many come before the head
    (the first main-path nn.Linear after the last block output, else the last convolution)."""
    results = set(relevant[-1].all_input_nodes) if relevant else set()  # the logits
    found: list[fx.Node] = []
    head = last_conv = None
    for node in relevant:
        if node not in main or node.op in ("placeholder", "output"):
            continue
        outputs = tracer.returned_by.get(node, [])
        if any(is_block(c) and c not in outputs for c in tracer.enclosing.get(node, ())):
            continue  # inside a block
        block_output = any(is_block(c) for c in outputs)
        returned = [modules[name] for name, _ in outputs]  # timm's Linear is traced through: F.linear
        if block_output:
            head = last_conv = None
        elif head is None and any(isinstance(m, nn.Linear) for m in returned):
            head = len(found)
        elif any(isinstance(m, nn.modules.conv._ConvNd) for m in returned):
            last_conv = len(found)
        if node in results or _is_container(node):
            continue
        if block_output or _is_activation(node, modules) or _is_flatten(node, modules):
            found.append(node)
    return found, head_position(head, last_conv, len(found))


def head_position(linear: int | None, last_conv: int | None, count: int) -> int:
    """Where the head starts among ``count`` GLs: at the first Linear after the last block;
    without one, at the last convolution after it (a convolutional classifier); else after all."""
    for position in (linear, last_conv):
        if position is not None:
            return position
    return count


def _call_nodes(tracer: _Tracer) -> dict[Point, fx.Node]:
    """The node of every module call's output and first input."""
    nodes: dict[Point, fx.Node] = {}
    for table, side in ((tracer.returned_by, "out"), (tracer.taken_by, "in")):
        for node, calls in table.items():
            for name, call in calls:
                point = Point(name, None if tracer.call_count[name] == 1 else call, side)
                nodes.setdefault(point, node)
    return nodes


def trace_layers(model: nn.Module, keep_whole: Callable[[nn.Module], bool]) -> GraphLayers:
    """Generalized layers of ``model`` by the graph rule (see the module docstring).

    ``keep_whole(module)`` says which modules are registered blocks or input
    layers. Raises TraceFailed when the model's own forward cannot be traced.
    """
    tracer = _trace(model, keep_whole)
    modules = dict(model.named_modules())
    relevant = _relevant(tracer.graph, _shape_nodes(tracer.graph))
    main = _main_path(relevant)
    blocks = _block_types(relevant, tracer, modules, keep_whole)

    def is_block(call: Call) -> bool:
        return type(modules[call[0]]) in blocks

    candidates, head_candidate = _candidates(relevant, main, tracer, modules, is_block)
    points: list[Point] = []
    untappable: list[str] = []
    head = head_candidate  # the head's index among the tapped points: less the untapped ones before it
    for position, node in enumerate(candidates):
        point = _point(node, tracer, is_block)
        if point is None:
            untappable.append(node.name)
            head -= position < head_candidate
        else:
            points.append(point)
    if untappable:
        log.info("%s: main-path points made by functions that no module returns or takes are "
                 "not tapped: %s", type(model).__name__, ", ".join(untappable))
    return GraphLayers(points, head, tracer.call_count, tracer.graph, _call_nodes(tracer), main,
                       untappable)


def tail_module(model: nn.Module, layers: GraphLayers, point: Point) -> fx.GraphModule:
    """A GraphModule running ``model`` from main-path ``point`` to the output (modules shared)."""
    node = layers.nodes.get(point)
    if node is None or node not in layers.main_path:
        raise ValueError(f"{point.name!r} is not on the main path of {type(model).__name__}, so "
                         "its tail cannot run on its own; valid: generalized layers")
    graph = layers.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    needed = _reachable([output], lambda n: n.all_input_nodes, {node})
    new = fx.Graph()
    env = {node: new.placeholder("x")}
    for current in graph.nodes:
        if current not in needed:
            continue
        if current.op == "placeholder":
            raise ValueError(f"the part of {type(model).__name__} after {point.name!r} reads the "
                             "model input (e.g. its shape), so it cannot run on its own")
        env[current] = new.node_copy(current, lambda n: env[n])
    return fx.GraphModule(model, new, class_name=f"{type(model).__name__}Tail")
