"""The Program: a captured model as a sequence of layers, each with its own FX graph and annotations.

A Program is what every later step reasons about. ``graph_module`` is the flat exported graph (it trains);
``layers`` partitions its nodes, in execution order, into a prologue (embeddings), the body layers
(repeated blocks, plus any glue between them, such as Swin's patch merging) and an epilogue (final norm,
head, loss). Each layer owns a GraphModule of its nodes, so a pipeline stage is just a run of layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

PROLOGUE, BLOCK, TRANSITION, EPILOGUE = "prologue", "block", "transition", "epilogue"
META_KEY = "galvatron_fx"  # node.meta[META_KEY]: a NodeMeta; GraphModule.meta[META_KEY]: a LayerMeta


@dataclass(frozen=True)
class TensorSpec:
    """A tensor value by name: what a layer boundary carries, a pipeline sends, redistribution moves."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    batched: bool  # dim 0 is the batch dimension

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


@dataclass
class NodeInfo:
    """What analysis measured of one node (``passes.analysis.annotate``): ``NodeMeta.info``."""

    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    fwd_flops: int = 0
    bwd_flops: int = 0
    fwd_ops: int = 0  # operators dispatched (passes.analysis.annotate.DispatchCounter)
    bwd_ops: int = 0
    fwd_attention_flops: int = 0  # the part of the FLOPs in fused attention kernels (scaled_dot_product_attention)
    bwd_attention_flops: int = 0
    saved_bytes: int = 0  # activation bytes autograd saves for backward, first saved by this node
    param_bytes: int = 0  # for get_attr nodes that fetch a parameter


@dataclass(frozen=True)
class NodeMeta:
    """Everything the passes record on one FX node, under ``node.meta[META_KEY]``. Frozen: copies of a graph
    share the values of ``node.meta``, so a pass replaces the record (``set_node_meta``) and a rewrite of one
    copy never shows in another, or in the Program."""

    info: NodeInfo | None = None  # shape, FLOPs, saved bytes (passes.analysis.annotate)
    batched: bool = False  # dim 0 of the value is the batch (passes.analysis.batch_dim)
    sharded: bool = False  # this rank's shard of a value its tensor-parallel group shares (lowering)


def node_meta(node: fx.Node) -> NodeMeta:
    return node.meta.get(META_KEY) or _NO_NODE_META


def set_node_meta(node: fx.Node, **changes: Any) -> None:
    node.meta[META_KEY] = dataclasses.replace(node_meta(node), **changes)


@dataclass(frozen=True)
class LayerMeta:
    """What lowering records on one layer's GraphModule, under ``gm.meta[META_KEY]``: the shards of its
    parameters (tensor and vocab parallelism: target → ShardRecord), which of its inputs arrive and which
    outputs leave split along the sequence (sequence parallelism) or along the features (a grid's rows), and
    which parameters' gradients are partial sums the runtime adds up after backward (sequence parallelism)."""

    shards: dict[str, Any] = field(default_factory=dict)
    seq_inputs: frozenset[str] = frozenset()
    seq_outputs: tuple[bool, ...] = ()
    feature_inputs: frozenset[str] = frozenset()
    feature_outputs: tuple[bool, ...] = ()
    # sequence parallelism: parameter target → the ranks over which its gradient is a partial sum
    partial_grads: dict[str, tuple[int, ...]] = field(default_factory=dict)


def layer_meta(gm: fx.GraphModule) -> LayerMeta:
    return gm.meta.get(META_KEY) or _NO_LAYER_META


def set_layer_meta(gm: fx.GraphModule, **changes: Any) -> None:
    gm.meta[META_KEY] = dataclasses.replace(layer_meta(gm), **changes)


_NO_NODE_META, _NO_LAYER_META = NodeMeta(), LayerMeta()


@dataclass
class LayerStats:
    """Per-layer sums, for the whole example batch (``Program.batch_size`` samples)."""

    param_count: int = 0
    param_bytes: int = 0
    fwd_flops: int = 0
    bwd_flops: int = 0
    fwd_ops: int = 0  # operators dispatched forward and backward: per-operator overhead scales with them
    bwd_ops: int = 0
    # fused attention (scaled_dot_product_attention): its calls and its part of the FLOPs, which run at their own
    # rate, not the matrix multiplications' (cost.step_probe)
    attention_calls: int = 0
    fwd_attention_flops: int = 0
    bwd_attention_flops: int = 0
    saved_activation_bytes: int = 0


@dataclass
class Layer:
    """One entry of the layer table."""

    index: int
    kind: str  # PROLOGUE, BLOCK, TRANSITION or EPILOGUE
    module_path: str  # the block's module path; for other kinds the common prefix of their modules
    layer_type: str
    node_names: tuple[str, ...]
    param_names: tuple[str, ...]  # fully qualified names in the user's model, tied weights once
    inputs: tuple[TensorSpec, ...] = ()  # activations it reads that earlier layers produced
    boundary_out: tuple[TensorSpec, ...] = ()  # every activation live after it: what a cut here sends
    stats: LayerStats = field(default_factory=LayerStats)
    module: fx.GraphModule | None = field(default=None, repr=False)
    input_names: tuple[str, ...] = ()  # the layer module's placeholders, in order (graph inputs too)
    output_names: tuple[str, ...] = ()  # values the layer module returns, in order

    @property
    def boundary_bytes(self) -> int:
        return sum(t.nbytes for t in self.boundary_out)


