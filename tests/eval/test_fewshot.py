import json

import numpy as np
import torch
from PIL import Image

from mmlora.cli import main
from mmlora.eval.fewshot import classify, labelled_images, support_indices


def test_seg_folder_labels_are_the_dominant_non_background_class(shapes_small):
    world = shapes_small / "world_A"
    classes, items = labelled_images(world, "val")
    all_classes = (world / "classes.txt").read_text().split()
    assert "background" not in classes
    for path, label in items:
        mask = np.asarray(Image.open(world / "masks" / "val" / f"{path.stem}.png"))
        counts = {all_classes[v]: int((mask == v).sum()) for v in np.unique(mask) if v != 255 and all_classes[v] != "background"}
        assert classes[label] == max(counts, key=counts.get)


def test_support_sets_are_k_per_class_and_seeded():
    labels = [0] * 10 + [1] * 3 + [2] * 7
    a, b, c = support_indices(labels, 4, 0), support_indices(labels, 4, 0), support_indices(labels, 4, 1)
    assert a == b and a != c
    assert [labels[i] for i in a] == [0] * 4 + [1] * 3 + [2] * 4  # class 1 has only 3 images


def test_prototype_and_zero_shot_rules():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    support = torch.nn.functional.normalize(torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]]), dim=-1)
    labels = torch.tensor([1, 1, 0])  # prototypes point the other way than the text embeddings
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=-1)
    assert classify("zero-shot", query, text, None, None, 2).tolist() == [0, 1]
    assert classify("prototype", query, text, support, labels, 2).tolist() == [1, 0]


def test_eval_fewshot_on_an_image_folder_and_a_seg_folder(tiny_clip_dir, shapes_small, tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 3)):
        for name, rgb in (("red square", (220, 30, 30)), ("blue square", (30, 30, 220))):
            folder = tmp_path / "imgs" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                arr = np.full((40, 40, 3), 128, np.uint8)
                arr[10:30, 10:30] = np.array(rgb) + rng.integers(-20, 20, 3)
                Image.fromarray(arr.astype(np.uint8)).save(folder / f"{i}.png")
    assert main(["eval", "fewshot", "--data", str(tmp_path / "imgs"), "--model", f"tiny={tiny_clip_dir}",
                 "--shots", "1,2", "--seeds", "2", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["protocol"]["classes"] == ["blue square", "red square"] and report["protocol"]["num_test"] == 6
    assert set(report["rows"]) == {"tiny/zero-shot", "tiny/prototype/1-shot", "tiny/prototype/2-shot",
                                   "tiny/blend/1-shot", "tiny/blend/2-shot"}
    # Colour is what separates these images: class means of any shots classify the test images.
    assert report["rows"]["tiny/prototype/2-shot"]["accuracy"] == 1.0
    assert len(report["rows"]["tiny/blend/1-shot"]["per_seed"]) == 2
    assert "| tiny/zero-shot |" in capsys.readouterr().out
    assert main(["eval", "fewshot", "--data", str(shapes_small / "world_A"), "--model", f"t={tiny_clip_dir}",
                 "--shots", "1", "--seeds", "1", "--test-split", "val", "--out", str(tmp_path / "seg")]) == 0
    assert main(["eval", "fewshot", "--data", str(tmp_path / "nowhere"), "--model", f"t={tiny_clip_dir}",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["eval", "fewshot", "--data", str(tmp_path / "imgs"), "--model", f"t={tiny_clip_dir}",
                 "--shots", "0", "--out", str(tmp_path / "x")]) == 2
