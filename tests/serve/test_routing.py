"""Serving a router run (``--router NAME=RUN``): a request that names the router, or no adapter, goes to
the expert its router picks for it, and gets that expert's caption alone in plain PEFT."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from mmlora.errors import MmloraError
from mmlora.serve.engine import Engine
from tests.adapter_runs import caption_alone, make_run


@pytest.fixture(scope="module")
def router_run(tmp_path_factory, tiny_llava_dir):
    """A router over experts B and C (and the base) whose gate always picks C."""
    from safetensors.torch import load_file, save_file

    from mmlora.train.continual import write_router_run

    tmp = tmp_path_factory.mktemp("serve-router")
    experts = {"B": make_run(tmp / "b", "tiny-llava", {"language": {"mode": "lora", "rank": 4}}, 41),
               "C": make_run(tmp / "c", "tiny-llava", {"language": {"mode": "lora", "rank": 8}}, 42)}
    run = write_router_run(tmp / "router", "tiny-llava", {k: str(v) for k, v in experts.items()}, gate="learned")
    path = run / "final/router.safetensors"
    state = load_file(str(path))
    state["router.linear.bias"] = torch.tensor([0.0, 0.0, 4.0])  # experts: base, B, C
    save_file(state, str(path))
    return run, experts


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 160, 40)).save(buf, format="PNG")
    return buf.getvalue()


def test_requests_naming_the_router_or_nothing_go_to_its_pick(router_run):
    from fastapi.testclient import TestClient

    from mmlora.serve.app import create_app

    run, experts = router_run
    engine = Engine("tiny-llava", {}, mode="gathered", max_new_tokens=5, router=("auto", run))
    assert sorted(engine.runs) == ["auto-B", "auto-C"]
    expected = caption_alone(experts["C"], Image.open(io.BytesIO(_png())).convert("RGB"), 5)
    with TestClient(create_app(engine, max_batch=4, max_wait_ms=5)) as client:
        for form in ({"adapter": "auto"}, {}):
            r = client.post("/caption", data=form, files={"image": ("x.png", _png(), "image/png")})
            assert r.status_code == 200, r.text
            assert r.json()["routed_to"] == "auto-C" and r.json()["caption"] == expected
        named = client.post("/caption", data={"adapter": "auto-B"}, files={"image": ("x.png", _png(), "image/png")})
        assert "routed_to" not in named.json()
        assert named.json()["caption"] == caption_alone(experts["B"], Image.open(io.BytesIO(_png())).convert("RGB"), 5)
        assert client.get("/info").json()["router"] == "auto"
        assert "auto" in [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_a_router_needs_a_router_run_and_gathered_mode(router_run, tmp_path):
    run, experts = router_run
    with pytest.raises(MmloraError, match="not a router run"):
        Engine("tiny-llava", {}, mode="gathered", router=("auto", experts["B"]))
    with pytest.raises(MmloraError, match="--mode gathered"):
        Engine("tiny-llava", {}, mode="mixed", router=("auto", run))
    from fastapi.testclient import TestClient

    from mmlora.serve.app import create_app

    with TestClient(create_app(Engine("tiny-llava", {"b": experts["B"]}, mode="gathered"))) as client:
        r = client.post("/caption", data={}, files={"image": ("x.png", _png(), "image/png")})
        assert r.status_code == 400 and "name an adapter" in r.json()["detail"]
