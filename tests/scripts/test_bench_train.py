"""The training benchmark and the GPU check run end to end: ``scripts/gpu_check.sh --dry-run`` runs
``scripts/bench_train.py`` on the ``tiny`` preset on CPU (LoRA, QLoRA, QDoRA; both arms; the profiled
pass) and writes the report and the GPU check's JSON. No timing is asserted: only that the report is
produced, complete, and that both arms trained on the same thing (equal first-step losses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.bnb]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    env = os.environ | {"PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_tiny_preset_report(dry_run):
    report = json.loads((dry_run / "bench" / "report.json").read_text())
    assert report["preset"] == "tiny" and set(report["arms"]) == {
        f"{arm}/{v}" for arm in ("reference", "mmlora") for v in ("lora", "qlora", "qdora")}
    for arm in report["arms"].values():
        m = arm["median"]
        assert m["samples_per_s"] > 0 and m["tokens_per_s"] > 0 and m["cpu_s_per_step"] > 0 and m["peak_mib"] > 0
    for variant, ratio in report["ratios"].items():
        assert ratio["first_loss_rel_diff"] < 1e-4, variant  # same model, data, labels and batches
        assert ratio["samples_per_s"] > 0 and ratio["peak_memory"] > 0
    a, b = report["arms"]["reference/lora"], report["arms"]["mmlora/lora"]
    assert a["tokens_per_pass"] == b["tokens_per_pass"] and a["trainable"] == b["trainable"]
    assert set(report["breakdown_ms"]) == {"reference", "mmlora"}
    assert {"vision", "projector", "language_layers", "head_loss", "optimizer", "data", "other", "step"} <= set(
        report["breakdown_ms"]["mmlora"])
    md = (dry_run / "bench" / "report.md").read_text()
    assert "| ratio mmlora / reference |" in md and "| DoRA / LoRA in the same arm |" in md and "| mmlora |" in md


def test_gpu_check_dry_run_json(dry_run):
    summary = json.loads((dry_run / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["preset"] == "tiny"
    for key in ("reference/qlora", "mmlora/qlora", "mmlora/qdora"):
        arm = summary["arms"][key]
        assert arm["mfu"] > 0 and arm["samples_per_s"] > 0 and arm["peak_memory_mib"] > 0
    assert set(summary["ratios_mmlora_over_reference"]) == {"lora", "qlora", "qdora"}
    assert summary["params"]["language_layers"] > 0
    packing = summary["packing"]  # the packing arm: mixed lengths, group_by_length against packing
    assert set(packing["arms"]) == {"reference", "mmlora", "mmlora-no-ckpt", "reference-no-ckpt"}
    for arm in ("mmlora", "mmlora-no-ckpt"):
        assert packing["arms"][arm]["padding_share"] < packing["arms"]["reference"]["padding_share"]
    assert set(packing["ratios_over_reference"]) == set(packing["arms"]) - {"reference"}
    assert packing["ratios_over_reference"]["mmlora"]["samples_per_s"] > 0 and packing["attention"] == "mmlora_varlen"
    md = (dry_run / "packing" / "report.md").read_text()
    assert "| tokens | vqa | caption | chat | text | all |" in md and "padding share" in md
    assert "| mmlora, packing + batch_tokens, no checkpointing |" in md


def test_the_mixture_has_its_stated_shares_and_lengths():
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_bench.mixture import SHARES, build, histogram

    scenes = [{"id": i, "file_name": f"images/train/{i}.png",
               "objects": [{"shape": "circle", "colour": "red", "position": "center", "size": "small"}]} for i in range(5)]
    records = build(scenes, {i: "a small red circle in the center." for i in range(5)}, 200, seed=1)
    kinds = [r["id"].rsplit("_", 1)[1] for r in records]
    assert {k: kinds.count(k) / 200 for k in SHARES} == SHARES
    assert all(("image" in r) == (k != "text") for r, k in zip(records, kinds))
    turns = {k: [len(r["conversations"]) // 2 for r, kk in zip(records, kinds) if kk == k] for k in SHARES}
    assert set(turns["vqa"]) == {1} and min(turns["chat"]) >= 8 and max(turns["chat"]) <= 40
    assert build(scenes, {i: "x." for i in range(5)}, 50, seed=1) == build(scenes, {i: "x." for i in range(5)}, 50, seed=1)
    table = histogram([10, 70, 300, 3000], ["vqa", "caption", "chat", "text"])
    assert "| ≤64 | 1 | 0 | 0 | 0 | 1 |" in table and "| >2048 | 0 | 0 | 0 | 1 | 1 |" in table


def test_mixture_arms_differ_only_in_trainer_and_checkpointing():
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_train import mixture_jobs

    jobs = mixture_jobs({"variant": "lora"}, budget=936, max_length=2048,
                        arms=["reference", "mmlora", "mmlora-no-ckpt", "reference-no-ckpt"])
    assert {k: (j["arm"], j["gradient_checkpointing"]) for k, j in jobs.items()} == {
        "reference": ("reference", True), "mmlora": ("mmlora", True),
        "mmlora-no-ckpt": ("mmlora", False), "reference-no-ckpt": ("reference", False)}
    for name in ("reference", "reference-no-ckpt"):
        assert jobs[name]["group_by_length"] and "train_overrides" not in jobs[name]
    for name in ("mmlora", "mmlora-no-ckpt"):
        assert jobs[name]["train_overrides"] == {"batch_tokens": 936, "packing": {"enabled": True, "max_tokens": 2048}}
    # a budget above the longest sample (the 7b-shape's 576-token images, batch 8): rows as long as the budget
    long = mixture_jobs({"variant": "lora"}, budget=5600, max_length=2048, arms=["reference", "mmlora"])
    assert long["mmlora"]["train_overrides"]["packing"]["max_tokens"] == 5600
    with pytest.raises(SystemExit, match="reference"):
        mixture_jobs({}, 936, 2048, ["mmlora"])


def test_padding_share_is_what_trainers_length_grouped_sampler_leaves():
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    sys.path.insert(0, str(ROOT / "scripts"))
    from train_bench.mixture import padding_share

    assert padding_share([50] * 40, 4) == (0.0, 0.0, 0.0)
    # 16 samples: one batch per mega-batch, so no grouping at all; by hand, seed 0's batches
    lengths = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300, 400, 500, 600, 700]
    order = list(LengthGroupedSampler(4, lengths=lengths, generator=torch.Generator().manual_seed(0)))
    batches = [[lengths[i] for i in order[k:k + 4]] for k in range(0, 16, 4)]
    by_hand = 1 - sum(lengths) / sum(4 * max(b) for b in batches)
    mean, low, high = padding_share(lengths, 4, seeds=1)
    assert mean == low == high == pytest.approx(by_hand) and by_hand > 0.2
    # a dataset of 800 sorts 200 samples at a time: of two lengths, at most one batch per mega-batch
    # mixes them (3 short samples padded by 900 each)
    many = [100, 1000] * 400
    mean, _, high = padding_share(many, 4, seeds=3)
    most = 4 * 3 * 900
    assert 0 < high <= most / (most + sum(many)) and mean < padding_share(many[:32], 4, seeds=3)[0]
