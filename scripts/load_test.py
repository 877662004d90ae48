"""Load test of ``mmlora serve`` on loopback: throughput and latency against the number of adapters, for
gathered multi-adapter batches, PEFT's mixed-adapter batches, adapter switching, and one merged model
per adapter (S-LoRA's comparison, small).

Run: python scripts/load_test.py [--base tiny-llava] [--adapters 1,8,64] [--modes gathered,mixed,switch,merged]
                                 [--kinds lora,dora,full] [--ranks 4,8,16] [--requests 96] [--clients 16]
                                 [--repeats 2] [--max-seconds 60] [--out evals/serve]

For each number of adapters N it writes N runs with seeded random adapter weights (non-zero, so each
adapter gives different answers; kinds cycling through ``--kinds`` — LoRA on the vision tower, the
projector and the language model, DoRA on all three, LoRA beside a fully trained projector, LoRA on
the language model alone —, ranks through ``--ranks``), then for each mode (``gathered-fixed``:
gathered without continuous batching) starts the real server (FastAPI + uvicorn) on 127.0.0.1, sends one warm-up request
per adapter (so every mode starts with its adapters loaded), and then ``--requests`` caption requests
from ``--clients`` concurrent clients, each naming an adapter drawn uniformly at random (seeded). Each
cell runs ``--repeats`` times (a fresh server each time); the table gives the median throughput and
the process's CPU seconds per request beside it, and the note the machine's load average before and
after, so that a contended machine shows; "warm-up ms per adapter" is the loading pass (one request
per adapter, each loading it) divided by the adapters. Bounded: at most ``--requests`` requests and
``--max-seconds`` per cell; only loopback is ever contacted. Writes ``load_test.md`` and ``load_test.json``.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import json
import random
import statistics
import sys
import time
from pathlib import Path


#: adapter kinds of the generated runs (``--kinds``): placements on LLaVA's three modalities
KINDS = {
    "lora": lambda r: {"vision": {"mode": "lora", "targets": ["q", "v"], "rank": r},
                       "projector": {"mode": "lora", "rank": r}, "language": {"mode": "lora", "rank": r}},
    "dora": lambda r: {"vision": {"mode": "dora", "targets": ["q", "v"], "rank": r},
                       "projector": {"mode": "dora", "rank": r}, "language": {"mode": "dora", "rank": r}},
    "full": lambda r: {"vision": {"mode": "lora", "targets": ["q", "v"], "rank": r},
                       "projector": {"mode": "full"}, "language": {"mode": "lora", "rank": r}},
    "language": lambda r: {"language": {"mode": "lora", "rank": r}},
}


def make_adapters(base: str, n: int, out: Path, ranks: tuple[int, ...] = (4,), kinds: tuple[str, ...] = ("lora",),
                  scale: float = 0.3) -> dict[str, Path]:
    """``n`` runs on ``base``: adapter ``i`` of kind ``kinds[i % len(kinds)]`` (``KINDS``) and rank
    ``ranks[i % len(ranks)]``, seeded random non-zero weights of ``scale`` (full projectors moved off the base's)."""
    from mmlora.config.schema import Recipe
    from mmlora.runs.synthetic import place, write_random_run

    placed = {}
    runs = {}
    for i in range(n):
        kind, rank = kinds[i % len(kinds)], ranks[i % len(ranks)]
        if (kind, rank) not in placed:
            recipe = Recipe.model_validate({"model": {"name": base}, "placement": KINDS[kind](rank)})
            placed[kind, rank] = (*place(recipe), recipe)
        model, plan, recipe = placed[kind, rank]
        runs[f"a{i}"] = write_random_run(model, plan, recipe, out / f"a{i}", seed=i, scale=scale)
    return runs


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def request_images(n: int) -> list[bytes]:
    """PNG bytes of the images requests draw from: ``n`` world-A test images (their captions differ in
    length with their number of objects), or, for 0, one plain 64-pixel image."""
    from PIL import Image

    if n == 0:
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="PNG")
        return [buf.getvalue()]
    from mmlora.showcase.shapes import cached_worlds

    paths = sorted((cached_worlds(scale=0.05) / "world_A/images/test").glob("*.png"))[:n]
    return [p.read_bytes() for p in paths]


