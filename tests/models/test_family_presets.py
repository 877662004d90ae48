"""Every VLM family is a preset, ``tiny-<type>``: listed, built into the cache on first use, named by
its recipe in recipes/families/ (so the recipes run from a fresh clone)."""

from __future__ import annotations

from pathlib import Path

import yaml

from mmlora.cli import main
from mmlora.models.families import FAMILIES
from mmlora.models.loading import resolve_pretrained
from mmlora.models.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]


def test_a_preset_per_family_and_the_recipes_name_them(capsys):
    # tiny-llava is the LLaVA-1.5 preset of the demo and the tests (mmlora.models.llava), the llava family's
    assert {p.family for p in PRESETS.values() if p.kind == "family"} == set(FAMILIES) - {"llava"}
    assert PRESETS["tiny-llava"].kind == "llava"
    assert all(PRESETS[f"tiny-{t}"].family == t for t in FAMILIES if t != "llava")
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert all(f"tiny-{t}" in out for t in FAMILIES)
    for recipe in sorted((ROOT / "recipes" / "families").glob("*.yaml")):
        model = yaml.safe_load(recipe.read_text())["model"]
        assert model["name"] == f"tiny-{recipe.stem}", recipe
        assert "mmlora models tiny" in recipe.read_text()  # still named as the way to get a folder


def test_a_family_preset_builds_once_into_the_cache(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoProcessor

    monkeypatch.setenv("MMLORA_CACHE", str(tmp_path / "cache"))
    path = resolve_pretrained("tiny-paligemma")
    assert path.parent == tmp_path / "cache" and (path / ".complete").is_file()
    assert AutoConfig.from_pretrained(path).model_type == "paligemma"
    assert type(AutoProcessor.from_pretrained(path)).__name__ == "PaliGemmaProcessor"
    assert resolve_pretrained("tiny-paligemma") == path  # the second use reads the cache


def test_building_a_preset_leaves_the_random_state_alone(tmp_path, monkeypatch):
    import torch

    from mmlora.models.presets import preset_path

    monkeypatch.setenv("MMLORA_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(123)
    preset_path("tiny-llava")  # a build: the cache is empty
    after_build = torch.rand(3)
    torch.manual_seed(123)
    preset_path("tiny-llava")  # a cache hit
    assert torch.equal(after_build, torch.rand(3))
