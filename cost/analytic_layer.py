"""A layer's analytic figures from its captured graph (``ModelProfile.from_program``): time as the
operators it dispatches × the hardware's time per operator + its FLOPs ÷ the sustained throughput; memory
from the graph's annotations (saved bytes per TP degree, the backward's working set, what bf16 autocast keeps);
the parameters autocast casts; and what the graph says of the model (heads, sequence length, hidden size, tied
and vocabulary-sized weights).
"""

from __future__ import annotations

from .layer_type_profile import LayerTypeProfile
from .memory import (
    DTYPE_BYTES,
    grad_working_bytes,
    saved_without_weight_casts,
    tp_activation_parts,
    tp_activation_split,
)
from .time_formula import TimeFormula

TP_DEGREES = (1, 2, 4, 8, 16, 32, 64)  # the degrees a profile's tables hold


def batched_bytes(specs) -> int:
    return sum(spec.nbytes for spec in specs if spec.batched)


def layer_type_profile(
    program, layer, flops_per_s: float, heads: int, vocab: bool = False, op_overhead_s: float = 0.0
) -> LayerTypeProfile:
    """A LayerTypeProfile of ``layer`` with analytic times (operators × ``op_overhead_s`` + FLOPs ÷
    ``flops_per_s``) and graph memory."""
    batch = program.batch_size
    stats = layer.stats
    replicated, sharded = tp_activation_split(program.graph_module, layer)
    per_tp = {tp: int((replicated + sharded / tp) / batch) for tp in TP_DEGREES}
    working = {tp: grad_working_bytes(program.graph_module, layer, tp) // batch for tp in TP_DEGREES}
    outputs = [
        spec
        for spec in layer.boundary_out
        if spec.name in layer.output_names and spec.batched and spec.dtype.is_floating_point
    ]
    hidden_bytes = max((spec.nbytes for spec in outputs), default=0) // batch
    fwd_flops, bwd_flops = stats.fwd_flops // batch, stats.bwd_flops // batch
    return LayerTypeProfile(
        layer_type=layer.layer_type if layer.kind not in ("prologue", "epilogue") else layer.kind,
        fwd=_analytic_time(stats.fwd_ops * op_overhead_s, fwd_flops / flops_per_s),
        bwd=_analytic_time(stats.bwd_ops * op_overhead_s, bwd_flops / flops_per_s),
        param_count=stats.param_count,
        activation_bytes_per_sample=per_tp,
        ckpt_activation_bytes_per_sample=batched_bytes(layer.inputs) // batch,
        boundary_bytes_per_sample=hidden_bytes,
        num_heads=heads,
        vocab_param_count=_vocab_params(program, layer) if vocab else 0,
        largest_param_count=max((program.graph_module.get_parameter(n).numel() for n in layer.param_names), default=0),
        fwd_flops_per_sample=fwd_flops,
        bwd_flops_per_sample=bwd_flops,
        attention_calls=stats.attention_calls,
        fwd_attention_flops_per_sample=stats.fwd_attention_flops // batch,
        bwd_attention_flops_per_sample=stats.bwd_attention_flops // batch,
        grad_working_bytes_per_sample=working,
        autocast_cast_param_count=cast_param_count(program, layer),
    )


def _analytic_time(fixed_s: float, s_per_sample: float) -> TimeFormula:
    return TimeFormula(tuple(term for term in ((0, 0, fixed_s), (1, 0, s_per_sample)) if term[2]))


# operators that multiply by a weight (autocast runs them in bf16, casting the weight), and the views between
_MATMULS = ("linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d")
_VIEWS = ("t", "transpose", "permute", "view", "reshape", "expand", "alias", "_to_copy", "to")


def cast_param_count(program, layer) -> int:
    """Parameters of ``layer`` that bf16 autocast casts at each forward: those a matrix multiplication of the
    layer reads, directly or through views (an embedding table only indexed is not cast; one tied to the head
    is cast by the head's layer)."""
    own = set(layer.node_names)

    def op(node) -> str:
        return getattr(node.target, "__name__", str(node.target)).split(".")[0]

    def multiplied(node) -> bool:
        users = [user for user in node.users if user.name in own and user.op == "call_function"]
        return any(op(user) in _MATMULS or (op(user) in _VIEWS and multiplied(user)) for user in users)

    nodes = {n.target: n for n in program.graph_module.graph.nodes if n.op == "get_attr"}
    return sum(
        program.graph_module.get_parameter(name).numel()
        for name in layer.param_names
        if name in nodes and multiplied(nodes[name])
    )


def bf16_activation_scale(layer, autocast_saved: dict[str, int] | None) -> float | None:
    """What ``layer`` saves under bf16 autocast (``saved_bytes_under_autocast``) less its weights' casts (the
    cost model adds those itself: ``CostModel.autocast_cast_bytes``), per byte it saves in fp32; None where it
    saves nothing in fp32 or was not run under autocast (a model on the meta device)."""
    fp32 = layer.stats.saved_activation_bytes
    if autocast_saved is None or fp32 <= 0:
        return None
    casts = layer.stats.param_count * DTYPE_BYTES["bf16"]
    return max(sum(autocast_saved.get(name, 0) for name in layer.node_names) - casts, 1) / fp32


def bf16_activation_table(program, layer, autocast_saved: dict[str, int] | None) -> dict[int, int] | None:
    """TP degree → bytes per sample ``layer`` saves under bf16 autocast (``saved_bytes_under_autocast``), its
    weights' casts left out, split over a Megatron TP group as ``tp_activation_parts`` splits the fp32 bytes;
    None where it was not run under autocast."""
    if autocast_saved is None:
        return None
    saved = saved_without_weight_casts(program.graph_module, layer, autocast_saved)
    replicated, gathered, sharded = tp_activation_parts(program.graph_module, layer, saved)
    return {tp: int((replicated + gathered + sharded / tp) / program.batch_size) for tp in TP_DEGREES}


def tied_param_count(program) -> int:
    """Parameters used by both the prologue and the epilogue (a tied embedding and LM head)."""
    shared = set(program.prologue.param_names) & set(program.epilogue.param_names)
    return sum(program.graph_module.get_parameter(name).numel() for name in shared)


def _vocab_params(program, layer) -> int:
    """Parameters of ``layer`` with a vocabulary dimension (the largest dimension among its 2-D weights)."""
    params = [program.graph_module.get_parameter(n) for n in layer.param_names]  # tied names too
    matrices = [p for p in params if p.dim() == 2]
    if not matrices:
        return 0
    vocab = max(max(p.shape) for p in matrices)
    return sum(p.numel() for p in matrices if vocab in p.shape)


def infer_num_heads(program) -> int:
    """Attention heads, read from the first scaled-dot-product attention (or 4-D score) in the body."""
    names = {name for layer in program.body for name in layer.node_names}
    for node in program.graph_module.graph.nodes:
        if node.name in names and "scaled_dot_product" in str(node.target):
            value = node.args[0].meta.get("val")
            if value is not None and value.dim() == 4:
                return int(value.shape[1])
    for node in program.graph_module.graph.nodes:  # eager attention: softmax over a [b, h, s, s] tensor
        if node.name in names and "softmax" in str(node.target):
            value = node.meta.get("val")
            if value is not None and value.dim() == 4:
                return int(value.shape[1])
    return 0


def infer_seq_hidden(program) -> tuple[int, int]:
    """(sequence length, hidden size) from the first body layer's 3-D batched outputs."""
    for layer in program.body:
        for spec in layer.boundary_out:
            if spec.batched and len(spec.shape) == 3 and spec.dtype.is_floating_point:
                return spec.shape[1], spec.shape[2]
    return 1, 0
