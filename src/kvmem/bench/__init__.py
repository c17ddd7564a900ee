"""Benchmarks behind `kvmem bench`."""
