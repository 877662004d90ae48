"""Composition: reference grammar, mixed-adapter batches against each adapter alone (plain PEFT),
weighted merges against the formula, and the commands that take compositions."""

import pytest
import torch

from mmlora.cli import main
from mmlora.runs.compose import adapters_per_sample, load_adapter_set, parse_composition, weighted_merge
from mmlora.errors import MmloraError
from tests.adapter_runs import CLIP_PLACEMENT, LLAVA_PLACEMENT, make_run


@pytest.fixture(scope="module")
def llava_runs(tmp_path_factory, tiny_llava_dir):
    tmp = tmp_path_factory.mktemp("compose")
    return [make_run(tmp / name, "tiny-llava", LLAVA_PLACEMENT, seed) for name, seed in (("red", 1), ("blue", 2))]


def _plain_peft(run):
    """An independent reference: the base from transformers, the adapter with PeftModel alone."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from mmlora.models.presets import preset_path

    base = LlavaForConditionalGeneration.from_pretrained(preset_path("tiny-llava"), dtype=torch.float32)
    return PeftModel.from_pretrained(base, run / "final" / "adapters" / "default").eval()


def test_grammar():
    comp = parse_composition("runs/a+runs/b:ties:0.7,0.3:density=0.5")
    assert [str(r) for r in comp.runs] == ["runs/a", "runs/b"] and comp.method == "ties"
    assert comp.weights == [0.7, 0.3] and comp.options == {"density": 0.5} and comp.names == ["a", "b"]
    assert parse_composition("runs/a") is None
    assert parse_composition("x/final+y/final").method == "mixed"
    assert parse_composition("a+b:linear").weights == [0.5, 0.5]
    for bad, msg in (("a+b:average", "unknown combination"), ("a+b:linear:1,2,3", "3 weights for 2 runs"),
                     ("a+b:mixed:0.5,0.5", "mixed takes no weights"), ("a+b:ties:1,1:rho=2", "unknown option")):
        with pytest.raises(MmloraError, match=msg):
            parse_composition(bad)


def test_mixed_batch_equals_each_adapter_alone(llava_runs, shapes_small):
    from tests.placement.conftest import llava_batch

    model, processor, _ = load_adapter_set(llava_runs)
    batch = llava_batch(processor, shapes_small, n=3)
    batch.pop("labels")
    names = ["red", "blue", "__base__"]
    with torch.no_grad(), adapters_per_sample(model, names):
        mixed = model(**batch).logits
    with torch.no_grad():
        for i, run in enumerate(llava_runs):
            alone = _plain_peft(run)(**{k: v[i:i + 1] for k, v in batch.items()}).logits
            assert torch.allclose(mixed[i:i + 1], alone, atol=1e-5)
        with model.disable_adapter():
            base = model(**{k: v[2:3] for k, v in batch.items()}).logits
        assert torch.allclose(mixed[2:3], base, atol=1e-5)
        assert not torch.allclose(mixed[0:1], base, atol=1e-3)  # the adapters do change the outputs
    with pytest.raises(MmloraError, match="non-existing adapter"), adapters_per_sample(model, ["green"] * 3):
        pass


def test_mixed_generation_equals_each_adapter_alone(llava_runs, shapes_small):
    from mmlora.data.samples import load_image
    from mmlora.generate import generate_answers

    images = [load_image(p, "", None) for p in sorted((shapes_small / "world_B/images/test").glob("*.png"))[:2]]
    model, processor, _ = load_adapter_set(llava_runs)
    mixed = generate_answers(model, processor, images, max_new_tokens=6, adapter_names=["red", "blue"])
    for i, run in enumerate(llava_runs):
        assert mixed[i] == generate_answers(_plain_peft(run), processor, images[i:i + 1], max_new_tokens=6)[0]


def test_weighted_cat_merge_is_the_weighted_sum_of_updates(llava_runs):
    model, _, _ = load_adapter_set(llava_runs)
    weighted_merge(model, ["red", "blue"], [0.7, 0.3], "cat")
    layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    expected = sum(w * layer.get_delta_weight(n) for n, w in (("red", 0.7), ("blue", 0.3)))
    assert torch.allclose(layer.get_delta_weight("merged"), expected, atol=1e-5)
    for method in ("linear", "ties", "dare_linear", "svd"):
        weighted_merge(model, ["red", "blue"], [0.5, 0.5], method, new_name=f"m_{method}")
        assert model.active_adapter == f"m_{method}"


def test_commands_take_compositions(llava_runs, shapes_small, tmp_path, capsys):
    images = sorted((shapes_small / "world_B/images/test").glob("*.png"))[:2]
    ref = "+".join(str(r) for r in llava_runs)
    assert main(["predict", ref, "--image", str(images[0]), "--adapter", "blue", "--image", str(images[1]),
                 "--adapter", "red", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["blue", "red"]
    assert main(["predict", ref + ":linear:0.5,0.5", "--image", str(images[0]), "--max-new-tokens", "4"]) == 0
    assert main(["predict", str(llava_runs[0]), "--image", str(images[0]), "--adapter", "x"]) == 2


@pytest.mark.slow  # pycocoevalcap's Java scorers
def test_eval_caption_routes_a_mixed_composition(llava_runs, shapes_small, tmp_path):
    ref = "+".join(str(r) for r in llava_runs)
    coco = shapes_small / "world_B/annotations/captions_test.json"
    assert main(["eval", "caption", "--coco", str(coco), "--limit", "2", "--max-new-tokens", "4",
                 "--model", f"mix={ref}", "--out", str(tmp_path / "cap")]) == 0
    import json

    rows = [json.loads(line) for line in (tmp_path / "cap" / "captions_mix.jsonl").read_text().splitlines()]
    assert [r["adapter"] for r in rows] == ["red", "blue"]


def test_eval_seg_routes_clip_adapters(tmp_path, shapes_small, tiny_clip_dir):
    from mmlora.models.dense import dense_features
    from mmlora.eval.segmentation import evaluate_segmentation

    runs = [make_run(tmp_path / n, "tiny-clip", CLIP_PLACEMENT, s) for n, s in (("c1", 3), ("c2", 4))]
    model, _, _ = load_adapter_set(runs)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        with adapters_per_sample(model, ["c1", "c2"]):
            mixed = dense_features(model, images)
        for i, name in enumerate(["c1", "c2"]):
            model.set_adapter(name)
            assert torch.allclose(mixed[i], dense_features(model, images[i:i + 1])[0], atol=1e-5)
    report = evaluate_segmentation("+".join(map(str, runs)), shapes_small / "world_A", "test", ["vanilla"],
                                   tmp_path / "seg", limit=2)
    assert report["protocol"]["adapters"] == "round robin over c1, c2"
