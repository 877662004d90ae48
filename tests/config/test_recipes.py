import json
from pathlib import Path

import pytest

from mmlora.cli import main
from mmlora.config.loading import load_recipe, recipe_json_schema
from mmlora.errors import MmloraError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


def test_recipes_exist():
    assert {p.parent.name for p in RECIPES} >= {"tiny", "llava"}


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_shipped_recipe_explains_itself_and_plans(path, capsys, monkeypatch):
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and text.startswith("#"), "a recipe opens with a comment block"
    assert any("Run" in line for line in header) and any("Override" in line or "override" in line for line in header)
    monkeypatch.chdir(ROOT)  # recipes name shipped files relative to the repository
    recipe = load_recipe(path)
    assert main(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    if recipe.trains_router:  # what trains is the router over earlier runs, not the placement
        assert plan["continual"]["method"] == "router" and plan["continual"]["router_params"] > 0
    else:
        assert any(m["trainable_params"] for m in plan["modalities"].values())


def test_llava15_7b_recipe_plans_from_its_config(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["plan", "recipes/llava/llava15-7b-qlora.yaml", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    vision, language = plan["modalities"]["vision"], plan["modalities"]["language"]
    assert plan["modality_map"]["vision"]["n_layers"] == 24 and plan["modality_map"]["vision"]["read_layers"] == 23
    assert vision["layers"] == list(range(23)) and len(vision["modules"]) == 23 * 4
    assert language["precision"] == "4bit" and len(language["modules"]) == 32 * 7
    assert "lm_head" not in {m["name"] for m in language["modules"]}
    assert plan["modalities"]["projector"]["mode"] == "full" and plan["warnings"] == []
    # LoRA r=128 on 4096x4096 attention and 4096x11008 MLP projections, 32 layers:
    assert language["trainable_params"] == 32 * 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008))


def test_overrides_and_closest_key_errors(tmp_path):
    recipe = ROOT / "recipes" / "tiny" / "llava-lora.yaml"
    r = load_recipe(recipe, ["placement.language.rank=16", "placement.vision.targets=[q,k]"])
    assert r.placement.language.rank == 16 and r.placement.vision.targets == ["q", "k"]
    with pytest.raises(MmloraError, match=r"placement.language.rnak: unknown key; did you mean 'rank'\?"):
        load_recipe(recipe, ["placement.language.rnak=4"])
    with pytest.raises(MmloraError, match="rank set, but mode is frozen"):
        load_recipe(recipe, ["placement.language.mode=frozen"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: tiny-llava}\nplacement:\n  vision: {mode: lora, layers: {first: 1, last: 1}}\n")
    with pytest.raises(MmloraError, match=f"(?s){bad}: invalid recipe:.*exactly one of first, last"):
        load_recipe(bad)
    with pytest.raises(MmloraError, match="not key=value"):
        load_recipe(recipe, ["placement.language.rank"])


def test_shipped_json_schema_is_current():
    assert (ROOT / "recipes" / "schema.json").read_text() == recipe_json_schema()


def test_plan_cli_prints_the_table(capsys):
    assert main(["plan", str(ROOT / "recipes" / "tiny" / "llava-mixed.yaml")]) == 0
    out = capsys.readouterr().out
    assert "adapter 'default': dora on vision" in out and "adapter 'language': lora on language" in out
    assert main(["plan", str(ROOT / "recipes" / "tiny" / "llava-lora.yaml"), "placement.vision.layers=all"]) == 0
    captured = capsys.readouterr()
    assert "never read" in captured.out
    assert main(["plan", "no-such.yaml"]) == 2
    assert "no recipe at" in capsys.readouterr().err


def test_accelerate_configs_are_valid_accelerate_configs():
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig

    configs = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"ddp", "fsdp2", "deepspeed-zero2", "deepspeed-zero3"}
    for path in configs:
        text = path.read_text()
        assert text.startswith("#") and "accelerate launch --config_file" in text
        data = yaml.safe_load(text)
        assert data["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}, path.name
        ClusterConfig.from_yaml_file(path)  # accelerate's own loader and schema
