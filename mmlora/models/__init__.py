"""Models: resolving references (presets, folders, cached hub ids), loading in a precision per modality,
the modality map (vision / projector / language / heads, found structurally), tiny builders from config,
open_clip unfusing and conversion, CLIP dense features and class-text embeddings.

Layer: models. Imports config and the foundation.
"""
