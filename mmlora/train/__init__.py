"""Training: the Accelerate loop (``loop.py``) and what it is made of — optimizer groups, speed switches
and packing's setup, a process's micro-batches, skipped samples, the staged gradient audit, the
collectives, what a run records — and the hooks a caller passes in (``hooks.py``: evaluators, event
callbacks).

Layer: train. Imports objectives, runs, data, placement, adapters, models, config and the foundation.
"""
