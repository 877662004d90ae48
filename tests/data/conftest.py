"""Fixtures for the data tests: the tiny VLM families, built once per module."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``model_type`` → ``(model, processor)`` loaded (eval mode) from its tiny folder, built once per module."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmlora.models.families import save_family

    loaded: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in loaded:
            folder = tmp_path_factory.mktemp(model_type) / "model"
            save_family(model_type, folder)
            model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
            loaded[model_type] = (model, AutoProcessor.from_pretrained(folder))
        return loaded[model_type]

    return get
