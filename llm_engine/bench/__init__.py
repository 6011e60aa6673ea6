"""Benchmarks of every kernel against its references and the hardware limits."""
