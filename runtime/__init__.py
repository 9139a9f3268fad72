"""Runtime: process groups, stage execution, pipeline schedules, data parallelism, checkpoints."""
