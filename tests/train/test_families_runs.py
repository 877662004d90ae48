"""What each VLM family's trained run goes on to do (the family matrix's later columns):

* exact resume: 4 steps in one go give the same per-step losses (metrics.jsonl) as 2 steps, a
  checkpoint, and a resume to 4 (constant learning rate, so the schedule does not depend on max_steps);
* merged export: ``export_run(..., merge=True)`` checks the merge on a probe batch from the run's data,
  and the folder it writes reloads with ``AutoModelForImageTextToText.from_pretrained`` to the adapter
  model's logits within 1e-4;
* served: ``mmlora.serve.engine.Engine`` captions an image through the run as a named adapter, equal to
  ``generate_answers`` on ``load_reference(run)``. A run that trained a module in full (gemma3's
  projector) is refused by the server as one that changed the base; gemma3 is served with its
  projector frozen instead;
* ``mmlora data check --model tiny-TYPE`` with the family's processor reports as bad a sample with two
  images for one placeholder and one whose long prompt puts the image tokens past ``max_length``, and
  passes the good ones.

Results go to ``MMLORA_FAMILY_RESULTS`` (``tests/train/test_families_train.record``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmlora.config.loading import load_recipe
from mmlora.train.loop import Trainer
from tests.train.conftest import read_metrics
from tests.train.test_families_train import ROOT, TRAINED, record

EXPORT_TOLERANCE = 1e-4


def _train(model_type: str, world: Path, out: Path, *extra: str) -> Trainer:
    overrides = [f"train.output_dir={out}", "train.batch_size=2", "train.eval_every=null", "train.warmup_steps=0",
                 "train.scheduler=constant", "train.keep_last=5",
                 f"data.train=[{{format: llava, path: {world / 'llava_train.json'}}}]", "data.val=[]", *extra]
    trainer = Trainer(load_recipe(ROOT / "recipes" / "families" / f"{model_type}.yaml", overrides), recipe_name=model_type)
    trainer.setup()
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def family_runs(shapes_small, tmp_path_factory):
    """``get(model_type)`` → ``{"straight": 4-step run, "resumed": 2 steps + resume to 4}`` (trained once)."""
    runs: dict[str, dict[str, Path]] = {}

    def get(model_type: str) -> dict[str, Path]:
        if model_type not in runs:
            world = shapes_small / "world_B"
            from mmlora.models.presets import preset_path

            preset_path(f"tiny-{model_type}")  # built before either run: building it consumes the seeded RNG
            root = tmp_path_factory.mktemp(f"runs-{model_type}")
            _train(model_type, world, root / "straight", "train.max_steps=4", "train.save_every=null")
            _train(model_type, world, root / "resumed", "train.max_steps=2", "train.save_every=2")
            resumed = _train(model_type, world, root / "resumed", "train.max_steps=4", "train.save_every=2")
            assert resumed.step == 4
            runs[model_type] = {"straight": root / "straight", "resumed": root / "resumed"}
        return runs[model_type]

    return get


@pytest.mark.parametrize("model_type", TRAINED)
def test_resume_reproduces_the_losses(model_type, family_runs):
    runs = family_runs(model_type)
    assert (runs["resumed"] / "checkpoints" / "step-000002").is_dir()
    expected, resumed = read_metrics(runs["straight"]), read_metrics(runs["resumed"])
    steps = [r["step"] for r in expected if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert [r["step"] for r in resumed if "loss" in r] == steps
    assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in expected if "loss" in r]
    record(model_type, "resume", "✓")


@pytest.mark.parametrize("model_type", TRAINED)
def test_merged_export_reloads_in_transformers(model_type, family_runs, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText

    from mmlora.runs.export import _probe_batch, export_run
    from mmlora.runs.reference import load_reference

    run = family_runs(model_type)["resumed"]
    result = export_run(run, tmp_path / "merged", merge=True)
    assert result["merged"] and result["max_abs_diff"] <= EXPORT_TOLERANCE
    loaded = load_reference(run)
    batch = _probe_batch(loaded.processor, loaded.recipe)
    batch.pop("labels", None)
    assert "pixel_values" in batch
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = loaded.model(**batch).logits.float()
        got = merged(**batch).logits.float()
        with loaded.model.disable_adapter():
            untrained = loaded.model(**batch).logits.float()
    diff = float((want - got).abs().max())
    assert diff <= EXPORT_TOLERANCE, f"reloaded merged logits differ by {diff:.2e}"
    assert float((want - untrained).abs().max()) > EXPORT_TOLERANCE  # the adapters changed something
    record(model_type, "export", "✓")


@pytest.mark.parametrize("model_type", TRAINED)
def test_served_caption_equals_generate(model_type, family_runs, shapes_small, tmp_path):
    from mmlora.errors import MmloraError
    from mmlora.generate import generate_answers
    from mmlora.runs.reference import load_reference
    from mmlora.serve.engine import Engine, Item

    run = family_runs(model_type)["resumed"]
    base = f"tiny-{model_type}"  # the family recipe's model.name
    note = ""
    if model_type == "gemma3":  # its recipe trains the projector in full: served merged (or gathered), not switched
        with pytest.raises(MmloraError, match="trained in place \\(full\\): serve it with --mode gathered or merged"):
            Engine(base, {"recipe": run}, mode="switch")
        image = Image.open(sorted((shapes_small / "world_B" / "images" / "val").glob("*.png"))[0]).convert("RGB")
        merged = Engine(base, {"recipe": run}, mode="merged", max_new_tokens=8)
        loaded = load_reference(run)
        want = generate_answers(loaded.model, loaded.processor, [image], ["Describe the image."], batch_size=1,
                                max_new_tokens=8)
        assert merged.run([Item("caption", "recipe", image, "Describe the image.")])[0]["caption"] == want[0]
        run = tmp_path / "frozen-projector"
        _train(model_type, shapes_small / "world_B", run, "train.max_steps=2", "train.save_every=null",
               "placement.projector.mode=frozen")
        note = " (the recipe's full projector served merged; switch mode with the projector frozen)"
    # Mixed batches route row i to adapter i; a family whose processor flattens an image into many
    # pixel rows (Qwen's patches, LLaVA-NeXT's and mllama's tiles) is refused in mixed mode, in one
    # line, and served in switch mode.
    from mmlora.generate import pixel_rows_per_image

    if pixel_rows_per_image(load_reference(base).processor) != 1:
        with pytest.raises(MmloraError, match="--mode switch"):
            Engine(base, {"tuned": run}, mode="mixed")
        note += " (switch/merged modes: mixed needs one pixel row per image)"
    engine = Engine(base, {"tuned": run}, mode="switch", max_new_tokens=8)
    image = Image.open(sorted((shapes_small / "world_B" / "images" / "val").glob("*.png"))[0]).convert("RGB")
    prompt = "Describe the image."
    (served,) = engine.run([Item("caption", "tuned", image, prompt)])
    loaded = load_reference(run)
    want = generate_answers(loaded.model, loaded.processor, [image], [prompt], batch_size=1, max_new_tokens=8)
    assert served["caption"] == want[0]
    if not note:
        # one mixed batch (the run's adapter and the bare base): each row as served alone, or refused in
        # one line where an adapted layer reads all images' features as one sequence (Gemma 4's projector)
        mixed = Engine(base, {"tuned": run}, mode="mixed", max_new_tokens=8)
        items = [Item("caption", "tuned", image, prompt), Item("caption", "__base__", image, prompt)]
        try:
            tuned, bare = mixed.run(items)
        except MmloraError as err:
            assert "--mode switch" in str(err) and "\n" not in str(err)
            note = " (switch/merged modes: mixed refused, an adapted layer reads all images' features as one sequence)"
        else:
            base_alone = generate_answers(load_reference(base).model, loaded.processor, [image], [prompt], batch_size=1,
                                          max_new_tokens=8)
            assert (tuned["caption"], bare["caption"]) == (want[0], base_alone[0])
    record(model_type, "serve", "✓" + note)


@pytest.mark.parametrize("model_type", TRAINED)
def test_data_check_finds_what_training_rejects(model_type, shapes_small, tmp_path, capsys):
    from transformers import AutoProcessor

    from mmlora.cli import main
    from mmlora.data.build import read_dataset
    from mmlora.config.schema import DatasetSpec
    from mmlora.data.processing import ConversationEncoder
    from mmlora.models.presets import preset_path

    world = shapes_small / "world_B"
    good = json.loads((world / "llava_train.json").read_text())[:3]  # image paths relative to world/
    two = {**good[0], "id": "two_images", "image": [good[0]["image"], good[1]["image"]]}
    long_prompt = {**good[1], "id": "long_prompt", "conversations": [
        {"from": "human", "value": "Look closely. " * 150 + "<image>\nDescribe the image."}, good[1]["conversations"][1]]}
    data = tmp_path / "data.json"
    data.write_text(json.dumps([*good, two, long_prompt]))
    # max_length: just above the longest good sample as this family's processor encodes it
    encoder = ConversationEncoder(AutoProcessor.from_pretrained(preset_path(f"tiny-{model_type}")), 100_000)
    records = read_dataset(DatasetSpec(format="llava", path=str(data), images=str(world)))
    longest = max(len(encoder.encode(r)["input_ids"]) for r in records[:3])
    capsys.readouterr()
    rc = main(["data", "check", str(data), "--images", str(world), "--model", f"tiny-{model_type}", "--max-length", str(longest + 8)])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "5 records, 3 good, 2 bad" in out, out
    bad = [line for line in out.splitlines() if line.strip().startswith("BAD")]
    assert len(bad) == 2 and any("two_images" in b and "placeholder" in b for b in bad), out
    assert any("long_prompt" in b and "max_length" in b for b in bad), out
    record(model_type, "check", "✓")
