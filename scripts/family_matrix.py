"""Write the README's model-family matrix from the family checks.

Runs the family tests (tests/train/test_families_train.py: 2 training steps on image batches with
the gradient audit, the trained ``final/`` reloaded in plain transformers + PEFT without mmlora to the
same logits, and a step with a 4-bit language model and an fp32 vision tower, each layer's class
checked; tests/models/test_family_generation.py: batched = one-by-one answers;
tests/generate/test_iteration.py: continuous batching with staggered joins = one-by-one greedy, or its refusal;
tests/train/test_families_runs.py: exact resume, merged export reloaded in transformers, a caption served
by the engine equal to ``generate_answers``, ``mmlora data check`` finding the bad samples) with
``MMLORA_FAMILY_RESULTS`` pointing at a JSON file they fill, plans each recipe in recipes/families/,
and replaces the table between the ``family-matrix`` markers in README.md. A family that cannot be
built here gets its one-line refusal (``mmlora models tiny TYPE``) in every cell.

Run: python scripts/family_matrix.py   (about a minute on CPU; no download)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma", "gemma3", "llava_next", "llava_onevision",
            "internvl", "qwen3_vl", "mllama", "gemma4"]
COLUMNS = [("plan", "plan (`mmlora plan`)"), ("train", "trains on images (2 steps, batch 2)"),
           ("audit", "gradient audit (vision, projector, language)"),
           ("reload", "reloads in plain transformers + PEFT (same logits, 1e-5)"),
           ("qlora", "4-bit language + fp32 vision (1 step, layers checked)"),
           ("generate", "batched = one-by-one generation"),
           ("resume", "exact resume (4 steps = 2 + resume to 4, same losses)"),
           ("export", "merged export reloads in transformers (same logits, 1e-4)"),
           ("serve", "served by `mmlora serve` (caption = generate)"),
           ("continuous", "continuous batching (staggered joins = one-by-one greedy)"),
           ("check", "`mmlora data check` finds what training rejects")]
START, END = "<!-- family-matrix:start -->", "<!-- family-matrix:end -->"


def refusal(model_type: str) -> str | None:
    """The one-line reason ``mmlora models tiny`` refuses ``model_type``, or None."""
    from mmlora.errors import MmloraError
    from mmlora.models.families import FAMILIES as BUILDERS

    if model_type not in BUILDERS:
        return "no processor recipe"
    try:
        BUILDERS[model_type](model_type)
    except MmloraError as err:
        return str(err)
    return None


def plan_ok(model_type: str) -> str:
    recipe = ROOT / "recipes" / "families" / f"{model_type}.yaml"
    if not recipe.is_file():
        return "no recipe"
    run = subprocess.run([sys.executable, "-m", "mmlora", "plan", str(recipe), "--json"], cwd=ROOT,
                         capture_output=True, text=True)
    return "✓" if run.returncode == 0 else (run.stderr.strip().splitlines() or ["failed"])[-1]


def results() -> dict[str, dict[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "families.json"
        env = {**os.environ, "MMLORA_FAMILY_RESULTS": str(path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/train/test_families_train.py", "tests/models/test_family_generation.py",
                        "tests/train/test_families_runs.py", "tests/generate/test_iteration.py"], cwd=ROOT, env=env)
        return json.loads(path.read_text()) if path.is_file() else {}


def table(found: dict[str, dict[str, str]]) -> str:
    lines = ["| family | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for model_type in FAMILIES:
        reason = refusal(model_type)
        if reason:
            cells = [f"refused: {reason}"] * len(COLUMNS)
        else:
            row = {**found.get(model_type, {}), "plan": plan_ok(model_type)}
            cells = [row.get(key, "✗ (failed)") for key, _ in COLUMNS]
        lines.append(f"| `{model_type}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    text = table(results())
    readme = ROOT / "README.md"
    content = readme.read_text()
    if START not in content:
        print(text)
        print(f"README.md has no {START} marker: table printed only", file=sys.stderr)
        return 1
    head, rest = content.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
