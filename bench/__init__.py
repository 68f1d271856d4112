"""Benchmarks: ratios measured in one run (ours vs a baseline), not tests."""
