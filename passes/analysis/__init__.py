"""Analysis passes: layers, batch dimension, shapes, FLOPs, memory, dimension factors."""
