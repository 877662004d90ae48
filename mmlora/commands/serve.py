"""``mmlora serve --base BASE --adapter NAME=RUN ...``: an HTTP API (and demo page) for many adapters.

    mmlora serve --base shapes-llava-base --adapter b=runs/shapes-llava-lora-b --port 8000
    mmlora serve --base tiny-clip --adapter seg=runs/tiny-clip-lora --max-loaded 4 --mode mixed

Open http://127.0.0.1:8000/ for the demo page; the API is described at /docs. Needs the ``serve``
extra (FastAPI, uvicorn, python-multipart).
"""

from __future__ import annotations

import argparse

from mmlora.optional import require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="the base every adapter was trained on (preset or folder)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN",
                        help="an adapter-only run to serve under NAME (repeat); loaded on first use")
    parser.add_argument("--mode", default="mixed", choices=("mixed", "switch", "merged", "gathered"),
                        help="mixed: one batch mixes adapters (PEFT); gathered: the same, stacked and gathered per sample (LoRA and DoRA); switch: one adapter per batch; merged: a merged copy per adapter")
    parser.add_argument("--max-loaded", type=int, default=8, help="adapters kept loaded (least recently used go first)")
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
    for item in args.adapter:
        name, sep, run_path = item.partition("=")
        if not sep or not name or not run_path:
            raise MmloraError(f"--adapter {item!r}: use NAME=RUN, e.g. b=runs/shapes-llava-lora-b")
        if name in adapters:
            raise MmloraError(f"--adapter {name!r} given twice")
        adapters[name] = run_path
    engine = Engine(args.base, adapters, args.mode, args.max_loaded, args.max_new_tokens, args.seg_mode)
    app = create_app(engine, args.max_queue, args.max_batch, args.max_wait_ms, Limits(max_bytes=args.max_image_bytes))
    print(f"serving {args.base} ({engine.kind}) with {len(adapters)} adapter(s) on http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
