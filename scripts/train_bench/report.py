"""Medians over repeated runs, ratios mmlora / reference, and the markdown report."""

from __future__ import annotations

import os
import platform
import statistics
from datetime import date

from train_bench.shapes import BenchShape, model_flops_per_sample

ARM_NAMES = {"reference": "HF Trainer + PEFT", "mmlora": "mmlora"}


def run_metrics(run: dict) -> dict[str, float]:
    """Throughput over the steps after the first (warm-up), and the memory peak, of one run."""
    ends = run["step_ends"]
    span = ends[-1] - ends[0]
    steps = len(ends) - 1
    cpu = run["step_cpu"][-1] - run["step_cpu"][0]
    return {
        "samples_per_s": sum(run["samples"][1:]) / span,
        "tokens_per_s": sum(run["tokens"][1:]) / span,
        "step_s": span / steps,
        "samples_per_cpu_s": sum(run["samples"][1:]) / cpu,
        "cpu_s_per_step": cpu / steps,
        "peak_mib": run["peak_bytes"] / 2**20,
        "first_loss": run["losses"][0] if run["losses"] else float("nan"),
        "last_loss": run["losses"][-1] if run["losses"] else float("nan"),
    }


def pass_metrics(run: dict) -> dict[str, float]:
    """Throughput over the whole pass, from the first batch's collation to the last step's end: the arms
    order their batches differently (both put a long batch first), so leaving out a first step would
    leave out unlike work."""
    span = run["step_ends"][-1] - run["start"]
    cpu = run["step_cpu"][-1] - run["start_cpu"]
    return {
        "samples_per_s": sum(run["samples"]) / span,
        "tokens_per_s": sum(run["tokens"]) / span,
        "samples_per_cpu_s": sum(run["samples"]) / cpu,
        "peak_mib": run["peak_bytes"] / 2**20,
        "pass_s": span,
    }


