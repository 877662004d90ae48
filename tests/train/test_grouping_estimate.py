"""Length grouping estimates an image sample's length from the tokens one image takes in the
processed text, wrappers included: for Gemma 3 that is ``mm_tokens_per_image`` soft tokens plus
``<start_of_image>`` and ``<end_of_image>``, not the soft tokens alone."""

from __future__ import annotations

from pathlib import Path

from mmlora.config.loading import load_recipe
from mmlora.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]


def test_gemma3_grouping_counts_every_image_token(shapes_small, tmp_path):
    from mmlora.models.families import save_family

    save_family("gemma3", tmp_path / "model")
    world = shapes_small / "world_B"
    overrides = [f"model.name={tmp_path / 'model'}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1",
                 f"data.train=[{{format: llava, path: {world / 'llava_train.json'}}}]", "data.val=[]"]
    trainer = Trainer(load_recipe(ROOT / "recipes" / "families" / "gemma3.yaml", overrides), recipe_name="gemma3")
    trainer.setup()
    config = trainer.accelerator.unwrap_model(trainer.model).config
    assert trainer.train_set.image_tokens() == config.mm_tokens_per_image + 2
    # so an image sample's estimate misses only the chat template's turn markers and role words (18
    # tokens here, the same for every sample), not the image's 18 tokens on top
    sample = next(i for i, s in enumerate(trainer.train_set.samples) if s.images)
    actual = len(trainer.train_set[sample]["input_ids"])
    assert 0 <= actual - trainer.sampler.lengths[sample] <= 18
