import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlora.showcase import shapes
from mmlora.showcase.shapes import CLASSES, COLOURS, POSITIONS, WORLDS, generate_world


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files(tmp_path):
    a = generate_world(tmp_path / "one", "B", {"train": 6, "val": 2}, seed=7, image_size=64)
    b = generate_world(tmp_path / "two", "B", {"train": 6, "val": 2}, seed=7, image_size=64)
    c = generate_world(tmp_path / "three", "B", {"train": 6, "val": 2}, seed=8, image_size=64)
    assert _digest(a) == _digest(b)
    assert len(_digest(a)) == 2 * 6 + 2 * 2 + 2 * 3 + 2  # images+masks, 3 files per split, 2 world files
    differing = [k for k, v in _digest(a).items() if _digest(c).get(k) != v]
    assert any(k.startswith("images/") for k in differing)


def test_images_do_not_depend_on_split_size(tmp_path):
    small = generate_world(tmp_path / "s", "A", {"train": 3}, seed=1, image_size=64)
    big = generate_world(tmp_path / "b", "A", {"train": 5}, seed=1, image_size=64)
    for i in range(3):
        rel = f"images/train/A_train_{i:05d}.png"
        assert (small / rel).read_bytes() == (big / rel).read_bytes()


def _load_split(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"captions_{split}.json").read_text())


@pytest.mark.parametrize("world", ["A", "B", "C"])
def test_masks_match_the_shapes_drawn(shapes_small, world):
    root = shapes_small / f"world_{world}"
    coco = _load_split(root, "train")
    assert (root / "classes.txt").read_text().split("\n")[:-1] == list(CLASSES)
    for entry in coco["images"]:
        image = np.asarray(Image.open(root / entry["file_name"]).convert("RGB"))
        mask_img = Image.open(root / "masks" / "train" / f"{entry['mmlora_id']}.png")
        assert mask_img.mode == "P"
        mask = np.asarray(mask_img)
        assert mask.shape == image.shape[:2]
        objects = entry["objects"]
        # Only background and the classes of the objects drawn appear in the mask.
        assert set(np.unique(mask).tolist()) <= {0} | {CLASSES.index(o["shape"]) for o in objects}
        # Every object pixel has its object's colour and every pixel of an object colour is labelled.
        object_colours = {tuple(COLOURS[o["colour"]]) for o in objects}
        is_object_colour = np.zeros(mask.shape, bool)
        for colour in object_colours:
            is_object_colour |= (image == np.array(colour)).all(axis=2)
        if world == "C":
            # outlines: every stroke pixel is inside its shape's mask, and the shapes are hollow
            assert not (is_object_colour & (mask == 0)).any()
            assert ((mask > 0) & ~is_object_colour).sum() > 0.2 * (mask > 0).sum()
        else:
            assert np.array_equal(is_object_colour, mask > 0)
        for o in objects:
            cls = CLASSES.index(o["shape"])
            cx, cy = int(round(o["cx"])), int(round(o["cy"]))
            assert mask[cy, cx] == cls, f"{entry['mmlora_id']}: centre of {o} is not labelled {o['shape']}"
            if world == "C":
                assert (is_object_colour & (mask == cls)).any(), f"{entry['mmlora_id']}: {o} has no stroke"
            else:
                assert tuple(image[cy, cx]) == COLOURS[o["colour"]]
        # Background pixels are grey (R=G=B), so they can never be mistaken for an object; light in
        # A and B, dark in C.
        bg = image[mask == 0]
        assert (bg[:, 0] == bg[:, 1]).all() and (bg[:, 1] == bg[:, 2]).all()
        assert (bg[:, 0] <= 85).all() if world == "C" else (bg[:, 0] >= 150).all()


def test_coco_captions_load_with_pycocotools(shapes_small):
    from pycocotools.coco import COCO

    path = shapes_small / "world_A" / "annotations" / "captions_val.json"
    coco = COCO(str(path))
    ids = coco.getImgIds()
    assert len(ids) == 10
    anns = coco.loadAnns(coco.getAnnIds(imgIds=ids[0]))
    assert len(anns) == 5 and all(isinstance(a["caption"], str) for a in anns)


