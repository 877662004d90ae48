"""The dense segmentation objective: masks of seen classes train CLIP's patch features and text tower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from mmlora.config.schema import DataSpec, DatasetSpec, DenseSpec
from mmlora.data.samples import Sample
from mmlora.data.segmentation import SegmentationFolder
from mmlora.errors import MmloraError
from mmlora.models.text import BACKGROUND_WORDS
from mmlora.objectives.dense import DenseSeg, seg_classes, uses_dense

from .conftest import run_training


def _seg_data(root, ignore=("triangle",)) -> DataSpec:
    return DataSpec(train=[DatasetSpec(format="seg", path=str(root), split="train", ignore_classes=list(ignore))],
                    val=[DatasetSpec(format="seg", path=str(root), split="val", ignore_classes=list(ignore))])


def test_encoder_crops_image_and_mask_together_and_hides_unseen(tiny_clip_dir, shapes_small, tmp_path):
    world = shapes_small / "world_A"
    objective = DenseSeg(tiny_clip_dir, _seg_data(world), DenseSpec())
    classes = (world / "classes.txt").read_text().split()
    assert objective.seen == [c for c in classes if c != "triangle"]
    # A 96x64 image whose left and right thirds differ; mask: left third triangle, middle circle, right star.
    img = np.zeros((64, 96, 3), np.uint8)
    img[:, 64:] = 255
    mask = np.zeros((64, 96), np.uint8)
    mask[:, :32], mask[:, 32:64], mask[:, 64:] = classes.index("triangle"), classes.index("circle"), classes.index("star")
    Image.fromarray(img).save(tmp_path / "x.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    item = objective.encoder.encode(Sample("x", "m.png", [], [tmp_path / "x.png"], target=tmp_path / "m.png"))
    size = objective.encoder.size
    assert item["image"].shape == (3, size, size) and item["mask"].shape == (size, size)
    # Centre crop of the resized 96x64 → keeps the middle 64 px columns (scaled): mask columns from the
    # left third (triangle → ignored), the middle (circle) and the right third (star); the image's
    # white part lines up with the star part of the mask.
    m = item["mask"]
    assert set(m.unique().tolist()) == {255, objective.seen.index("circle"), objective.seen.index("star")}
    star = m == objective.seen.index("star")
    white = item["image"].mean(0) > 0.5
    assert (star == white).float().mean() > 0.97


def test_loss_is_the_pixel_cross_entropy_and_ignores_unseen_pixels(tiny_clip_dir, shapes_small):
    from mmlora.models.dense import dense_tokens
    from mmlora.models.loading import load_clip
    from mmlora.models.unfuse import unfuse_attention

    world = shapes_small / "world_A"
    objective = DenseSeg(tiny_clip_dir, _seg_data(world), DenseSpec(mode="clearclip", templates="a {}."))
    model, _, tokenizer = load_clip(tiny_clip_dir)
    unfuse_attention(model)
    items = [objective.encoder.encode(s) for s in SegmentationFolder(world, "train").as_samples()[:2]]
    batch = objective.collate(items)
    loss, units = objective.loss_sum(model, batch)
    # Reference written out: one prompt per class (the background class averages its background
    # words), cosine logits on the patch grid, bilinear upsampling, x logit scale, cross-entropy
    # summed over pixels of seen classes.
    with torch.no_grad():
        def embed(words):
            return F.normalize(F.normalize(model.encode_text(tokenizer([f"a {w}." for w in words])), dim=-1).mean(0), dim=0)

        text = torch.stack([embed(BACKGROUND_WORDS if c == "background" else [c]) for c in objective.seen])
        tok = dense_tokens(model, batch["image"], "clearclip")[:, 1:]
        g = int(tok.shape[1] ** 0.5)
        feats = F.normalize(tok, dim=-1).reshape(len(tok), g, g, -1)
        logits = F.interpolate(torch.einsum("bhwe,ce->bchw", feats, text), size=batch["mask"].shape[-2:],
                               mode="bilinear", align_corners=False) * model.logit_scale.exp()
        keep = batch["mask"] != 255
        ref = -logits.log_softmax(1).gather(1, batch["mask"].clamp(max=len(text) - 1)[:, None])[:, 0][keep].sum()
    assert units == int(keep.sum()) == objective.units(batch)
    assert torch.allclose(loss, ref, rtol=1e-5)


def test_lora_on_q_v_trains_in_both_towers(tiny_clip_dir, shapes_small, tmp_path):
    from safetensors.torch import load_file

    world = shapes_small / "world_A"
    recipe = {
        "model": {"name": str(tiny_clip_dir)},
        "placement": {"vision": {"mode": "lora", "targets": ["q", "v"], "rank": 4},
                      "text": {"mode": "lora", "targets": ["q", "v"], "rank": 4}},
        "data": {"train": [{"format": "seg", "path": str(world), "split": "train", "ignore_classes": ["triangle"]}],
                 "val": [{"format": "seg", "path": str(world), "split": "val", "ignore_classes": ["triangle"]}]},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 5, "batch_size": 6, "lr": 5e-3,
                  "scheduler": "constant", "eval_every": 5, "dense": {"mode": "vanilla"}},
    }
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(recipe))
    trainer, result = run_training(path)
    assert trainer.objective.unit == "pixel"
    weights = load_file(str(tmp_path / "run" / "final" / "adapters" / "default" / "adapter_model.safetensors"))
    b = {k: v for k, v in weights.items() if "lora_B" in k}
    vision = [k for k in b if "visual" in k]
    text = [k for k in b if "visual" not in k]
    assert vision and text
    assert all(b[k].abs().sum() > 0 for k in b), "every lora_B moved from its zero init"
    losses = [m["loss"] for m in trainer_metrics(tmp_path / "run")]
    assert np.mean(losses[-2:]) < losses[0]

    # The run evaluates like any CLIP: its adapters merged for eval give the adapter model's features,
    # and `eval seg` scores base and run side by side.
    from mmlora.cli import main
    from mmlora.models.dense import dense_tokens
    from mmlora.eval.segmentation import load_clip_for_eval
    from mmlora.runs.reference import load_reference

    images = torch.randn(2, 3, 64, 64)
    merged, _ = load_clip_for_eval(tmp_path / "run")
    unmerged = load_reference(tmp_path / "run").model
    base, _ = load_clip_for_eval(str(tiny_clip_dir))
    with torch.no_grad():
        m, u, b = (dense_tokens(x, images) for x in (merged, unmerged, base))
    assert torch.allclose(m, u, atol=1e-5) and not torch.allclose(m, b, atol=1e-3)
    assert main(["eval", "seg", "--data", str(world), "--split", "val", "--model", f"base={tiny_clip_dir}",
                 "--model", f"lora={tmp_path / 'run'}", "--modes", "vanilla", "--unseen", "triangle",
                 "--limit", "4", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(report["modes"]) == {"base/vanilla", "lora/vanilla"}
    assert report["modes"]["base/vanilla"]["IoU"] != report["modes"]["lora/vanilla"]["IoU"]


def trainer_metrics(run):
    from .conftest import read_metrics

    return [m for m in read_metrics(run) if "loss" in m]


def test_refuses_mixed_data_unknown_classes_and_non_clip_models(tiny_llava_dir, shapes_small):
    world = shapes_small / "world_A"
    mixed = DataSpec(train=[DatasetSpec(format="seg", path=str(world)),
                            DatasetSpec(format="llava", path=str(world / "llava_train.json"))])
    with pytest.raises(MmloraError, match="mixes seg datasets"):
        uses_dense(mixed)
    with pytest.raises(MmloraError, match=r"ignore_classes \['unicorn'\]"):
        seg_classes(_seg_data(world, ["unicorn"]))
    with pytest.raises(ValueError, match="format: seg only"):
        DatasetSpec(format="llava", path="x.json", ignore_classes=["triangle"])
    from mmlora.models.loading import load_llava
    from mmlora.objectives.select import objective_for

    model, _ = load_llava(tiny_llava_dir)
    with pytest.raises(MmloraError, match="open_clip"):
        objective_for(model, tiny_llava_dir, _seg_data(world))


def test_a_frozen_text_tower_is_embedded_once(tiny_clip_dir, shapes_small, monkeypatch):
    import mmlora.objectives.dense as seg  # where the objective looks the function up
    from mmlora.models.loading import load_clip
    from mmlora.models.unfuse import unfuse_attention

    world = shapes_small / "world_A"
    objective = DenseSeg(tiny_clip_dir, _seg_data(world), DenseSpec())
    model, _, _ = load_clip(tiny_clip_dir)
    unfuse_attention(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))  # image tower trains, text tower frozen
    calls = []
    real = seg.class_text_embeddings
    monkeypatch.setattr(seg, "class_text_embeddings", lambda *a: calls.append(1) or real(*a))
    batch = objective.collate([objective.encoder.encode(s) for s in SegmentationFolder(world, "train").as_samples()[:2]])
    first, _ = objective.loss_sum(model, batch)
    second, _ = objective.loss_sum(model, batch)
    assert len(calls) == 1 and torch.allclose(first, second)
    first.backward()
    assert model.visual.conv1.weight.grad is not None