@dataclass
class Program:
    """A captured model: flat graph, layer table, and how to call it like the original."""

    graph_module: fx.GraphModule
    layers: list[Layer]
    batch_size: int
    placeholder_names: tuple[str, ...]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    model_name: str = ""
    exported: Any = field(default=None, repr=False)  # torch.export.ExportedProgram
    # the batch is a symbol in every layer graph (any batch runs); False where the model could only be captured
    # at the example's batch (see ``static_batch_reason``)
    dynamic_batch: bool = True
    static_batch_reason: str = ""
    _hierarchy: Any = field(default=None, repr=False)

    # -- structure ---------------------------------------------------------------------------
    @property
    def body(self) -> list[Layer]:
        """The layers a plan assigns strategies to: every layer but prologue and epilogue."""
        return [layer for layer in self.layers if layer.kind in (BLOCK, TRANSITION)]

    @property
    def prologue(self) -> Layer:
        return self.layers[0]

    @property
    def epilogue(self) -> Layer:
        return self.layers[-1]

    def layer_types(self) -> dict[str, list[int]]:
        """Layer type → indices (into ``layers``) of the body layers of that type, in order."""
        types: dict[str, list[int]] = {}
        for layer in self.body:
            types.setdefault(layer.layer_type, []).append(layer.index)
        return types

    @property
    def hierarchy(self) -> torch.nn.Module:
        """The unflattened module tree (``torch.export.unflatten``): one submodule per user module, each
        with its own graph, holding the Program's parameters (not the user's)."""
        if self._hierarchy is None:
            tree = torch.export.unflatten(self.exported)
            for name, param in self.graph_module.named_parameters(remove_duplicate=False):
                owner, _, leaf = name.rpartition(".")
                tree.get_submodule(owner)._parameters[leaf] = param
            self._hierarchy = tree
        return self._hierarchy

    def named_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        """Unique parameters of the Program under the user's names (tied weights once)."""
        return self.graph_module.named_parameters()

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter under the names the layers (and so the stages) use, with its full shape."""
        out: dict[str, tuple[int, ...]] = {}
        for layer in self.layers:
            for name in layer.param_names:
                out.setdefault(name, tuple(layer.module.get_parameter(name).shape))
        return out

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.named_parameters())

    # -- calling -----------------------------------------------------------------------------
    def flatten_inputs(self, args: tuple = (), kwargs: dict | None = None) -> dict[str, Any]:
        """Map a call's arguments to the flat graph's placeholders, by name."""
        kwargs = kwargs or {}
        kwarg_keys = self.in_spec.child(1).context if self.in_spec.num_children > 1 else []
        missing = [key for key in kwarg_keys if key not in kwargs]
        extra = [key for key in kwargs if key not in kwarg_keys]
        if missing or extra:
            from .errors import GalvatronError

            raise GalvatronError(
                f"the batch's keyword arguments {sorted(kwargs)} differ from the captured ones {list(kwarg_keys)}",
                "pass the same arguments that the model was captured with",
            )
        leaves = pytree.tree_leaves((tuple(args), {key: kwargs[key] for key in kwarg_keys}))
        if len(leaves) != len(self.placeholder_names):
            from .errors import GalvatronError

            raise GalvatronError(
                f"the batch has {len(leaves)} leaves but the captured model takes {len(self.placeholder_names)}",
                "pass the same positional arguments that the model was captured with",
            )
        return dict(zip(self.placeholder_names, leaves))

    def run_layers(self, *args, **kwargs):
        """Call the model layer by layer; equals calling ``graph_module`` (and the original model)."""
        env = self.flatten_inputs(args, kwargs)
        for layer in self.layers:
            run_layer(layer, env)
        outputs = [env[name] for name in self.output_names]
        return pytree.tree_unflatten(outputs, self.out_spec)

    @property
    def output_names(self) -> tuple[str, ...]:
        output_node = next(n for n in reversed(self.graph_module.graph.nodes) if n.op == "output")
        return tuple(arg.name if isinstance(arg, fx.Node) else None for arg in pytree.tree_leaves(output_node.args[0]))

    def differentiable_names(self) -> frozenset[str]:
        """Values of the flat graph that can carry a gradient: floating point and computed from a trainable
        parameter. A pipeline cut sends gradients back for these only (both sides derive the same set; a
        superset is safe: a value left without a gradient sends zeros)."""
        trainable = {
            name for name, param in self.graph_module.named_parameters(remove_duplicate=False) if param.requires_grad
        }
        names: set[str] = set()
        for node in self.graph_module.graph.nodes:
            if node.op == "get_attr":
                differentiable = node.target in trainable
            else:
                differentiable = any(arg.name in names for arg in node.all_input_nodes)
            value = node.meta.get("val")
            # a tuple-valued node passes differentiability on to its getitems
            if differentiable and (not isinstance(value, torch.Tensor) or value.dtype.is_floating_point):
                names.add(node.name)
        return frozenset(names)


def run_layer(layer: Layer, env: dict[str, Any]) -> None:
    """Run one layer's module on values from ``env`` and store what it returns back into ``env``."""
    outputs = layer.module(*[env[name] for name in layer.input_names])
    env.update(zip(layer.output_names, outputs))


def layers_using(program: Program) -> dict[str, list[int]]:
    """Parameter name → indices of the Program layers that use it (a tied weight: several)."""
    users: dict[str, list[int]] = {}
    for layer in program.layers:
        for name in layer.param_names:
            users.setdefault(name, []).append(layer.index)
    return users
