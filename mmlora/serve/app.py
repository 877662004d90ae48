"""The HTTP API (FastAPI): captions or segmentation masks from one base with many adapters.

    GET  /            the demo page (upload an image, pick an adapter, see the caption or overlay)
    GET  /info        base, kind (caption | segment), adapters, loaded adapters, queue
    POST /caption     multipart: image (file), adapter, prompt, max_new_tokens (optional) → {"caption", ...}
                      (a server with ``--router``: a request naming no adapter, or the router, is routed)
    POST /segment     multipart: image (file), adapter, classes ("a,b,c")      → {"mask_png", "overlay_png", ...}
    POST /v1/chat/completions, GET /v1/models    OpenAI-compatible (``mmlora.serve.openai_api``): ``model`` = adapter,
                      the image as an ``image_url`` data URL; ``stream: true`` for server-sent events

Every request names its adapter (``__base__`` = the base alone); requests are batched across adapters
by :mod:`mmlora.serve.batcher`. Bad requests get a 4xx with a message and never reach the model:
an unknown adapter (404), a missing field (422), an image that does not decode (400), too many bytes
or pixels (413), the wrong task for this base (400), a prompt holding a special or image placeholder
token (400). A full queue answers 503 with ``Retry-After``. A batch that still fails is run again
item by item: only the faulty request gets the error (400 for a problem with it, 500 for ours).
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from mmlora.data.samples import CAPTION_PROMPT, to_rgb
from mmlora.errors import MmloraError
from mmlora.eval.overlay import colour_mask, render_overlay
from mmlora.optional import require
from mmlora.runs.compose import BASE
from mmlora.serve.batcher import Batcher, QueueFull
from mmlora.serve.engine import Engine, Item
from mmlora.serve.openai_api import add_openai_routes

require("fastapi", "serve", "the HTTP API (mmlora serve)")  # one line that says how to install it
# At module level: FastAPI reads the routes' (string) annotations from this module's globals.
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("page.html")


@dataclass
class Limits:
    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_classes: int = 32
    max_prompt_chars: int = 500


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_image(data: bytes, limits: Limits):
    """An RGB PIL image from an upload's bytes, or an HTTPException: 413 over the byte or pixel limit
    (the size read from the header, before decoding: no decompression bomb), 400 if it does not decode."""
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise HTTPException(413, f"image is larger than {limits.max_bytes} bytes")
    if not data:
        raise HTTPException(400, "image is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > limits.max_pixels:
                raise HTTPException(413, f"image is {w}x{h} pixels; the limit is {limits.max_pixels} pixels")
            img.load()
            return to_rgb(img)
    except HTTPException:
        raise
    except Image.DecompressionBombError as err:
        raise HTTPException(413, f"image refused: {err}") from None
    except Exception as err:  # noqa: BLE001 — PIL raises many kinds for broken files
        raise HTTPException(400, f"image could not be decoded ({type(err).__name__}: {err})") from None


async def while_connected(answer: Awaitable[dict], item: Item, request: Request, poll_s: float = 0.1) -> dict:
    """``answer``'s result; if the client disconnects first, ``item`` is cancelled (it leaves the queue,
    or the running batch at the next decoding step) and nobody is answered (499, the status nginx logs
    for a client that closed its request)."""
    task = asyncio.ensure_future(answer)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if await request.is_disconnected():
            item.cancelled = True
            task.cancel()
            raise HTTPException(499, "the client closed the request")


def create_app(engine: Engine, max_queue: int = 64, max_batch: int = 8, max_wait_ms: float = 10.0,
               limits: Limits | None = None):
    """The FastAPI application serving ``engine`` (its batcher starts and stops with the app)."""

    limits = limits or Limits()
    batcher = Batcher(engine, max_queue, max_batch, max_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="mmlora serve", lifespan=lifespan)
    app.state.batcher, app.state.engine = batcher, engine

    def check_adapter(name: str | None) -> str:
        """The adapter a request names (the router's name, or none: routed when the server has a router)."""
        router = getattr(engine, "router_name", None)
        if not name:
            if router is None:
                raise HTTPException(400, f"name an adapter; this server has: {', '.join([BASE, *engine.adapter_names])}")
            return router
        if name not in (BASE, router) and name not in engine.runs:
            known = ", ".join([BASE, *engine.adapter_names] + ([router] if router else []))
            raise HTTPException(404, f"unknown adapter {name!r}; this server has: {known}")
        return name

    async def read_image(upload: UploadFile):
        return decode_image(await upload.read(limits.max_bytes + 1), limits)

    def submit(item: Item):
        """Check ``item`` and queue it: its future, or an HTTPException (400 for the request, 503 when full)."""
        if item.kind != engine.kind:
            other = "/caption" if engine.kind == "caption" else "/segment"
            raise HTTPException(400, f"this server's base ({engine.base_ref}) does {engine.kind}: use {other}")
        try:
            engine.check(item)  # validated before it joins a batch
        except MmloraError as err:
            raise HTTPException(400, str(err)) from None
        try:
            return batcher.submit(item)
        except QueueFull as err:
            raise HTTPException(503, str(err), headers={"Retry-After": "1"}) from None

    async def outcome(future) -> dict:
        """The future's result, or an HTTPException: 400 for a problem with the request, 500 for ours."""
        try:
            return await asyncio.wrap_future(future)
        except MmloraError as err:  # a problem with this request (it failed alone: see the batcher)
            raise HTTPException(400, str(err)) from None
        except Exception as err:  # noqa: BLE001 — it failed alone, on our side: a 500, the server lives
            raise HTTPException(500, f"inference failed: {type(err).__name__}: {err}") from None

    async def answer(item: Item, request: Request) -> dict:
        start = time.perf_counter()
        result = await while_connected(outcome(submit(item)), item, request)
        return result | {"adapter": item.adapter, "latency_ms": round(1000 * (time.perf_counter() - start), 2)}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE.read_text()

    @app.get("/info")
    async def info() -> dict:
        return {"base": engine.base_ref, "kind": engine.kind, "mode": engine.mode, "router": getattr(engine, "router_name", None),
                "adapters": [BASE, *engine.adapter_names], "loaded": engine.loaded,
                "loaded_mib": round(engine.loaded_mib(), 3), "max_loaded": engine.max_loaded,
                "continuous_batching": engine.continuous, "running": engine.active,
                "queue": batcher.waiting, "max_queue": batcher.max_queue}

    @app.post("/caption")
    async def caption(request: Request, image: UploadFile = File(...), adapter: str | None = Form(None),
                      prompt: str | None = Form(None), max_new_tokens: int | None = Form(None)):
        adapter = check_adapter(adapter)
        if prompt is not None and len(prompt) > limits.max_prompt_chars:
            raise HTTPException(400, f"prompt is longer than {limits.max_prompt_chars} characters")
        if max_new_tokens is not None and not 1 <= max_new_tokens <= engine.max_new_tokens:
            raise HTTPException(400, f"max_new_tokens must be from 1 to {engine.max_new_tokens} (the server's --max-new-tokens)")
        item = Item("caption", adapter, await read_image(image), prompt=(prompt or "").strip() or CAPTION_PROMPT,
                    max_new_tokens=max_new_tokens)
        return await answer(item, request)

    @app.post("/segment")
    async def segment(request: Request, image: UploadFile = File(...), adapter: str = Form(...), classes: str = Form(...)):
        adapter = check_adapter(adapter)
        names = [c.strip() for c in classes.split(",") if c.strip()]
        if len(names) < 2:
            raise HTTPException(400, "give at least two class names, comma-separated (e.g. background,circle)")
        if len(names) > limits.max_classes:
            raise HTTPException(400, f"{len(names)} classes; the limit is {limits.max_classes}")
        img = await read_image(image)
        result = await answer(Item("segment", adapter, img, classes=names), request)
        mask = result.pop("mask")
        mask_img, blend = colour_mask(mask.numpy(), len(names)), render_overlay(img, mask.numpy(), names)
        fractions = {c: round(float((mask == k).float().mean()), 4) for k, c in enumerate(names)}
        return result | {"mask_png": _png(mask_img), "overlay_png": _png(blend), "classes": names,
                         "fractions": fractions, "size": list(img.size)}

    add_openai_routes(app, engine, submit, outcome, lambda data: decode_image(data, limits), while_connected)
    return app
