"""Ratio benchmarks (``python -m benchmarks.ingest``)."""
