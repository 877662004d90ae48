"""``mmlora serve --base BASE --adapter NAME=RUN ...``: an HTTP API (and demo page) for many adapters.

    mmlora serve --base shapes-llava-base --adapter b=runs/shapes-llava-lora-b --port 8000
    mmlora serve --base tiny-clip --adapter seg=runs/tiny-clip-lora --max-loaded 4 --mode mixed
    mmlora serve --base shapes-llava-base --adapters-from runs/ --mode gathered --max-loaded 512MiB

Open http://127.0.0.1:8000/ for the demo page; the API is described at /docs; OpenAI clients use
http://127.0.0.1:8000/v1 with ``model`` = an adapter's name. Needs the ``serve`` extra (FastAPI,
uvicorn, python-multipart).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmlora.optional import require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="the base every adapter was trained on (preset or folder)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN",
                        help="a run to serve under NAME (repeat); loaded on first use")
    parser.add_argument("--router", default=None, metavar="NAME=RUN",
                        help="a router run (continual.method: router): requests naming NAME, or no adapter, go to the "
                             "expert its router picks (--mode gathered)")
    parser.add_argument("--adapters-from", default=None, metavar="DIR",
                        help="serve every run in DIR (each subfolder with final/manifest.json), named after its folder")
    parser.add_argument("--mode", default="mixed", choices=("mixed", "switch", "merged", "gathered"),
                        help="gathered: one batch mixes adapters, stacked and gathered per sample (LoRA, DoRA, several "
                             "adapters per run, full projectors; page-in off the decoding loop); mixed: the same with "
                             "PEFT's mixed batches; switch: one adapter per batch; merged: a merged copy per run")
    parser.add_argument("--max-loaded", default="8",
                        help="adapters kept loaded: a number (8) or their memory (512MiB, 2GiB); least recently used go first")
    parser.add_argument("--no-continuous", action="store_true",
                        help="fixed batches instead of continuous batching (gathered and mixed captions)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a request waits for company")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond this get 503")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-image-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--seg-mode", default="maskclip", help="dense CLIP mode for /segment")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)


def run(args: argparse.Namespace) -> int:
    from mmlora.errors import MmloraError

    require("fastapi", "serve", "mmlora serve")
    uvicorn = require("uvicorn", "serve", "mmlora serve")
    from mmlora.serve.app import Limits, create_app
    from mmlora.serve.engine import Engine

    adapters = {}
    if args.adapters_from:
        from mmlora.runs.layout import FINAL, MANIFEST

        root = Path(args.adapters_from)
        if not root.is_dir():
            raise MmloraError(f"--adapters-from {root}: no such folder")
        adapters = {p.parent.parent.name: p.parent.parent for p in sorted(root.glob(f"*/{FINAL}/{MANIFEST}"))}
        if not adapters:
            raise MmloraError(f"--adapters-from {root}: no run in it (a run is a folder with {FINAL}/{MANIFEST})")
    for item in args.adapter:
        name, sep, run_path = item.partition("=")
        if not sep or not name or not run_path:
            raise MmloraError(f"--adapter {item!r}: use NAME=RUN, e.g. b=runs/shapes-llava-lora-b")
        if name in adapters:
            raise MmloraError(f"--adapter {name!r} given twice")
        adapters[name] = run_path
    router = None
    if args.router:
        name, sep, run_path = args.router.partition("=")
        if not sep or not name or not run_path:
            raise MmloraError(f"--router {args.router!r}: use NAME=RUN, e.g. auto=runs/continual/router")
        router = (name, run_path)
    engine = Engine(args.base, adapters, args.mode, args.max_loaded, args.max_new_tokens, args.seg_mode,
                    continuous=not args.no_continuous, router=router)
    app = create_app(engine, args.max_queue, args.max_batch, args.max_wait_ms, Limits(max_bytes=args.max_image_bytes))
    batching = "continuous batching" if engine.continuous else f"fixed batches ({engine.continuous_off})"
    print(f"serving {args.base} ({engine.kind}, {args.mode}, {batching}) with {len(adapters)} adapter(s) "
          f"on http://{args.host}:{args.port}/ (OpenAI-compatible: http://{args.host}:{args.port}/v1)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
