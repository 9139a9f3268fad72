"""One self-contained HTML page of a LayerGraph: inline CSS, SVG and a few lines of JS, no network.

Sections: summary; legend (strategy → colour); the layer graph (stages as bands, layers coloured by strategy
with their predicted time and memory, the collectives they imply, redistributions and send/recv between
them); per-stage memory against the budget; the pipeline schedule as a timeline; the full layer table.
Elements carry ``class`` and ``data-*`` attributes (layer, stage, op) so that tests and scripts can find them.
"""

from __future__ import annotations

import dataclasses
import html
import json

from galvatron_fx.units import format_bytes

from .collectives import SHORT_OP
from .model import LayerGraph, LayerNode
from .schedule import BACKWARD, FORWARD, GRAD_SYNC

WIDTH = 1180
FORWARD_FILL, BACKWARD_FILL, SYNC_FILL = "#a6cee3", "#1f4e79", "#7f7f7f"
STATES_FILL, ACTIVATIONS_FILL, PEAK_FILL = "#6a51a3", "#bcbddc", "#fdd0a2"

CSS = """
body{font-family:'DejaVu Sans',Helvetica,Arial,sans-serif;margin:20px 28px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 6px} h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.summary span{display:inline-block;background:#f1f3f5;border-radius:4px;padding:3px 8px;margin:2px 4px 2px 0;font-size:13px}
.legend{display:flex;flex-wrap:wrap;gap:8px 18px;font-size:13px}
.legend-item{display:flex;align-items:center;gap:6px}
.swatch{width:30px;height:18px;border-radius:3px;border:1px solid #333}
.note{font-size:12px;color:#555;margin:4px 0}
svg text{font-family:'DejaVu Sans',Helvetica,Arial,sans-serif}
table{border-collapse:collapse;font-size:11.5px;max-width:100%} th,td{border:1px solid #ddd;padding:3px 5px;text-align:right;white-space:nowrap} td.wrap{white-space:normal;min-width:120px} td.path{white-space:normal;max-width:180px}
th{background:#f1f3f5;white-space:normal} td.l{text-align:left} tr.hl td{background:#fff3bf}
g.layer.hl rect.box{stroke:#000;stroke-width:3}
"""

