"""Training objectives behind one protocol (``base.Objective``): captioning LM (``caption``), CLIP
contrastive (``contrastive``), CLIP dense segmentation (``dense``); ``select.objective_for`` picks one.

Layer: objectives. Imports runs, data, placement, models, config and the foundation.
"""
