"""Data: readers (LLaVA JSON, COCO captions, messages JSONL, Hugging Face datasets, segmentation
folders) → samples → processing (chat template, labels on answers only; the recipe's image budget,
``image_budget``) → batching; ``data check``.

Layer: data. Imports config and the foundation (nothing of models: processors are arguments).
"""
