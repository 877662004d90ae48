"""The ``mixture`` data of the packing benchmark: instruction data whose lengths vary as real mixes do.

Built from world-A scenes (their images and object lists), in LLaVA's JSON format, seeded:

* 40% short VQA — one question about one object, a one- or two-word answer;
* 30% captions — the scene's caption;
* 15% long multi-turn chats — 8 to 40 question/answer turns about the scene's objects;
* 15% text-only chats — 1 to 12 turns about shapes and colours, no image.

LLaVA-1.5's 665k mix has the same shape of spread (one-word VQA answers next to long conversations,
text-only ShareGPT turns among them); the report prints the token-length histogram of what was built.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

#: sample kind → share of the mixture
SHARES = {"vqa": 0.40, "caption": 0.30, "chat": 0.15, "text": 0.15}
SIDES = {"circle": "no corners", "square": "four corners", "triangle": "three corners", "cross": "twelve corners"}


def _turns(pairs: list[tuple[str, str]], image: bool) -> list[dict]:
    conv = []
    for k, (q, a) in enumerate(pairs):
        conv += [{"from": "human", "value": ("<image>\n" if image and k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return conv


def _object_pairs(objects: list[dict], rng: random.Random) -> list[tuple[str, str]]:
    o = rng.choice(objects)
    asks = [(f"what colour is the {o['shape']} in the {o['position']}?", f"{o['colour']}."),
            (f"what shape is in the {o['position']}?", f"a {o['shape']}."),
            (f"is the {o['colour']} {o['shape']} small or large?", f"{o['size']}."),
            ("how many shapes are there?", f"{len(objects)}.")]
    return [rng.choice(asks)]


def build(scenes: list[dict], captions: dict[int, str], n: int, seed: int = 0) -> list[dict]:
    """``n`` samples drawn from ``scenes`` (COCO ``images`` entries with ``objects``) in :data:`SHARES`."""
    rng = random.Random(seed)
    kinds = [k for k, share in SHARES.items() for _ in range(round(share * n))][:n]
    kinds += ["vqa"] * (n - len(kinds))
    rng.shuffle(kinds)
    out = []
    for i, kind in enumerate(kinds):
        scene = rng.choice(scenes)
        objects = scene["objects"]
        record = {"id": f"mix_{i:05d}_{kind}"}
        if kind == "vqa":
            conv = _turns(_object_pairs(objects, rng), image=True)
        elif kind == "caption":
            conv = _turns([("provide a one-sentence caption for the provided image.", captions[scene["id"]])], image=True)
        elif kind == "chat":
            pairs = [pair for _ in range(rng.randint(8, 40)) for pair in _object_pairs(objects, rng)]
            conv = _turns(pairs, image=True)
        else:
            pairs = []
            for _ in range(rng.randint(1, 12)):
                shape = rng.choice(sorted(SIDES))
                pairs.append((f"how many corners does a {shape} have?", f"a {shape} has {SIDES[shape]}."))
            conv = _turns(pairs, image=False)
        record["conversations"] = conv
        if kind != "text":
            record["image"] = scene["file_name"]
        out.append(record)
    return out


def prepare_mixture(n: int, world: Path, out: Path, seed: int = 0, name: str = "mixture.json") -> Path:
    """The mixture as a LLaVA JSON in ``out`` (images stay in ``world``)."""
    coco = json.loads((world / "annotations" / "captions_train.json").read_text())
    captions = {a["image_id"]: a["caption"] for a in coco["annotations"]}
    path = out / name
    path.write_text(json.dumps(build(coco["images"], captions, n, seed)))
    return path


def histogram(lengths: list[int], kinds: list[str], edges: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)) -> str:
    """A markdown table: samples per token-length bin, per kind and in all."""
    names = sorted(set(kinds), key=list(SHARES).index)
    bins = [f"≤{e}" for e in edges] + [f">{edges[-1]}"]

    def which(n: int) -> int:
        return next((k for k, e in enumerate(edges) if n <= e), len(edges))

    rows = ["| tokens | " + " | ".join(names) + " | all |", "|---|" + "---|" * (len(names) + 1)]
    for b, label in enumerate(bins):
        counts = [sum(1 for n, k in zip(lengths, kinds) if k == name and which(n) == b) for name in names]
        rows.append(f"| {label} | " + " | ".join(map(str, counts)) + f" | {sum(counts)} |")
    rows.append(f"\nlengths {min(lengths)}–{max(lengths)} tokens (image tokens included), mean {sum(lengths) / len(lengths):.0f}.")
    return "\n".join(rows)


def padding_share(lengths: list[int], batch_size: int, seeds: int = 20) -> tuple[float, float, float]:
    """The share of token cells that are padding when HF Trainer's ``group_by_length`` orders
    ``lengths`` into batches of ``batch_size`` (its own ``get_length_grouped_indices``): (mean, min,
    max) over ``seeds`` shuffles. It groups within random mega-batches of ``min(n // (4 x batch), 50)``
    batches, so how much padding it leaves depends on the dataset's size as well as its lengths."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    shares = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        order = get_length_grouped_indices(lengths, batch_size, generator=generator)
        batches = [[lengths[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
        shares.append(1 - sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches))
    return sum(shares) / len(shares), min(shares), max(shares)

