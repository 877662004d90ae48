"""Training: the Accelerate loop (``loop.py``), optimizer groups, speed switches, and the hooks a caller
passes in (``hooks.py``: evaluators, event callbacks).

Layer: train. Imports objectives, runs, data, placement, adapters, models, config and the foundation.
"""
