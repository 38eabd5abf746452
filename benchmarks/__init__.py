"""Benchmarks: scripts that print their figures as JSON (see the README)."""
