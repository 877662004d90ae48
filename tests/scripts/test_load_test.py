"""The load test runs end to end on a tiny shape (loopback only) and reports every cell."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_test_on_a_tiny_shape(tmp_path, tiny_llava_dir):
    script = _script("load_test")
    assert script.main(["--adapters", "1,2", "--requests", "4", "--clients", "2", "--max-new-tokens", "2",
                        "--max-seconds", "60", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "load_test.json").read_text())["rows"]
    assert [(r["adapters"], r["mode"]) for r in rows] == [(n, m) for n in (1, 2) for m in ("mixed", "switch", "merged")]
    for r in rows:
        assert r["requests"] == 4 and r["statuses"] == {"200": 4} and r["throughput"] > 0
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["adapter_loads"] == 0  # all adapters fit, and were loaded before timing
    assert "| 2 | merged | 4 |" in (tmp_path / "load_test.md").read_text()
