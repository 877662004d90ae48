"""Case table: (architecture, placement spec, the modules it must place on) → one shared checker.

Each row's expected module set is written here independently of the planner (full module names as
the architecture has them), so the planner's structural discovery is checked against a reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from mmlora.config.schema import PlacementSpec
from mmlora.models.modality import discover_modalities
from mmlora.placement.apply import apply_placement, save_initial_state
from mmlora.placement.plan import plan_placement
from mmlora.runs.save import load_placement, save_placement
from tests.placement.conftest import clip_batch, clip_loss, llava_batch, text_batch


@dataclass
class Case:
    id: str
    arch: str  # "tiny-llava", "tiny-clip" or a transformers model type built by tiny_any
    spec: dict
    expected: Callable[[str], bool]  # full module name -> adapted?
    full_prefixes: tuple[str, ...] = ()
    n_adapters: int = 1


def _q_or_v(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("q_proj", "v_proj")


LANG_LINEAR = re.compile(r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
TEXT_LINEAR = re.compile(r"model\.text_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")

CASES = [
    Case(
        "llava-lora-qv-first-layer+full-projector+lora-language",
        "tiny-llava",
        {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": {"first": 1}, "rank": 4},
         "projector": {"mode": "full"},
         "language": {"mode": "lora", "rank": 8}},
        lambda n: (n.startswith("model.vision_tower.encoder.layers.0.self_attn.") and _q_or_v(n))
        or LANG_LINEAR.fullmatch(n) is not None,
        full_prefixes=("model.multi_modal_projector.",),
    ),
    Case(
        "llava-dora-vision+rslora-schedule-language",
        "tiny-llava",
        {"vision": {"mode": "dora", "targets": "attention", "layers": [0], "rank": 4},
         "language": {"mode": "lora", "targets": ["attention", "mlp"], "rank_schedule": {"min": 2, "max": 8}, "rslora": True}},
        lambda n: re.fullmatch(r"model\.vision_tower\.encoder\.layers\.0\.self_attn\.(q|k|v|out)_proj", n) is not None
        or LANG_LINEAR.fullmatch(n) is not None,
        n_adapters=2,
    ),
    Case(
        "llava-pissa-language-pattern",
        "tiny-llava",
        {"language": {"mode": "lora", "targets": ["layers.*.mlp.*_proj"], "init": "pissa", "rank": 4}},
        lambda n: re.fullmatch(r"model\.language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj", n) is not None,
    ),
    Case(
        "clip-lora-qv-both-towers",
        "tiny-clip",
        {"vision": {"mode": "lora", "targets": ["q", "v"], "rank": 4}, "text": {"mode": "lora", "targets": ["q", "v"], "rank": 4}},
        lambda n: re.fullmatch(r"(visual\.)?transformer\.resblocks\.\d+\.attn\.(q|v)_proj", n) is not None,
    ),
    Case(
        "clip-dora-vision-last-layer+full-text-projection",
        "tiny-clip",
        {"vision": {"mode": "dora", "targets": ["q", "k", "v"], "layers": {"last": 1}, "rank": 2},
         "text": {"mode": "full", "targets": ["ln_final"]}},
        lambda n: re.fullmatch(r"visual\.transformer\.resblocks\.1\.attn\.(q|k|v)_proj", n) is not None,
        full_prefixes=("ln_final.",),
    ),
    *[
        Case(
            f"{arch}-lora-language+vision-qv",
            arch,
            {"vision": {"mode": "lora", "targets": ["q", "v"], "rank": 2}, "language": {"mode": "lora", "rank": 4}},
            None,  # filled in below: the family's own module names
        )
        for arch in ("qwen2_vl", "idefics3", "paligemma", "gemma3", "mllama", "internvl")
    ],
]

_FAMILY_EXPECTED = {
    "qwen2_vl": lambda n: LANG_LINEAR.fullmatch(n) is not None or re.fullmatch(r"model\.visual\.blocks\.\d+\.attn\.qkv", n) is not None,
    "idefics3": lambda n: TEXT_LINEAR.fullmatch(n) is not None
    or re.fullmatch(r"model\.vision_model\.encoder\.layers\.\d+\.self_attn\.(q|v)_proj", n) is not None,
    "paligemma": lambda n: LANG_LINEAR.fullmatch(n) is not None
    or re.fullmatch(r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.(q|v)_proj", n) is not None,
    "gemma3": lambda n: LANG_LINEAR.fullmatch(n) is not None
    or re.fullmatch(r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.(q|v)_proj", n) is not None,
    "mllama": lambda n: re.fullmatch(r"model\.language_model\.layers\.\d+\.(self_attn|cross_attn)\.[qkvo]_proj", n) is not None
    or re.fullmatch(r"model\.language_model\.layers\.\d+\.mlp\.(gate|up|down)_proj", n) is not None
    or re.fullmatch(r"model\.vision_model\.(transformer|global_transformer)\.layers\.\d+\.self_attn\.(q|v)_proj", n) is not None,
    "internvl": lambda n: LANG_LINEAR.fullmatch(n) is not None
    or re.fullmatch(r"model\.vision_tower\.encoder\.layer\.\d+\.attention\.(q|v)_proj", n) is not None,
}
for case in CASES:
    if case.expected is None:
        case.expected = _FAMILY_EXPECTED[case.arch]


def _build(case: Case, tiny_llava, tiny_clip):
    if case.arch == "tiny-llava":
        return tiny_llava[0]
    if case.arch == "tiny-clip":
        return tiny_clip[0]
    from mmlora.models.tiny_any import build_tiny

    return build_tiny(case.arch)


def _loss_fn(case: Case, tiny_llava, tiny_clip, shapes_small):
    if case.arch == "tiny-llava":
        batch = llava_batch(tiny_llava[1], shapes_small)
        return lambda m: m(**batch).loss, lambda m: m(**{k: v for k, v in batch.items() if k != "labels"}).logits
    if case.arch == "tiny-clip":
        batch = clip_batch(tiny_clip[1], tiny_clip[2], shapes_small)
        return lambda m: clip_loss(m, batch), lambda m: torch.cat([m.encode_image(batch["image"]), m.encode_text(batch["text"])])
    batch = text_batch(None)
    return lambda m: m(**batch).loss, lambda m: m(input_ids=batch["input_ids"]).logits


def _adapted_modules(model) -> set[str]:
    base = model.get_base_model()
    return {n for n, m in base.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_placement_case(case, tiny_llava, tiny_clip, shapes_small, tmp_path):
    torch.manual_seed(0)
    model = _build(case, tiny_llava, tiny_clip)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn, outputs = _loss_fn(case, tiny_llava, tiny_clip, shapes_small)
    with torch.no_grad():
        reference = outputs(model)

    spec = PlacementSpec.model_validate(case.spec)
    plan = plan_placement(model, discover_modalities(model), spec)
    expected = {n for n, _ in model.named_modules() if n and case.expected(n)}
    planned = {t.name for m in plan.modalities.values() for t in m.targets}
    assert planned == expected, f"planned - expected: {planned - expected}; expected - planned: {expected - planned}"
    assert len(plan.adapters) == case.n_adapters

    placed = apply_placement(model, plan)
    initial_adapters = save_initial_state(placed, plan)
    # 1. Adapters sit exactly on the planned modules.
    assert _adapted_modules(placed) == expected
    # 2. Only the planned parameters are trainable.
    trainable = {n for n, p in placed.get_base_model().named_parameters() if p.requires_grad}
    lora_params = {n for n in trainable if ".lora_" in n}
    assert {n.split(".lora_")[0] for n in lora_params} == expected
    full = trainable - lora_params
    assert full == set(plan.full_params)
    assert all(any(n.startswith(p) for p in case.full_prefixes) for n in full)
    assert bool(full) == bool(case.full_prefixes)
    assert sum(p.numel() for p in placed.parameters() if p.requires_grad) == sum(
        m.trainable_params for m in plan.modalities.values()
    )

    # 3. A training step moves only trainable tensors.
    opt = torch.optim.SGD([p for p in placed.parameters() if p.requires_grad], lr=0.5)
    loss = loss_fn(placed)
    loss.backward()
    opt.step()
    after = placed.get_base_model().state_dict()
    moved = {k for k, v in base_state.items() if k in after and not torch.equal(after[k], v)}
    assert moved <= {n for n in full}  # base weights of adapted layers are renamed (base_layer) and untouched
    for k, v in base_state.items():
        module, _, leaf = k.rpartition(".")
        wrapped = f"{module}.base_layer.{leaf}"
        if module and wrapped in after and "pissa" not in case.id:
            assert torch.equal(after[wrapped], v), f"{k} changed"

    # 4. Non-zero adapters change the outputs.
    with torch.no_grad():
        for n, p in placed.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
        adapted = outputs(placed)
    assert not torch.allclose(adapted, reference, atol=1e-4)

    # 5. Saved adapters reload on a fresh base through plain PEFT and give the same outputs.
    base_name = case.arch
    save_placement(placed, plan, tmp_path / "final", base_name, initial_adapters=initial_adapters)
    fresh = _build(case, *_fresh(case, tiny_llava, tiny_clip))
    reloaded = load_placement(fresh, tmp_path / "final")
    with torch.no_grad():
        again = outputs(reloaded)
    assert torch.allclose(adapted, again, atol=1e-5), (adapted - again).abs().max()


def _fresh(case: Case, tiny_llava, tiny_clip):
    """A new copy of the base (with original weights) for reloading."""
    if case.arch == "tiny-llava":
        from mmlora.models.loading import load_llava

        return load_llava(tiny_llava[0].name_or_path), tiny_clip
    if case.arch == "tiny-clip":
        from mmlora.models.loading import load_clip
        from mmlora.models.presets import preset_path
        from mmlora.models.unfuse import unfuse_attention

        m, p, t = load_clip(preset_path("tiny-clip"))
        unfuse_attention(m)
        return tiny_llava, (m, p, t)
    return tiny_llava, tiny_clip