def run_cell(base: str, runs: dict[str, Path], mode: str, requests: int, clients: int, max_seconds: float,
             budgets: list[int], max_batch: int, images: list[bytes], seed: int = 0) -> dict:
    """One (adapters, mode) cell: a fresh server, warm-up, then the timed requests (each with an image
    drawn from ``images`` and a token budget from ``budgets``, sent as ``max_new_tokens`` when there are several)."""
    import httpx

    from mmlora.serve.app import create_app
    from mmlora.serve.local import on_loopback, send_requests

    engine = _engine(base, runs, mode, max(budgets))
    rss_base = _rss_mib()
    app = create_app(engine, max_queue=max(64, 2 * clients), max_batch=max_batch, max_wait_ms=5)
    rng = random.Random(seed)
    plan = [(rng.choice(list(runs)), rng.choice(budgets), rng.choice(images)) for _ in range(requests)]
    with on_loopback(app) as url, httpx.Client(base_url=url, timeout=max_seconds) as http:
        warm = time.perf_counter()
        for name in runs:  # warm-up: every adapter loaded once, outside the measurement
            http.post("/caption", data={"adapter": name}, files={"image": ("x.png", images[0], "image/png")}).raise_for_status()
        warm_ms = 1000 * (time.perf_counter() - warm) / len(runs)  # a load and a one-request batch, per adapter
        rss_loaded = _rss_mib()
        batcher = app.state.batcher
        batcher.batch_sizes.clear()
        batcher.running_sizes.clear()
        loads_before = engine.loads
        # The clients run in a process of their own: threads beside the server would take its GIL and
        # slow the modes that run more Python (routing, decoding loops) more than the others.
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=send_requests, args=(url, plan, len(budgets) > 1, clients, max_seconds, child))
        proc.start()
        assert parent.recv() == "ready"
        cpu_start = time.process_time()
        parent.send("go")
        latencies, statuses, wall = parent.recv()
        cpu = time.process_time() - cpu_start  # the server process alone
        proc.join()
        sizes, running = list(batcher.batch_sizes), list(batcher.running_sizes)
    ok = len(latencies)
    return {"adapters": len(runs), "mode": mode, "requests": ok, "statuses": statuses, "seconds": wall,
            "cpu_seconds": cpu, "throughput": ok / wall if wall else 0.0, "cpu_ms_per_request": 1000 * cpu / ok if ok else None,
            "p50_ms": _percentile(latencies, 50) if ok else None, "p90_ms": _percentile(latencies, 90) if ok else None,
            "p99_ms": _percentile(latencies, 99) if ok else None,
            "mean_batch": statistics.mean(sizes) if sizes else 0.0,
            "mean_running": statistics.mean(running) if running else None, "adapter_loads": engine.loads - loads_before,
            "models_in_memory": 1 + len(runs) if mode == "merged" else 1, "warmup_ms_per_adapter": warm_ms,
            "loaded_mib": engine.loaded_mib(), "rss_growth_mib": rss_loaded - rss_base,
            "pool_mib": (engine.pool.nbytes() + engine.full.nbytes()) / 2**20 if engine.pool is not None else None,
            "continuous": engine.continuous}


def _engine(base: str, runs: dict[str, Path], mode: str, max_new_tokens: int):
    """The engine of a cell: ``mode`` (``gathered-fixed``: gathered without continuous batching)."""
    from mmlora.serve.engine import Engine

    plain, _, fixed = mode.partition("-")
    return Engine(base, runs, mode=plain, max_loaded=len(runs), max_new_tokens=max_new_tokens, continuous=not fixed)


