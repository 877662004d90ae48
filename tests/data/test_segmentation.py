import json

import numpy as np
import pytest
from PIL import Image

from mmlora.data.samples import BadSample
from mmlora.data.segmentation import IGNORE_INDEX, SegmentationFolder, reduce_zero_label


def test_reads_the_shapes_world(shapes_small):
    folder = SegmentationFolder(shapes_small / "world_A", "val")
    assert len(folder) == 10 and folder.classes[0] == "background"
    image, mask = folder.load(0)
    assert image.size == (128, 128) and mask.shape == (128, 128) and mask.max() < len(folder.classes)


def _folder(tmp_path, mask: np.ndarray, image_size=(8, 8), classes=("a", "b", "c"), meta=None):
    (tmp_path / "images" / "val").mkdir(parents=True)
    (tmp_path / "masks" / "val").mkdir(parents=True)
    Image.new("RGB", image_size).save(tmp_path / "images" / "val" / "x.png")
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "masks" / "val" / "x.png")
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    if meta:
        (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def test_ignore_index_and_reduce_zero_label(tmp_path):
    mask = np.array([[0, 1, 2, 3], [255, 3, 2, 1]] * 4)[:, :4].repeat(2, axis=1)
    folder = SegmentationFolder(_folder(tmp_path, mask, meta={"reduce_zero_label": True}), "val")
    _, out = folder.load(0)
    assert (out[mask == 0] == IGNORE_INDEX).all() and (out[mask == 255] == IGNORE_INDEX).all()
    assert (out[mask == 3] == 2).all() and (out[mask == 1] == 0).all()
    assert np.array_equal(reduce_zero_label(np.array([[0, 1, 255]])), np.array([[255, 0, 255]]))


def test_mask_of_another_size_is_a_bad_sample(tmp_path):
    folder = SegmentationFolder(_folder(tmp_path, np.zeros((4, 4)), image_size=(8, 8)), "val")
    with pytest.raises(BadSample, match=r"mask is 4x4 but image is 8x8"):
        folder.load(0)


def test_mask_values_outside_the_classes_are_a_bad_sample(tmp_path):
    mask = np.zeros((8, 8))
    mask[0, 0] = 7
    folder = SegmentationFolder(_folder(tmp_path, mask), "val")
    with pytest.raises(BadSample, match=r"mask values \[7\] are outside the 3 classes"):
        folder.load(0)
