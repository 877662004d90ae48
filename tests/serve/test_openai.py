"""The OpenAI-compatible endpoint, driven by the ``openai`` Python client pointed at the loopback server:
``model`` names the adapter, the image travels as a data URL; answers (whole and streamed) equal the
run alone in plain PEFT; what the server does not do is refused with a 4xx the client raises."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from mmlora.serve.app import create_app
from mmlora.serve.engine import Engine
from mmlora.serve.local import on_loopback
from tests.adapter_runs import caption_alone, make_run
from tests.serve.test_continuous import KINDS

openai = pytest.importorskip("openai")


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _message(image, text="Describe the image."):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": _data_url(image)}}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llava_dir, shapes_small):
    tmp = tmp_path_factory.mktemp("serve-openai")
    runs = {"lora": make_run(tmp / "lora", "tiny-llava", KINDS["lora"], 21),
            "dora": make_run(tmp / "dora", "tiny-llava", KINDS["dora"], 22)}
    engine = Engine("tiny-llava", runs, mode="gathered", max_loaded=2, max_new_tokens=8)
    images = [Image.open(p).convert("RGB") for p in sorted((shapes_small / "world_B/images/test").glob("*.png"))[:2]]
    with on_loopback(create_app(engine, max_batch=4, max_wait_ms=5)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60), runs, images


def test_models_list_the_adapters(server):
    client, _, _ = server
    assert [m.id for m in client.models.list().data] == ["__base__", "lora", "dora"]


def test_a_completion_answers_with_the_named_adapter(server):
    client, runs, images = server
    for name in ("lora", "dora", "__base__"):
        done = client.chat.completions.create(model=name, messages=_message(images[0]), max_tokens=6)
        assert done.object == "chat.completion" and done.model == name
        choice = done.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
        assert choice.message.content == caption_alone(runs.get(name), images[0], 6, "Describe the image.")
        assert done.usage.completion_tokens <= 6 + 1 and done.usage.prompt_tokens > 10
        assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_a_streamed_completion_adds_up_to_the_answer(server):
    client, runs, images = server
    stream = client.chat.completions.create(model="lora", messages=_message(images[1]), max_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # piece by piece, as decoded
    assert "".join(pieces) == caption_alone(runs["lora"], images[1], 8, "Describe the image.")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(pieces) - 1


@pytest.mark.parametrize("kwargs,error,message", [
    ({"model": "nope"}, "NotFoundError", "model 'nope' does not exist"),
    ({"temperature": 0.7}, "BadRequestError", "decodes greedily"),
    ({"n": 2}, "BadRequestError", "one answer per request"),
    ({"max_tokens": 999}, "BadRequestError", "max_tokens must be a whole number from 1 to 8"),
    ({"messages": [{"role": "user", "content": "no image"}]}, "BadRequestError", "exactly one image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}]},
     "BadRequestError", "fetches nothing"),
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
     "BadRequestError", "one user message"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
     "BadRequestError", "could not be decoded"),
])
def test_what_the_server_does_not_do_is_a_4xx_the_client_raises(server, kwargs, error, message):
    client, _, images = server
    request = {"model": "lora", "messages": _message(images[0])} | kwargs
    with pytest.raises(getattr(openai, error), match=message):
        client.chat.completions.create(**request)


def test_a_prompt_with_the_image_placeholder_is_refused(server):
    client, _, images = server
    with pytest.raises(openai.BadRequestError, match="placeholder"):
        client.chat.completions.create(model="lora", messages=_message(images[0], "look: <image>"))


def _slow_server(tmp_path, shapes_small):
    """A server whose decoding steps take 20 ms each (time to see a client leave), and one image."""
    import time

    runs = {"lora": make_run(tmp_path / "lora", "tiny-llava", KINDS["lora"], 21)}
    engine = Engine("tiny-llava", runs, mode="gathered", max_new_tokens=200)
    step = engine.step

    def slow_step():
        time.sleep(0.02)
        return step()

    engine.step = slow_step
    image = Image.open(min((shapes_small / "world_B/images/test").glob("*.png"))).convert("RGB")
    return engine, create_app(engine, max_batch=4, max_wait_ms=5), image


def _left_early(app, engine) -> None:
    """The request was cancelled and its sequence left after a few steps, not after its 200."""
    import time

    deadline = time.monotonic() + 30
    while app.state.batcher.cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.state.batcher.cancelled == 1 and engine.active == 0
    assert sum(app.state.batcher.running_sizes) < 100


def test_a_stream_closed_by_its_client_stops_decoding(tiny_llava_dir, shapes_small, tmp_path):
    """The client reads the first piece and hangs up: the server cancels the request."""
    import json

    import httpx

    engine, app, image = _slow_server(tmp_path, shapes_small)
    with on_loopback(app) as url:
        body = {"model": "lora", "messages": _message(image), "max_tokens": 200, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # the first piece of the answer: hang up
        _left_early(app, engine)


@pytest.mark.parametrize("route", ["/caption", "/v1/chat/completions"])
def test_a_client_that_gives_up_waiting_stops_its_decoding(route, tiny_llava_dir, shapes_small, tmp_path):
    """Not streamed: the client times out and closes the connection; the server sees it between polls
    and cancels the request."""
    import io

    import httpx

    engine, app, image = _slow_server(tmp_path, shapes_small)
    png = io.BytesIO()
    image.save(png, format="PNG")
    with on_loopback(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            if route == "/caption":
                httpx.post(url + route, data={"adapter": "lora", "max_new_tokens": "200"},
                           files={"image": ("x.png", png.getvalue(), "image/png")}, timeout=0.5)
            else:
                httpx.post(url + route, json={"model": "lora", "messages": _message(image), "max_tokens": 200},
                           timeout=0.5)
        _left_early(app, engine)
