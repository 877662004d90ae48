"""Pieces of ``scripts/bench_train.py``: workload shapes, the two training arms, measurement, report."""
