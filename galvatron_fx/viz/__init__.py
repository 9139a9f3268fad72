"""Visualising a plan for debugging: a self-contained HTML page, an ONNX file for Netron, Graphviz DOT.

``visualize(program, plan, "out/")`` writes ``<model>.html``, ``<model>.onnx`` and ``<model>.dot`` from one
annotated layer graph (``build_layer_graph``); ``galvatron-fx viz`` does the same from the command line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from galvatron_fx.errors import ConfigError

from .dot import render_dot
from .html import render_html
from .model import LayerGraph, build_layer_graph
from .onnx_export import build_onnx, write_onnx

FORMATS = ("html", "onnx", "dot")

__all__ = [
    "visualize",
    "build_layer_graph",
    "LayerGraph",
    "render_html",
    "render_dot",
    "build_onnx",
    "write_onnx",
    "FORMATS",
]


def parse_formats(formats: "str | Iterable[str]") -> tuple[str, ...]:
    """``"html,dot"`` or ``["html", "dot"]`` → ``("html", "dot")``; raises ConfigError on an unknown format."""
    names = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = [f for f in names if f not in FORMATS]
    if unknown or not names:
        raise ConfigError(f"visualisation format(s) {unknown or names} unknown", f"choose among {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(names))


def visualize(
    program,
    plan,
    path: "str | Path",
    cost_model=None,
    formats: "str | Iterable[str]" = FORMATS,
    memory_budget_bytes: int | None = None,
) -> dict[str, Path]:
    """Write the plan's visualisations; returns ``{format: file}``.

    ``path`` is a directory (created if missing; files are named after the model) or a file name whose
    suffix is dropped and replaced per format. ``cost_model`` (a ``galvatron_fx.cost.model.CostModel``)
    supplies the per-layer predictions; without it they come from ``plan.prediction`` and the Program's
    annotations (the page says which). ``memory_budget_bytes`` defaults to the plan's recorded budget.
    """
    chosen = parse_formats(formats)
    graph = build_layer_graph(program, plan, cost_model, memory_budget_bytes)
    target = Path(path)
    if target.suffix.lower() in {f".{f}" for f in FORMATS}:
        directory, stem = target.parent, target.stem
    else:
        directory, stem = target, re.sub(r"[^0-9A-Za-z_.-]+", "_", graph.model_name) or "plan"
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for fmt in chosen:
        file = directory / f"{stem}.{fmt}"
        if fmt == "html":
            file.write_text(render_html(graph), encoding="utf-8")
        elif fmt == "dot":
            file.write_text(render_dot(graph), encoding="utf-8")
        else:
            write_onnx(graph, program, file)
        written[fmt] = file
    return written
