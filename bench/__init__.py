"""Benchmarks of the ProLoRA engine (not tests: nothing here asserts on timings)."""
