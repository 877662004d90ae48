"""Training speed and memory: HF Trainer + PEFT (the reference) against mmlora's trainer.

Run: python scripts/bench_train.py --preset vocab-heavy [--repeats 3] [--out DIR]
     python scripts/bench_train.py --preset tiny --out /tmp/bench      # seconds: checks the report
     python scripts/bench_train.py --preset llava7b-shape --data mixture --out bench/mixture   # packing

``--data mixture`` (``train_bench/mixture.py``: short VQA, captions, long chats, text-only) compares
HF Trainer + PEFT with its best settings for mixed lengths (``group_by_length``, SDPA, gradient
checkpointing, batch ``batch_size``) against mmlora with exact packing and token-budget batches of
the same mean size (``batch_tokens`` = batch size x mean sample length): with the same checkpointing,
and without any (packed token budgets bound the activations, so recomputation may not be needed to
stay under the reference's memory); the reference without checkpointing shows what dropping it
costs there. One pass each, alternating; it reports samples/s and tokens/s over the pass, padding
share and peak memory per arm, every arm's ratios to the reference, and the token-length histogram.

Both arms train the same randomly initialised LLaVA-shaped model (``scripts/train_bench/shapes.py``)
on the same shapes-world captions, with identical answer-only labels and identical global batches,
for one pass over the data; each run is a fresh process (forked from a server that has imported the
libraries once), and the arms alternate (a, b, a, b, ...); medians are reported. Reported: samples/s
and tokens/s over the steps after the first, peak memory above the post-load baseline (RSS on CPU,
allocated memory on a GPU), a per-component time breakdown from a separate profiled pass, the
ratios mmlora / reference, and DoRA's step time against LoRA's in each arm. ``--out DIR`` writes
``report.md`` and ``report.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_bench.mixture import prepare_mixture  # noqa: E402
from train_bench.report import mixture_markdown, summarize, summarize_mixture, to_markdown  # noqa: E402
from train_bench.shapes import SHAPES, build_model_folder, model_params  # noqa: E402

# Imported once by the fork server, so that each run starts without paying for them.
PRELOAD = ["torch", "transformers", "peft", "accelerate", "transformers.models.llava.modeling_llava",
           "transformers.trainer", "mmlora.train.loop", "mmlora.placement.apply", "mmlora.data.build", "train_bench.arms"]


def prepare_data(n: int, out: Path, name: str = "train.json") -> tuple[Path, Path]:
    """The first ``n`` world-A training captions as a LLaVA JSON in ``out``; returns (json, image root)."""
    from mmlora.showcase.shapes import cached_worlds

    scale = 0.05 if n <= 100 else 0.05 * -(-n // 100)
    world = cached_worlds(scale=scale) / "world_A"
    records = json.loads((world / "llava_train.json").read_text())
    if len(records) < n:
        raise SystemExit(f"need {n} samples, the world has {len(records)}")
    path = out / name
    path.write_text(json.dumps(records[:n]))
    return path, world


def run(ctx, job: dict, work: Path, label: str) -> dict:
    """Run one arm in a fresh process; its output goes to ``<label>.log`` (shown if it fails)."""
    out, log = work / f"{label}.json", work / f"{label}.log"
    job = job | {"work_dir": str(work / label)}
    p = ctx.Process(target=_child, args=(job, str(out), str(log)))
    started = time.perf_counter()
    p.start()
    p.join()
    if p.exitcode != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-4000:] if log.is_file() else ""
        raise SystemExit(f"{tail}\n{label} failed (exit code {p.exitcode})")
    result = json.loads(out.read_text())
    print(f"  {label}: {time.perf_counter() - started:.1f} s", flush=True)
    return result


def _child(job: dict, out: str, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from train_bench.arms import run_job

    run_job(job, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(SHAPES), default="llava7b-shape")
    p.add_argument("--repeats", type=int, default=3, help="runs per arm and variant (medians are reported)")
    p.add_argument("--variants", default="lora,dora", help="lora, dora, qlora, qdora (comma-separated)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on a GPU")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run; default on CPU 1 (on a shared machine two OpenMP threads stall "
                        "whenever one is descheduled), on a GPU torch's default")
    p.add_argument("--no-profile", action="store_true", help="skip the per-component breakdown pass")
    p.add_argument("--profile-steps", type=int, default=4, help="steps of the profiled pass (the first is warm-up)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (bf16 dense) for MFU")
    p.add_argument("--out", type=Path, default=None, help="write report.md and report.json here")
    p.add_argument("--data", choices=["captions", "mixture"], default="captions",
                   help="captions: world-A captions (every arm and variant); mixture: mixed lengths, HF group_by_length "
                        "against mmlora packing (LoRA)")
    p.add_argument("--samples", type=int, default=96, help="--data mixture: samples in the pass")
    p.add_argument("--mixture-arms", default=",".join(MIXTURE_ARMS),
                   help="--data mixture: the arms to run (reference always): " + ", ".join(MIXTURE_ARMS))
    args = p.parse_args(argv)

    shape = SHAPES[args.preset]
    import torch

    cuda = torch.cuda.is_available()
    precision = args.precision or ("bf16" if cuda else "fp32")
    threads = args.threads or (0 if cuda else 1)  # 0: leave torch's default
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mmlora-bench-") as tmp:
        work = Path(tmp)
        print(f"bench_train: preset {shape.name} ({shape.about}); building the model", flush=True)
        model_dir = build_model_folder(shape, work / "model", dtype="bfloat16" if precision == "bf16" and cuda else "float32")
        data_json, image_root = prepare_data(shape.steps * shape.batch_size, work)
        if args.data == "mixture":
            return run_mixture(args, shape, model_dir, image_root, work, precision, threads, started)
        profile_json, _ = prepare_data(min(args.profile_steps, shape.steps) * shape.batch_size, work, "profile.json")
        base_job = {"model_dir": str(model_dir), "data_json": str(data_json), "image_root": str(image_root),
                    "rank": shape.rank, "batch_size": shape.batch_size, "precision": precision, "threads": threads}
        # Freed tensors go back to the OS at once (no dynamic mmap threshold), so the RSS high-water mark
        # follows live memory rather than allocator fragmentation; the runs inherit it from the fork server.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is imported, i.e. in the fork server
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        runs: dict[str, list[dict]] = {}
        # a, b, a, b, ... with every variant in each round, the order rotated from round to round, so
        # that changes in the machine's load hit every arm and variant alike
        pairs = [(variant, arm) for variant in variants for arm in ("reference", "mmlora")]
        for r in range(args.repeats):
            for variant, arm in pairs[2 * r % len(pairs):] + pairs[:2 * r % len(pairs)]:
                runs.setdefault(f"{arm}/{variant}", []).append(
                    run(ctx, base_job | {"arm": arm, "variant": variant}, work, f"{arm}-{variant}-{r}"))
        profiles = {}
        if not args.no_profile:
            for arm in ("reference", "mmlora"):
                profiles[arm] = run(ctx, base_job | {"arm": arm, "variant": variants[0], "profile": True,
                                                     "data_json": str(profile_json)}, work, f"{arm}-profile")
        if args.out:  # the raw runs first, so that nothing measured is lost if summarizing fails
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "runs.json").write_text(json.dumps({"runs": runs, "profiles": profiles}) + "\n")
        report = summarize(shape, runs, profiles, precision=precision, threads=threads,
                           wall_s=time.perf_counter() - started, params=model_params(model_dir),
                           peak_tflops=args.peak_tflops)
    return write_report(report, to_markdown(report), args.out)


def write_report(report: dict, md: str, out: Path | None) -> int:
    """Print the markdown; with ``--out``, write it and the JSON there."""
    print(md)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(md)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    return 0


#: the mixture's arms: (trainer, gradient checkpointing); ``reference`` is what every ratio divides by
MIXTURE_ARMS = {
    "reference": ("reference", True),  # HF Trainer + PEFT, group_by_length, checkpointing every layer
    "mmlora": ("mmlora", True),  # packing + token budgets, the same checkpointing
    "mmlora-no-ckpt": ("mmlora", False),  # packing + token budgets, no recomputation
    "reference-no-ckpt": ("reference", False),  # HF without checkpointing: its speed and what it costs in memory
}


def mixture_jobs(base_job: dict, budget: int, max_length: int, arms: list[str]) -> dict[str, dict]:
    """The job of each mixture arm (``MIXTURE_ARMS``)."""
    unknown = sorted(set(arms) - set(MIXTURE_ARMS))
    if unknown or "reference" not in arms:
        raise SystemExit(f"--mixture-arms: choose from {', '.join(MIXTURE_ARMS)}, 'reference' included (got {arms})")
    jobs = {}
    for name in arms:
        trainer, ckpt = MIXTURE_ARMS[name]
        job = base_job | {"arm": trainer, "gradient_checkpointing": ckpt}
        if trainer == "reference":
            job["group_by_length"] = True
        else:
            # rows at least as long as the budget: a micro-batch is one row (rows pad to the fullest)
            job["train_overrides"] = {"batch_tokens": budget,
                                      "packing": {"enabled": True, "max_tokens": max(max_length, budget)}}
        jobs[name] = job
    return jobs


def run_mixture(args, shape, model_dir: Path, image_root: Path, work: Path, precision: str, threads: int,
                started: float) -> int:
    """The packing comparison on the mixture data (LoRA; see the module docstring)."""
    from transformers import AutoProcessor

    from mmlora.data.batching import ConversationDataset
    from mmlora.data.processing import ConversationEncoder
    from mmlora.data.readers import read_llava

    max_length = 2048
    data_json = prepare_mixture(args.samples, image_root, work)
    ds = ConversationDataset(read_llava(data_json, image_root), ConversationEncoder(AutoProcessor.from_pretrained(model_dir), max_length))
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    kinds = [s.id.rsplit("_", 1)[1] for s in ds.samples]
    budget = shape.batch_size * round(sum(lengths) / len(lengths))
    base_job = {"model_dir": str(model_dir), "data_json": str(data_json), "image_root": str(image_root), "rank": shape.rank,
                "batch_size": shape.batch_size, "precision": precision, "threads": threads, "variant": "lora",
                "max_length": max_length}
    jobs = mixture_jobs(base_job, budget, max_length, [a.strip() for a in args.mixture_arms.split(",") if a.strip()])
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    os.environ["TQDM_DISABLE"] = "1"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    runs: dict[str, list[dict]] = {}
    names = list(jobs)
    for r in range(args.repeats):  # every arm in each round, the order rotated from round to round
        for arm in names[r % len(names):] + names[:r % len(names)]:
            runs.setdefault(arm, []).append(run(ctx, jobs[arm], work, f"{arm}-mixture-{r}"))
    profiles = {} if args.no_profile else {arm: run(ctx, jobs[arm] | {"profile": True}, work, f"{arm}-mixture-profile")
                                           for arm in names}
    if args.out:  # the raw runs first, so that nothing measured is lost if summarizing fails
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runs.json").write_text(json.dumps({"runs": runs, "profiles": profiles}) + "\n")
    report = summarize_mixture(shape, runs, lengths, kinds, budget, precision=precision, threads=threads,
                               wall_s=time.perf_counter() - started, profiles=profiles)
    return write_report(report, mixture_markdown(report), args.out)


if __name__ == "__main__":
    sys.exit(main())
