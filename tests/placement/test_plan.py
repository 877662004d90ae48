import pytest

from mmlora.config.schema import PlacementSpec
from mmlora.errors import MmloraError
from mmlora.models.modality import discover_modalities
from mmlora.placement.peft_backend import lora_kwargs
from mmlora.placement.plan import plan_placement
from mmlora.placement.report import format_plan


def _plan(model, spec: dict):
    return plan_placement(model, discover_modalities(model), PlacementSpec.model_validate(spec))


def test_per_modality_ranks_compile_into_one_adapter(tiny_llava):
    plan = _plan(tiny_llava[0], {"vision": {"mode": "lora", "targets": "q", "layers": [0], "rank": 2},
                                 "language": {"mode": "lora", "targets": "v", "rank": 8, "alpha": 4}})
    assert len(plan.adapters) == 1
    cfg = lora_kwargs(plan.adapters[0].lora)
    assert cfg["r"] in (2, 8) and set(plan.adapters[0].modalities) == {"vision", "language"}
    ranks = {t.name: t.rank for m in plan.modalities.values() for t in m.targets}
    # every module's rank is the default or in rank_pattern (escaped full names, PEFT's regex match)
    import re

    for name, rank in ranks.items():
        assert cfg["rank_pattern"].get(re.escape(name), cfg["r"]) == rank
    assert {t.alpha for t in plan.modalities["language"].targets} == {4.0}
    assert {t.alpha for t in plan.modalities["vision"].targets} == {4.0}  # default alpha = 2 x rank


def test_variant_or_dropout_split_adapters(tiny_llava):
    plan = _plan(tiny_llava[0], {"vision": {"mode": "lora", "layers": [0], "dropout": 0.1},
                                 "language": {"mode": "lora"}})
    assert [a.modalities for a in plan.adapters] == [["vision"], ["language"]]
    assert plan.adapters[0].name == "default" and plan.adapters[1].name == "language"


def test_rank_schedule_grows_over_depth(tiny_llava):
    plan = _plan(tiny_llava[0], {"language": {"mode": "lora", "targets": "q", "rank_schedule": {"min": 2, "max": 6}}})
    assert [(t.layer, t.rank) for t in plan.modalities["language"].targets] == [(0, 2), (1, 6)]


@pytest.mark.parametrize("spec, message", [
    ({"vision": {"mode": "lora", "targets": ["gate"]}}, "match no module of vision"),
    ({"language": {"mode": "lora", "targets": ["*q_proj"]}}, "also matches 2 module"),
    ({"language": {"mode": "lora", "layers": [7]}}, r"\[7\] do not exist"),
    ({"projector": {"mode": "lora", "layers": {"first": 1}}}, "no stack of layers"),
    ({"text": {"mode": "lora"}}, "no text modality"),
    ({"vision": {"mode": "frozen"}}, "nothing would train"),
])
def test_plans_that_cannot_work_are_refused(tiny_llava, spec, message):
    with pytest.raises(MmloraError, match=message):
        _plan(tiny_llava[0], spec)


def test_leak_error_names_the_other_modality(tiny_llava):
    with pytest.raises(MmloraError) as err:
        _plan(tiny_llava[0], {"language": {"mode": "lora", "targets": ["*q_proj"]}})
    assert "module(s) of vision" in str(err.value) and "model.vision_tower.encoder.layers.0.self_attn.q_proj" in str(err.value)


def test_table_shows_every_modality(tiny_llava):
    plan = _plan(tiny_llava[0], {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0]},
                                 "projector": {"mode": "full", "lr": 1e-3}, "language": {"mode": "dora", "precision": "4bit"}})
    text = format_plan(plan)
    for word in ("vision", "projector", "language", "dora", "4bit", "0.001", "trainable:", "full_modules.safetensors"):
        assert word in text


