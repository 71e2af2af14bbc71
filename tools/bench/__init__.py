"""Benchmarks: side-by-side comparisons in one run, written as JSON + Markdown + PNG (``python -m tools.bench``)."""
