"""Layer discovery: partition the flat graph's nodes into prologue, body layers and epilogue.

Requires: a flat exported GraphModule whose call nodes carry ``meta["nn_module_stack"]`` and the
user's module tree (for container structure). Ensures: a list of ``Segment``s, in execution order,
covering every call node exactly once; blocks are the elements of the innermost homogeneous module
lists (``nn.ModuleList``/``nn.Sequential`` whose children share one class), so no per-model code is
needed. Runs of other nodes between blocks become transition layers (e.g. Swin's patch merging).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from galvatron_fx.program import BLOCK, EPILOGUE, PROLOGUE, TRANSITION


@dataclass
class Segment:
    kind: str
    module_path: str
    module_class: str
    nodes: list[fx.Node] = field(default_factory=list)


def find_block_paths(model: nn.Module) -> list[str]:
    """Module paths of repeated blocks: elements of innermost lists whose children share one class."""
    lists = []
    for path, module in model.named_modules():
        children = list(module.named_children())
        if children and all(name.isdigit() for name, _ in children):
            if len({type(child) for _, child in children}) == 1:
                lists.append(path)
    # A list nested inside another list's element (Swin: stages → blocks) wins over the outer one.
    innermost = [p for p in lists if not any(q != p and q.startswith(_prefix(p)) for q in lists)]
    return [_prefix(path) + name for path in innermost for name, _ in model.get_submodule(path).named_children()]


def _prefix(path: str) -> str:
    return f"{path}." if path else ""


def _innermost_block(node: fx.Node, block_paths: set[str]) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, module_class in reversed(list(stack.values())):
        if path in block_paths:
            return path, module_class
    return None


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    prefix = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


def _describe(paths: list[str]) -> str:
    """Where a non-block segment's nodes come from: their common module, else first → last module."""
    named = list(dict.fromkeys(p for p in paths if p))
    prefix = _common_prefix(named)
    if prefix or not named:
        return prefix
    return named[0] if len(named) == 1 else f"{named[0]} → {named[-1]}"


def _module_paths(nodes: list[fx.Node]) -> list[str]:
    paths = []
    for node in nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            paths.append(list(stack.values())[-1][0])
    return paths


def discover_layers(graph_module: fx.GraphModule, model: nn.Module) -> list[Segment]:
    """Partition ``graph_module``'s call nodes into segments (see module docstring)."""
    block_paths = set(find_block_paths(model))
    calls = [n for n in graph_module.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    segments: list[Segment] = []
    current: Segment | None = None
    for node in calls:
        owner = _innermost_block(node, block_paths)
        if owner is None and node.meta.get("nn_module_stack") is None and current is not None:
            owner = (current.module_path, current.module_class) if current.kind == BLOCK else None
        if owner is not None:
            path, module_class = owner
            if current is None or current.kind != BLOCK or current.module_path != path:
                if any(s.kind == BLOCK and s.module_path == path for s in segments):
                    raise AssertionError(f"nodes of block {path} are not contiguous in the graph")
                current = Segment(BLOCK, path, module_class.rsplit(".", 1)[-1])
                segments.append(current)
        elif current is None or current.kind == BLOCK:
            current = Segment(TRANSITION, "", "")
            segments.append(current)
        current.nodes.append(node)

    blocks = [s for s in segments if s.kind == BLOCK]
    if not blocks:
        warnings.warn(
            f"{type(model).__name__} has no repeated blocks (no module list of same-class modules): "
            "it is captured as a single layer, so pipeline and per-layer strategies have nothing to split",
            stacklevel=3,
        )
        whole = Segment(BLOCK, "", type(model).__name__, [n for s in segments for n in s.nodes])
        segments = [Segment(PROLOGUE, "", ""), whole, Segment(EPILOGUE, "", "")]
    else:
        if segments[0].kind != TRANSITION:
            segments.insert(0, Segment(TRANSITION, "", ""))
        if segments[-1].kind != TRANSITION:
            segments.append(Segment(TRANSITION, "", ""))
        segments[0].kind, segments[-1].kind = PROLOGUE, EPILOGUE

    for segment in segments:
        if segment.kind != BLOCK:
            segment.module_path = _describe(_module_paths(segment.nodes))
            segment.module_class = segment.kind
    return segments
