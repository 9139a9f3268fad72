"""Capture's analysis passes, in order: the flat graph ``torch.export`` produced becomes the Program's layer
table, every node annotated. ``galvatron_fx.capture`` exports the model and runs ``ANALYSIS_PASSES`` over a
``Capture`` (``passes.infra``: each pass has one job and states what it requires and ensures):

1. ``MarkBatched``: which values have the batch as dim 0 (the batch symbol; by size for a static export);
2. ``Concretize``: shapes at the example's sizes, no symbols left;
3. ``SimplifyAttentionMasks``: causal masks as ``is_causal=True``, masks that keep everything dropped;
4. ``DiscoverLayers``: prologue, repeated blocks, transitions, epilogue, from the module tree;
5. ``LocalizeValues``: each layer rebuilds what it can from its own inputs (sizes, position ids, rotary
   tables, masks from the batch) instead of receiving it;
6. ``SplitLayers``: one GraphModule per layer, its inputs, outputs and boundary, layer types;
7. ``AnnotateNodes``: FLOPs forward and backward, saved activation bytes, parameter bytes per node;
8. ``SumLayerStats``: those summed per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn as nn

from galvatron_fx.passes.analysis.annotate import annotate_nodes, sum_layer_stats
from galvatron_fx.passes.analysis.attention_masks import simplify_attention_masks
from galvatron_fx.passes.analysis.batch_dim import concretize, mark_batched, mark_batched_by_size
from galvatron_fx.passes.analysis.discover_layers import Segment, discover_layers
from galvatron_fx.passes.analysis.local_values import localize_values
from galvatron_fx.passes.analysis.split_layers import split_layers
from galvatron_fx.passes.infra import Pass, PassFailure
from galvatron_fx.program import Layer, node_meta


@dataclass
class Capture:
    """A capture in progress: the exported flat graph, the user's model, the example's flat inputs (by
    placeholder, in order), and what the passes have built so far."""

    graph_module: fx.GraphModule
    model: nn.Module
    flat_inputs: list[Any]
    batch_size: int
    static_reason: str = ""  # why the batch could not be a symbol ("" when it is)
    segments: list[Segment] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)

    @property
    def placeholders(self) -> list[fx.Node]:
        return list(self.graph_module.graph.find_nodes(op="placeholder"))


class MarkBatched(Pass[Capture]):
    def __call__(self, capture, context):
        if capture.static_reason:
            mark_batched_by_size(capture.graph_module, capture.batch_size)
        else:
            mark_batched(capture.graph_module)
        return capture

    def ensures(self, capture, context):
        if not any(node_meta(n).batched for n in capture.placeholders):
            raise PassFailure("no input is batched")


class Concretize(Pass[Capture]):
    def __call__(self, capture, context):
        if not capture.static_reason:
            concretize(capture.graph_module, capture.flat_inputs)
        return capture


class SimplifyAttentionMasks(Pass[Capture]):
    def __call__(self, capture, context):
        sizes = (capture.batch_size,) if capture.static_reason else (1, capture.batch_size)
        simplify_attention_masks(capture.graph_module, sizes)
        return capture


class DiscoverLayers(Pass[Capture]):
    def __call__(self, capture, context):
        capture.segments = discover_layers(capture.graph_module, capture.model)
        return capture

    def ensures(self, capture, context):
        calls = [n for n in capture.graph_module.graph.nodes if n.op.startswith("call_")]
        covered = [n for segment in capture.segments for n in segment.nodes]
        if len(covered) != len(calls) or set(covered) != set(calls):
            raise PassFailure(f"the segments cover {len(covered)} of {len(calls)} call nodes")


class LocalizeValues(Pass[Capture]):
    def __call__(self, capture, context):
        localize_values(capture.graph_module, capture.segments)
        return capture


class SplitLayers(Pass[Capture]):
    def requires(self, capture, context):
        if not capture.segments:
            raise PassFailure("no segments: discover the layers first")

    def __call__(self, capture, context):
        capture.layers = split_layers(capture.graph_module, capture.segments)
        return capture

    def ensures(self, capture, context):
        if [layer.index for layer in capture.layers] != list(range(len(capture.segments))):
            raise PassFailure("the layer table does not follow the segments")


class AnnotateNodes(Pass[Capture]):
    def __call__(self, capture, context):
        annotate_nodes(capture.graph_module, dict(zip((n.name for n in capture.placeholders), capture.flat_inputs)))
        return capture

    def ensures(self, capture, context):
        missing = [n.name for n in capture.graph_module.graph.nodes if n.op != "output" and node_meta(n).info is None]
        if missing:
            raise PassFailure(f"nodes left unannotated: {missing[:5]}")


class SumLayerStats(Pass[Capture]):
    def __call__(self, capture, context):
        sum_layer_stats(capture.graph_module, capture.layers)
        return capture


ANALYSIS_PASSES: tuple[Pass[Capture], ...] = (
    MarkBatched(),
    Concretize(),
    SimplifyAttentionMasks(),
    DiscoverLayers(),
    LocalizeValues(),
    SplitLayers(),
    AnnotateNodes(),
    SumLayerStats(),
)
