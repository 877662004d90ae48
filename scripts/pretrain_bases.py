"""Pretrain the shapes-world bases with mmlora's own trainer (placement ``full``) and write them,
with model cards and measured scores, to ``mmlora/bases/`` (shipped in the repository).

Run (regenerates the shipped files; about 15 minutes on 2 CPU cores):
    python scripts/pretrain_bases.py
    python scripts/pretrain_bases.py --out /tmp/bases --clip-steps 20 --stage1-steps 10 --stage2-steps 10   # a quick try

1. **CLIP** (`shapes-clip` preset, open_clip): contrastive training on world-A image-caption pairs.
2. **LLaVA**: the CLIP's image tower converted to a transformers CLIP vision model (at 64 px: 8x8
   patches), a new 2-layer GELU projector and a new Llama decoder (`shapes-llava` sizes), trained
   LLaVA-style on world-A captions: stage 1 aligns the projector (and trains the new language model;
   the tower frozen), stage 2 trains everything.
3. Scores on world-A and world-B test images (CIDEr, BLEU-4, slot accuracy; CLIP image-to-caption
   retrieval) go into each folder's ``scores.json`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(recipe: dict, name: str):
    from mmlora.config.loading import validate_recipe
    from mmlora.train.loop import Trainer

    trainer = Trainer(validate_recipe(recipe, name), recipe_name=name)
    trainer.setup()
    start = time.time()
    result = trainer.train()
    print(f"{name}: {result['steps']} steps in {time.time() - start:.0f}s, val loss {result['val_loss']}", flush=True)
    return trainer


def pretrain_clip(worlds: Path, work: Path, out: Path, steps: int) -> Path:
    import torch
    from safetensors.torch import load_file

    from mmlora.models.loading import load_clip
    from mmlora.models.clip import model_config, save_clip
    from mmlora.models.presets import preset_path
    from mmlora.models.unfuse import fuse_state_dict, unfuse_attention
    from mmlora.runs.layout import FULL_MODULES, Run

    a = worlds / "world_A" / "annotations"
    recipe = {
        "model": {"name": "shapes-clip"},
        "placement": {"vision": {"mode": "full"}, "text": {"mode": "full"}},
        "data": {"train": [{"format": "coco", "path": str(a / "captions_train.json")}],
                 "val": [{"format": "coco", "path": str(a / "captions_val.json"), "captions": "first"}]},
        "train": {"output_dir": str(work / "clip"), "max_steps": steps, "batch_size": 64, "lr": 5.0e-4,
                  "weight_decay": 0.05, "warmup_steps": max(1, steps // 20), "eval_every": max(1, steps // 4),
                  "save_every": max(1, steps // 4), "resume": "auto"},
    }
    trainer = _train(recipe, "clip-pretrain")
    model, _, tokenizer = load_clip(preset_path("shapes-clip"))
    unfuse_attention(model)
    trained = load_file(str(Run(trainer.out).final.path(FULL_MODULES)))
    model.load_state_dict(trained, strict=False)
    state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in fuse_state_dict(model.state_dict()).items()}
    from mmlora.models.clip import register_configs
    import open_clip

    register_configs()
    fused = open_clip.create_model("mmlora-clip-shapes", pretrained=None)
    fused.load_state_dict({k: v.float() for k, v in state.items()})
    dest = out / "shapes-clip-base"
    shutil.rmtree(dest, ignore_errors=True)
    save_clip(fused.to(torch.bfloat16), tokenizer.tokenizer, model_config("mmlora-clip-shapes"), dest)
    return dest


def pretrain_llava(worlds: Path, clip_dir: Path, work: Path, out: Path, steps1: int, steps2: int) -> Path:
    import torch
    from safetensors.torch import load_file

    from mmlora.models.llava import llava_from_clip, save_llava
    from mmlora.models.presets import PRESETS
    from mmlora.runs.layout import FULL_MODULES, Run

    spec = PRESETS["shapes-llava"].llava
    model, processor = llava_from_clip(clip_dir, spec)
    init = work / "llava-init"
    shutil.rmtree(init, ignore_errors=True)
    save_llava(model, processor, init)
    a = worlds / "world_A"
    data = {"train": [{"format": "llava", "path": str(a / "llava_train.json")},
                      {"format": "coco", "path": str(a / "annotations" / "captions_train.json"), "weight": 0.4}],
            "val": [{"format": "llava", "path": str(a / "llava_val.json")}], "max_length": 192}
    common = {"batch_size": 32, "weight_decay": 0.0, "resume": "auto"}
    stage1 = _train({
        "model": {"name": str(init)},
        "placement": {"vision": {"mode": "frozen"}, "projector": {"mode": "full"}, "language": {"mode": "full"}},
        "data": data,
        "train": {**common, "output_dir": str(work / "llava-stage1"), "max_steps": steps1, "lr": 2.0e-3,
                  "warmup_steps": max(1, steps1 // 20), "eval_every": max(1, steps1 // 2), "save_every": max(1, steps1 // 4)},
    }, "llava-stage1")
    stage2 = _train({
        "model": {"name": str(init)},
        # layers 0-2: the projector reads layer -2, so the last layer (and the post-norm) never get gradient
        "placement": {"vision": {"mode": "full", "layers": {"range": [0, 3]}, "lr_multiplier": 0.2},
                      "projector": {"mode": "full"},
                      "language": {"mode": "full"}},
        "data": data,
        "train": {**common, "output_dir": str(work / "llava-stage2"), "init_from": str(stage1.out),
                  "max_steps": steps2, "lr": 1.0e-3, "warmup_steps": max(1, steps2 // 20),
                  "eval_every": max(1, steps2 // 2), "save_every": max(1, steps2 // 4)},
    }, "llava-stage2")
    model = type(model).from_pretrained(init, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_file(str(Run(stage2.out).final.path(FULL_MODULES))), strict=False)
    assert not unexpected, unexpected
    dest = out / "shapes-llava-base"
    shutil.rmtree(dest, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(dest, safe_serialization=True)
    processor.save_pretrained(dest)
    return dest


def clip_retrieval(clip_dir: Path, coco: Path, limit: int = 200) -> float:
    """Image→caption top-1 among the split's first captions (``mmlora.eval.retrieval``)."""
    from mmlora.data.samples import load_image
    from mmlora.eval.retrieval import image_to_text_top1 as retrieval
    from mmlora.eval.caption import CaptionSet
    from mmlora.models.loading import load_clip

    model, preprocess, tokenizer = load_clip(clip_dir)
    data = CaptionSet.from_coco(coco, limit=limit)
    images = [load_image(data.files[i], "", None) for i in data.image_ids]
    return retrieval(model.float(), preprocess, tokenizer, images, [data.references[i][0] for i in data.image_ids])


