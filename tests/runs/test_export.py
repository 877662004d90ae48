import json

import pytest
import torch

from mmlora.cli import main
from mmlora.errors import MmloraError
from mmlora.data.samples import load_image
from mmlora.generate import generate_answers
from mmlora.runs.export import export_run
from mmlora.runs.reference import load_reference
from tests.train.conftest import run_training


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shapes_small):
    """One short QLoRA run (4-bit language model) shared by the export tests."""
    import yaml

    from tests.train.conftest import BASE

    tmp = tmp_path_factory.mktemp("export")
    data = json.loads(json.dumps(BASE))
    world = shapes_small / "world_B"
    data["data"]["train"] = [{"format": "llava", "path": str(world / "llava_train.json")}]
    data["data"]["val"] = [{"format": "llava", "path": str(world / "llava_val.json")}]
    data["placement"]["language"]["precision"] = "4bit"
    data["train"].update({"output_dir": str(tmp / "run"), "max_steps": 3, "eval_every": 3})
    path = tmp / "qlora.yaml"
    path.write_text(yaml.safe_dump(data))
    trainer, _ = run_training(path)
    return trainer.out


@pytest.mark.bnb
def test_merged_export_equals_the_adapters(trained_run, tmp_path, shapes_small):
    result = export_run(trained_run, tmp_path / "merged", merge=True)
    assert result["merged"] and result["max_abs_diff"] < 1e-4
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert {type(m).__name__ for m in merged.modules()} .isdisjoint({"Linear4bit"})
    # The merged checkpoint reproduces the adapter model (on the dequantized base) on a real image.
    loaded = load_reference(trained_run, dequantize_base=True)
    adapters = loaded.model
    from tests.placement.conftest import llava_batch

    batch = llava_batch(AutoProcessor.from_pretrained(tmp_path / "merged"), shapes_small)
    batch.pop("labels")
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, adapters(**batch).logits, atol=1e-4)
    assert "merge check" in (tmp_path / "merged" / "README.md").read_text()


def test_adapter_export_and_cli(trained_run, tmp_path, capsys, shapes_small):
    assert main(["export", str(trained_run), "--out", str(tmp_path / "adapters")]) == 0
    out = tmp_path / "adapters"
    assert (out / "manifest.json").is_file() and (out / "adapters" / "default" / "adapter_model.safetensors").is_file()
    assert "library_name: peft" in (out / "README.md").read_text()
    with pytest.raises(MmloraError, match="not empty"):
        export_run(trained_run, out)
    image = shapes_small / "world_B" / "images" / "test" / "B_test_00000.png"
    assert main(["predict", str(trained_run), "--image", str(image), "--max-new-tokens", "4"]) == 0
    loaded = load_reference(trained_run)
    (answer,) = generate_answers(loaded.model, loaded.processor, [load_image(image, str(image), None)], "Describe.",
                                 max_new_tokens=4)
    assert isinstance(answer, str)
    assert main(["predict", str(tmp_path / "nope"), "--image", str(image)]) == 2


@pytest.mark.bnb
def test_merged_qlora_requantized_to_int4(trained_run, tmp_path):
    from mmlora.adapters.int4 import Int4Linear, int4_layers, quantize_int4

    result = export_run(trained_run, tmp_path / "int4", merge=True, int4_group_size=16)
    assert result["requantized"] and result["int4_layers"] == 14  # the 4-bit language model's linear layers
    int4 = load_reference(tmp_path / "int4").model
    reference = load_reference(trained_run, dequantize_base=True).model.merge_and_unload()
    name = next(iter(int4_layers(int4)))
    codes, scales, zeros = quantize_int4(reference.get_submodule(name).weight, 16)
    layer = int4.get_submodule(name)
    assert isinstance(layer, Int4Linear) and torch.equal(layer.codes, codes)
    assert torch.equal(layer.scales, scales) and torch.equal(layer.zeros, zeros)
    assert not any(isinstance(m, Int4Linear) for n, m in int4.named_modules() if "vision_tower" in n)
    with pytest.raises(MmloraError, match="add --merge"):
        export_run(trained_run, tmp_path / "x", int4_group_size=16)
