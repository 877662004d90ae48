"""The demo pipeline end to end on tiny models and the small shapes world (the real demo's numbers
are in the README; here: every stage runs, and the table shows what the evaluations wrote)."""

import json

import yaml
from PIL import Image

from mmlora.showcase.demo import CLIP_RECIPE, LLAVA_RECIPE, _train, ensure_worlds, format_report, run_demo
from tests.conftest import SMALL_SCALE


def _tiny(recipe, model: str, tmp_path, name: str):
    data = yaml.safe_load(recipe.read_text())
    data["model"]["name"] = model
    if "layers" in data["placement"].get("vision", {}):
        data["placement"]["vision"]["layers"] = [0]  # the layer the tiny LLaVA's projector reads
    data["data"].pop("max_length", None)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_trains_evaluates_and_reports_before_after(shapes_small, tiny_llava_dir, tiny_clip_dir, tmp_path):
    logs = []
    kwargs = dict(out_dir=tmp_path / "demo", data_dir=shapes_small,
                  llava_recipe=_tiny(LLAVA_RECIPE, "tiny-llava", tmp_path, "llava"),
                  clip_recipe=_tiny(CLIP_RECIPE, "tiny-clip", tmp_path, "clip"),
                  llava_overrides={"max_steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2},
                  clip_overrides={"max_steps": 2, "batch_size": 4, "eval_every": 2, "save_every": 2},
                  caption_limit=3, seg_limit=2, scale=SMALL_SCALE, log=logs.append)
    r = run_demo(**kwargs)
    cap = json.loads((tmp_path / "demo" / "eval_caption" / "metrics.json").read_text())
    seg = json.loads((tmp_path / "demo" / "eval_seg" / "metrics.json").read_text())
    assert r.before["CIDEr"] == cap["models"]["base"]["scores"]["CIDEr"]
    assert r.after["BLEU-4"] == cap["models"]["adapted"]["scores"]["BLEU-4"]
    assert r.after["mIoU seen"] == seg["modes"]["adapted/vanilla"]["mIoU_seen"]
    assert r.before["mIoU unseen"] == seg["modes"]["base/vanilla"]["mIoU_unseen"]
    assert r.unseen == ["triangle"]
    assert seg["protocol"]["templates"] == "shapes-captions"  # the prompts the CLIP recipe trained with
    assert set(seg["modes"]) == {f"{n}/{m}" for n in ("base", "adapted") for m in ("vanilla", "clearclip")}
    assert Image.open(r.outputs["overlay"]).size == (4 * 3 * 128, 3 * 128 + 22)
    text = format_report(r, 60.0)
    for label in ("CIDEr", "BLEU-4", "slot accuracy", "star recall", "purple recall", "mIoU seen",
                  "mIoU unseen (triangle)", "overlay"):
        assert label in text
    # novel-concept recall is computed from the captions the evaluation wrote, against world B's objects
    from mmlora.eval.caption import CaptionSet
    from mmlora.showcase.slots import novel_recall

    written = [json.loads(x) for x in (tmp_path / "demo" / "eval_caption" / "captions_adapted.jsonl").read_text().splitlines()]
    data = CaptionSet.from_coco(shapes_small / "world_B" / "annotations" / "captions_test.json", limit=3)
    want = novel_recall({x["image_id"]: x["caption"] for x in written}, data.objects)
    assert (r.after["star recall"], r.after["purple recall"]) == (want["novel_shape"], want["novel_colour"])
    # A second demo reuses the finished runs; a changed recipe retrains its run (and only that one).
    logs.clear()
    run_demo(**kwargs)
    assert sum("reusing" in line for line in logs) == 2
    logs.clear()
    data_dir = ensure_worlds(shapes_small, SMALL_SCALE)
    _train(kwargs["llava_recipe"], data_dir, tmp_path / "demo" / "llava-lora-b-wide",
           {**kwargs["llava_overrides"], "max_steps": 3}, logs.append)
    assert sum("trained by another recipe" in line for line in logs) == 1 and not any("reusing" in line for line in logs)
    metrics = (tmp_path / "demo" / "llava-lora-b-wide" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == 3


def test_the_demo_reads_only_worlds_it_generated(shapes_small, tmp_path):
    """Worlds generated with other settings are left alone: the demo generates its own beside its runs
    (once), and an empty folder gets the worlds generated in place."""
    logs = []
    assert ensure_worlds(shapes_small, SMALL_SCALE, tmp_path / "own", logs.append) == shapes_small
    assert not logs and not (tmp_path / "own").exists()
    other_scale = SMALL_SCALE / 2
    used = ensure_worlds(shapes_small, other_scale, tmp_path / "own", logs.append)
    assert used == tmp_path / "own" and (used / "world_C" / "world.json").is_file()
    assert "splits" in logs[0] and str(tmp_path / "own") in logs[0]
    stamp = (used / "world_B" / "world.json").stat().st_mtime_ns
    assert ensure_worlds(shapes_small, other_scale, tmp_path / "own", logs.append) == used
    assert (used / "world_B" / "world.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    fresh = tmp_path / "fresh"
    assert ensure_worlds(fresh, other_scale, tmp_path / "own2", logs.append) == fresh
    assert not (tmp_path / "own2").exists()
