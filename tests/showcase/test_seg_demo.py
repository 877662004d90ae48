import numpy as np
from PIL import Image

from mmlora.cli import main


def test_demo_seg_writes_an_overlay_and_an_index_mask_of_the_input_size(tiny_clip_dir, tmp_path, capsys):
    arr = np.full((97, 150, 3), 200, np.uint8)
    arr[20:60, 30:90] = (220, 40, 40)
    Image.fromarray(arr).save(tmp_path / "photo.jpg")
    out = tmp_path / "out" / "overlay.png"
    assert main(["demo", "seg", str(tmp_path / "photo.jpg"), "--classes", "background,red square|red box,circle",
                 "--run", str(tiny_clip_dir), "--method", "maskclip", "--out", str(out)]) == 0
    overlay, mask = Image.open(out), Image.open(tmp_path / "out" / "overlay_mask.png")
    assert overlay.size == mask.size == (150, 97)
    assert mask.mode == "P" and np.asarray(mask).max() < 3
    assert not np.array_equal(np.asarray(overlay.convert("RGB")), arr)  # coloured in
    printed = capsys.readouterr().out
    assert "red square|red box" in printed and str(out) in printed


def test_demo_seg_refuses_bad_input(tiny_clip_dir, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    assert main(["demo", "seg", str(tmp_path / "x.png"), "--classes", "a,b", "--method", "nope",
                 "--run", str(tiny_clip_dir), "--out", str(tmp_path / "o.png")]) == 2
    assert main(["demo", "seg", str(tmp_path / "missing.png"), "--classes", "a,b", "--run", str(tiny_clip_dir),
                 "--out", str(tmp_path / "o.png")]) == 2
    assert main(["demo", "seg", str(tmp_path / "x.png"), "--classes", "a,,b", "--run", str(tiny_clip_dir),
                 "--out", str(tmp_path / "o.png")]) == 2
