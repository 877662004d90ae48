"""Placement: per-modality spec → plan (``plan.py``) → PEFT adapters (``apply.py``) → audit, save."""
