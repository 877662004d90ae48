#!/usr/bin/env bash
# GPU check: mmlora's trainer against HF Trainer + PEFT on the `7b-shape` preset — LLaVA-1.5-7B's layer
# shapes (CLIP-L/14 at 336 px, 576 image tokens; Llama-2-7B layers, 32k vocabulary) with a few layers and
# random weights built on the GPU — for LoRA, QLoRA (4-bit NF4 language model) and QDoRA, in bf16, batch 8,
# one pass of 12 steps, gradient checkpointing, SDPA; then the packing arm: the same model on the mixed-length
# `mixture` data, HF Trainer + PEFT with group_by_length against mmlora with exact packing and token-budget
# batches (FlashAttention-2 varlen where flash-attn is installed, mmlora's per-segment SDPA otherwise), each
# with and without gradient checkpointing.
# Within 12 minutes on an H100/H200.
#
# Run:   scripts/gpu_check.sh [--out DIR]                 (default DIR: gpu_check/)
#        scripts/gpu_check.sh --dry-run [--out DIR]       (CPU, the `tiny` preset: checks the script end to end)
#        PEAK_TFLOPS=312 scripts/gpu_check.sh             (another GPU's bf16 dense peak; default 989, H100/H200)
#
# Writes DIR/gpu_check.json: per arm and variant, samples/s, tokens/s, MFU, peak memory above the post-load
# baseline (max_memory_allocated), and the ratios mmlora / reference; DIR/bench/report.md holds the tables.
#
# MFU = model FLOPs per second / the GPU's peak. Model FLOPs of a frozen-base LoRA step: 4 x parameters x
# tokens for the language model and head (forward + backward to the inputs; checkpoint recomputation is not
# counted), 6 x parameters x image tokens for the trained projector, 2 x parameters x patches for the frozen
# vision tower (forward only). See scripts/train_bench/shapes.py (model_flops_per_sample).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=gpu_check
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: $0 [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "$DRY" = 1 ]; then
  PRESET=tiny; PEAK=${PEAK_TFLOPS:-1}; LIMIT=300; PACK_LIMIT=120; PACK_SAMPLES=16
else
  PRESET=7b-shape; PEAK=${PEAK_TFLOPS:-989}; LIMIT=480; PACK_LIMIT=240; PACK_SAMPLES=64
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device (use --dry-run on a CPU)')"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi
mkdir -p "$OUT"
timeout "$LIMIT" "$PY" scripts/bench_train.py --preset "$PRESET" --variants lora,qlora,qdora --repeats 1 \
  --precision "$([ "$DRY" = 1 ] && echo fp32 || echo bf16)" --peak-tflops "$PEAK" --out "$OUT/bench"
timeout "$PACK_LIMIT" "$PY" scripts/bench_train.py --preset "$PRESET" --data mixture --samples "$PACK_SAMPLES" --repeats 1 \
  --precision "$([ "$DRY" = 1 ] && echo fp32 || echo bf16)" --out "$OUT/packing" \
  || echo "gpu_check: the packing arm did not finish (its report is missing from gpu_check.json)" >&2

"$PY" - "$OUT" "$DRY" <<'PYEOF'
import json, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
report = json.loads((out / "bench" / "report.json").read_text())
arms = {key: {"samples_per_s": a["median"]["samples_per_s"], "tokens_per_s": a["median"]["tokens_per_s"],
              "mfu": a["median"].get("mfu"), "model_tflops_per_s": a["median"]["model_tflops_per_s"],
              "peak_memory_mib": a["median"]["peak_mib"], "loss_first_last": [a["median"]["first_loss"], a["median"]["last_loss"]]}
        for key, a in report["arms"].items()}
summary = {"dry_run": dry, "preset": report["preset"], "machine": report["machine"], "date": report["date"],
           "precision": report["precision"], "peak_tflops": report["peak_tflops"], "shape": report["shape"],
           "params": report["params"], "arms": arms, "ratios_mmlora_over_reference": report["ratios"],
           "dora_over_lora": report["dora_over_lora_step_time"], "breakdown_ms": report["breakdown_ms"]}
packing = out / "packing" / "report.json"
if packing.is_file():
    p = json.loads(packing.read_text())
    import importlib.util
    summary["packing"] = {"attention": "flash_attention_2" if importlib.util.find_spec("flash_attn") and not dry else "mmlora_varlen",
                          "ratios_over_reference": p["ratios"], "samples": p["samples"], "batch_tokens": p["batch_tokens"],
                          "arms": {arm: {k: a["median"][k] for k in ("samples_per_s", "tokens_per_s", "padding_share", "peak_mib")}
                                   for arm, a in p["arms"].items()}}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out / 'gpu_check.json'}")
PYEOF
