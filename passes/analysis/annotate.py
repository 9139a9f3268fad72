"""Analysis passes: annotate every node, then sum the annotations per layer.

``annotate_nodes`` requires a flat GraphModule with ``meta["val"]`` on its nodes. It runs the graph once
forward and once backward on fake tensors (no memory, no compute) and ensures every node has a ``NodeInfo``
in its ``NodeMeta`` (``program.node_meta(node).info``): output shape and dtype, forward FLOPs and the FLOPs
of its backward (torch.utils.flop_counter's formulas, attributed through autograd hooks on the node's
grad_fn), the operators it dispatches forward and backward (what per-operator overhead scales with:
``cost/step_probe.py``), and the activation bytes autograd saves for backward (storages first saved by this
node, parameters excluded); get_attr nodes of parameters carry their bytes. ``sum_layer_stats`` requires
annotated nodes and ensures every layer's ``stats``. ``saved_bytes_under_autocast`` counts the saved bytes
again under bf16 autocast, for the memory of mixed-precision training, and leaves the annotations alone.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from galvatron_fx.program import Layer, LayerStats, NodeInfo, node_meta, set_node_meta


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flops(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's FLOP counter has formulas for the CUDA attention kernels but not for the CPU's flash attention,
# which scaled_dot_product_attention dispatches to on CPU (and on fake CPU tensors): without these, a
# capture on CPU counts attention as zero FLOPs and the analytic profile prices it as free.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
}

# The fused attention kernels (forward and backward) scaled_dot_product_attention dispatches to, on CPU and GPU:
# their FLOPs run at a rate of their own (cost.step_probe times it), counted apart.
ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name)
    for name in (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_cudnn_attention_backward",
    )
    if hasattr(torch.ops.aten, name)
)


def attention_flops(counter: FlopCounterMode) -> int:
    """The FLOPs ``counter`` has counted in fused attention kernels (``ATTENTION_OPS``)."""
    counts = counter.flop_counts.get("Global", {})  # read in place: get_flop_counts copies every module's table
    return sum(counts.get(op, 0) for op in ATTENTION_OPS)


# Assertion ops pin the capture device and carry no cost.
_SKIPPED_TARGETS = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}


class DispatchCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched under it that launch work (after autograd and autocast: the calls a
    step pays for); views and ``prim`` queries launch none. ``paused`` leaves out the fake tensors the
    counting itself creates."""

    def __init__(self):
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.namespace == "aten" and not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _Counters:
    """FLOPs, dispatched operators and the FLOPs of fused attention so far, read together."""

    def __init__(self, flops: FlopCounterMode, ops: DispatchCounter):
        self.flops, self.ops = flops, ops

    def read(self) -> tuple[int, int, int]:
        return self.flops.get_total_flops(), self.ops.count, attention_flops(self.flops)


