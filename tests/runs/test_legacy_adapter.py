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


def test_a_bare_4x_peft_folder_loads_as_a_model_reference(legacy_run):
    """``--model ADAPTER_DIR`` for a PEFT folder saved elsewhere: its base from adapter_config.json, keys
    renamed, the same logits as the adapter in the current layout."""
    import json

    from peft import PeftModel

    from mmlora.runs.reference import load_reference

    _, adapter, old = legacy_run
    config = json.loads((old / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "tiny-llava"
    (old / "adapter_config.json").write_text(json.dumps(config))
    reference = _logits(PeftModel.from_pretrained(_base(), adapter).eval())
    loaded = load_reference(old)
    assert loaded.processor is not None
    torch.testing.assert_close(_logits(loaded.model), reference)


def test_a_bare_peft_folder_without_a_base_is_refused(legacy_run, tmp_path):
    import json

    from mmlora.errors import MmloraError
    from mmlora.runs.reference import load_reference

    _, _, old = legacy_run
    bare = tmp_path / "bare"
    shutil.copytree(old, bare)
    config = json.loads((bare / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (bare / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MmloraError, match="no base_model_name_or_path"):
        load_reference(bare)


def test_a_composition_of_4x_runs_loads_each_adapter_renamed(legacy_run, tmp_path):
    from mmlora.runs.compose import load_composition, parse_composition
    from mmlora.runs.save import load_placement

    run, _, old = legacy_run
    reference = _logits(load_placement(_base(), run / "final").eval())
    for name in ("a", "b"):
        shutil.copytree(run, tmp_path / name)
        shutil.copy(old / "adapter_model.safetensors", tmp_path / name / "final" / "adapters" / "default" / "adapter_model.safetensors")
    model, _, _, names = load_composition(parse_composition(f"{tmp_path / 'a'}+{tmp_path / 'b'}"))
    assert names == ["a", "b"]
    for name in names:
        model.set_adapter(name)
        torch.testing.assert_close(_logits(model), reference)


def test_a_bare_peft_folder_with_a_broken_config_is_refused(legacy_run, tmp_path):
    from mmlora.errors import MmloraError
    from mmlora.runs.reference import load_reference

    _, _, old = legacy_run
    bare = tmp_path / "broken"
    shutil.copytree(old, bare)
    (bare / "adapter_config.json").write_text("{not json")
    with pytest.raises(MmloraError, match="not a readable PEFT adapter config"):
        load_reference(bare)


def test_a_run_with_lora_on_the_output_layer_reloads(tmp_path):
    """PEFT saves an adapted output layer's weights under ``lm_head.base_layer``; such a run loads, and
    gives plain PEFT's logits."""
    from peft import PeftModel

    from mmlora.runs.reference import load_reference

    placement = {"language": {"mode": "lora", "targets": ["all-linear", "lm_head"], "rank": 4}}
    run = make_run(tmp_path / "run", "tiny-llava", placement, seed=3)
    folder = next(run.rglob("adapter_config.json")).parent
    assert any(".lm_head.base_layer." in k for k in load_file(str(folder / "adapter_model.safetensors")))
    loaded = load_reference(str(run)).model.float().eval()
    plain = PeftModel.from_pretrained(_base(), folder).eval()
    assert torch.allclose(_logits(loaded), _logits(plain), atol=1e-5)
    assert not torch.allclose(_logits(plain), _logits(_base()), atol=1e-3)  # the adapter changes the outputs
