"""Lowering a Program and a Plan to one rank's stage: stage-level passes, layer-graph rewrites, graph ops."""
