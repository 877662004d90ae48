"""Shared fixtures: offline hub, a per-checkout build cache, tiny models and data built once.

Everything expensive (shapes worlds, tiny model presets) goes through ``mmlora.cache``, keyed by
what built it, under ``.cache/mmlora`` in the checkout (``MMLORA_CACHE`` overrides), so repeated
runs and test modules share one build.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("MMLORA_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "mmlora"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The small shapes worlds tests use (5% of the default sizes: A 100/10/10, B 25/5/10).
SMALL_SCALE = 0.05


@pytest.fixture(scope="session")
def shapes_small() -> Path:
    """Folder with world_A/ and world_B/ at SMALL_SCALE, 128 px."""
    from mmlora.showcase.shapes import cached_worlds

    return cached_worlds(scale=SMALL_SCALE)


@pytest.fixture(scope="session")
def tiny_llava_dir() -> Path:
    from mmlora.models.presets import preset_path

    return preset_path("tiny-llava")


@pytest.fixture(scope="session")
def tiny_clip_dir() -> Path:
    from mmlora.models.presets import preset_path

    return preset_path("tiny-clip")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
