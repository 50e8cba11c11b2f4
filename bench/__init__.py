"""Benchmarks: scripts printing JSON and a table (see README)."""
