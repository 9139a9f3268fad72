"""Cost model: cluster descriptions, profilers, time and memory predictions."""
