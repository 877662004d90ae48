"""The QA-LoRA table script runs end to end on a few steps and a few images."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two short trainings on shapes-llava-base, pycocoevalcap's Java scorers
@pytest.mark.bnb
def test_qalora_table_on_one_step(tmp_path, shapes_small):
    spec = importlib.util.spec_from_file_location("qalora_table", ROOT / "scripts" / "qalora_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--data", str(shapes_small), "--runs", str(tmp_path / "runs"), "--exports",
                        str(tmp_path / "exports"), "--out", str(tmp_path / "out"), "--steps", "1", "--limit", "2"]) == 0
    table = (tmp_path / "out" / "qalora_table.md").read_text()
    assert table.count("\n| ") == 6 and "QA-LoRA merged (INT4 g16)" in table
    assert (tmp_path / "exports" / "qalora-merged-int4" / "model_int4.safetensors").is_file()
