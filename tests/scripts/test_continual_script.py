"""The continual study runs end to end on the tiny LLaVA (a few steps, a few images, one seed): every
method is scored on every world after each stage, the continual-learning figures follow from the
scores by their definitions, and a second run reuses everything."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _script():
    spec = importlib.util.spec_from_file_location("continual_script", ROOT / "scripts" / "continual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_study_on_a_tiny_shape(tmp_path, shapes_small, tiny_llava_dir):
    script = _script()
    argv = ["--out", str(tmp_path), "--data", str(shapes_small), "--scale", "0.05", "--seeds", "0", "--steps", "2",
            "--router-steps", "2", "--test", "3", "--replay", "4", "--distill-images", "3", "--ranks", "2",
            "--base", "tiny-llava", "--vision-layers", "0"]
    assert script.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    seed = results["seeds"]["0"]
    assert set(seed) == {"sequential", "olora", "router", "oracle", "uniform", "merge-linear", "merge-ties",
                         "merge-dare", "distill-r2"}
    for method, worlds in seed.items():
        assert set(worlds) == {"A", "B", "C"}
        stages = {"0", "2"} if method.startswith("distill") else {"0", "1", "2"}
        for w, by_stage in worlds.items():
            assert set(by_stage) == stages, (method, w)
            assert by_stage["0"] == seed["sequential"][w]["0"]  # stage 0 is the base for every method
            assert (by_stage["2"]["novel"] is None) == (w != "B")
    assert seed["sequential"]["B"]["1"] == seed["olora"]["B"]["1"] == seed["oracle"]["B"]["1"]  # all B's run
    assert seed["oracle"]["A"]["2"] == seed["oracle"]["A"]["0"]  # the oracle gives world A the base
    row = results["summary"]["sequential"]
    s = seed["sequential"]
    assert row["bwt"]["B"] == [s["B"]["2"]["slot"] - s["B"]["1"]["slot"]]
    assert row["bwt"]["A"] == [s["A"]["2"]["slot"] - s["A"]["0"]["slot"]]
    assert row["average"] == [statistics.mean(s[w]["2"]["slot"] for w in "ABC")]
    table = (tmp_path / "table.md").read_text()
    assert "| merge-dare |" in table and "| distill-r2 |" in table and "BWT B" in table
    teacher = json.loads((tmp_path / "runs/seed0/teacher.json").read_text())
    assert len(teacher) == 9 and all(r["conversations"][1]["from"] == "gpt" for r in teacher)
    stamp = (tmp_path / "results.json").stat().st_mtime_ns
    assert script.main(argv) == 0  # everything reused: nothing trains or captions again
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == results["seeds"]
    assert (tmp_path / "results.json").stat().st_mtime_ns >= stamp
