"""Vocab parallelism for the embedding (prologue) and the LM head with its cross-entropy (epilogue).

The ``vtp`` ranks of a group each hold ``ceil(V / vtp)`` rows of the vocabulary (the last rank's tail is
zero padding when ``vtp`` does not divide ``V``; padded logits never enter the softmax). Prologue and
epilogue keep the data layout of the trainer (each rank its own samples), so nothing around them changes:

- embedding: the group's token ids are all-gathered (integers, cheap), each rank looks up the rows of its
  shard (ids outside it give zeros: ``masked_embedding``) and a reduce-scatter along the batch returns to
  every rank the summed embeddings of its own samples (backward: all-gather of the gradients);
- head: the hidden states are all-gathered along the batch (backward: reduce-scatter of the partial
  gradients), each rank computes the logits of its vocabulary shard for the group's rows, and
  ``vocab_cross_entropy`` (all-reduced max, sum of exponentials and target logit) gives the loss of every
  row of the group. Its mean has the value of the plain loss; its gradient is scaled by ``vtp`` so that each
  sample's gradient is the one its own rank would have produced.

Tied weights (GPT-2's ``wte``/``lm_head``) are sharded once and shared. Every parameter of prologue and
epilogue has its gradient scaled by ``1 / vtp``; replicated ones (position embeddings, final norm) also get
``tp_copy`` over the group, because each rank's gradient covers only its own samples; the runtime then
averages them over the ``devices / vtp`` replicas of the same shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from galvatron_fx.errors import PlanError
from galvatron_fx.fx_utils import get_attr_path, set_attr_path
from galvatron_fx.passes.analysis.dim_tracking import VIEWS, param_matmul, rewritten_meta
from galvatron_fx.passes.lower.graph.tensor_parallel import ShardRecord
from galvatron_fx.passes.lower.ops.collectives import all_gather_dim, gather_dim_sum_grad, reduce_scatter_dim, tp_copy
from galvatron_fx.passes.lower.ops.redistribute import scale_grad
from galvatron_fx.passes.lower.ops.vocab import masked_embedding, vocab_cross_entropy
from galvatron_fx.program import layer_meta, set_layer_meta

aten = torch.ops.aten
CROSS_ENTROPY = aten.cross_entropy_loss.default


@dataclass(frozen=True)
class VocabConfig:
    """``vtp`` ranks (``ranks``, this process ``vtp_rank``) share a vocabulary of ``vocab`` entries."""

    vtp: int
    vtp_rank: int
    ranks: tuple[int, ...]
    vocab: int

    @property
    def rows(self) -> int:
        return math.ceil(self.vocab / self.vtp)

    @property
    def start(self) -> int:
        return self.vtp_rank * self.rows


@dataclass(frozen=True)
class VocabShardRecord(ShardRecord):
    """A shard along the vocabulary of ``vocab`` entries, ``padded_rows`` zero rows appended at the end."""

    padded_rows: int = 0

    def select(self, full: torch.Tensor) -> torch.Tensor:
        pad = [0, 0] * (full.dim() - 1 - self.dim) + [0, self.padded_rows]
        return super().select(torch.nn.functional.pad(full, pad) if self.padded_rows else full)

    def positions(self) -> torch.Tensor:
        """Flat indices of the shard's elements in the full tensor; -1 for padding."""
        return self.select(torch.arange(math.prod(self.full_shape)).view(self.full_shape) + 1).reshape(-1) - 1


# -- the pass ------------------------------------------------------------------------------------------------


def _shard(gm, node: fx.Node, dim: int, cfg: VocabConfig, shared: dict) -> None:
    """Replace parameter ``node`` by its vocabulary shard along ``dim`` (once per parameter object)."""
    full = get_attr_path(gm, node.target)
    if id(full) not in shared:
        record = VocabShardRecord(
            node.target,
            tuple(full.shape),
            dim,
            (cfg.rows * cfg.vtp,),
            ((cfg.start, cfg.rows),),
            replicas=1,
            ranks=cfg.ranks,
            padded_rows=cfg.rows * cfg.vtp - cfg.vocab,
        )
        shared[id(full)] = (nn.Parameter(record.select(full.detach()).clone().contiguous(), full.requires_grad), record)
    param, record = shared[id(full)]
    set_attr_path(gm, node.target, param)
    set_layer_meta(gm, shards={**layer_meta(gm).shards, node.target: record})
    shared.setdefault("ids", set()).add(id(param))


def vocab_size(epilogue: fx.GraphModule) -> int | None:
    """The vocabulary size: the class dimension of the epilogue's cross-entropy."""
    for node in epilogue.graph.find_nodes(op="call_function", target=CROSS_ENTROPY):
        return int(node.args[0].meta["val"].shape[-1])
    return None


def _vocab_embeddings(gm: fx.GraphModule, cfg: VocabConfig, shared: dict, names: set[str] | None = None) -> list[str]:
    """Every lookup in an embedding of ``vocab`` rows (of those in ``names``, if given) made vocab-parallel:
    the group's ids all-gathered, this rank's rows looked up, the sums reduce-scattered back to each rank's
    own samples. Returns the sharded weights."""
    graph, done = gm.graph, []
    for node in list(graph.find_nodes(op="call_function", target=aten.embedding.default)):
        weight, ids = node.args[0], node.args[1]
        if (
            weight.op != "get_attr"
            or get_attr_path(gm, weight.target).shape[0] != cfg.vocab
            or (names is not None and weight.target not in names)
        ):
            continue
        _shard(gm, weight, 0, cfg, shared)
        with graph.inserting_before(node):
            every = graph.call_function(all_gather_dim, (ids, 0, cfg.ranks))
            part = graph.call_function(
                masked_embedding, (weight, every, cfg.start, node.args[2] if len(node.args) > 2 else -1)
            )
            mine = graph.call_function(reduce_scatter_dim, (part, 0, cfg.ranks))
        node.replace_all_uses_with(mine)
        graph.erase_node(node)
        done.append(weight.target)
    return done


