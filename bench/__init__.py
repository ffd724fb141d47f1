"""Benchmarks: python -m bench.<name>; each prints one JSON object."""
