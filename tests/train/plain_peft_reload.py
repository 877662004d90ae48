"""Reload trained runs with plain transformers + PEFT + safetensors, never mmlora, and compare logits.

    python tests/train/plain_peft_reload.py JOBS.json

``JOBS.json`` maps a name to ``{"base": folder, "final": run/final, "batch": file, "logits": file}``
(the batch and the trained model's logits on it as safetensors files). Prints one JSON object: each
name's largest absolute logit difference, reloaded and (to show the check is not vacuous) of the untrained
base, as ``[reloaded, base]`` (or ``"error: ..."``), and ``mmlora_imported`` (must be false).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText


def reload_diff(job: dict) -> list[float]:
    final = Path(job["final"])
    model = AutoModelForImageTextToText.from_pretrained(job["base"], dtype=torch.float32).eval()
    batch = load_file(job["batch"])
    want = load_file(job["logits"])["logits"]
    with torch.no_grad():
        base = model(**batch).logits
    full = final / "full_modules.safetensors"  # parameters trained in place (mode: full)
    if full.is_file():
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(str(full)).items():
                params[name].copy_(value)
    model = PeftModel.from_pretrained(model, final / "adapters" / "default").eval()
    with torch.no_grad():
        got = model(**batch).logits
    if got.shape != want.shape:
        raise ValueError(f"logits shape {tuple(got.shape)} != {tuple(want.shape)}")
    return [float((got.float() - want.float()).abs().max()), float((base.float() - want.float()).abs().max())]


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    out: dict = {}
    for name, job in jobs.items():
        try:
            out[name] = reload_diff(job)
        except Exception as err:  # reported per job; the test names it
            out[name] = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    out["mmlora_imported"] = any(m == "mmlora" or m.startswith("mmlora.") for m in sys.modules)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
