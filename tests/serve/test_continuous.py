"""Serving every adapter kind with continuous batching: requests for LoRA, DoRA, full-projector,
vision-only, language-only and two-adapter runs (and the base) join the running batch at different
steps, and each gets the caption its run gives alone in plain PEFT; a request whose adapter is still
being read from disk waits without stopping the others; a poisoned prefill fails alone."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from mmlora.errors import MmloraError
from mmlora.serve.engine import Engine, Item
from tests.adapter_runs import caption_alone, make_run

KINDS = {
    "lora": {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0], "rank": 4},
             "projector": {"mode": "lora", "rank": 4}, "language": {"mode": "lora", "rank": 8}},
    "dora": {"vision": {"mode": "dora", "targets": ["q", "v"], "layers": [0], "rank": 4},
             "language": {"mode": "dora", "rank": 4}},
    "fullproj": {"projector": {"mode": "full"}, "language": {"mode": "lora", "rank": 4}},
    "vision": {"vision": {"mode": "lora", "targets": "all-linear", "rank": 8}},
    "language": {"language": {"mode": "lora", "rank": 4}},
    "two": {"vision": {"mode": "dora", "targets": ["q", "v"], "rank": 4}, "language": {"mode": "lora", "rank": 4}},
}


@pytest.fixture(scope="module")
def kind_runs(tmp_path_factory, tiny_llava_dir):
    tmp = tmp_path_factory.mktemp("serve-kinds")
    return {name: make_run(tmp / name, "tiny-llava", placement, seed) for seed, (name, placement) in enumerate(KINDS.items(), 11)}


@pytest.fixture(scope="module")
def images(shapes_small):
    paths = sorted((shapes_small / "world_B/images/test").glob("*.png"))
    return [Image.open(p).convert("RGB") for p in paths[:7]]


@pytest.fixture(scope="module")
def expected(kind_runs, images):
    """``(adapter, image index) → caption alone in plain PEFT`` for every kind and the base."""
    names = [*KINDS, "__base__"]
    return {(n, k): caption_alone(kind_runs.get(n), images[k], max_new_tokens=6) for k, n in enumerate(names)}


def test_two_adapter_and_full_runs_are_what_they_say(kind_runs):
    import json

    manifest = lambda n: json.loads((kind_runs[n] / "final/manifest.json").read_text())  # noqa: E731
    assert len(manifest("two")["adapters"]) == 2 and "full_modules" in manifest("fullproj")


@pytest.mark.parametrize("mode", ["gathered", "mixed"])
def test_staggered_joins_give_each_kind_its_caption_alone(mode, kind_runs, images, expected):
    runs = kind_runs if mode == "gathered" else {n: kind_runs[n] for n in ("lora", "vision", "language")}
    engine = Engine("tiny-llava", runs, mode=mode, max_loaded=len(runs), max_new_tokens=6)
    assert engine.continuous
    names = [n for n in [*KINDS, "__base__"] if n in runs or n == "__base__"]
    order = [names.index(n) for n in names]
    items = {n: Item("caption", n, images[[*KINDS, "__base__"].index(n)], "Provide a one-sentence caption for the provided image.")
             for n in names}
    got = {}
    pending = list(names)
    steps = 0
    while pending or engine.active:
        if pending:  # two newcomers join before every second step
            joiners, pending = pending[:2], pending[2:]
            for seq in engine.join([items[n] for n in joiners]):
                if seq.done:
                    got[seq.request.adapter] = engine.answer(seq)
        for seq in engine.step():
            got[seq.request.adapter] = engine.answer(seq)
        steps += 1
    assert len(order) == len(got)
    for n in names:
        assert got[n]["caption"] == expected[(n, [*KINDS, "__base__"].index(n))], n
    assert len({r["caption"] for r in got.values()}) > 2  # the runs really answer differently
    assert engine.running.prefills == -(-len(names) // 2)


def test_what_a_mode_cannot_serve_is_refused_in_one_line(kind_runs, tmp_path):
    with pytest.raises(MmloraError, match="DoRA adapters cannot share a PEFT mixed batch; serve it with --mode gathered"):
        Engine("tiny-llava", {"d": kind_runs["dora"]}, mode="mixed")
    with pytest.raises(MmloraError, match="2 PEFT adapters: serve it with --mode gathered or merged"):
        Engine("tiny-llava", {"two": kind_runs["two"]}, mode="mixed")
    with pytest.raises(MmloraError, match=r"trained in place \(full\): serve it with --mode gathered or merged"):
        Engine("tiny-llava", {"f": kind_runs["fullproj"]}, mode="switch")
    big = make_run(tmp_path / "big", "tiny-llava", {"language": {"mode": "full"}}, 3)
    with pytest.raises(MmloraError, match=r"trained [\d,]+ parameters in place \(\d+% of the base.*--mode merged"):
        Engine("tiny-llava", {"big": big}, mode="gathered")
    qa = make_run(tmp_path / "qa", "tiny-llava", {"language": {"mode": "qalora", "rank": 4, "group_size": 16}}, 4)
    with pytest.raises(MmloraError, match="QA-LoRA layers re-quantize the base; export it merged"):
        Engine("tiny-llava", {"qa": qa}, mode="gathered")


def test_merged_mode_serves_full_and_two_adapter_runs(kind_runs, images, expected):
    engine = Engine("tiny-llava", {n: kind_runs[n] for n in ("fullproj", "two")}, mode="merged", max_loaded=1,
                    max_new_tokens=6)
    for n in ("fullproj", "two"):
        k = [*KINDS, "__base__"].index(n)
        item = Item("caption", n, images[k], "Provide a one-sentence caption for the provided image.")
        assert engine.run([item])[0]["caption"] == expected[(n, k)]
    assert engine.loaded == ["two"]


def test_a_request_waits_for_its_adapter_without_stopping_the_others(kind_runs, images):
    """The page-in of ``language`` is held until ``lora``'s request has finished: decoding went on meanwhile."""
    from mmlora.serve.batcher import Batcher

    engine = Engine("tiny-llava", {n: kind_runs[n] for n in ("lora", "language")}, mode="gathered", max_loaded=2,
                    max_new_tokens=12)
    engine.ensure({"lora"})
    release, reading = threading.Event(), threading.Event()
    read = engine._read

    def slow_read(name):
        reading.set()
        assert release.wait(30)
        return read(name)

    engine.pager.read = slow_read
    batcher = Batcher(engine, max_batch=4, max_wait_ms=0).start()
    try:
        slow = batcher.submit(Item("caption", "language", images[0], "Describe."))
        assert reading.wait(30)
        fast = batcher.submit(Item("caption", "lora", images[1], "Describe."))
        result = fast.result(timeout=60)  # answered while the other adapter is still being read
        assert not slow.done() and result["caption"] and sum(batcher.running_sizes) >= 1
        release.set()
        assert slow.result(timeout=60)["caption"]
    finally:
        release.set()
        batcher.stop()
    assert engine.loaded == ["lora", "language"]


