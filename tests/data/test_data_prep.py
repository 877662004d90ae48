import json

import numpy as np
from PIL import Image

from data_prep import coco_to_llava, llava_hf, seg_layouts
from mmlora.data.readers import read_hf, read_llava
from mmlora.data.segmentation import SegmentationFolder


def test_coco_to_llava_round_trip(shapes_small, tmp_path):
    root = shapes_small / "world_A"
    out = tmp_path / "llava.json"
    assert coco_to_llava.main([str(root / "annotations" / "captions_val.json"), "--out", str(out), "--captions", "first"]) == 0
    items = json.loads(out.read_text())
    assert len(items) == 10
    # image paths are relative to the output folder: point it at the world's folder to read them
    records = read_llava(out, image_root=root)
    assert all(r.images[0].is_file() for r in records)


def test_llava_to_hf_and_back(shapes_small, tmp_path):
    src = shapes_small / "world_B" / "llava_val.json"
    assert llava_hf.main(["to-hf", str(src), "--out", str(tmp_path / "hf")]) == 0
    records = read_hf(tmp_path / "hf")
    original = read_llava(src)
    assert [r.messages for r in records] == [r.messages for r in original]
    assert llava_hf.main(["from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.json")]) == 0
    back = read_llava(tmp_path / "back.json")
    assert [r.messages for r in back] == [r.messages for r in original]
    a = np.asarray(Image.open(back[0].images[0]).convert("RGB"))
    b = np.asarray(Image.open(original[0].images[0]).convert("RGB"))
    assert np.array_equal(a, b)


def _voc_like(root, image_dir, mask_dir, sets_dir, values):
    for split, ids in (("train", ["a", "b"]), ("val", ["c"])):
        (root / sets_dir).mkdir(parents=True, exist_ok=True)
        (root / sets_dir / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            (root / image_dir).mkdir(parents=True, exist_ok=True)
            (root / mask_dir).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 4)).save(root / image_dir / f"{i}.jpg")
            Image.fromarray(np.full((4, 6), values, np.uint8)).save(root / mask_dir / f"{i}.png")


def test_voc_and_context_layouts(tmp_path):
    _voc_like(tmp_path / "voc", "JPEGImages", "SegmentationClass", "ImageSets/Segmentation", 15)
    assert seg_layouts.main(["voc", str(tmp_path / "voc"), "--out", str(tmp_path / "out_voc")]) == 0
    folder = SegmentationFolder(tmp_path / "out_voc", "train")
    assert len(folder) == 2 and folder.classes[15] == "person" and folder.load(0)[1].max() == 15
    _voc_like(tmp_path / "ctx", "JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext", 2)
    (tmp_path / "names.txt").write_text("background\nwall\nsky\n")
    assert seg_layouts.main(["context", str(tmp_path / "ctx"), "--classes", str(tmp_path / "names.txt"),
                             "--out", str(tmp_path / "out_ctx")]) == 0
    assert SegmentationFolder(tmp_path / "out_ctx", "val").load(0)[1].max() == 2


def test_ade20k_layout_reduces_zero_label(tmp_path):
    root = tmp_path / "ade"
    for src in ("training", "validation"):
        (root / "images" / src).mkdir(parents=True)
        (root / "annotations" / src).mkdir(parents=True)
        Image.new("RGB", (4, 2)).save(root / "images" / src / "x.jpg")
        Image.fromarray(np.array([[0, 1, 2, 150]] * 2, np.uint8)).save(root / "annotations" / src / "x.png")
    assert seg_layouts.main(["ade20k", str(root), "--out", str(tmp_path / "out")]) == 0
    _, mask = SegmentationFolder(tmp_path / "out", "val").load(0)
    assert mask[0].tolist() == [255, 0, 1, 149]
