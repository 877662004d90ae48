"""Slot accuracy for the shapes world: which shape, colour and position a caption names, per object.

The shapes world's captions name every object's shape, colour and grid position, so a caption can be
scored slot by slot against the ground-truth objects (``objects`` in the world's COCO file). The
captioning evaluation takes this as an extra scorer (``mmlora eval caption`` adds it when the data
carry objects).
"""

from __future__ import annotations

import re

from mmlora.showcase.shapes import COLOURS, POSITIONS, WORLDS

_SHAPES = ("circle", "square", "triangle", "cross", "star")


_POS_RE = re.compile("|".join(sorted((re.escape(p) for p in POSITIONS), key=len, reverse=True)))


def parse_objects(caption: str) -> list[dict[str, str | None]]:
    """Objects named in a caption of either world's style: clauses split at ``and``/``,``/``;``,
    each with a shape word, the colour word before it, and a position phrase."""
    text = caption.lower().replace("from top to bottom,", " ")
    clauses = re.split(r";|,| and ", text)
    found = []
    for clause in clauses:
        shape = next((s for s in _SHAPES if re.search(rf"\b{s}\b", clause)), None)
        if shape is None:
            continue
        colour = next((c for c in COLOURS if re.search(rf"\b{c}\b", clause)), None)
        pos = _POS_RE.search(clause)
        found.append({"shape": shape, "colour": colour, "position": pos.group(0) if pos else None})
    return found


def slot_accuracy(caption: str, objects: list[dict]) -> dict[str, float]:
    """Per ground-truth object, is its shape / colour named at its position? (and position itself)"""
    parsed = parse_objects(caption)
    by_pos = {p["position"]: p for p in parsed if p["position"]}
    hits = {"shape": 0, "colour": 0, "position": 0}
    for obj in objects:
        pred = by_pos.get(obj["position"])
        if pred is None:
            continue
        hits["position"] += 1
        hits["shape"] += pred["shape"] == obj["shape"]
        hits["colour"] += pred["colour"] == obj["colour"]
    n = max(len(objects), 1)
    out = {k: v / n for k, v in hits.items()}
    out["all"] = sum(out.values()) / 3
    return out


def mean_slot_accuracy(results: dict[int, str], objects: dict[int, list[dict]]) -> dict[str, float]:
    per = [slot_accuracy(results[i], objects[i]) for i in results if i in objects]
    if not per:
        return {}
    return {f"slot_{k}": sum(p[k] for p in per) / len(per) for k in per[0]}



def slot_scores(results: dict[int, str], data) -> dict[str, float]:
    """The captioning evaluation's extra scorer: mean slot accuracy over the images of ``data``
    (a ``CaptionSet``) that carry ground-truth objects; nothing for data without them."""
    return mean_slot_accuracy(results, data.objects)


#: The concepts world A never shows, by slot: world B's new shape and colour.
NOVEL = {"shape": WORLDS["B"].novel_shapes[0], "colour": WORLDS["B"].novel_colours[0]}


def novel_recall(captions: dict[int, str], objects: dict[int, list[dict]],
                 novel: dict[str, str] = NOVEL) -> dict[str, float | None]:
    """Of the ground-truth objects with a novel shape (colour), the share a caption names right at
    their position; ``None`` where no object has it."""
    hits = {k: [0, 0] for k in novel}
    for image_id, caption in captions.items():
        by_pos = {p["position"]: p for p in parse_objects(caption) if p["position"]}
        for obj in objects.get(image_id, []):
            for slot, value in novel.items():
                if obj[slot] == value:
                    hits[slot][1] += 1
                    hits[slot][0] += by_pos.get(obj["position"], {}).get(slot) == value
    return {f"novel_{k}": (h / n if n else None) for k, (h, n) in hits.items()}
