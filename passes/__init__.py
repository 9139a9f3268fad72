"""Graph passes: analysis (layers, shapes, FLOPs, memory), search and lowering."""
