"""Where one dimension of a layer's activations sits in every value of its graph: the sequence (sequence
parallelism) or the hidden features (grid tensor parallelism).

The factor analysis of ``passes.analysis.dim_tracking`` follows a dimension of one source value through views,
transposes and merges (GPT-2 flattens ``[batch, seq]`` into ``[batch * seq]`` before its projections), and
elementwise ops align it with the matching dimension of the values they combine. A ``TrackedFactor`` names that
dimension's factor class and answers, for any node, where the factor sits: ``(dim, factor sizes, index)``,
the form the collectives along one factor of a dimension take (``passes.lower.ops.collectives.sp_gather`` ...).
Projections with parameters are left out of the analysis (``param_matmul``): their outputs are new values.
"""

from __future__ import annotations

import torch.fx as fx

from galvatron_fx.passes.analysis.dim_factors import local_shape
from galvatron_fx.passes.analysis.dim_tracking import analyze, param_matmul


class TrackedFactor:
    """The factor class of dimension ``dim`` of the first of ``sources`` that has one there (``cls`` None when
    none has), its size ``length``, and its place in every value when ``ways`` ranks split it."""

    def __init__(self, gm: fx.GraphModule, sources: list[fx.Node], dim: int, ways: int):
        self.ways = ways
        self.analysis = analyze(
            gm, excluded={n for n in gm.graph.nodes if n.op == "call_function" and param_matmul(gm, n)}
        )
        factors, dims = self.analysis.factors, self.analysis.dims
        self.cls, self.length = None, 0
        for node in sources:
            node_dims = dims.get(node)
            if node_dims and len(node_dims) > dim % len(node_dims) and node_dims[dim]:
                leaves = factors.leaves_of(node_dims[dim])
                leaf = leaves[0] if dim >= 0 else leaves[-1]
                self.cls, self.length = factors.find(leaf), leaf.size
                break

    def dims(self, node: fx.Node):
        while (
            node not in self.analysis.dims
            and node.op == "call_function"
            and node.args
            and isinstance(node.args[0], fx.Node)
        ):
            node = node.args[0]  # inserted collectives and bias adds keep their input's dims
        dims = self.analysis.dims.get(node)
        return dims if isinstance(dims, list) and all(isinstance(d, list) for d in dims) else None

    def position(self, node: fx.Node, sharded: bool):
        """``(dim, factor sizes, index)`` of the factor in ``node`` (local sizes when ``sharded``), or None."""
        dims = self.dims(node)
        if self.cls is None or dims is None:
            return None
        factors = self.analysis.factors
        for d, factor_list in enumerate(dims):
            leaves = factors.leaves_of(factor_list)
            for i, leaf in enumerate(leaves):
                if factors.find(leaf) is self.cls:
                    sizes = tuple(
                        item.size // (self.ways if (j == i and sharded) else 1) for j, item in enumerate(leaves)
                    )
                    return d, sizes, i
        return None

    def local_sizes(self, node: fx.Node) -> list[int]:
        """``node``'s shape with the factor split ``ways`` ways."""
        return local_shape(self.analysis.factors, self.dims(node), {self.cls: self.ways})
