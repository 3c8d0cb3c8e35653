"""Benchmarks: scripts that print figures (see README.md); never collected by pytest."""
