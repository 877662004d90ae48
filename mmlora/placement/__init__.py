"""Placement: a recipe's per-modality spec → a typed plan (``plan.py``) → PEFT adapters (``apply.py``,
through the one PEFT backend), the gradient-flow audit and the plan's report.

Layer: placement. Imports adapters, models, config and the foundation.
"""
