"""The plan search: space, cost tables, Pareto fronts, bounds, the exact engine."""
