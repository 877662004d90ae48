"""Adapters saved under transformers 4.x module names load onto transformers 5 models; keys that
name no module are refused by name instead of loading as silently missing."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.adapter_runs import LLAVA_PLACEMENT, make_run

# transformers 4.x LLaVA layout → 5.x (the reverse of what the converter must find by itself).
TO_4X = [
    ("base_model.model.model.language_model.", "base_model.model.language_model.model."),
    ("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model."),
    ("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector."),
    ("base_model.model.lm_head.", "base_model.model.language_model.lm_head."),
]


def _to_4x(key: str) -> str:
    for new, old in TO_4X:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def _base():
    from mmlora.config.schema import ModelSpec
    from mmlora.models.build import load_model

    return load_model(ModelSpec.model_validate({"name": "tiny-llava"}))


def _logits(model) -> torch.Tensor:
    cfg = model.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = torch.tensor([[1] + [cfg.image_token_index] * n + [5, 7, 9]])
    pixels = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("legacy") / "run", "tiny-llava", LLAVA_PLACEMENT, seed=3)
    adapter = run / "final" / "adapters" / "default"
    old = tmp_path_factory.mktemp("legacy4x") / "adapter"
    shutil.copytree(adapter, old)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({_to_4x(k): v for k, v in state.items()}, str(old / "adapter_model.safetensors"))
    assert any(_to_4x(k) != k for k in state) and any("vision_model" in _to_4x(k) for k in state)
    return run, adapter, old


def test_4x_keys_convert_to_the_same_model(legacy_run, tmp_path):
    from peft import PeftModel

    from mmlora.runs.legacy import convert_legacy_adapter

    _, adapter, old = legacy_run
    reference = _logits(PeftModel.from_pretrained(_base(), adapter).eval())
    assert not torch.allclose(reference, _logits(_base()))
    converted = convert_legacy_adapter(old, tmp_path / "converted", _base())
    assert set(load_file(str(converted / "adapter_model.safetensors"))) == set(load_file(str(adapter / "adapter_model.safetensors")))
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(_base(), converted).eval()), reference)


def test_load_placement_renames_a_4x_adapter(legacy_run, tmp_path):
    from mmlora.runs.save import load_placement

    run, adapter, old = legacy_run
    reference = _logits(load_placement(_base(), run / "final").eval())
    legacy_final = tmp_path / "final"
    shutil.copytree(run / "final", legacy_final)
    shutil.copy(old / "adapter_model.safetensors", legacy_final / "adapters" / "default" / "adapter_model.safetensors")
    torch.testing.assert_close(_logits(load_placement(_base(), legacy_final).eval()), reference)


def test_a_key_naming_no_module_is_refused_by_name(legacy_run, tmp_path):
    from mmlora.errors import MmloraError
    from mmlora.runs.legacy import convert_legacy_adapter

    _, _, old = legacy_run
    bad = tmp_path / "bad"
    shutil.copytree(old, bad)
    state = load_file(str(bad / "adapter_model.safetensors"))
    state["base_model.model.no_such_tower.blocks.0.qkv.lora_A.weight"] = torch.zeros(4, 8)
    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(MmloraError, match=r"no_such_tower\.blocks\.0\.qkv\.lora_A\.weight"):
        convert_legacy_adapter(bad, tmp_path / "out", _base())