def test_a_poisoned_prefill_fails_alone(kind_runs, images):
    from mmlora.serve.batcher import Batcher

    engine = Engine("tiny-llava", {"lora": kind_runs["lora"]}, mode="gathered", max_new_tokens=4)
    join = engine.join

    def poisoned(items):
        if any(i.prompt == "poison" for i in items):
            raise RuntimeError("index out of range (simulated)")
        if any(i.prompt == "user error" for i in items):
            raise MmloraError("this request cannot run (simulated)")
        return join(items)

    engine.join = poisoned
    batcher = Batcher(engine, max_batch=8, max_wait_ms=300)
    prompts = ["one", "poison", "two", "user error", "three"]
    futures = {p: batcher.submit(Item("caption", "lora", images[0], p)) for p in prompts}  # queued before the start
    batcher.start()
    try:
        for p in ("one", "two", "three"):
            assert futures[p].result(timeout=60)["caption"] == caption_alone(kind_runs["lora"], images[0], 4, p)
        with pytest.raises(RuntimeError, match="index out of range"):
            futures["poison"].result(timeout=60)
        with pytest.raises(MmloraError, match="cannot run"):
            futures["user error"].result(timeout=60)
    finally:
        batcher.stop()
    assert batcher.retried == 1 and batcher.batch_sizes.count(1) == 3  # one failed prefill, then each alone


def test_a_cancelled_request_leaves_and_the_others_keep_their_answers(kind_runs, images):
    """A request whose client went away leaves the running batch at the next step (``cancelled``, its
    future cancelled), or the queue before it joins; the sequences beside it still get their answer alone."""
    from mmlora.serve.batcher import Batcher

    engine = Engine("tiny-llava", {"lora": kind_runs["lora"]}, mode="gathered", max_new_tokens=6)
    stay, leave = (Item("caption", "lora", images[k], "Describe.") for k in (0, 1))
    seqs = engine.join([stay, leave])
    engine.step()
    leave.cancelled = True
    done = engine.step()
    assert [s.request.handle for s in done] == [leave] and done[0].finish_reason == "cancelled"
    assert engine.active == 1 and len(done[0].tokens) == 2  # the first token at the join, one step
    while engine.active:
        done = engine.step()
    assert engine.answer(seqs[0])["caption"] == caption_alone(kind_runs["lora"], images[0], 6, "Describe.")

    batcher = Batcher(engine, max_batch=4, max_wait_ms=300)
    waiting = Item("caption", "lora", images[1], "Describe.")
    futures = [batcher.submit(waiting), batcher.submit(Item("caption", "lora", images[0], "Describe."))]
    waiting.cancelled = True  # before the worker starts: it never joins
    abandoned = batcher.submit(Item("caption", "lora", images[1], "Describe."))
    abandoned.cancel()  # what asyncio does to the future when the awaiting task is cancelled: the worker lives on
    batcher.start()
    try:
        assert futures[1].result(timeout=60)["caption"] == caption_alone(kind_runs["lora"], images[0], 6, "Describe.")
        assert futures[0].cancelled() and batcher.cancelled == 1
        later = batcher.submit(Item("caption", "lora", images[1], "Describe."))
        assert later.result(timeout=60)["caption"] == caption_alone(kind_runs["lora"], images[1], 6, "Describe.")
    finally:
        batcher.stop()
