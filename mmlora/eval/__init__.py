"""Evaluation: captioning (pycocoevalcap; the in-training caption metrics), open-vocabulary
segmentation (dense CLIP → mIoU), few-shot classification, retrieval, and the one overlay renderer.

Layer: eval. Imports train (its hook protocol), runs, generate, data, models, config and the foundation.
"""