def test_per_modality_ranks_reach_lora_config_exactly(tiny_llava):
    import inspect

    from peft import AdaLoraConfig, LoraConfig

    from mmlora.placement.apply import apply_placement
    from mmlora.placement.peft_backend import peft_config
    from mmlora.placement.settings import AdaLoraSettings

    model = tiny_llava[0]
    plan = _plan(model, {"vision": {"mode": "lora", "targets": "q", "layers": [0], "rank": 2},
                         "language": {"mode": "lora", "targets": "v", "rank": 8, "alpha": 32}})
    (adapter,) = plan.adapters
    assert adapter.adalora is None and adapter.lora.dora is False and adapter.lora.init == "default"
    cfg = peft_config(adapter.lora, adapter.adalora, causal_lm=True)
    assert isinstance(cfg, LoraConfig) and cfg.task_type == "CAUSAL_LM"
    # language (two modules) sets the default; vision's rank 2 and default alpha 2 x 2 are the overrides
    assert (cfg.r, cfg.lora_alpha) == (8, 32)
    assert cfg.rank_pattern == {r"model\.vision_tower\.encoder\.layers\.0\.self_attn\.q_proj": 2}
    assert cfg.alpha_pattern == {r"model\.vision_tower\.encoder\.layers\.0\.self_attn\.q_proj": 4.0}
    assert set(cfg.target_modules) == {"model.vision_tower.encoder.layers.0.self_attn.q_proj",
                                       "model.language_model.layers.0.self_attn.v_proj",
                                       "model.language_model.layers.1.self_attn.v_proj"}
    assert (cfg.lora_dropout, cfg.use_dora, cfg.use_rslora, cfg.init_lora_weights, cfg.bias) == (0.0, False, False, True, "none")

    # AdaLoRA's budget travels in the plan; without total_step, building its config is refused as before
    ada = _plan(model, {"vision": {"mode": "lora", "targets": "q", "layers": [0]}, "language": {"mode": "lora"},
                        "adalora": {"init_r": 6, "target_r": 2, "tfinal": 2, "total_step": 10}})
    assert ada.adapters[0].adalora == ada.adalora == AdaLoraSettings(6, 2, 0, 2, 1, 10)
    cfg = peft_config(ada.adapters[0].lora, ada.adapters[0].adalora)
    assert isinstance(cfg, AdaLoraConfig) and (cfg.init_r, cfg.target_r, cfg.tfinal, cfg.total_step) == (6, 2, 2, 10)
    no_steps = _plan(model, {"language": {"mode": "lora"}, "adalora": {}})
    with pytest.raises(MmloraError, match="placement.adalora.total_step: AdaLoRA needs the number of training steps"):
        peft_config(no_steps.adapters[0].lora, no_steps.adapters[0].adalora)
    too_short = _plan(model, {"language": {"mode": "lora"}, "adalora": {"tinit": 5, "tfinal": 10, "total_step": 3}})
    with pytest.raises(MmloraError, match="tinit 5 \\+ tfinal 10 leave no step of the 3-step run for allocating the budget"):
        peft_config(too_short.adapters[0].lora, too_short.adapters[0].adalora)

    # applying needs only the plan, and PEFT puts the planned rank and alpha on each module
    assert list(inspect.signature(apply_placement).parameters) == ["model", "plan"]
    base = apply_placement(model, plan).get_base_model()
    for m in plan.modalities.values():
        for t in m.targets:
            module = base.get_submodule(t.name)
            assert module.r["default"] == t.rank and module.scaling["default"] == t.alpha / t.rank, t.name


def test_qalora_settings_live_on_the_modality_plan(tiny_llava):
    plan = _plan(tiny_llava[0], {"language": {"mode": "qalora", "targets": "q", "rank": 4, "dropout": 0.1,
                                              "rslora": True, "group_size": 16}})
    (m,) = plan.qalora
    assert (m.group_size, m.dropout, m.rslora) == (16, 0.1, True) and not plan.adapters
