"""The rank-allocation record and ``mmlora export --as-lora``: an AdaLoRA adapter with hand-set rank
masks (rank 0 included) becomes a plain LoRA adapter at those ranks that gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from mmlora.errors import MmloraError

#: Module → the rank its mask keeps (of init_r 4); the rest keep all 4.
KEPT = {"model.language_model.layers.0.self_attn.q_proj": 0, "model.language_model.layers.0.self_attn.v_proj": 1,
        "model.language_model.layers.1.self_attn.q_proj": 3, "model.vision_tower.encoder.layers.0.self_attn.q_proj": 2}


@pytest.fixture(scope="module")
def adalora_run(tmp_path_factory, tiny_llava_dir):
    """A run folder whose AdaLoRA adapter has seeded random factors and PEFT rank masks set as KEPT."""
    from transformers import AutoProcessor

    from mmlora.config.schema import Recipe
    from mmlora.models.build import load_model
    from mmlora.models.modality import discover_modalities
    from mmlora.placement.apply import apply_placement
    from mmlora.placement.plan import plan_placement
    from mmlora.runs.layout import Run
    from mmlora.runs.save import save_placement

    placement = {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0]}, "language": {"mode": "lora", "targets": ["q", "v"]},
                 "adalora": {"init_r": 4, "target_r": 2, "total_step": 10}}
    recipe = Recipe.model_validate({"model": {"name": "tiny-llava"}, "placement": placement})
    model = load_model(recipe.model)
    plan = plan_placement(model, discover_modalities(model), recipe.placement)
    placed = apply_placement(model, plan).eval()
    g = torch.Generator().manual_seed(0)
    pattern = {}
    with torch.no_grad():
        for name, p in placed.base_model.model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if ".lora_E." in name:
                module = name.split(".lora_E.")[0]
                mask = [k < KEPT.get(module, 4) for k in range(4)]
                p.mul_(torch.tensor(mask, dtype=p.dtype).unsqueeze(1))
                pattern[f"{module}.lora_E.default"] = mask
    placed.peft_config["default"].rank_pattern = pattern
    out = tmp_path_factory.mktemp("adalora") / "run"
    final = Run(out).final
    save_placement(placed, plan, final.folder, "tiny-llava")
    final.write_recipe(recipe)
    AutoProcessor.from_pretrained(tiny_llava_dir).save_pretrained(final.folder)
    return out, placed


def _batch(tiny_llava_dir):
    ids = torch.arange(3, 19).reshape(2, 8)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_as_lora_keeps_the_allocated_ranks_and_the_logits(adalora_run, tiny_llava_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mmlora.runs.export import export_run

    run, adalora = adalora_run
    result = export_run(run, tmp_path / "lora", as_lora=True)
    assert result["as_lora"] and result["max_abs_diff"] <= 1e-5
    folder = tmp_path / "lora" / "adapters" / "default"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert "model.language_model.layers.0.self_attn.q_proj" not in config["target_modules"]  # pruned to 0
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_llava_dir), folder).eval()
    ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in plain.named_modules()
             if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    for module, kept in KEPT.items():
        assert ranks.get(module, 0) == kept
    assert all(r == 4 for n, r in ranks.items() if n not in KEPT)
    batch = _batch(tiny_llava_dir)
    base = AutoModelForImageTextToText.from_pretrained(tiny_llava_dir).eval()
    with torch.no_grad():
        expected, got, untouched = adalora(**batch).logits, plain(**batch).logits, base(**batch).logits
    assert (expected - untouched).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    manifest = json.loads((tmp_path / "lora" / "manifest.json").read_text())
    assert manifest["adapters"][0]["variant"] == "lora" and manifest["adapters"][0]["converted_from"] == "adalora"
    assert "AdaLoRA adapter as LoRA" in (tmp_path / "lora" / "README.md").read_text()


def test_as_lora_refuses_what_it_cannot_convert(adalora_run, tmp_path):
    from mmlora.runs.export import export_run
    from tests.adapter_runs import LLAVA_PLACEMENT, make_run

    run, _ = adalora_run
    with pytest.raises(MmloraError, match="leave out --merge"):
        export_run(run, tmp_path / "a", merge=True, as_lora=True)
    lora = make_run(tmp_path / "lora-run", "tiny-llava", LLAVA_PLACEMENT, 1)
    with pytest.raises(MmloraError, match=r"not an AdaLoRA run \(lora\)"):
        export_run(lora, tmp_path / "b", as_lora=True)


def test_the_record_until_a_step_and_its_table():
    from mmlora.runs.allocation import ModuleRanks, RankAllocation, format_allocation

    alloc = RankAllocation(4, 2, modules=[ModuleRanks("v.0.q", "vision", 0, "q"), ModuleRanks("l.0.q", "language", 0, "q"),
                                          ModuleRanks("l.1.q", "language", 1, "q")])
    alloc.record(0, 12, {"v.0.q": 4, "l.0.q": 4, "l.1.q": 4})
    alloc.record(3, 9, {"v.0.q": 1, "l.0.q": 4, "l.1.q": 4})
    alloc.record(5, 6, {"v.0.q": 0, "l.0.q": 4, "l.1.q": 2})
    assert alloc.totals() == {"vision": 0, "language": 6} and alloc.totals(1) == {"vision": 1, "language": 8}
    earlier = alloc.until(4)
    assert earlier.steps == [0, 3] and earlier.modules[2].ranks == [4, 4]
    assert RankAllocation.from_dict(json.loads(json.dumps(alloc.to_dict()))) == alloc
    text = format_allocation(alloc)
    vision = next(line for line in text.splitlines() if line.startswith("vision"))
    language = next(line for line in text.splitlines() if line.startswith("language"))
    assert vision.split() == ["vision", "1", "0", "of", "4", "0.0%", "1", "L0", "0"]  # one module, pruned to 0
    assert language.split() == ["language", "2", "6", "of", "8", "100.0%", "0", "L0", "4", "·", "L1", "2"]
    assert "total rank 6 after step 5 (budget 6" in text