# Hovering a layer box highlights its table row and the other way round.
JS = """
document.querySelectorAll('[data-layer]').forEach(function(el){
  function mark(on){document.querySelectorAll('[data-layer="'+el.dataset.layer+'"]').forEach(function(x){x.classList.toggle('hl',on)})}
  el.addEventListener('mouseenter',function(){mark(true)}); el.addEventListener('mouseleave',function(){mark(false)});
});
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def format_seconds(seconds: float | None) -> str:
    """``12.3 µs``, ``4.56 ms``, ``1.23 s``; ``–`` for unknown."""
    if seconds is None:
        return "–"
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(seconds) >= factor or unit == "µs":
            return f"{seconds / factor:.3g} {unit}"
    raise AssertionError("unreachable")


def _text(x, y, text, size=12, weight="normal", anchor="start", fill="#222", cls="") -> str:
    klass = f' class="{cls}"' if cls else ""
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" font-weight="{weight}" text-anchor="{anchor}" '
        f'fill="{fill}"{klass}>{_e(text)}</text>'
    )


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis (the tooltip keeps it whole)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text_color(fill: str) -> str:
    """Black or white, whichever reads better on ``fill``."""
    r, g, b = (int(fill[i : i + 2], 16) for i in (1, 3, 5))
    return "#111111" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "#ffffff"


# -- layer graph ------------------------------------------------------------------------------------
BOX_X, BOX_W, BOX_H, GAP = 150, 330, 58, 34


def _layer_box(node: LayerNode, y: float, max_time_s: float, max_memory: int) -> str:
    ink = _text_color(node.color)
    total_s = node.fwd_s + node.bwd_s
    tip = (
        f"{node.name}\n{node.layer_type} · {node.strategy_label} · stage {node.stage}\nfwd {format_seconds(node.fwd_s)}, "
        f"bwd {format_seconds(node.bwd_s)}, grad sync {format_seconds(node.grad_sync_s)}\nmemory {format_bytes(node.memory_bytes)} "
        f"(states {format_bytes(node.model_state_bytes)}, activations {format_bytes(node.activation_bytes)})\n"
        f"{node.fwd_flops / 1e9:.4g} GFLOPs fwd per micro-batch"
    )
    parts = [
        f'<g class="layer" data-layer="{node.index}" data-stage="{node.stage}" data-strategy="{_e(node.strategy_label)}">',
        f"<title>{_e(tip)}</title>",
        f'<rect class="box" x="{BOX_X}" y="{y:.1f}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{node.color}" stroke="#333"/>',
        _text(BOX_X + 10, y + 18, _clip(node.name, 40), 13, "bold", fill=ink),
        _text(BOX_X + 10, y + 34, f"{node.layer_type} · {node.strategy_label}", 12, fill=ink),
        _text(
            BOX_X + 10, y + 50, f"{format_seconds(total_s)} fwd+bwd · {format_bytes(node.memory_bytes)}", 12, fill=ink
        ),
    ]
    xs = [BOX_X + BOX_W + 14] * 2  # row 0: forward and per-step calls; row 1: backward
    for c in node.collectives:  # badges: what the strategy communicates
        label = c.label()
        width = 8 + 6.6 * len(label)
        tip = (
            f"{c.op} over {c.group_size} ranks ({'consecutive' if c.consecutive else 'strided'}) for {c.purpose}, "
            f"{c.count}× {format_bytes(c.bytes_per_call)} per {'step' if c.phase == 'step' else 'micro-batch'} ({c.phase}), "
            f"{format_seconds(c.time_s)}"
        )
        row = 1 if c.phase == "backward" else 0
        x = xs[row]
        parts.append(
            f'<g class="collective" data-op="{c.op}" data-purpose="{c.purpose}"><title>{_e(tip)}</title>'
            f'<rect x="{x:.1f}" y="{y + 6 + row * 24:.1f}" width="{width:.1f}" height="19" rx="9" fill="#fff" stroke="#444"/>'
            + _text(x + width / 2, y + 20 + row * 24, label, 11, anchor="middle")
            + "</g>"
        )
        xs[row] += width + 6
    bars_x = WIDTH - 200
    for row, (value, top, fill, text) in enumerate(
        (
            (total_s, max_time_s, "#555", format_seconds(total_s)),
            (node.memory_bytes, max_memory, "#999", format_bytes(node.memory_bytes)),
        )
    ):
        width = 120 * value / top if top else 0
        parts.append(
            f'<rect class="bar" x="{bars_x}" y="{y + 10 + row * 22:.1f}" width="{width:.1f}" height="14" fill="{fill}"/>'
            + _text(bars_x + 126, y + 21 + row * 22, text, 11)
        )
    return "\n".join(parts) + "</g>"


def _layer_graph(g: LayerGraph) -> str:
    max_time = max((n.fwd_s + n.bwd_s for n in g.layers), default=0.0)
    max_memory = max((n.memory_bytes for n in g.layers), default=0)
    redistribution = {r.src: r for r in g.redistributions}
    transfer = {t.src: t for t in g.transfers}
    y, bands, body, positions = 30.0, [], [], {}
    for stage in g.stages:
        top = y - 12
        for index in stage.layer_indices:
            node = g.layers[index]
            positions[index] = y
            body.append(_layer_box(node, y, max_time, max_memory))
            y += BOX_H + GAP
            if index in transfer:
                y += 26  # room for the stage cut
        bands.append((stage, top, y - GAP - top + 12))
    arrows = []
    for a, b in zip(g.layers, g.layers[1:]):
        y0, y1 = positions[a.index] + BOX_H, positions[b.index]
        cx = BOX_X + BOX_W / 2
        arrows.append(
            f'<line x1="{cx}" y1="{y0:.1f}" x2="{cx}" y2="{y1 - 3:.1f}" stroke="#333" stroke-width="2" marker-end="url(#arrow)"/>'
        )
        mid = (y0 + y1) / 2
        if a.index in redistribution:
            r = redistribution[a.index]
            tip = f"{r.src_label} → {r.dst_label}: forward {r.op}, backward {r.backward_op}, {format_bytes(r.bytes)}, {format_seconds(r.time_s)}"
            arrows.append(
                f'<g class="redistribution" data-src="{r.src}" data-dst="{r.dst}" data-op="{r.op}"><title>{_e(tip)}</title>'
                f'<polygon points="{cx},{mid - 10:.1f} {cx + 12},{mid:.1f} {cx},{mid + 10:.1f} {cx - 12},{mid:.1f}" fill="#ffd43b" stroke="#333"/>'
                + _text(
                    cx + 20,
                    mid + 4,
                    f"redistribute: {r.op} fwd / {r.backward_op} bwd · {format_bytes(r.bytes)} · "
                    f"{format_seconds(r.time_s)}",
                    11,
                )
                + "</g>"
            )
        if a.index in transfer:
            t = transfer[a.index]
            tip = f"stage {t.src_stage} → {t.dst_stage}: {', '.join(t.tensors)}"
            arrows.append(
                f'<g class="transfer" data-src="{t.src}" data-dst="{t.dst}"><title>{_e(tip)}</title>'
                f'<line x1="20" y1="{mid:.1f}" x2="{WIDTH - 20}" y2="{mid:.1f}" stroke="#c92a2a" stroke-width="2" stroke-dasharray="8 5"/>'
                + _text(
                    cx + 20,
                    mid - 5,
                    f"send/recv {format_bytes(t.bytes)} per micro-batch · {format_seconds(t.time_s)} "
                    f"(stage {t.src_stage} → {t.dst_stage})",
                    11,
                    "bold",
                    fill="#c92a2a",
                )
                + "</g>"
            )
    band_svg = []
    for stage, top, height in bands:
        ranks = f"ranks {stage.ranks[0]}–{stage.ranks[-1]}" if len(stage.ranks) > 1 else f"rank {stage.ranks[0]}"
        band_svg.append(
            f'<g class="stage" data-stage="{stage.stage}"><rect x="10" y="{top:.1f}" width="{WIDTH - 20}" height="{height:.1f}" '
            f'rx="8" fill="{"#f8f9fa" if stage.stage % 2 == 0 else "#eef2f6"}" stroke="#adb5bd"/>'
            + _text(20, top + 22, f"stage {stage.stage}", 14, "bold")
            + _text(20, top + 40, ranks, 11, fill="#555")
            + "</g>"
        )
    header = _text(
        BOX_X + BOX_W + 14, 14, "collectives per micro-batch (fwd / bwd) and per step", 11, fill="#555"
    ) + _text(WIDTH - 200, 14, "fwd+bwd time · memory", 11, fill="#555")
    defs = (
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto">'
        '<path d="M0,0 L10,5 L0,10 z" fill="#333"/></marker></defs>'
    )
    height = y - GAP + 24
    return (
        f'<svg id="layer-graph" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0f}">{defs}'
        + "".join(band_svg)
        + header
        + "".join(arrows)
        + "".join(body)
        + "</svg>"
    )


# -- memory per stage ----------------------------------------------------------------------------------
def _memory_bars(g: LayerGraph) -> str:
    peak = max((s.memory_bytes for s in g.stages), default=1) or 1
    budget = g.memory_budget_bytes
    off_scale = budget is not None and budget > 4 * peak
    axis = peak * 1.15 if budget is None or off_scale else max(budget, peak) * 1.05
    left, width, row_h = 150, WIDTH - 480, 40
    rows = []
    for i, s in enumerate(g.stages):
        y = 10 + i * row_h
        x, segments = left, []
        for name, value, fill in (
            ("model states", s.model_state_bytes, STATES_FILL),
            (f"activations ({s.in_flight} micro-batches)", s.activation_bytes, ACTIVATIONS_FILL),
            ("transient peak", s.peak_extra_bytes, PEAK_FILL),
        ):
            w = width * value / axis
            segments.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="24" fill="{fill}"><title>{_e(name)}: {format_bytes(value)}</title></rect>'
            )
            x += w
        over = budget is not None and s.memory_bytes > budget
        share = f" = {100 * s.memory_bytes / budget:.3g}% of budget" if budget else ""
        rows.append(
            f'<g class="stage-memory" data-stage="{s.stage}" data-bytes="{s.memory_bytes}" data-over="{int(over)}">'
            + _text(10, y + 17, f"stage {s.stage}", 13, "bold")
            + "".join(segments)
            + _text(
                left + width + 40,
                y + 17,
                f"{format_bytes(s.memory_bytes)}{share}{'  OVER BUDGET' if over else ''}",
                12,
                "bold" if over else "normal",
                fill="#c92a2a" if over else "#222",
            )
            + "</g>"
        )
    bottom = 10 + len(g.stages) * row_h
    if budget is not None:
        bx = left + width if off_scale else left + width * budget / axis
        label = f"budget {format_bytes(budget)}" + (" (off scale →)" if off_scale else "")
        rows.append(
            f'<g class="budget"><line x1="{bx:.1f}" y1="4" x2="{bx:.1f}" y2="{bottom - 8}" stroke="#c92a2a" stroke-width="2" '
            f'stroke-dasharray="{"4 3" if off_scale else "none"}"/>'
            + _text(bx, bottom + 8, label, 11, anchor="middle", fill="#c92a2a")
            + "</g>"
        )
    legend = "".join(
        f'<rect x="{left + i * 220}" y="{bottom + 18}" width="14" height="12" fill="{fill}"/>'
        + _text(left + i * 220 + 20, bottom + 28, name, 11)
        for i, (name, fill) in enumerate(
            (("model states", STATES_FILL), ("activations in flight", ACTIVATIONS_FILL), ("transient peak", PEAK_FILL))
        )
    )
    return f'<svg id="stage-memory" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{bottom + 40}">{"".join(rows)}{legend}</svg>'


# -- pipeline timeline ------------------------------------------------------------------------------------
def _timeline(g: LayerGraph) -> str:
    end_s = g.schedule_s or 1.0
    left, width, row_h = 150, WIDTH - 190, 36
    scale = width / end_s
    boxes = []
    for op in g.schedule:
        x, w, y = left + op.start_s * scale, max((op.end_s - op.start_s) * scale, 0.5), 10 + op.stage * row_h
        fill = {FORWARD: FORWARD_FILL, BACKWARD: BACKWARD_FILL, GRAD_SYNC: SYNC_FILL}[op.phase]
        label = {FORWARD: f"F{op.micro_batch}", BACKWARD: f"B{op.micro_batch}", GRAD_SYNC: "sync"}[op.phase]
        tip = f"stage {op.stage} {op.phase} micro-batch {op.micro_batch}: {format_seconds(op.start_s)} → {format_seconds(op.end_s)}"
        boxes.append(
            f'<g class="op {op.phase}" data-stage="{op.stage}" data-micro-batch="{op.micro_batch}"><title>{_e(tip)}</title>'
            f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="26" fill="{fill}" stroke="#fff" stroke-width="1"/>'
            + (
                _text(x + w / 2, y + 17, label, 11, anchor="middle", fill="#111" if op.phase == FORWARD else "#fff")
                if w > 24
                else ""
            )
            + "</g>"
        )
    rows = "".join(_text(10, 10 + s.stage * row_h + 17, f"stage {s.stage}", 13, "bold") for s in g.stages)
    bottom = 10 + len(g.stages) * row_h
    ticks = []
    for k in range(6):
        t = end_s * k / 5
        x = left + t * scale
        ticks.append(
            f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="#333"/>'
            + _text(x, bottom + 18, format_seconds(t), 11, anchor="middle")
        )
    legend = "".join(
        f'<rect x="{left + i * 160}" y="{bottom + 28}" width="14" height="12" fill="{fill}"/>'
        + _text(left + i * 160 + 20, bottom + 38, name, 11)
        for i, (name, fill) in enumerate(
            (("forward", FORWARD_FILL), ("backward", BACKWARD_FILL), ("gradient sync", SYNC_FILL))
        )
    )
    return (
        f'<svg id="timeline" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{bottom + 50}">{rows}'
        f'<line x1="{left}" y1="{bottom}" x2="{left + width}" y2="{bottom}" stroke="#333"/>{"".join(ticks)}{"".join(boxes)}{legend}</svg>'
    )


# -- table and page ----------------------------------------------------------------------------------------
def _table(g: LayerGraph) -> str:
    head = (
        "#",
        "type",
        "module",
        "stage",
        "strategy",
        "params",
        "fwd GFLOPs",
        "saved",
        "boundary",
        "fwd / bwd",
        "grad sync",
        "states",
        "activations",
        "collectives",
    )
    rows = []
    for n in g.layers:
        comms = ", ".join(c.label() for c in n.collectives) or "–"
        cells = (
            n.index,
            n.layer_type,
            n.module_path,
            n.stage,
            f'<span class="swatch" style="display:inline-block;width:10px;height:10px;background:{n.color}"></span> {_e(n.strategy_label)}',
            f"{n.param_count:,}",
            f"{n.fwd_flops / 1e9:.4g}",
            format_bytes(n.saved_activation_bytes),
            format_bytes(n.boundary_bytes),
            f"{format_seconds(n.fwd_s)} / {format_seconds(n.bwd_s)}",
            format_seconds(n.grad_sync_s),
            format_bytes(n.model_state_bytes),
            format_bytes(n.activation_bytes),
            comms,
        )
        rows.append(
            f'<tr data-layer="{n.index}">'
            + "".join(
                f'<td class="{"l wrap" if i == 13 else "l path" if i == 2 else "l" if i in (1, 4) else ""}">{c if i == 4 else _e(c)}</td>'
                for i, c in enumerate(cells)
            )
            + "</tr>"
        )
    return (
        '<table id="layer-table"><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )


def render_html(g: LayerGraph) -> str:
    """The whole page as one string (UTF-8 when written)."""
    budget = format_bytes(g.memory_budget_bytes) if g.memory_budget_bytes else "not given"
    chips = [
        f"world size {g.world_size}",
        f"pp {g.pp}",
        g.pipeline.upper(),
        f"{g.chunks} micro-batches of {g.micro_batch}",
        f"global batch {g.global_batch}",
        f"iteration {format_seconds(g.iteration_s)}",
        f"{g.samples_per_s:,.1f} samples/s",
        f"memory budget {budget}",
        f"predictions: {g.source}",
    ]
    legend = "".join(
        f'<div class="legend-item" data-strategy="{_e(label)}"><div class="swatch" style="background:{color}"></div>{_e(label)}</div>'
        for label, color in g.legend
    )
    ops = ", ".join(f"{short} = {op.replace('_', '-')}" for op, short in SHORT_OP.items())
    stage_times = "; ".join(
        f"stage {s.stage}: F {format_seconds(s.fwd_s)}, B {format_seconds(s.bwd_s)}, sync {format_seconds(s.grad_sync_s)}"
        for s in g.stages
    )
    data = json.dumps(dataclasses.asdict(g), default=str).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(g.model_name)} — galvatron_fx plan</title><style>{CSS}</style></head>
<body>
<h1>{_e(g.model_name)} — hybrid-parallel plan</h1>
<div class="summary">{"".join(f"<span>{_e(c)}</span>" for c in chips)}</div>
<h2>Strategies</h2><div class="legend" id="legend">{legend}</div>
<h2>Layer graph</h2>
<p class="note">Layers in execution order, grouped by pipeline stage and coloured by strategy. Badges: collectives each layer's strategy
implies ({_e(ops)}; ×calls per micro-batch, or per step for gradient sync; gN = a group of N ranks). Yellow diamonds: redistribution between layouts; red dashed
lines: pipeline send/recv. Times and memory are predictions for one device.</p>
{_layer_graph(g)}
<h2>Memory per stage (one device) against the budget</h2>
{_memory_bars(g)}
<h2>Pipeline schedule ({_e(g.pipeline.upper())}, {g.chunks} micro-batches)</h2>
<p class="note">Per micro-batch — {_e(stage_times)}. Simulated length {_e(format_seconds(g.schedule_s))}; predicted iteration time
{_e(format_seconds(g.iteration_s))} ({_e(g.source)}).</p>
{_timeline(g)}
<h2>Layers</h2>
{_table(g)}
<script type="application/json" id="layer-graph-data">{data}</script>
<script>{JS}</script>
</body></html>
"""
