"""Graphviz DOT text of a LayerGraph: one cluster per pipeline stage, layers as boxes filled with their
strategy's colour, collectives as small ellipses beside their layer, redistributions as diamonds on the
path, send/recv as bold red edges across stages, other data flow (masks, skip inputs) as dashed grey edges,
and a legend. ``dot -Tsvg plan.dot > plan.svg`` draws it; nothing here needs Graphviz installed.
"""

from __future__ import annotations

from galvatron_fx.units import format_bytes

from .html import _text_color, format_seconds
from .model import LayerGraph


def _q(text) -> str:
    """A DOT double-quoted string; ``\\n`` in ``text`` stays a DOT line break."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(**values) -> str:
    return "[" + ", ".join(f"{key}={_q(value)}" for key, value in values.items()) + "]"


def render_dot(graph: LayerGraph) -> str:
    """The DOT source (a ``digraph``) of ``graph``."""
    title = (
        f"{graph.model_name}: {graph.world_size} devices, pp {graph.pp}, {graph.pipeline}, {graph.chunks} micro-batches of "
        f"{graph.micro_batch}; iteration {format_seconds(graph.iteration_s)} ({graph.source})"
    )
    lines = [
        f"digraph {_q(graph.model_name)} {{",
        f"  graph {_attrs(rankdir='TB', labelloc='t', label=title, fontname='Helvetica', newrank='true')};",
        f"  node {_attrs(shape='box', style='rounded,filled', fontname='Helvetica', fontsize='10')};",
        f"  edge {_attrs(fontname='Helvetica', fontsize='9')};",
    ]
    redistribution = {r.src: r for r in graph.redistributions}
    transfer = {t.src: t for t in graph.transfers}
    for stage in graph.stages:
        memory = f"{format_bytes(stage.memory_bytes)}" + (
            f" of {format_bytes(graph.memory_budget_bytes)}" if graph.memory_budget_bytes else ""
        )
        lines.append(f"  subgraph cluster_stage{stage.stage} {{")
        label = f"stage {stage.stage} (ranks {stage.ranks[0]}-{stage.ranks[-1]}), memory {memory}"
        lines.append(f"    graph {_attrs(label=label, style='rounded,filled', fillcolor='#f4f6f8', color='#adb5bd')};")
        for index in stage.layer_indices:
            n = graph.layers[index]
            label = (
                f"L{n.index} {n.module_path}\n{n.layer_type} · {n.strategy_label}\n"
                f"fwd {format_seconds(n.fwd_s)} bwd {format_seconds(n.bwd_s)}\n{format_bytes(n.memory_bytes)} · {n.fwd_flops / 1e9:.3g} GFLOPs"
            )
            lines.append(
                f"    L{n.index} {_attrs(label=label, fillcolor=n.color, fontcolor=_text_color(n.color), tooltip=n.strategy_label)};"
            )
            for k, c in enumerate(n.collectives):
                lines.append(
                    f"    L{n.index}_c{k} {_attrs(label=c.label(), shape='ellipse', style='dashed', fontsize='8', tooltip=c.op)};"
                )
                lines.append(
                    f"    L{n.index} -> L{n.index}_c{k} {_attrs(style='dotted', arrowhead='none', color='#868e96')};"
                )
            if index in redistribution:
                r = redistribution[index]
                label = f"redistribute\n{r.op} / {r.backward_op}\n{format_bytes(r.bytes)}"
                lines.append(
                    f"    R{r.src}_{r.dst} {_attrs(label=label, shape='diamond', style='filled', fillcolor='#ffd43b', fontsize='8')};"
                )
        lines.append("  }")
    for a, b in zip(graph.layers, graph.layers[1:]):
        if a.index in redistribution:
            r = redistribution[a.index]
            lines.append(f"  L{a.index} -> R{r.src}_{r.dst};")
            lines.append(f"  R{r.src}_{r.dst} -> L{b.index};")
        elif a.index in transfer:
            t = transfer[a.index]
            label = f"send/recv {format_bytes(t.bytes)}\n{format_seconds(t.time_s)}"
            lines.append(
                f"  L{a.index} -> L{b.index} {_attrs(label=label, color='#c92a2a', fontcolor='#c92a2a', penwidth='2.5', style='bold')};"
            )
        else:
            lines.append(f"  L{a.index} -> L{b.index} {_attrs(penwidth='1.5')};")
    for n in graph.layers:  # data flow that skips layers
        for p in n.producers:
            if p != n.index - 1:
                lines.append(f"  L{p} -> L{n.index} {_attrs(style='dashed', color='#adb5bd', constraint='false')};")
    lines.append("  subgraph cluster_legend {")
    lines.append(f"    graph {_attrs(label='strategies', style='rounded', color='#adb5bd')};")
    for k, (label, color) in enumerate(graph.legend):
        lines.append(f"    legend{k} {_attrs(label=label, fillcolor=color, fontcolor=_text_color(color))};")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"
