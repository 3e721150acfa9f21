"""Benchmarks and diagnostics of w2ssl, run from the repository root as ``python -m bench.<tool>``."""
