"""Helpers of benchmarks/run.py: processes, targets, load runs and reports."""