def _median(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def step_medians(runs: list[dict]) -> dict[str, float]:
    """Medians over every timed step of every run (steps after each run's first): on a shared
    machine another process's burst slows a few steps, and a median over many steps is steadier
    than one over a few run averages."""
    rows = []
    for run in runs:
        ends, cpu = run["step_ends"], run["step_cpu"]
        for i in range(1, len(ends)):
            dt, dc = ends[i] - ends[i - 1], cpu[i] - cpu[i - 1]
            rows.append({"samples_per_s": run["samples"][i] / dt, "tokens_per_s": run["tokens"][i] / dt,
                         "step_s": dt, "cpu_s_per_step": dc, "samples_per_cpu_s": run["samples"][i] / dc})
    return _median(rows)


COMPONENTS = ["vision", "projector", "language_layers", "head_loss", "optimizer", "data"]


def _breakdown(run: dict, per: float, data_per: float, data_in_step: bool) -> dict[str, float]:
    """Milliseconds by component over the steps after the first, divided by ``per`` (steps or samples);
    ``data`` (encoding and collation, timed per batch) divided by ``data_per``; ``other`` is the rest of
    the step (``data`` subtracted too where ``data_in_step``: per step, the same unit)."""
    step_ms = 1000 * (run["step_ends"][-1] - run["step_ends"][0]) / per
    out = {k: 1000 * run["breakdown"].get(k, 0.0) / per for k in COMPONENTS if k != "data"}
    out["data"] = 1000 * run["breakdown"].get("data", 0.0) / data_per
    out = {k: out[k] for k in COMPONENTS}
    out["other"] = step_ms - sum(v for k, v in out.items() if k != "data" or data_in_step)
    out["step"] = step_ms
    return out


def breakdown_ms(run: dict) -> dict[str, float]:
    """Milliseconds per step by component (steps after the first); ``other`` is the rest of the step."""
    steps = len(run["step_ends"]) - 1
    return _breakdown(run, steps, max(1, run["breakdown"].get("data_batches", steps)), data_in_step=True)


def breakdown_per_sample_ms(run: dict) -> dict[str, float]:
    """Milliseconds per sample by component over the steps after the first: the mixture's arms cut
    the pass into different numbers of steps, so per-step times would compare unlike steps. ``data``
    is per batch, over all batches."""
    return _breakdown(run, sum(run["samples"][1:]), len(run["samples"]), data_in_step=False)


def machine(threads: int) -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {threads} torch thread{'s' if threads > 1 else ''} per run"


def summarize(shape: BenchShape, runs: dict[str, list[dict]], profiles: dict[str, dict], precision: str,
              threads: int, wall_s: float, params: dict[str, int], peak_tflops: float | None = None) -> dict:
    arms: dict[str, dict] = {}
    for key, rs in runs.items():
        metrics = [run_metrics(r) for r in rs]
        samples, tokens = sum(rs[0]["samples"]), sum(rs[0]["tokens"])
        flops = model_flops_per_sample(params, tokens / samples, shape.image_tokens)
        median = _median(metrics) | step_medians(rs)
        median["model_tflops_per_s"] = flops * median["samples_per_s"] / 1e12
        if peak_tflops:
            median["mfu"] = median["model_tflops_per_s"] / peak_tflops
        raw = [{"step_s": [b - a for a, b in zip(r["step_ends"], r["step_ends"][1:])],
                "cpu_s": [b - a for a, b in zip(r["step_cpu"], r["step_cpu"][1:])],
                "samples": r["samples"], "tokens": r["tokens"], "losses": r["losses"], "peak_bytes": r["peak_bytes"]}
               for r in rs]
        arms[key] = {"median": median, "runs": metrics, "raw": raw, "trainable": rs[0]["trainable"],
                     "tokens_per_pass": tokens, "samples_per_pass": samples, "model_flops_per_sample": flops}
    ratios = {}
    for variant in sorted({k.split("/")[1] for k in runs}):
        a, b = arms.get(f"reference/{variant}"), arms.get(f"mmlora/{variant}")
        if a and b:
            ma, mb = a["median"], b["median"]
            ratios[variant] = {"samples_per_s": mb["samples_per_s"] / ma["samples_per_s"],
                               "tokens_per_s": mb["tokens_per_s"] / ma["tokens_per_s"],
                               "samples_per_cpu_s": mb["samples_per_cpu_s"] / ma["samples_per_cpu_s"],
                               "peak_memory": mb["peak_mib"] / ma["peak_mib"] if ma["peak_mib"] > 0 else float("nan"),
                               "first_loss_rel_diff": abs(mb["first_loss"] - ma["first_loss"]) / abs(ma["first_loss"])}
    dora = {}
    for arm in ARM_NAMES:
        for plain, var in (("lora", "dora"), ("qlora", "qdora")):
            if f"{arm}/{plain}" in arms and f"{arm}/{var}" in arms:
                d, p = arms[f"{arm}/{var}"]["median"], arms[f"{arm}/{plain}"]["median"]
                dora[f"{arm}/{var}"] = {"step_s": d["step_s"] / p["step_s"], "cpu_s_per_step": d["cpu_s_per_step"] / p["cpu_s_per_step"]}
    return {
        "preset": shape.name, "about": shape.about, "shape": shape.to_dict(), "precision": precision,
        "params": params, "peak_tflops": peak_tflops,
        "date": date.today().isoformat(), "machine": machine(threads), "load_average": os.getloadavg(), "wall_s": wall_s, "arms": arms, "ratios": ratios,
        "dora_over_lora_step_time": dora,
        "breakdown_ms": {arm: breakdown_ms(run) for arm, run in profiles.items()},
    }


def to_markdown(report: dict) -> str:
    s = report["shape"]
    lines = [
        f"### {report['preset']}: {report['about']}",
        "",
        f"{report['date']}, {report['machine']}, {report['precision']}; batch {s['batch_size']}, "
        f"{s['steps']} steps (one pass), gradient checkpointing, SDPA; {len(next(iter(report['arms'].values()))['runs'])} "
        f"runs per arm, alternating; throughput: medians over the steps after each run's first; memory: median "
        f"over runs; benchmark wall time {report['wall_s']:.0f} s.",
        "",
        "| arm | variant | samples/s | tokens/s | step (ms) | CPU s per step | peak memory above baseline (MiB) | "
        "model TFLOP/s (MFU) | trainable | loss step 1 → last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, a in report["arms"].items():
        arm, variant = key.split("/")
        m = a["median"]
        mfu = f" ({100 * m['mfu']:.1f}%)" if "mfu" in m else ""
        lines.append(f"| {ARM_NAMES[arm]} | {variant} | {m['samples_per_s']:.2f} | {m['tokens_per_s']:.0f} | "
                     f"{1000 * m['step_s']:.0f} | {m['cpu_s_per_step']:.2f} | {m['peak_mib']:.0f} | "
                     f"{m['model_tflops_per_s']:.3g}{mfu} | {a['trainable']:,} | {m['first_loss']:.4f} → {m['last_loss']:.4f} |")
    lines += ["", "| ratio mmlora / reference | samples/s | tokens/s | samples per CPU-second | peak memory | "
                  "loss step 1 rel. diff |", "|---|---|---|---|---|---|"]
    for variant, r in report["ratios"].items():
        lines.append(f"| {variant} | **{r['samples_per_s']:.2f}x** | {r['tokens_per_s']:.2f}x | {r['samples_per_cpu_s']:.2f}x | "
                     f"**{r['peak_memory']:.2f}x** | {r['first_loss_rel_diff']:.1e} |")
    if report["dora_over_lora_step_time"]:
        lines += ["", "| DoRA / LoRA in the same arm | step time | CPU time per step |", "|---|---|---|"]
        for key, v in report["dora_over_lora_step_time"].items():
            arm, variant = key.split("/")
            lines.append(f"| {ARM_NAMES[arm]} ({variant}) | **{v['step_s']:.2f}x** | {v['cpu_s_per_step']:.2f}x |")
    if report["breakdown_ms"]:
        comps = list(next(iter(report["breakdown_ms"].values())))
        lines += ["", "| ms per step (profiled pass) | " + " | ".join(c.replace("_", " ") for c in comps) + " |",
                  "|---|" + "---|" * len(comps)]
        for arm, b in report["breakdown_ms"].items():
            lines.append(f"| {ARM_NAMES[arm]} | " + " | ".join(f"{b[c]:.0f}" for c in comps) + " |")
    return "\n".join(lines) + "\n"


MIXTURE_NAMES = {"reference": "HF Trainer + PEFT, group_by_length", "mmlora": "mmlora, packing + batch_tokens",
                 "mmlora-no-ckpt": "mmlora, packing + batch_tokens, no checkpointing",
                 "reference-no-ckpt": "HF Trainer + PEFT, group_by_length, no checkpointing"}


def summarize_mixture(shape: BenchShape, runs: dict[str, list[dict]], lengths: list[int], kinds: list[str],
                      budget: int, precision: str, threads: int, wall_s: float,
                      profiles: dict[str, dict] | None = None) -> dict:
    """The packing comparison: per arm, medians over runs of the pass's throughput (batches differ
    between the arms, so per-step medians would compare unlike steps), its padding share and peak
    memory; every other arm's ratios to ``reference``."""
    from train_bench.mixture import histogram

    arms = {}
    for arm, rs in runs.items():
        metrics = [pass_metrics(r) | {"padding_share": 1 - sum(r["tokens"]) / sum(r["cells"]), "steps": len(r["step_ends"])}
                   for r in rs]
        arms[arm] = {"median": _median(metrics), "runs": metrics, "trainable": rs[0]["trainable"]}
    a = arms["reference"]["median"]
    ratios = {arm: {"samples_per_s": b["median"]["samples_per_s"] / a["samples_per_s"],
                    "tokens_per_s": b["median"]["tokens_per_s"] / a["tokens_per_s"],
                    "samples_per_cpu_s": b["median"]["samples_per_cpu_s"] / a["samples_per_cpu_s"],
                    "peak_memory": b["median"]["peak_mib"] / a["peak_mib"] if a["peak_mib"] > 0 else float("nan")}
              for arm, b in arms.items() if arm != "reference"}
    return {"preset": shape.name, "about": shape.about, "data": "mixture", "samples": len(lengths), "batch_size": shape.batch_size,
            "batch_tokens": budget, "precision": precision, "date": date.today().isoformat(), "machine": machine(threads),
            "load_average": os.getloadavg(), "wall_s": wall_s, "arms": arms, "ratios": ratios,
            "histogram": histogram(lengths, kinds),
            "breakdown_ms_per_sample": {arm: breakdown_per_sample_ms(run) for arm, run in (profiles or {}).items()}}


def mixture_markdown(report: dict) -> str:
    protocol = (f"{report['date']}, {report['machine']}, {report['precision']}; {report['samples']} samples, one pass; "
                f"reference batch {report['batch_size']}, mmlora batch_tokens {report['batch_tokens']} (the same mean batch), "
                f"gradient checkpointing (non-reentrant, every layer) unless the arm says otherwise, LoRA; "
                f"{len(report['arms']['reference']['runs'])} runs per arm, alternating; "
                f"medians over runs of the whole pass (first batch's collation to last step's end); load average at the end "
                f"{', '.join(f'{x:.1f}' for x in report['load_average'])}; benchmark wall time {report['wall_s']:.0f} s.")
    lines = [f"### {report['preset']} on the mixture: packing against group_by_length", "", protocol, "",
             "| arm | steps | samples/s | tokens/s | samples per CPU-second | padding share | peak memory above baseline (MiB) |",
             "|---|---|---|---|---|---|---|"]
    for arm, a in report["arms"].items():
        m = a["median"]
        lines.append(f"| {MIXTURE_NAMES[arm]} | {m['steps']:.0f} | {m['samples_per_s']:.2f} | {m['tokens_per_s']:.0f} | "
                     f"{m['samples_per_cpu_s']:.2f} | {m['padding_share']:.1%} | {m['peak_mib']:.0f} |")
    lines += ["", "| ratio to HF Trainer + PEFT, group_by_length | samples/s | tokens/s | samples per CPU-second | peak memory |",
              "|---|---|---|---|---|"]
    for arm, r in report["ratios"].items():
        lines.append(f"| {MIXTURE_NAMES[arm]} | **{r['samples_per_s']:.2f}x** | {r['tokens_per_s']:.2f}x | "
                     f"{r['samples_per_cpu_s']:.2f}x | **{r['peak_memory']:.2f}x** |")
    lines += ["", "Token lengths of the data (samples per bin):", "", report["histogram"]]
    if report.get("breakdown_ms_per_sample"):
        comps = list(next(iter(report["breakdown_ms_per_sample"].values())))
        lines += ["", "Where the time goes (a separate profiled pass per arm; ms per sample; `data` per batch, "
                  "`other` the rest of the step):", "",
                  "| arm | " + " | ".join(c.replace("_", " ") for c in comps) + " |", "|---|" + "---|" * len(comps)]
        for arm, b in report["breakdown_ms_per_sample"].items():
            lines.append(f"| {MIXTURE_NAMES[arm]} | " + " | ".join(f"{b[c]:.1f}" for c in comps) + " |")
    return "\n".join(lines) + "\n"
