"""The shapes worlds and what shows them off: the generator (``shapes``), slot accuracy (``slots``),
``make demo`` (``demo``, with its recipes as package data), ``mmlora demo seg`` (``seg_demo``).
Library layers know nothing of this package: prompts, corpora and scorers are passed in.

Layer: showcase. Imports every library layer below it.
"""
