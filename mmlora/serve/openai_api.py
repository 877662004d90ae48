"""The OpenAI-compatible endpoints, the convention of vLLM and LoRAX for adapters: a chat completion
whose ``model`` names the adapter and whose user message holds the image as an ``image_url`` data URL.

    GET  /v1/models              the adapters (and ``__base__``) as models
    POST /v1/chat/completions    {"model": ADAPTER, "messages": [{"role": "user", "content": [
                                     {"type": "text", "text": "Describe the image."},
                                     {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
                                  "max_tokens": 32, "stream": false}

With ``"stream": true`` the answer comes as server-sent events (``chat.completion.chunk`` objects, a
final chunk with ``finish_reason``, a usage chunk with ``stream_options.include_usage``, then
``data: [DONE]``), piece by piece as it is decoded where the server batches continuously (whole, in one
piece, in fixed-batch modes). Errors use OpenAI's body (``{"error": {"message", "type", "param",
"code"}}``) and the same status codes as the rest of the API: 404 for an unknown model, 400 for a
request this server cannot answer as sent, 413 for an image too large, 503 when the queue is full.

What this server does not do is refused in one line, not ignored: sampling (``temperature`` or
``top_p`` other than greedy's), ``n`` > 1, several turns or roles other than ``user`` (one question
about one image), images by http(s) URL (nothing is fetched: send a data URL), ``max_tokens`` above the
server's ``--max-new-tokens``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mmlora.data.samples import CAPTION_PROMPT
from mmlora.runs.compose import BASE
from mmlora.serve.engine import Engine, Item


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {404: "not_found_error", 413: "invalid_request_error", 503: "server_error", 500: "server_error"}
        body = {"error": {"message": self.message, "type": kind.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _parse(body: Any, engine: Engine, decode: Callable[[bytes], Any]) -> tuple[Item, dict]:
    """The request body → (the engine's item, the options of the answer); :class:`ApiError` if it cannot run."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "give 'model': the adapter to answer with (GET /v1/models lists them)", "model")
    router = getattr(engine, "router_name", None)
    if model not in (BASE, router) and model not in engine.runs:
        known = [BASE, *engine.adapter_names] + ([router] if router else [])
        raise ApiError(404, f"model {model!r} does not exist; this server has: {', '.join(known)}", "model", "model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "this server gives one answer per request: leave 'n' out or set it to 1", "n")
    for key, greedy in (("temperature", 0), ("top_p", 1)):
        value = body.get(key)
        if value is not None and value != greedy:
            raise ApiError(400, f"this server decodes greedily: leave '{key}' out or set it to {greedy}", key)
    limit = engine.max_new_tokens
    budget = body.get("max_completion_tokens", body.get("max_tokens"))
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or not 1 <= budget <= limit):
        raise ApiError(400, f"max_tokens must be a whole number from 1 to {limit} (the server's --max-new-tokens)",
                       "max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "give 'messages': a list with one user message", "messages")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles != ["user"]:
        raise ApiError(400, f"this server answers one user message about one image (got roles {roles}); "
                       "send a single {'role': 'user', 'content': [...]}", "messages")
    content = messages[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ApiError(400, "the user message's content must be a string or a list of parts", "messages")
    texts, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url", {})
            url = url.get("url") if isinstance(url, dict) else url
            images.append(url)
        else:
            raise ApiError(400, f"content part {part!r}: use {{'type': 'text', 'text': ...}} or "
                           "{'type': 'image_url', 'image_url': {'url': 'data:image/png;base64,...'}}", "messages")
    if len(images) != 1:
        raise ApiError(400, f"send exactly one image per request (got {len(images)})", "messages")
    url = images[0]
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ApiError(400, "send the image inline as a data URL (data:image/png;base64,...); this server fetches "
                       "nothing", "messages")
    try:
        data = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except ValueError:
        raise ApiError(400, "the image's data URL is not valid base64", "messages") from None
    try:
        image = decode(data)
    except HTTPException as err:
        raise ApiError(err.status_code, str(err.detail), "messages") from None
    prompt = "\n".join(t for t in texts if t.strip()).strip() or CAPTION_PROMPT
    stream = bool(body.get("stream", False))
    usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
    return Item("caption", model, image, prompt=prompt, max_new_tokens=budget), {"stream": stream, "usage": usage}


def _usage(result: dict) -> dict | None:
    if "prompt_tokens" not in result:
        return None
    p, c = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def add_openai_routes(app, engine: Engine, submit: Callable[[Item], Any], outcome: Callable[[Any], Any],
                      decode: Callable[[bytes], Any], while_connected: Callable[..., Any]) -> None:
    """Add ``/v1/models`` and ``/v1/chat/completions`` to ``app``; ``submit``, ``outcome`` and
    ``while_connected`` are the API's own (checks, queue, errors, a client that hangs up), ``decode``
    its image decoder."""

    @app.get("/v1/models")
    async def models() -> dict:
        created = int(time.time())
        router = [engine.router_name] if getattr(engine, "router_name", None) else []
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "mmlora"}
                                           for n in [BASE, *engine.adapter_names, *router]]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if engine.kind != "caption":
            return ApiError(400, f"this server's base ({engine.base_ref}) does segmentation: use /segment").response()
        try:
            body = await request.json()
        except ValueError:
            return ApiError(400, "the body is not valid JSON").response()
        loop = asyncio.get_running_loop()
        try:
            item, options = _parse(body, engine, decode)
            queue: asyncio.Queue = asyncio.Queue()
            if options["stream"]:
                item.on_text = lambda text: loop.call_soon_threadsafe(queue.put_nowait, text)
            future = submit(item)
        except ApiError as err:
            return err.response()
        except HTTPException as err:
            return ApiError(err.status_code, str(err.detail)).response()
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": item.adapter}
        if options["stream"]:
            return StreamingResponse(_events(meta, item, future, queue, outcome, options["usage"]),
                                     media_type="text/event-stream")
        try:
            result = await while_connected(outcome(future), item, request)
        except HTTPException as err:
            return ApiError(err.status_code, str(err.detail)).response()
        choice = {"index": 0, "message": {"role": "assistant", "content": result["caption"]},
                  "finish_reason": result.get("finish_reason", "stop"), "logprobs": None}
        routed = {"mmlora_routed_to": result["routed_to"]} if "routed_to" in result else {}
        return meta | {"object": "chat.completion", "choices": [choice], "usage": _usage(result)} | routed


async def _events(meta: dict, item: Item, future, queue: asyncio.Queue, outcome, usage: bool) -> AsyncIterator[str]:
    """The server-sent events of one streamed answer; if the client goes away before its end, the
    request is cancelled (dropped from the queue, or from the running batch at the next decoding step)."""
    try:
        async for event in _stream_events(meta, future, queue, outcome, usage):
            yield event
    finally:
        if not future.done():
            item.cancelled = True


async def _stream_events(meta: dict, future, queue: asyncio.Queue, outcome, usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: str | None = None) -> str:
        body = meta | {"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    done = asyncio.ensure_future(outcome(future))
    while True:
        getter = asyncio.ensure_future(queue.get())
        finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
        if getter in finished:
            yield chunk({"content": getter.result()})
            continue
        getter.cancel()
        break
    while not queue.empty():  # pieces queued before the end was seen
        yield chunk({"content": queue.get_nowait()})
    try:
        result = done.result()
    except HTTPException as err:
        body = {"error": {"message": str(err.detail), "type": "server_error" if err.status_code >= 500
                          else "invalid_request_error", "param": None, "code": None}}
        yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield chunk({}, result.get("finish_reason", "stop"))
    if usage:
        yield f"data: {json.dumps(meta | {'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(result)})}\n\n"
    yield "data: [DONE]\n\n"
