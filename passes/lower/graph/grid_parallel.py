"""Grid tensor parallelism in a layer's graph: 2D (SUMMA / Optimus), 2.5D (Tesseract) and 3D, with no per-model
code.

A 2D or 2.5D layer's ``tp`` ranks form ``depth × q × q`` (``parallel_dims``): the q ranks of a *row* split the
features and hold the same samples; the samples are split over the ``depth × q`` rows. Inside the layer every
activation is one block (its samples split over the rows, its features — hidden size, attention heads, MLP
columns — over the row), and every parameter is one block (split over the row as Megatron splits it, and over
the *column*).

How the graph is rewritten, in order (``grid_rewrite``):

1. The projections become tensor-parallel over the row (``tensor_parallel``, strict): Megatron's column- and
   row-parallel pairs found from the graph, ``tp_copy`` where values enter them, ``tp_reduce`` after them.
2. The hidden features are split over the row everywhere else (``FeatureRewrite``). They are the last dimension
   of the layer's activation input, followed through adds, norms and views by the factor analysis
   (``TrackedFactor``). Batched inputs whose last dimension they are arrive split, and such outputs leave split
   (``layer_meta(gm).feature_inputs`` / ``feature_outputs``: the stage's layouts move them so, and between layers
   of one grid nothing moves); other values that carry them are split in the graph (``sp_split``). A value
   entering a column-parallel projection is all-gathered along the features instead of copied (``sp_gather``:
   its gradient is reduce-scattered); the partial sums after a row-parallel projection are reduce-scattered
   along the features instead of all-reduced (``sp_reduce_scatter``); norms take their statistics over the row
   (``row_layer_norm``, ``row_mean``); parameters and whole values that meet feature blocks keep this rank's
   slice.
3. Every parameter is split once more over the column group and all-gathered before use (``grid_param``, a
   visible node per parameter): 1/q² of each weight per rank, its gradient the mean over the column and depth
   groups, which ran other samples.

3D (q × q × q) adds one move (``grid3d.CubeRewrite``): at the pairs the samples move instead of the features.

Between layers a grid layer's activations are split over its rows in samples (``parallel_dims.activation_strategy``)
and along the features as step 2 says. Ops that would mix the split features in another way (a softmax over the
hidden size, a projection left whole) are refused with the op named, and the search leaves the mode out for that
layer."""

from __future__ import annotations

import torch.fx as fx

from galvatron_fx.passes.analysis.dim_tracking import param_matmul, rewritten_meta
from galvatron_fx.passes.lower.graph.grid3d import CubeRewrite
from galvatron_fx.passes.lower.graph.grid_rewrite import (
    REMEDY,
    FeatureRewrite,
    GridConfig,
    GridResult,
    block_parameters,
    hidden_features,
    sample_rows,
)
from galvatron_fx.passes.lower.graph.random_streams import mark_sharded
from galvatron_fx.passes.lower.graph.tensor_parallel import TPConfig, tensor_parallel, tp_region
from galvatron_fx.program import set_layer_meta

__all__ = ["GridConfig", "GridResult", "grid_parallel"]


def grid_parallel(gm: fx.GraphModule, cfg: GridConfig, layer_name: str = "layer") -> GridResult:
    """Requires: an ATen-level layer GraphModule with ``meta["val"]``, at the layer's local batch, full
    parameters. Ensures: ``gm`` rewritten for global rank ``cfg.rank`` of the grid (see the module docstring):
    parameters held as blocks (each with a ShardRecord over the grid), feature blocks inside and on the inputs and
    outputs that ``layer_meta(gm)`` names. Raises PlanError naming what the grid cannot split."""
    hidden = hidden_features(gm, cfg, layer_name)  # before the projections are rewritten
    cube = cfg.groups.pairs != cfg.groups.row
    if cube:
        rows = sample_rows(gm, cfg, layer_name)
        projections = {
            n: param_matmul(gm, n) for n in gm.graph.nodes if n.op == "call_function" and param_matmul(gm, n)
        }
    pairs = cfg.groups.pairs
    tensor_parallel(gm, TPConfig(cfg.q, pairs.index(cfg.rank), pairs, strict=True), layer_name)
    if cube:
        rewrite = CubeRewrite(gm, cfg, hidden, rows, projections, layer_name)
        gradient_sum = rewrite.gradient_sum
    else:
        rewrite = FeatureRewrite(gm, cfg, hidden, layer_name)
        depth = cfg.groups.depth
        gradient_sum = lambda target: (depth, cfg.q * len(depth))  # noqa: E731
    rewrite.run(tp_region(gm))
    result = GridResult(gm, block_parameters(gm, cfg, gradient_sum))
    rewrite.local_placeholders()
    set_layer_meta(gm, feature_inputs=frozenset(rewrite.feature_inputs), feature_outputs=tuple(rewrite.feature_outputs))
    mark_sharded(rewrite.sharded)
    gm.graph.lint()
    gm.recompile()
    shape = "×".join([str(cfg.q)] * (3 if cube else 2))
    rewritten_meta(gm, f"{layer_name}: {shape} grid tensor parallelism", REMEDY)
    return result
