"""Benchmark helpers for the IMSM evaluation sets: JSON Lines loading and the paper's metrics."""
