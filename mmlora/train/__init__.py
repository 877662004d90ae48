"""Training: precision-aware loading, optimizer groups, checkpoints, and the loop (``loop.py``)."""
