"""QA-LoRA from a recipe: train, save, export merged to INT4, load back, same outputs."""

import json

import torch

from mmlora.cli import main
from tests.train.conftest import run_training


def test_train_export_int4_and_reload(make_recipe, tmp_path, shapes_small, capsys):
    from mmlora.runs.reference import load_reference
    from mmlora.adapters.int4 import INT4_MANIFEST, Int4Linear
    from mmlora.adapters.qalora import qalora_layers

    recipe = make_recipe("qalora", **{"placement.language": {"mode": "qalora", "rank": 4, "group_size": 16},
                                      "train.max_steps": 2, "train.eval_every": 2})
    trainer, result = run_training(recipe)
    final = result["final"]
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["qalora"]["modalities"] == ["language"] and len(manifest["qalora"]["modules"]) == 14
    # Training moved the QA-LoRA B matrices (they start at zero).
    trained = qalora_layers(trainer.accelerator.unwrap_model(trainer.model).get_base_model())
    assert any(layer.qalora_B.weight.abs().sum() > 0 for layer in trained.values())

    assert main(["export", str(trainer.out), "--out", str(tmp_path / "int4"), "--merge"]) == 0
    assert "merged INT4 model (14 INT4 layers)" in capsys.readouterr().out
    layers = json.loads((tmp_path / "int4" / INT4_MANIFEST).read_text())["layers"]
    assert len(layers) == 14 and set(layers.values()) == {16}
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "int4" / "model_int4.safetensors"))
    name = next(iter(layers))
    assert state[f"{name}.qweight"].dtype == torch.uint8 and f"{name}.weight" not in state

    run = load_reference(trainer.out)
    unmerged, processor = run.model, run.processor
    export = load_reference(tmp_path / "int4")
    merged, recipe_back = export.model, export.recipe
    assert recipe_back is None and isinstance(merged.get_submodule(name), Int4Linear)
    codes = qalora_layers(unmerged.get_base_model())[name].qweight
    assert torch.equal(merged.get_submodule(name).qweight, codes)
    from tests.placement.conftest import llava_batch

    batch = llava_batch(processor, shapes_small)
    batch.pop("labels")
    with torch.no_grad():
        assert (merged(**batch).logits - unmerged(**batch).logits).abs().max() < 1e-4