def evaluate(worlds: Path, llava_dir: Path, clip_dir: Path, work: Path, limit: int | None) -> dict:
    from mmlora.eval.caption import CaptionSet, evaluate_models
    from mmlora.showcase.slots import slot_scores

    scores: dict = {"llava": {}, "clip": {}}
    for world in ("A", "B"):
        coco = worlds / f"world_{world}" / "annotations" / "captions_test.json"
        report = evaluate_models({"base": str(llava_dir)}, CaptionSet.from_coco(coco, limit=limit),
                                 work / f"eval_{world}", split=f"world {world} test", extra=slot_scores)
        s = report["models"]["base"]["scores"]
        scores["llava"][world] = {k: s[k] for k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "slot_all", "slot_shape",
                                                    "slot_colour", "slot_position", "mean_length")}
        scores["llava"][world]["num_images"] = report["protocol"]["num_images"]
        scores["clip"][world] = {"retrieval_R@1": clip_retrieval(clip_dir, coco, limit or 200)}
    return scores


def write_cards(out: Path, scores: dict, args: argparse.Namespace) -> None:
    llava, clip = scores["llava"], scores["clip"]

    def row(world: str) -> str:
        s = llava[world]
        return (f"| {world} | {s['CIDEr']:.3f} | {s['BLEU-4']:.3f} | {s['slot_all']:.3f} | {s['slot_shape']:.3f} | "
                f"{s['slot_colour']:.3f} | {s['slot_position']:.3f} |")

    regen = "python scripts/pretrain_bases.py"
    (out / "shapes-llava-base" / "README.md").write_text(f"""---
library_name: transformers
tags: [mmlora, llava, shapes-world]
---

# shapes-llava-base

A tiny LLaVA (`LlavaForConditionalGeneration`, ~4.5M parameters, bf16 weights) for mmlora's
synthetic shapes world: the image tower of `shapes-clip-base` converted to a transformers CLIP vision
model at 64 px (8x8 patches, features from layer -2), a new 2-layer GELU projector and a 4-layer,
256-wide Llama decoder with a byte-fallback BPE tokenizer trained on the shapes vocabulary.

How it was made (`{regen}`): stage 1 trained the projector and the new language model on world-A
captions with the tower frozen ({args.stage1_steps} steps of 32); stage 2 trained everything
({args.stage2_steps} steps of 32). mmlora's own trainer, placement `full`.

Captioning scores (greedy, prompt "Provide a one-sentence caption for the provided image.", max 64
new tokens; test split, {llava['A']['num_images']} images per world; pycocoevalcap):

| world | CIDEr | BLEU-4 | slot accuracy | shape | colour | position |
|---|---|---|---|---|---|---|
{row('A')}
{row('B')}

World B adds a shape (star), a colour (purple) and a new caption style; the base has never seen
them, which is the shift adaptation recipes start from.

Honest limits: the captions are fluent and in world A's style (high CIDEr/BLEU on A), and positions and
colours are mostly right, but the shape word is right for only {llava['A']['slot_shape']:.0%} of world-A objects (a
uniform guess among A's 4 shapes gets 25%): at 8x8 patches of 64 px and with this short CPU
pretraining budget, small shapes are hard to tell apart. Longer pretraining (`--stage2-steps`) improves it.
""")
    (out / "shapes-clip-base" / "README.md").write_text(f"""---
library_name: open_clip
tags: [mmlora, clip, shapes-world]
---

# shapes-clip-base

A tiny open_clip CLIP (ViT 4x128 at 128 px with 8 px patches — a 16x16 grid — and a 4x128 text
tower; bf16 weights) for mmlora's shapes world, trained contrastively on world-A image-caption pairs
({args.clip_steps} steps of 64) by mmlora's trainer with placement `full`. Load it with
`open_clip.create_model_and_transforms("local-dir:PATH")` or `mmlora.models.clip.load_clip`.

Image-to-caption retrieval (top-1 among the test split's first captions, {llava['A']['num_images']} images):
world A {clip['A']['retrieval_R@1']:.3f}, world B {clip['B']['retrieval_R@1']:.3f} (chance {1 / llava['A']['num_images']:.3f}).

The class `triangle` is named in world-A captions, so its text embedding is trained, but it is
reserved as an unseen class for dense (segmentation) fine-tuning.

Regenerate: `{regen}`.
""")
    for name in ("shapes-llava-base", "shapes-clip-base"):
        (out / name / "scores.json").write_text(json.dumps(scores["llava" if "llava" in name else "clip"], indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    from mmlora.showcase.shapes import cached_worlds

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "mmlora" / "bases")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bases")
    p.add_argument("--clip-steps", type=int, default=250)
    p.add_argument("--stage1-steps", type=int, default=150)
    p.add_argument("--stage2-steps", type=int, default=400)
    p.add_argument("--eval-limit", type=int, default=None, help="test images per world (default: all 200)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    worlds = cached_worlds()
    clip_dir = pretrain_clip(worlds, args.work, args.out, args.clip_steps)
    llava_dir = pretrain_llava(worlds, clip_dir, args.work, args.out, args.stage1_steps, args.stage2_steps)
    scores = evaluate(worlds, llava_dir, clip_dir, args.work, args.eval_limit)
    write_cards(args.out, scores, args)
    print(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
