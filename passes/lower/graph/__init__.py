"""Rewrites of one layer's graph: tensor, sequence and vocab parallelism, random streams."""
