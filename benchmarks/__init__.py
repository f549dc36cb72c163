"""Benchmarks of the backfill pipeline: every figure is a ratio against a baseline measured in the same run.

Run with ``bash benchmarks/run.sh`` (or ``.venv/bin/python -m benchmarks.run``); not part of the test suite.
"""