def _rss_mib() -> float:
    """The process's resident memory now (Linux), MiB, after the allocator has handed its free pages back
    (glibc's ``malloc_trim``: freed memory it keeps for reuse is not the server's)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS as it is
        pass
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def median_row(repeats: list[dict]) -> dict:
    """One table row from a cell's repeats: medians, and every repeat's req/s."""
    mid = sorted(repeats, key=lambda r: r["throughput"])[len(repeats) // 2]

    def med(key: str) -> float | None:
        values = [r[key] for r in repeats if r[key] is not None]
        return statistics.median(values) if values else None

    return mid | {"throughput": med("throughput"), "cpu_ms_per_request": med("cpu_ms_per_request"),
                  "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "warmup_ms_per_adapter": med("warmup_ms_per_adapter"),
                  "repeat_throughputs": [r["throughput"] for r in repeats]}


def table(rows: list[dict]) -> str:
    lines = [("| adapters | mode | requests | req/s (median) | req/s per repeat | CPU ms per request | p50 ms | p99 ms | mean batch "
              "| sequences per step | full models in memory | adapters loaded (MiB) | pool (MiB) | RSS growth (MiB) "
              "| warm-up ms per adapter |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['adapters']} | {r['mode']} | refused: {r['refused']} |" + " |" * 12)
            continue
        fmt = lambda v, d=0: f"{v:.{d}f}" if v is not None else "-"  # noqa: E731
        each = ", ".join(f"{t:.1f}" for t in r.get("repeat_throughputs", [r["throughput"]]))
        lines.append(f"| {r['adapters']} | {r['mode']} | {r['requests']} | {r['throughput']:.1f} | {each} | "
                     f"{fmt(r['cpu_ms_per_request'])} | {fmt(r['p50_ms'])} | {fmt(r['p99_ms'])} | {r['mean_batch']:.1f} | "
                     f"{fmt(r.get('mean_running'), 1)} | {r['models_in_memory']} | {fmt(r['loaded_mib'], 1)} | {fmt(r.get('pool_mib'), 1)} | "
                     f"{fmt(r['rss_growth_mib'])} | "
                     f"{fmt(r.get('warmup_ms_per_adapter'))} |")
    return "\n".join(lines) + "\n"


def note(args: argparse.Namespace, load_before: tuple, load_after: tuple) -> str:
    import os

    return (f"\n({args.base}; per row up to {args.requests} caption requests, clients stop sending after "
            f"{args.max_seconds:g} s; {args.clients} concurrent clients on loopback, adapters drawn uniformly, kinds "
            f"{args.kinds} in turn, ranks {args.ranks}, weights {args.scale:g} x N(0, 1), "
            f"{f'{args.images} world-A test images' if args.images else 'one plain 64-pixel image'}, batches of up to {args.max_batch}, new tokens {args.max_new_tokens} (drawn per request) "
            f"(a mode's '-fixed' row: fixed batches instead of continuous batching), every adapter loaded "
            f"before timing; {args.repeats} repeats per row, each on a fresh server, the modes alternating; the clients in a "
            f"process of their own; CPU time of the server's process, {args.threads or 'default'} torch thread(s); {os.cpu_count()} CPUs, load average {', '.join(f'{x:.1f}' for x in load_before)} before "
            f"and {', '.join(f'{x:.1f}' for x in load_after)} after; 'full models in memory': the base, plus one merged "
            f"copy per adapter in merged mode; 'mean batch': requests per fixed batch, or per prefill joining the running batch; "
            f"'sequences per step': in the running batch, at each decoding step (continuous batching); 'adapters loaded': their tensors and full copies as served (fp32); 'pool': what the gathered "
            f"stacks (with their room to grow and their tables) and the full copies hold; 'RSS growth': the process's resident "
            f"memory after the warm-up less before the server started, each read after glibc's malloc_trim.)\n")


def profile_step(base: str, runs: dict[str, Path], mode: str, batch: int, max_new_tokens: int, images: list[bytes],
                 repeats: int = 5) -> dict:
    """Where one batch's time goes, in the engine (no HTTP): the processor (image preprocessing and
    tokenisation), the model's first forward (prefill, vision tower included), the later forwards
    (decode steps) and the rest (generation's Python, routing, decoding the text). Milliseconds, of
    the median (by total) of ``repeats`` batches of ``batch`` caption requests (the server's default
    prompt, the load test's images in turn) over the adapters in turn."""
    from PIL import Image

    from mmlora.data.samples import CAPTION_PROMPT
    from mmlora.serve.engine import Item

    engine = _engine(base, runs, mode, max_new_tokens)
    names = list(runs)
    pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    items = [Item("caption", names[i % len(names)], pictures[i % len(pictures)], CAPTION_PROMPT) for i in range(batch)]

    def run_batch() -> None:  # one batch start to end: continuous (join, steps) or fixed (generate)
        if engine.continuous:
            engine.join(items)
            while engine.active:
                engine.step()
        else:
            engine.run(items)

    run_batch()  # loads the adapters; warm-up
    spans: dict[str, float] = {}
    calls = {"forward": 0}
    clock: dict[str, float] = {}
    processor_call = type(engine.processor).__call__

    def timed_processor(self, *a, **kw):
        t = time.perf_counter()
        try:
            return processor_call(self, *a, **kw)
        finally:
            spans["processor"] = spans.get("processor", 0.0) + time.perf_counter() - t

    def pre(*_):
        clock["t"] = time.perf_counter()

    def post(*_):
        part = "prefill" if calls["forward"] == 0 else "decode"
        spans[part] = spans.get(part, 0.0) + time.perf_counter() - clock["t"]
        calls["forward"] += 1

    handles = [engine.base.register_forward_pre_hook(pre), engine.base.register_forward_hook(post)]
    rows = []
    type(engine.processor).__call__ = timed_processor
    try:
        for _ in range(repeats):
            spans.clear()
            calls["forward"] = 0
            t = time.perf_counter()
            run_batch()
            total = time.perf_counter() - t
            rows.append({k: 1000 * spans.get(k, 0.0) for k in ("processor", "prefill", "decode")}
                        | {"other": 1000 * (total - sum(spans.values())), "total": 1000 * total,
                           "decode_steps": calls["forward"] - 1})
    finally:
        type(engine.processor).__call__ = processor_call
        for h in handles:
            h.remove()
    mid = sorted(rows, key=lambda r: r["total"])[len(rows) // 2]  # the median batch, its parts adding up
    return mid | {"mode": mode, "batch": batch, "adapters": len(runs)}


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="tiny-llava")
    p.add_argument("--adapters", default="1,8,64")
    p.add_argument("--modes", default="gathered,mixed,switch,merged")
    p.add_argument("--ranks", default="4,8,16", help="LoRA ranks of the generated adapters, cycled")
    p.add_argument("--scale", type=float, default=0.3, help="the generated adapters' weights: scale x N(0, 1)")
    p.add_argument("--images", type=int, default=0,
                   help="draw each request's image from this many world-A test images (0: one plain 64-pixel image)")
    p.add_argument("--kinds", default="lora", help=f"adapter kinds, cycled: {', '.join(KINDS)} (modes that cannot "
                   "serve a kind get a 'refused' row)")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell (fresh server each); medians reported")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-new-tokens", default="8",
                   help="new tokens per request; several (4,16,48): each request draws its budget from them")
    p.add_argument("--profile", action="store_true",
                   help="also break one batch of --max-batch requests into processor / prefill / decode / other "
                        "(engine only, per mode and number of adapters)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time limit per cell")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the server (default 1: beside the clients' process on a small machine, two "
                        "OpenMP threads stall at every barrier when one is descheduled; 0: torch's default)")
    p.add_argument("--out", default=None, help="folder for load_test.md / .json (default: print only)")
    args = p.parse_args(argv)
    unknown = sorted({k for k in args.kinds.split(",") if k} - set(KINDS))
    if unknown:
        p.error(f"--kinds {','.join(unknown)}: choose from {', '.join(KINDS)}")
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run_load_test(args)
    finally:  # a caller in the same process (the tests) keeps its own thread count
        torch.set_num_threads(threads)


def run_load_test(args: argparse.Namespace) -> int:
    """The cells, the table and the files of ``main``'s arguments."""
    import tempfile

    counts = [int(n) for n in args.adapters.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    import os

    ranks = tuple(int(r) for r in args.ranks.split(","))
    budgets = [int(b) for b in str(args.max_new_tokens).split(",") if b]
    kinds = tuple(k for k in args.kinds.split(",") if k)
    from mmlora.errors import MmloraError

    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mmlora-load-") as tmp:
        all_runs = make_adapters(args.base, max(counts), Path(tmp), ranks, kinds, args.scale)
        images = request_images(args.images)
        for n in counts:
            runs = dict(list(all_runs.items())[:n])
            cells: dict[str, list[dict]] = {}
            refused: dict[str, str] = {}
            for r in range(args.repeats):  # every mode in each round, the order rotated: load changes hit all alike
                for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                    if mode in refused:
                        continue
                    try:
                        cells.setdefault(mode, []).append(run_cell(args.base, runs, mode, args.requests, args.clients,
                                                                   args.max_seconds, budgets, args.max_batch, images))
                    except MmloraError as err:  # a mode that cannot serve these runs (e.g. DoRA in PEFT's mixed batches)
                        refused[mode] = str(err).split(": ", 1)[-1]
            for mode in modes:
                row = ({"adapters": n, "mode": mode, "refused": refused[mode]} if mode in refused
                       else median_row(cells[mode]) | {"repeats": cells[mode]})
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
        profiles = []
        for n in counts if args.profile else []:  # the same batches at each number of adapters, no HTTP
            runs = dict(list(all_runs.items())[:n])
            for mode in modes:
                if mode.partition("-")[0] in ("gathered", "mixed") and not any(
                        r["mode"] == mode and r["adapters"] == n and "refused" in r for r in rows):
                    profiles.append(profile_step(args.base, runs, mode, args.max_batch, max(budgets), images))
    text = table(rows) + note(args, load_before, os.getloadavg())
    if profiles:
        text += ("\n| mode | adapters | batch | processor ms | prefill ms | decode ms (steps) | other ms | total ms |\n"
                 "|---|---|---|---|---|---|---|---|\n")
        for q in profiles:
            text += (f"| {q['mode']} | {q['adapters']} | {q['batch']} | {q['processor']:.1f} | {q['prefill']:.1f} | "
                     f"{q['decode']:.1f} ({q['decode_steps']:.0f}) | {q['other']:.1f} | {q['total']:.1f} |\n")
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "load_test.md").write_text(text)
        (out / "load_test.json").write_text(json.dumps({"args": vars(args), "rows": rows, "profiles": profiles},
                                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
