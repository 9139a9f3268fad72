"""Benchmarks: measurements that print tables and write JSON under benchmarks/results/ (see BENCHMARKS.md)."""
