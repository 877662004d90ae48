import ast
import re
from pathlib import Path

import pytest

from mmlora.config.schema import PlacementSpec
from mmlora.errors import MmloraError
from mmlora.models.modality import discover_modalities
from mmlora.placement.plan import plan_placement

# Families with a projector module of their own, and where it sits (independent reference).
COVERED = {
    "llava": "model.multi_modal_projector", "llava_next": "model.multi_modal_projector",
    "llava_onevision": "model.multi_modal_projector", "vipllava": "model.multi_modal_projector",
    "paligemma": "model.multi_modal_projector", "gemma3": "model.multi_modal_projector",
    "mllama": "model.multi_modal_projector", "internvl": "model.multi_modal_projector",
    "mistral3": "model.multi_modal_projector", "aya_vision": "model.multi_modal_projector",
    "lfm2_vl": "model.multi_modal_projector", "got_ocr2": "model.multi_modal_projector",
    "aria": "model.multi_modal_projector", "cohere2_vision": "model.multi_modal_projector",
    "idefics3": "model.connector", "smolvlm": "model.connector", "idefics2": "model.connector",
    "qwen2_vl": "model.visual.merger", "qwen2_5_vl": "model.visual.merger", "glm4v": "model.visual.merger",
    "deepseek_vl": "model.aligner", "kosmos-2": "image_to_text_projection",
    "llama4": "multi_modal_projector", "blip-2": "language_projection", "instructblip": "language_projection",
    "video_llama_3": "model.projector", "lighton_ocr": "model.vision_projection",
}


@pytest.mark.parametrize("model_type", sorted(COVERED))
def test_discovery_and_planning_on_meta(model_type):
    from mmlora.models.tiny_any import build_tiny

    model = build_tiny(model_type, device="meta")
    mmap = discover_modalities(model)
    assert {"vision", "projector", "language"} <= set(mmap.modalities)
    assert COVERED[model_type] in mmap.modalities["projector"].roots
    assert mmap.modalities["vision"].n_layers == 2 and mmap.modalities["language"].n_layers == 2
    # No module belongs to two modalities, and the towers are where their configs are.
    names = [n for n, _ in model.named_modules() if n]
    for n in names:
        assert sum(m.contains(n) for m in mmap.modalities.values()) <= 1
    spec = PlacementSpec.model_validate({"vision": {"mode": "lora", "targets": "attention", "layers": {"first": 1}},
                                         "projector": {"mode": "full"}, "language": {"mode": "lora"}})
    plan = plan_placement(model, mmap, spec)
    for name in ("vision", "language"):
        targets = plan.modalities[name].targets
        assert targets and all(mmap.modality_of(t.name) == name for t in targets)
    assert all(t.layer == 0 for t in plan.modalities["vision"].targets)
    assert plan.modalities["projector"].full_params


def test_coverage_document_lists_what_is_discovered():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "architectures.md").read_text()
    discovered = re.findall(r"^\| (\S+) \| discovered \|", doc, re.M)
    assert len(discovered) >= 25 and set(COVERED) <= set(discovered)


def test_recipe_override_names_the_modalities(tiny_llava):
    model = tiny_llava[0]
    mmap = discover_modalities(model, {"vision": r"model\.vision_tower", "language": r"model\.language_model|lm_head"})
    assert mmap.modalities["vision"].roots == ["model.vision_tower"]
    assert mmap.modalities["language"].n_layers == 2
    with pytest.raises(MmloraError, match="matches no module"):
        discover_modalities(model, {"vision": "nothing_here"})


def _code_strings(path: Path) -> list[str]:
    """String constants in code, docstrings excluded."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


PER_MODEL_PATHS = re.compile(
    r"vision_tower|multi_modal_projector|language_model|text_model|vision_model|visual\.|\.merger|connector|"
    r"model\.layers|encoder\.layers|resblocks"
)


# Weight converters map one fixed checkpoint format onto another, so they must name its keys; they
# play no part in finding modules for placement.
CONVERTERS = {"models/convert.py"}


def test_no_per_model_module_paths_in_the_package():
    root = Path(__file__).resolve().parents[2] / "mmlora"
    offenders = [
        f"{p.relative_to(root)}: {s!r}" for p in root.rglob("*.py") if str(p.relative_to(root)) not in CONVERTERS
        for s in _code_strings(p) if PER_MODEL_PATHS.search(s)
    ]
    assert not offenders, "per-model module paths in code: " + "; ".join(offenders)


def test_gemma4_audio_embedder_is_the_audio_towers_not_the_projector():
    from mmlora.models.tiny_any import build_tiny

    mmap = discover_modalities(build_tiny("gemma4", device="meta"))
    assert mmap.modalities["vision"].n_layers == 2 and mmap.modalities["language"].n_layers == 2
    assert mmap.modalities["projector"].roots == ["model.embed_vision"]
    assert mmap.modalities["audio"].roots == ["model.audio_tower", "model.embed_audio"]
