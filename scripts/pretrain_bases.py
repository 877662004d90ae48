"""Pretrain the shapes-world bases with mmlora's own trainer (placement ``full``) and write them,
with model cards and measured scores, to ``mmlora/bases/`` (shipped in the repository).

Run (regenerates the shipped files; resumable: each stage resumes from its last checkpoint in --work):
    python scripts/pretrain_bases.py
    python scripts/pretrain_bases.py --out /tmp/bases --pretrain-images 200 --tower-steps 20 --clip-steps 20 --stage1-steps 10 --stage2-steps 10   # a quick try

0. **Data**: a world-A ``pretrain`` split (``--pretrain-images``, default 20,000 images; generated into
   --work, deterministic from the seed, disjoint from every train/val/test image by its RNG key),
   besides world A's own train split.
1. **Tower** (``shapes-clip``'s image tower, ViT 4x128 at 64 px, an 8x8 patch grid): trained to name
   the shape under every patch (the generator's masks) and the shape and colour in every grid cell,
   from linear heads on its last two layers' patch tokens (``pretrain_tower``).
2. **CLIP** (``shapes-clip`` preset, open_clip): that tower and a new text tower trained contrastively
   on the world-A image-caption pairs (the tower at a tenth of the learning rate).
3. **LLaVA**: the CLIP's image tower converted to a transformers CLIP vision model, a new 2-layer GELU
   projector and a new Llama decoder (``shapes-llava`` sizes), trained LLaVA-style on world-A captions:
   stage 1 aligns the projector (and trains the new language model; the tower frozen), stage 2 trains
   everything, the tower at a tenth of the learning rate.
4. Scores on the world-A, world-B and world-C test images (CIDEr, BLEU-4, slot accuracy per slot, the
   share of distinct captions; CLIP image-to-caption retrieval and training-free dense segmentation)
   go into each folder's ``scores.json`` and ``README.md``, with the same scores on the first
   ``SUBSET`` test images of world A for the reproduction test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from mmlora.showcase.shapes import CLASSES, WORLDS

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


#: The tower's label sets: world A's shapes in the masks' class order (index = mask value), its colours.
SHAPE_CLASSES = tuple(c for c in CLASSES if c == "background" or c in WORLDS["A"].shapes)
COLOURS = ("none", *WORLDS["A"].colours)


def tower_labels(world: Path, split: str, preprocess, grid: int):
    """Images (preprocessed), per-patch shape labels (the mask class covering at least a quarter of the
    patch, else background) and per-cell (shape, colour) labels of ``world``'s ``split``."""
    import numpy as np
    import torch
    from PIL import Image

    from mmlora.showcase.shapes import POSITIONS

    coco = json.loads((world / "annotations" / f"captions_{split}.json").read_text())
    images, dense, cells = [], [], []
    for entry in coco["images"]:
        images.append(preprocess(Image.open(world / entry["file_name"]).convert("RGB")))
        mask = torch.from_numpy(np.array(Image.open(world / "masks" / split / Path(entry["file_name"]).name))).long()
        b = mask.shape[0] // grid
        counts = torch.nn.functional.one_hot(mask.view(grid, b, grid, b).permute(0, 2, 1, 3).reshape(grid, grid, -1),
                                             len(SHAPE_CLASSES)).sum(2)
        top = counts[..., 1:].max(-1)
        dense.append(torch.where(top.values >= b * b // 4, top.indices + 1, 0).flatten())
        cell = [[0, 0] for _ in POSITIONS]
        for o in entry["objects"]:
            cell[POSITIONS.index(o["position"])] = [SHAPE_CLASSES.index(o["shape"]), COLOURS.index(o["colour"])]
        cells.append(cell)
    return torch.stack(images), torch.stack(dense), torch.tensor(cells)


def pretrain_tower(pretrain: Path, test: Path, work: Path, steps: int, batch: int = 64, seed: int = 0) -> Path:
    """Stage 0: the CLIP image tower (random init) trained to name the shape under every patch (the
    generator's masks) and the shape and colour in every grid cell, from linear heads on its patch
    tokens. At this data scale contrastive captions alone teach colour and position but hardly shape
    (a per-cell linear probe of a contrastive-only tower reads shape for about 60% of objects); the
    dense labels stand in for the scale real CLIPs are trained at. A supervised classifier is not a
    recipe mmlora's trainer runs, so this is a plain loop; it checkpoints every quarter and resumes.
    Returns an open_clip folder (the text tower still random) that the CLIP stage starts from."""
    import torch

    from mmlora.models.clip import model_config, save_clip
    from mmlora.models.loading import load_clip
    from mmlora.models.presets import preset_path
    from mmlora.showcase.shapes import POSITIONS

    dest = work / "tower"
    if (dest / "open_clip_model.safetensors").is_file():
        return dest
    torch.manual_seed(seed)
    model, preprocess, tokenizer = load_clip(preset_path("shapes-clip"))
    visual = model.visual.float().train()
    visual.output_tokens = True
    cfg = model_config("mmlora-clip-shapes")["vision_cfg"]
    grid, width = cfg["image_size"] // cfg["patch_size"], cfg["width"]
    images, dense, cells = tower_labels(pretrain, "pretrain", preprocess, grid)
    # heads on the last layer's tokens (what the CLIP's dense modes read) and on the one before (what
    # the LLaVA projector reads, vision_feature_layer -2)
    n_cell = len(POSITIONS) * (len(SHAPE_CLASSES) + len(COLOURS))
    heads = torch.nn.ModuleDict({
        "dense": torch.nn.ModuleList([torch.nn.Linear(width, len(SHAPE_CLASSES)) for _ in range(2)]),
        "cell": torch.nn.ModuleList([torch.nn.Linear(grid * grid * width, n_cell) for _ in range(2)]),
    })
    inner: list = []
    visual.transformer.resblocks[-2].register_forward_hook(lambda _m, _i, out: inner.append(out))

    def patch_tokens(x):
        inner.clear()
        _, last = visual(x)
        before = inner[0] if inner[0].shape[0] == len(x) else inner[0].transpose(0, 1)  # batch-first or not
        return before[:, -grid * grid:], last

    params = [*visual.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    state_file, start = work / "tower_state.pt", 0
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)
        for module, key in ((visual, "visual"), (heads, "heads"), (opt, "opt"), (sched, "sched")):
            module.load_state_dict(state[key])
        start = state["step"]
    ce = torch.nn.functional.cross_entropy
    began = time.time()
    for step in range(start, steps):
        idx = torch.randint(0, len(images), (batch,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        y, loss = cells[idx], 0.0
        for k, tokens in enumerate(patch_tokens(images[idx])):
            logits = heads["cell"][k](tokens.flatten(1)).view(batch, len(POSITIONS), -1)
            loss = (loss + ce(heads["dense"][k](tokens).flatten(0, 1), dense[idx].flatten())
                    + ce(logits[..., :len(SHAPE_CLASSES)].flatten(0, 1), y[..., 0].flatten())
                    + ce(logits[..., len(SHAPE_CLASSES):].flatten(0, 1), y[..., 1].flatten()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if done % max(1, steps // 10) == 0 or done == steps:
            print(f"tower: step {done}/{steps} loss {loss.item():.3f} ({time.time() - began:.0f}s)", flush=True)
        if done % max(1, steps // 4) == 0 and done < steps:
            tmp = state_file.with_suffix(".tmp")
            torch.save({"visual": visual.state_dict(), "heads": heads.state_dict(),
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "step": done}, tmp)
            tmp.replace(state_file)
    visual.eval()
    x, _, y = tower_labels(test, "test", preprocess, grid)
    held, scores = y[..., 0] > 0, {}
    with torch.no_grad():
        for k, tokens in zip(("layer -2", "last layer"), patch_tokens(x)):
            pred = heads["cell"][0 if k == "layer -2" else 1](tokens.flatten(1)).view(len(x), len(POSITIONS), -1)
            scores[k] = {"shape": float((pred[..., :len(SHAPE_CLASSES)].argmax(-1)[held] == y[..., 0][held]).float().mean()),
                         "colour": float((pred[..., len(SHAPE_CLASSES):].argmax(-1)[held] == y[..., 1][held]).float().mean())}
    print(f"tower: world-A test objects, cell heads {scores}", flush=True)
    (work / "tower_scores.json").write_text(json.dumps(scores) + "\n")
    visual.output_tokens = False
    tmp = dest.with_name("tower.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_clip(model.eval(), tokenizer.tokenizer, model_config("mmlora-clip-shapes"), tmp)
    tmp.replace(dest)
    state_file.unlink(missing_ok=True)
    return dest


def pretrain_clip(worlds: Path, pretrain: Path, tower: Path, work: Path, out: Path, steps: int, batch: int = 128) -> Path:
    import torch
    from safetensors.torch import load_file

    from mmlora.models.loading import load_clip
    from mmlora.models.clip import model_config, save_clip
    from mmlora.models.unfuse import fuse_state_dict, unfuse_attention
    from mmlora.runs.layout import FULL_MODULES, Run

    a = worlds / "world_A" / "annotations"
    recipe = {
        "model": {"name": str(tower)},
        # the tower already sees (stage 0): a tenth of the text tower's learning rate keeps what it learnt
        "placement": {"vision": {"mode": "full", "lr_multiplier": 0.1}, "text": {"mode": "full"}},
        "data": {"train": [{"format": "coco", "path": str(a / "captions_train.json")},
                           {"format": "coco", "path": str(pretrain / "annotations" / "captions_pretrain.json")}],
                 "val": [{"format": "coco", "path": str(a / "captions_val.json"), "captions": "first"}]},
        "train": {"output_dir": str(work / "clip"), "max_steps": steps, "batch_size": batch, "lr": 1.0e-3,
                  "weight_decay": 0.05, "warmup_steps": max(1, steps // 20), "eval_every": max(1, steps // 4),
                  "save_every": max(1, steps // 4), "resume": "auto"},
    }
    trainer = _train(recipe, "clip-pretrain")
    model, _, tokenizer = load_clip(tower)
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


def pretrain_llava(worlds: Path, pretrain: Path, clip_dir: Path, work: Path, out: Path, steps1: int, steps2: int) -> Path:
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
                      {"format": "llava", "path": str(pretrain / "llava_pretrain.json")}],
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
        # (the tower at a tenth of the learning rate: it already sees, from stages 0 and 1)
        "placement": {"vision": {"mode": "full", "layers": {"range": [0, 3]}, "lr_multiplier": 0.1},
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


WORLDS = ("A", "B", "C")
#: The first SUBSET world-A test images are scored again by the reproduction test (tests/models/test_bases.py).
SUBSET = 40
DENSE_MODES = ("clearclip", "naclip", "sclip")


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


CAPTION_KEYS = ("CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "slot_all", "slot_shape", "slot_colour", "slot_position",
                "mean_length")


def caption_scores(llava_dir: Path, coco: Path, out: Path, split: str, limit: int | None) -> dict:
    """Captioning scores of the LLaVA base on ``coco`` plus ``distinct``: the share of distinct images
    (by their ground-truth objects) that got a caption no other image got."""
    from mmlora.eval.caption import CaptionSet, evaluate_models
    from mmlora.showcase.slots import slot_scores

    data = CaptionSet.from_coco(coco, limit=limit)
    report = evaluate_models({"base": str(llava_dir)}, data, out, split=split, extra=slot_scores)
    s = report["models"]["base"]["scores"]
    scores = {k: s[k] for k in CAPTION_KEYS}
    scores["num_images"] = report["protocol"]["num_images"]
    scores["distinct"] = distinct_share(json.loads((out / "results_base.json").read_text()), data)
    return scores


def distinct_share(predictions, data) -> float:
    """Among images with distinct ground truth (objects), the share whose caption is unique to them."""
    captions = {int(p["image_id"]): p["caption"] for p in predictions}
    truth = {i: json.dumps(sorted(json.dumps(o, sort_keys=True) for o in data.objects.get(i, []))) for i in captions}
    by_caption: dict[str, set[str]] = {}
    for i, caption in captions.items():
        by_caption.setdefault(caption, set()).add(truth[i])
    return sum(len(by_caption[captions[i]]) == 1 for i in captions) / max(len(captions), 1)


def evaluate(worlds: Path, llava_dir: Path, clip_dir: Path, work: Path, limit: int | None) -> dict:
    from mmlora.eval.segmentation import evaluate_segmentation

    scores: dict = {"llava": {}, "clip": {}}
    for world in WORLDS:
        coco = worlds / f"world_{world}" / "annotations" / "captions_test.json"
        scores["llava"][world] = caption_scores(llava_dir, coco, work / f"eval_{world}", f"world {world} test", limit)
        seg = evaluate_segmentation(str(clip_dir), worlds / f"world_{world}", "test", list(DENSE_MODES),
                                    work / f"seg_{world}", limit=limit, unseen=["triangle"])
        scores["clip"][world] = {"retrieval_R@1": clip_retrieval(clip_dir, coco, limit or 200),
                                 **{f"mIoU_{m}": seg["modes"][m]["mIoU"] for m in DENSE_MODES}}
    coco = worlds / "world_A" / "annotations" / "captions_test.json"
    sub = min(SUBSET, limit or SUBSET)
    scores["llava"]["A_subset"] = caption_scores(llava_dir, coco, work / "eval_A_subset", "world A test subset", sub)
    scores["clip"]["A_subset"] = {"retrieval_R@1": clip_retrieval(clip_dir, coco, sub)}
    return scores


def write_cards(out: Path, scores: dict, args: argparse.Namespace) -> None:
    llava, clip, tower = scores["llava"], scores["clip"], scores["clip"]["tower"]

    def row(world: str) -> str:
        s = llava[world]
        return (f"| {world} | {s['CIDEr']:.3f} | {s['BLEU-4']:.3f} | {s['slot_all']:.3f} | {s['slot_shape']:.3f} | "
                f"{s['slot_colour']:.3f} | {s['slot_position']:.3f} | {s['distinct']:.2f} |")

    def clip_row(world: str) -> str:
        s = clip[world]
        return f"| {world} | {s['retrieval_R@1']:.3f} | " + " | ".join(f"{s[f'mIoU_{m}']:.3f}" for m in DENSE_MODES) + " |"

    regen = "python scripts/pretrain_bases.py"
    n = llava["A"]["num_images"]
    (out / "shapes-llava-base" / "README.md").write_text(f"""---
library_name: transformers
tags: [mmlora, llava, shapes-world]
---

# shapes-llava-base

A tiny LLaVA (`LlavaForConditionalGeneration`, ~4.5M parameters, bf16 weights) for mmlora's
synthetic shapes world: the image tower of `shapes-clip-base` converted to a transformers CLIP vision
model (64 px, 8x8 patches, features from layer -2), a new 2-layer GELU projector and a 4-layer,
256-wide Llama decoder with a byte-fallback BPE tokenizer trained on the shapes vocabulary.

How it was made (`{regen}`): the tower comes from `shapes-clip-base` (see its card: trained on the
generator's masks, then contrastively). World-A captions of {args.pretrain_images} generated
pretraining images and world A's train split; stage 1 trained the projector and the new language
model with the tower frozen ({args.stage1_steps} steps of 32); stage 2 trained everything, the
tower's first three layers at a tenth of the learning rate ({args.stage2_steps} steps of 32).
mmlora's own trainer, placement `full`.

Captioning scores (greedy, prompt "Provide a one-sentence caption for the provided image.", max 64
new tokens; test split, {n} images per world; pycocoevalcap). Slot accuracy: per ground-truth
object, its shape / colour named at its position, and its position named at all; distinct: the
share of test images whose caption no other image (with other objects) got.

| world | CIDEr | BLEU-4 | slot accuracy | shape | colour | position | distinct |
|---|---|---|---|---|---|---|---|
{row('A')}
{row('B')}
{row('C')}

World B adds a shape (star), a colour (purple) and a new caption style; world C draws world A's
scenes as outlines on dark ground (a shift only in pixels). The base has seen neither: they are the
shifts adaptation recipes start from.
""")
    (out / "shapes-clip-base" / "README.md").write_text(f"""---
library_name: open_clip
tags: [mmlora, clip, shapes-world]
---

# shapes-clip-base

A tiny open_clip CLIP (ViT 4x128 at 64 px with 8 px patches — an 8x8 grid — and a 4x128 text
tower; bf16 weights) for mmlora's shapes world. Load it with
`open_clip.create_model_and_transforms("local-dir:PATH")` or `mmlora.models.clip.load_clip`.

How it was made (`{regen}`), on world A ({args.pretrain_images} generated pretraining images and
world A's train split):
1. the image tower alone, {args.tower_steps} steps of 64: linear heads on the patch tokens of its last
   two layers name the shape under every patch (from the generator's masks) and the shape and colour
   in every grid cell. Contrastive captions alone teach colour and position at this data scale but
   hardly shape; the dense labels stand in for the scale real CLIPs see. The heads are dropped; on
   the world-A test objects they named shape {tower['last layer']['shape']:.3f} / colour
   {tower['last layer']['colour']:.3f} (last layer) and {tower['layer -2']['shape']:.3f} /
   {tower['layer -2']['colour']:.3f} (layer -2).
2. contrastive training of both towers, {args.clip_steps} steps of {args.clip_batch}, the image tower at a
   tenth of the learning rate (mmlora's trainer, placement `full`).

Image-to-caption retrieval (top-1 among the test split's first captions, {n} images; chance
{1 / n:.3f}) and training-free dense segmentation (mIoU over all classes, `shapes` templates,
`mmlora eval seg`):

| world | R@1 | """ + " | ".join(f"mIoU {m}" for m in DENSE_MODES) + """ |
|---|---|""" + "---|" * len(DENSE_MODES) + f"""
{clip_row('A')}
{clip_row('B')}
{clip_row('C')}

The class `triangle` is named in world-A captions, so its text embedding is trained, but it is
reserved as an unseen class for dense (segmentation) fine-tuning.

Regenerate: `{regen}`.
""")
    for name in ("shapes-llava-base", "shapes-clip-base"):
        (out / name / "scores.json").write_text(json.dumps(scores["llava" if "llava" in name else "clip"], indent=2) + "\n")


def pretrain_world(work: Path, images: int, seed: int = 0) -> Path:
    """World A's ``pretrain`` split of ``images`` images under ``work`` (generated once)."""
    from mmlora.showcase.shapes import generate_world

    root = work / "pretrain_world"
    meta = root / "world_A" / "world.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("splits") != {"pretrain": images}:
        shutil.rmtree(root, ignore_errors=True)
        generate_world(root, "A", {"pretrain": images}, seed=seed)
    return root / "world_A"


def main(argv: list[str] | None = None) -> int:
    from mmlora.showcase.shapes import cached_worlds

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "mmlora" / "bases")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bases")
    p.add_argument("--pretrain-images", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tower-steps", type=int, default=3000)
    p.add_argument("--clip-steps", type=int, default=600)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument("--stage1-steps", type=int, default=500)
    p.add_argument("--stage2-steps", type=int, default=2000)
    p.add_argument("--eval-limit", type=int, default=None, help="test images per world (default: all 200)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start, cpu = time.time(), time.process_time()
    worlds = cached_worlds()
    pretrain = pretrain_world(args.work, args.pretrain_images)
    tower = pretrain_tower(pretrain, worlds / "world_A", args.work, args.tower_steps, seed=args.seed)
    clip_dir = pretrain_clip(worlds, pretrain, tower, args.work, args.out, args.clip_steps, args.clip_batch)
    llava_dir = pretrain_llava(worlds, pretrain, clip_dir, args.work, args.out, args.stage1_steps, args.stage2_steps)
    scores = evaluate(worlds, llava_dir, clip_dir, args.work, args.eval_limit)
    scores["clip"]["tower"] = json.loads((args.work / "tower_scores.json").read_text())
    write_cards(args.out, scores, args)
    print(json.dumps(scores, indent=2))
    print(f"pretrain_bases: {time.time() - start:.0f}s wall, {time.process_time() - cpu:.0f}s CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