@pytest.mark.parametrize("world", ["A", "B", "C"])
def test_captions_name_every_object(shapes_small, world):
    coco = _load_split(shapes_small / f"world_{world}", "train")
    caps: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    for entry in coco["images"]:
        for cap in caps[entry["id"]]:
            for o in entry["objects"]:
                assert f"{o['size']} {o['colour']} {o['shape']}" in cap
                assert o["position"] in cap


def test_world_b_carries_the_shift_and_a_does_not(shapes_small):
    a = _load_split(shapes_small / "world_A", "train")
    b = _load_split(shapes_small / "world_B", "train")
    for entry in a["images"]:
        for o in entry["objects"]:
            assert o["shape"] in WORLDS["A"].shapes and o["colour"] in WORLDS["A"].colours
    for entry in b["images"]:
        assert any(o["shape"] == "star" or o["colour"] == "purple" for o in entry["objects"])
    a_caps = {x["caption"] for x in a["annotations"]}
    b_caps = {x["caption"] for x in b["annotations"]}
    assert not any(" holds a " in c for c in a_caps)
    assert all(any(p in c for p in POSITIONS) and (" holds a " in c or ": " in c or " shows a " in c) for c in b_caps)


def test_llava_json_follows_the_llava_format(shapes_small):
    root = shapes_small / "world_A"
    data = json.loads((root / "llava_train.json").read_text())
    assert len(data) == 100
    ids = set()
    for item in data:
        assert set(item) == {"id", "image", "conversations"}
        assert (root / item["image"]).is_file()
        conv = item["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert conv[0]["value"].count("<image>") == 1 and conv[0]["value"].startswith("<image>\n")
        assert "<image>" not in conv[1]["value"]
        ids.add(item["id"])
    assert len(ids) == len(data)


def test_voc_layout_and_segmentation_resolution(shapes_small):
    root = shapes_small / "world_A"
    ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert len(ids) == 10
    meta = json.loads((root / "world.json").read_text())
    assert meta["image_size"] >= 16 * 8  # a 16x16 patch grid for a patch-8 CLIP
    assert meta["spec"]["unseen_dense_classes"] == ["triangle"]
    for i in ids:
        assert (root / "images" / "val" / f"{i}.png").is_file() and (root / "masks" / "val" / f"{i}.png").is_file()


def test_corpus_covers_every_caption_word():
    words = {w for line in shapes.corpus() for w in line.replace(".", " ").replace(";", " ").replace(",", " ").split()}
    for name in list(COLOURS) + list(CLASSES[1:]) + ["top", "left", "holds", "large", "small"]:
        assert name in words


def test_the_shipped_tokenizer_corpus_is_the_worlds_corpus():
    from mmlora.models.corpus import tokenizer_corpus

    assert tokenizer_corpus() == shapes.corpus()


def test_world_c_is_world_a_in_other_pixels(shapes_small):
    """World C's shift lives only in pixels: A's vocabulary and caption templates, A's layout rules."""
    a = _load_split(shapes_small / "world_A", "train")
    c = _load_split(shapes_small / "world_C", "train")

    def template(caption: str, objects: list[dict]) -> str:
        for o in objects:
            caption = caption.replace(f"a {o['size']} {o['colour']} {o['shape']} in the {o['position']}", "OBJ")
        return caption.replace("textured", "BG").replace("plain", "BG")

    def templates(coco: dict) -> set[str]:
        objects = {e["id"]: e["objects"] for e in coco["images"]}
        return {template(x["caption"], objects[x["image_id"]]) for x in coco["annotations"]}

    assert templates(c) <= templates(a)
    for entry in c["images"]:
        assert 1 <= len(entry["objects"]) <= 3
        for o in entry["objects"]:
            assert o["shape"] in WORLDS["A"].shapes and o["colour"] in WORLDS["A"].colours
    meta = json.loads((shapes_small / "world_C" / "world.json").read_text())
    assert meta["spec"]["render"] == "outline" and meta["spec"]["caption_style"] == "plain"
