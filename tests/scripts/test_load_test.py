"""The load test runs end to end on a tiny shape (loopback only) and reports every cell."""

import importlib.util
import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_test_on_a_tiny_shape(tmp_path, tiny_llava_dir):
    script = _script("load_test")
    modes = ("gathered", "gathered-fixed", "mixed", "switch", "merged")
    assert script.main(["--adapters", "1,3", "--requests", "4", "--clients", "2", "--max-new-tokens", "2",
                        "--kinds", "lora,dora,full", "--modes", ",".join(modes), "--ranks", "4,8", "--repeats", "2",
                        "--max-seconds", "60", "--profile", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "load_test.json").read_text())
    rows = report["rows"]
    assert [(q["adapters"], q["mode"]) for q in report["profiles"]] == [
        (1, "gathered"), (1, "gathered-fixed"), (1, "mixed"), (3, "gathered"), (3, "gathered-fixed")]  # mixed refused at 3
    for q in report["profiles"]:
        parts = q["processor"] + q["prefill"] + q["decode"] + q["other"]
        assert abs(parts - q["total"]) < 1e-6 * max(1.0, q["total"]) + 1e-3 and min(q["processor"], q["prefill"]) > 0
        assert q["decode_steps"] == 1  # --max-new-tokens 2: one prefill, then one decode step
    assert [(r["adapters"], r["mode"]) for r in rows] == [(n, m) for n in (1, 3) for m in modes]
    refused = {(r["adapters"], r["mode"]): r["refused"] for r in rows if "refused" in r}
    # three kinds: DoRA cannot join PEFT's mixed batches, a full projector cannot be switched in PEFT
    assert set(refused) == {(3, "mixed"), (3, "switch")}
    assert "DoRA" in refused[3, "mixed"] and "trained in place" in refused[3, "switch"]
    for r in (r for r in rows if "refused" not in r):
        assert len(r["repeats"]) == 2 and r["throughput"] == statistics.median(x["throughput"] for x in r["repeats"])
        for x in r["repeats"]:
            assert x["requests"] == 4 and x["statuses"] == {"200": 4} and x["throughput"] > 0 and x["cpu_seconds"] > 0
            assert x["p50_ms"] <= x["p90_ms"] <= x["p99_ms"]
            assert x["adapter_loads"] == 0  # all adapters fit, and were loaded before timing
            assert x["loaded_mib"] > 0
        assert (r["pool_mib"] is not None and r["pool_mib"] > 0) == r["mode"].startswith("gathered")
        assert r["continuous"] == (r["mode"] in ("gathered", "mixed"))
    sizes = {r["mode"]: r["loaded_mib"] for r in rows if r["adapters"] == 3 and "refused" not in r}
    assert sizes["gathered"] == sizes["merged"]  # the same three runs' tensors, whatever holds them
    text = (tmp_path / "load_test.md").read_text()
    assert "| 3 | merged | 4 |" in text and "load average" in text and "CPU ms per request" in text
    assert "| 3 | mixed | refused: DoRA" in text and "adapters loaded (MiB)" in text
    assert "| gathered | 3 | 8 |" in text and "prefill ms" in text