class _CostInterpreter(fx.Interpreter):
    """Runs the graph on fake tensors and records per-node FLOPs and saved bytes."""

    def __init__(self, graph_module: fx.GraphModule, fake_mode: FakeTensorMode, counters: _Counters):
        super().__init__(graph_module)
        self.fake_mode = fake_mode
        self.counters = counters
        self.info: dict[fx.Node, NodeInfo] = {}
        self.current: fx.Node | None = None
        self.seen_storages: set[StorageWeakRef] = set()
        self.keep_alive: list[torch.Tensor] = []  # so that storage identities are not reused
        self.fake_attrs: dict[str, torch.Tensor] = {}
        self.known_grad_fns: set[Any] = set()

    # -- fake parameters --------------------------------------------------------------------
    def fetch_attr(self, target: str) -> Any:
        if target not in self.fake_attrs:
            real = super().fetch_attr(target)
            if not isinstance(real, torch.Tensor):  # submodules of higher-order ops
                return real
            self.counters.ops.paused = True
            with self.fake_mode:
                fake = torch.empty_strided(real.shape, real.stride(), dtype=real.dtype, device=real.device)
            fake.requires_grad_(real.requires_grad)
            self.counters.ops.paused = False
            if isinstance(real, torch.nn.Parameter):
                self.seen_storages.add(StorageWeakRef(fake.untyped_storage()))
            self.fake_attrs[target] = fake
        return self.fake_attrs[target]

    # -- per-node accounting ----------------------------------------------------------------
    def run_node(self, node: fx.Node) -> Any:
        if node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in _SKIPPED_TARGETS:
            return None
        self.current = node
        flops, ops, attention = self.counters.read()
        result = super().run_node(node)
        info = self.info.setdefault(node, NodeInfo())
        flops_after, ops_after, attention_after = self.counters.read()
        info.fwd_flops += flops_after - flops
        info.fwd_ops += ops_after - ops
        info.fwd_attention_flops += attention_after - attention
        self._hook_backward(node, result)
        return result

    def pack_saved(self, tensor: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(tensor.untyped_storage())
        if key not in self.seen_storages and self.current is not None:
            self.seen_storages.add(key)
            self.keep_alive.append(tensor)
            self.info.setdefault(self.current, NodeInfo()).saved_bytes += tensor.untyped_storage().nbytes()
        return tensor

    def _hook_backward(self, node: fx.Node, result: Any) -> None:
        """Attribute to this node the FLOPs and operators of every autograd node it created (one op can create
        several, e.g. linear = view(addmm)): count between each one's pre- and post-hook."""
        frontier = [getattr(v, "grad_fn", None) for v in pytree.tree_leaves(result)]
        while frontier:
            grad_fn = frontier.pop()
            if grad_fn is None or grad_fn in self.known_grad_fns:
                continue
            self.known_grad_fns.add(grad_fn)  # also keeps the wrapper alive, so identity is stable
            frontier.extend(fn for fn, _ in grad_fn.next_functions)
            start: list[tuple[int, int, int]] = []
            grad_fn.register_prehook(lambda grads, start=start: start.append(self.counters.read()))

            def after(grad_inputs, grad_outputs, node=node, start=start):
                (flops, ops, attention), (flops_after, ops_after, attention_after) = start.pop(), self.counters.read()
                info = self.info.setdefault(node, NodeInfo())
                info.bwd_flops += flops_after - flops
                info.bwd_ops += ops_after - ops
                info.bwd_attention_flops += attention_after - attention

            grad_fn.register_hook(after)


def _fake_input(fake_mode: FakeTensorMode, node: fx.Node, example: Any) -> Any:
    value = node.meta.get("val", example)
    if not isinstance(value, torch.Tensor):
        return example
    with fake_mode:
        return torch.empty(tuple(value.shape), dtype=value.dtype, device=value.device)


def _run_fake(
    graph_module: fx.GraphModule, example_inputs: dict[str, Any], autocast_dtype: torch.dtype | None = None
) -> _CostInterpreter:
    """Forward and backward of ``graph_module`` on fake tensors, counted by a ``_CostInterpreter``; with
    ``autocast_dtype``, under autocast for the device of the graph's parameters."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    counter, ops = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS), DispatchCounter()
    interpreter = _CostInterpreter(graph_module, fake_mode, _Counters(counter, ops))
    placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
    inputs = [_fake_input(fake_mode, n, example_inputs.get(n.name)) for n in placeholders]
    autocast = (
        torch.autocast(_parameter_device(graph_module), dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with fake_mode, counter, ops:
        with torch.autograd.graph.saved_tensors_hooks(interpreter.pack_saved, lambda t: t):
            with torch.enable_grad(), autocast:
                outputs = interpreter.run(*inputs)
        interpreter.current = None
        differentiable = [o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor) and o.requires_grad]
        if differentiable:
            torch.autograd.backward(differentiable, [torch.ones_like(o) for o in differentiable])
    return interpreter


def _parameter_device(graph_module: fx.GraphModule) -> str:
    return next((p.device.type for p in graph_module.parameters()), "cpu")


def saved_bytes_under_autocast(
    graph_module: fx.GraphModule, example_inputs: dict[str, Any], dtype: torch.dtype = torch.bfloat16
) -> dict[str, int] | None:
    """Node name → the bytes autograd saves for backward first at that node when the graph runs under autocast
    to ``dtype`` (autocast's casts of weights included): ``NodeInfo.saved_bytes`` at mixed precision, where
    the residual stream, norms and softmax stay fp32 and matmuls save bf16. None for a model on a device
    without autocast (the meta device: its constants live there, so the graph cannot run on another).
    Node meta is left as it is."""
    if _parameter_device(graph_module) not in ("cpu", "cuda"):
        return None
    interpreter = _run_fake(graph_module, example_inputs, dtype)
    return {node.name: info.saved_bytes for node, info in interpreter.info.items()}


def annotate_nodes(graph_module: fx.GraphModule, example_inputs: dict[str, Any]) -> None:
    """Annotate every call node of ``graph_module`` (see module docstring). ``example_inputs``: by placeholder."""
    interpreter = _run_fake(graph_module, example_inputs)

    parameters = dict(graph_module.named_parameters(remove_duplicate=False))
    for node in graph_module.graph.nodes:
        if node.op == "output":
            continue
        info = interpreter.info.get(node, NodeInfo())
        value = node.meta.get("val")
        if node.op == "get_attr" and node.target in parameters:
            value = parameters[node.target]
            info.param_bytes = value.numel() * value.element_size()
        if isinstance(value, torch.Tensor):
            info.shape, info.dtype = tuple(int(s) for s in value.shape), value.dtype
        set_node_meta(node, info=info)


def sum_layer_stats(graph_module: fx.GraphModule, layers: list[Layer]) -> None:
    """Fill every layer's ``stats`` from its nodes' annotations and its parameters."""
    nodes = {n.name: n for n in graph_module.graph.nodes}
    for layer in layers:
        infos = [node_meta(nodes[name]).info or NodeInfo() for name in layer.node_names]
        params = [graph_module.get_parameter(name) for name in layer.param_names]
        layer.stats = LayerStats(
            param_count=sum(p.numel() for p in params),
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            fwd_flops=sum(i.fwd_flops for i in infos),
            bwd_flops=sum(i.bwd_flops for i in infos),
            fwd_ops=sum(i.fwd_ops for i in infos),
            bwd_ops=sum(i.bwd_ops for i in infos),
            attention_calls=sum(1 for i in infos if i.fwd_attention_flops),
            fwd_attention_flops=sum(i.fwd_attention_flops for i in infos),
            bwd_attention_flops=sum(i.bwd_attention_flops for i in infos),
            saved_activation_bytes=sum(i.saved_bytes for i in infos),
        )
