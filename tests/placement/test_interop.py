"""Adapters saved by mmlora load in plain transformers + PEFT, in a process that never imports mmlora."""

import json
import subprocess
import sys
import textwrap

import torch

from mmlora.config.schema import PlacementSpec
from mmlora.models.modality import discover_modalities
from mmlora.placement.apply import apply_placement
from mmlora.placement.plan import plan_placement
from mmlora.runs.save import save_placement
from tests.placement.conftest import llava_batch


def test_plain_peft_reload_reproduces_logits(tiny_llava, tiny_llava_dir, shapes_small, tmp_path):
    model, processor = tiny_llava
    spec = PlacementSpec.model_validate({
        "vision": {"mode": "dora", "targets": ["q", "v"], "layers": [0], "rank": 4},
        "projector": {"mode": "full"},
        "language": {"mode": "lora", "rank": 4, "rank_schedule": None, "alpha": 8},
    })
    plan = plan_placement(model, discover_modalities(model), spec)
    placed = apply_placement(model, plan)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in placed.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # adapters and the full projector all non-trivial
    batch = llava_batch(processor, shapes_small)
    batch.pop("labels")
    with torch.no_grad():
        logits = placed(**batch).logits
    save_placement(placed, plan, tmp_path / "final", str(tiny_llava_dir))
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    torch.save(logits, tmp_path / "logits.pt")
    manifest = json.loads((tmp_path / "final" / "manifest.json").read_text())
    assert [a["modalities"] for a in manifest["adapters"]] == [["vision"], ["language"]]
    assert manifest["full_modules"]["modalities"] == ["projector"]

    script = textwrap.dedent(f"""
        import json, sys, torch
        from pathlib import Path
        from safetensors.torch import load_file
        from transformers import LlavaForConditionalGeneration
        from peft import PeftModel
        folder = Path({str(tmp_path / "final")!r})
        manifest = json.loads((folder / "manifest.json").read_text())
        base = LlavaForConditionalGeneration.from_pretrained(manifest["base_model"])
        missing, unexpected = base.load_state_dict(load_file(folder / manifest["full_modules"]["path"]), strict=False)
        assert not unexpected
        first, *rest = manifest["adapters"]
        model = PeftModel.from_pretrained(base, folder / first["path"], adapter_name=first["name"])
        for a in rest:
            model.load_adapter(folder / a["path"], adapter_name=a["name"])
        model.base_model.set_adapter([a["name"] for a in manifest["adapters"]])
        batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
        with torch.no_grad():
            out = model(**batch).logits
        ref = torch.load({str(tmp_path / "logits.pt")!r}, weights_only=True)
        print((out - ref).abs().max().item())
        assert "mmlora" not in sys.modules
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5
