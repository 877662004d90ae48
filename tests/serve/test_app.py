"""The HTTP API: good requests answered (batched across adapters), every kind of bad request
refused with a 4xx and a message, a full queue answered with 503, a failed batch with 500 — and the
server still answering afterwards."""

import io
import threading

import pytest
from PIL import Image

from mmlora.serve.app import Limits, create_app
from mmlora.serve.engine import Engine
from tests.adapter_runs import LLAVA_PLACEMENT, make_run


def _png(size=(64, 64), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_llava_dir):
    from fastapi.testclient import TestClient

    tmp = tmp_path_factory.mktemp("serve-app")
    runs = {n: make_run(tmp / n, "tiny-llava", LLAVA_PLACEMENT, s) for n, s in (("red", 1), ("blue", 2))}
    engine = Engine("tiny-llava", runs, mode="mixed", max_loaded=2, max_new_tokens=4)
    app = create_app(engine, max_queue=16, max_batch=4, max_wait_ms=200,
                     limits=Limits(max_bytes=200_000, max_pixels=512 * 512))
    with TestClient(app) as c:
        yield c


def test_good_requests_are_batched_across_adapters(client):
    info = client.get("/info").json()
    assert info["kind"] == "caption" and info["adapters"] == ["__base__", "red", "blue"] and info["loaded"] == []
    results = {}

    def ask(adapter):
        r = client.post("/caption", data={"adapter": adapter}, files={"image": ("x.png", _png(), "image/png")})
        results[adapter] = r

    threads = [threading.Thread(target=ask, args=(a,)) for a in ("red", "blue", "__base__")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for adapter, r in results.items():
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == adapter and isinstance(r.json()["caption"], str)
    batcher = client.app.state.batcher
    assert max(batcher.batch_sizes) > 1  # at least two adapters shared one forward
    assert sorted(client.get("/info").json()["loaded"]) == ["blue", "red"]
    assert "<form" in client.get("/").text


@pytest.mark.parametrize("data,files,status,message", [
    ({"adapter": "green"}, {"image": ("x.png", _png(), "image/png")}, 404, "unknown adapter 'green'"),
    ({"adapter": "red"}, None, 422, "image"),
    ({}, {"image": ("x.png", _png(), "image/png")}, 400, "name an adapter"),
    ({"adapter": "red"}, {"image": ("x.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")}, 400, "could not be decoded"),
    ({"adapter": "red"}, {"image": ("x.png", b"", "image/png")}, 400, "empty"),
    ({"adapter": "red"}, {"image": ("x.bin", b"\0" * 300_000, "image/png")}, 413, "larger than"),
    ({"adapter": "red"}, {"image": ("x.png", _png((1024, 1024)), "image/png")}, 413, "pixels"),
    ({"adapter": "red", "prompt": "x" * 600}, {"image": ("x.png", _png(), "image/png")}, 400, "prompt"),
])
def test_bad_requests_get_a_4xx_with_a_message(client, data, files, status, message):
    r = client.post("/caption", data=data, files=files)
    assert r.status_code == status and message in str(r.json()["detail"])
    assert client.post("/caption", data={"adapter": "red"}, files={"image": ("x.png", _png(), "image/png")}).status_code == 200


@pytest.mark.parametrize("prompt", ["describe <image> please", "a caption</s>"])
def test_a_prompt_with_a_placeholder_or_special_token_is_refused_before_it_joins_a_batch(client, prompt):
    batches = client.app.state.batcher.batches
    r = client.post("/caption", data={"adapter": "red", "prompt": prompt}, files={"image": ("x.png", _png(), "image/png")})
    assert r.status_code == 400 and "added by the server" in r.json()["detail"]
    assert client.app.state.batcher.batches == batches  # it never reached the model


def test_wrong_task_for_this_base(client):
    r = client.post("/segment", data={"adapter": "red", "classes": "a,b"}, files={"image": ("x.png", _png(), "image/png")})
    assert r.status_code == 400 and "does caption: use /caption" in r.json()["detail"]


class _SlowEngine:
    """A stand-in engine: blocks until released, or fails, to test the queue and errors."""

    kind, mode, base_ref, max_loaded, loaded, runs, adapter_names = "caption", "mixed", "stub", 4, [], {"a": None}, ["a"]
    continuous, max_new_tokens = False, 8

    def __init__(self):
        self.release, self.fail = threading.Event(), False

    def batch_key(self, item):
        return (item.kind,)

    def fits(self, names):
        return True

    def check(self, item):
        pass

    def run(self, items):
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("out of memory (simulated)")
        return [{"caption": "ok"} for _ in items]


class _PoisonEngine(_SlowEngine):
    """Fails any batch holding a request whose prompt is ``poison`` (our bug) or ``user error`` (theirs)."""

    def __init__(self):
        super().__init__()
        self.release.set()
        self.sizes: list[int] = []

    def run(self, items):
        from mmlora.errors import MmloraError

        self.sizes.append(len(items))
        if any(i.prompt == "poison" for i in items):
            raise RuntimeError("index out of range (simulated)")
        if any(i.prompt == "user error" for i in items):
            raise MmloraError("this request cannot run (simulated)")
        return [{"caption": f"ok {i.prompt}"} for i in items]


def test_a_poisoned_request_fails_alone_and_the_others_in_its_batch_are_answered():
    from fastapi.testclient import TestClient

    engine = _PoisonEngine()
    with TestClient(create_app(engine, max_queue=16, max_batch=8, max_wait_ms=300)) as c:
        results = {}

        def ask(prompt):
            results[prompt] = c.post("/caption", data={"adapter": "a", "prompt": prompt},
                                     files={"image": ("x.png", _png(), "image/png")})

        prompts = ["one", "poison", "two", "user error", "three"]
        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert max(engine.sizes) > 1 and c.app.state.batcher.retried >= 1  # they shared a batch, which failed
    for p in ("one", "two", "three"):
        assert results[p].status_code == 200 and results[p].json()["caption"] == f"ok {p}"
    assert results["poison"].status_code == 500 and "index out of range" in results["poison"].json()["detail"]
    assert results["user error"].status_code == 400 and "cannot run" in results["user error"].json()["detail"]


def test_full_queue_answers_503_and_a_failed_batch_500():
    from fastapi.testclient import TestClient

    engine = _SlowEngine()
    with TestClient(create_app(engine, max_queue=1, max_batch=1, max_wait_ms=0)) as c:
        send = lambda: c.post("/caption", data={"adapter": "a"}, files={"image": ("x.png", _png(), "image/png")})  # noqa: E731
        first = threading.Thread(target=send)  # taken by the worker, which blocks on it
        first.start()
        batcher = c.app.state.batcher
        import time

        while batcher.waiting or not batcher._thread.is_alive():
            time.sleep(0.01)
        time.sleep(0.2)
        second = threading.Thread(target=send)  # waits in the queue: it is now full
        second.start()
        while batcher.waiting < 1:
            time.sleep(0.01)
        r = send()
        assert r.status_code == 503 and "retry later" in r.json()["detail"] and r.headers["retry-after"] == "1"
        engine.release.set()
        first.join(), second.join()
        engine.fail = True
        r = send()
        assert r.status_code == 500 and "out of memory (simulated)" in r.json()["detail"]
        engine.fail = False
        assert send().json()["caption"] == "ok"


def test_serve_command_refuses_bad_arguments(capsys):
    from mmlora.cli import main

    assert main(["serve", "--base", "tiny-llava", "--adapter", "no-equals-sign"]) == 2
    assert "use NAME=RUN" in capsys.readouterr().err