def vocab_parallel_tied(
    gm: fx.GraphModule, cfg: VocabConfig, shared: dict, names: set[str], what: str = "layer"
) -> None:
    """Requires: a body layer whose rows are this rank's own samples (its dp spans the stage). Ensures: its
    lookups in the embedding weights ``names`` that the embedding and head shard (T5's decoder embedding, tied
    to them) use the same shard, as in ``vocab_parallel``, their gradients scaled by ``1 / vtp``. PlanError
    where such a weight is used other than as an embedding."""
    reads = [n for n in gm.graph.find_nodes(op="get_attr") if n.target in names]
    if not reads:
        return
    others = [u for n in reads for u in n.users if u.target is not aten.embedding.default]
    if others:
        raise PlanError(
            f"{what} uses the vocab-parallel weight {reads[0].target} in {others[0].name} ({others[0].target}), "
            "not as an embedding",
            "use vtp=1",
        )
    _vocab_embeddings(gm, cfg, shared, names)
    for node in reads:
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(scale_grad, (node, 1.0 / cfg.vtp))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    gm.graph.lint()
    gm.recompile()
    rewritten_meta(gm, f"{what}: vocab parallelism over {cfg.vtp} ranks", "use vtp=1")


def tied_vocab_names(program) -> set[str]:
    """Embedding weights of vocabulary size that a body layer reads and the embedding or head holds too."""
    vocab = vocab_size(program.epilogue.module)
    ends = set(program.prologue.param_names) | set(program.epilogue.param_names)
    names = set()
    for layer in program.body:
        for node in layer.module.graph.find_nodes(op="call_function", target=aten.embedding.default):
            weight = node.args[0]
            if (
                weight.op == "get_attr"
                and weight.target in ends
                and get_attr_path(layer.module, weight.target).shape[0] == vocab
            ):
                names.add(weight.target)
    return names


def vocab_parallel(gm: fx.GraphModule, cfg: VocabConfig, shared: dict, what: str = "layer") -> list[str]:
    """Requires: a prologue or epilogue GraphModule with ``meta["val"]``. Ensures: embeddings with ``vocab``
    rows and the projection feeding the cross-entropy sharded along the vocabulary with the collectives
    described above; every parameter's gradient scaled by ``1 / vtp`` (``tp_copy`` on replicated ones).
    ``shared`` maps parameters already sharded (tied weights) to their shard. Returns what was sharded."""
    graph, ranks = gm.graph, cfg.ranks
    done = _vocab_embeddings(gm, cfg, shared)
    for loss in list(graph.find_nodes(op="call_function", target=CROSS_ENTROPY)):
        logits, target, *rest = loss.args
        weight_arg, reduction, ignore_index, smoothing = (rest + [None, 1, -100, 0.0][len(rest) :])[:4]
        if weight_arg is not None or reduction != 1 or smoothing:
            raise PlanError(
                f"{what}: vocab parallelism supports mean cross-entropy without class weights or label smoothing",
                "use vtp=1 for this model",
            )
        path, head = [], logits
        while param_matmul(gm, head) is None:  # back from the loss to the projection through single-input ops
            path.append(head)
            inputs = [a for a in head.all_input_nodes if a.op != "get_attr"]
            if head.op != "call_function" or len(inputs) != 1:
                raise PlanError(
                    f"{what}: cannot find the projection that produces the logits of {loss.name}",
                    "use vtp=1 for this model",
                )
            head = inputs[0]
        x, w, b, w_in, w_out = param_matmul(gm, head)
        _shard(gm, w, w_out, cfg, shared)
        if b is not None:
            _shard(gm, b, 0, cfg, shared)
        with graph.inserting_before(head):
            head.replace_input_with(x, graph.call_function(gather_dim_sum_grad, (x, 0, ranks)))
        for node in path:  # the rows are now the group's, the classes this rank's shard
            if node.target in VIEWS and len(node.args[1]) > 1:
                node.args = (node.args[0], [-1, *[cfg.rows if s == cfg.vocab else s for s in node.args[1][1:]]])
        with graph.inserting_before(loss):
            every = graph.call_function(all_gather_dim, (target, 0, ranks))
            value = graph.call_function(vocab_cross_entropy, (logits, every, cfg.start, cfg.vocab, ranks, ignore_index))
            scaled = graph.call_function(scale_grad, (value, float(cfg.vtp)))
        loss.replace_all_uses_with(scaled)
        graph.erase_node(loss)
        done.append(w.target)
    for node in list(graph.find_nodes(op="get_attr")):
        param = get_attr_path(gm, node.target)
        if not isinstance(param, nn.Parameter):
            continue
        with graph.inserting_after(node):
            grad = graph.call_function(scale_grad, (node, 1.0 / cfg.vtp))
            if id(param) not in shared.get("ids", ()):  # replicated: each rank saw only its own samples
                with graph.inserting_after(grad):
                    last = graph.call_function(tp_copy, (grad, ranks))
            else:
                last = grad
        node.replace_all_uses_with(last, delete_user_cb=lambda user: user is not grad)
    graph.lint()
    gm.recompile()
    rewritten_meta(gm, f"{what}: vocab parallelism over {cfg.vtp} ranks", "use vtp=1")
    return done
