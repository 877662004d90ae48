import json

import torch

from mmlora.cli import main
from mmlora.models.text import IMAGENET_TEMPLATES, SHAPES_CAPTION_TEMPLATES, class_embeddings, template_list


def test_imagenet_templates_are_clips_eighty():
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


def test_shapes_caption_templates_are_the_worlds_caption_frame(shapes_small):
    """Every size x colour x position of world A's first caption template, the class word in the shape's slot."""
    assert template_list("shapes-captions") is SHAPES_CAPTION_TEMPLATES
    assert len(SHAPES_CAPTION_TEMPLATES) == 2 * 4 * 9 == len(set(SHAPES_CAPTION_TEMPLATES))
    captions = json.loads((shapes_small / "world_A" / "annotations" / "captions_train.json").read_text())
    said = {a["caption"] for a in captions["annotations"]}
    objects = [im["objects"][0] for im in captions["images"] if len(im["objects"]) == 1]
    framed = {f"a {o['size']} {o['colour']} {{}} in the {o['position']}." for o in objects}
    assert framed <= set(SHAPES_CAPTION_TEMPLATES)  # the positions, sizes and colours world A uses
    o = objects[0]
    assert f"a {o['size']} {o['colour']} {{}} in the {o['position']}.".format(o["shape"]) in said


def test_class_embeddings_average_synonyms_and_templates(tiny_clip_dir):
    from mmlora.models.loading import load_clip

    model, _, tokenizer = load_clip(tiny_clip_dir)
    templates = ["a {}.", "there is a {}."]
    emb = class_embeddings(model, tokenizer, ["circle|ring", "star"], templates)
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        parts = torch.nn.functional.normalize(model.encode_text(tokenizer(["a circle.", "there is a circle.", "a ring.", "there is a ring."])), dim=-1)
    assert torch.allclose(emb[0], torch.nn.functional.normalize(parts.mean(0), dim=0), atol=1e-5)


def test_eval_seg_writes_metrics_with_the_protocol(shapes_small, tiny_clip_dir, tmp_path, capsys):
    assert main(["eval", "seg", "--data", str(shapes_small / "world_A"), "--split", "val", "--clip", str(tiny_clip_dir),
                 "--modes", "vanilla,clearclip", "--crop", "64", "--stride", "32", "--unseen", "triangle",
                 "--limit", "3", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    p = report["protocol"]
    assert (p["crop"], p["stride"], p["short_side"], p["num_images"], p["split"]) == (64, 32, 64, 3, "val")
    for mode in ("vanilla", "clearclip"):
        s = report["modes"][mode]
        assert 0.0 <= s["mIoU"] <= 1.0 and 0.0 <= s["aAcc"] <= 1.0 and set(s["IoU"]) == set(p["classes"])
    assert "| clearclip |" in (tmp_path / "table.md").read_text() and "| vanilla |" in capsys.readouterr().out
    assert main(["eval", "seg", "--data", str(shapes_small / "world_A"), "--modes", "bogus", "--out", str(tmp_path)]) == 2
