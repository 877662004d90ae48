"""The adapter pool: ``--max-loaded`` as a count or a size, least-recently-used eviction that never
touches an adapter in use, and the page-in thread."""

from __future__ import annotations

import threading

import pytest

from mmlora.errors import MmloraError
from mmlora.serve.pool import Budget, Pager, parse_max_loaded


@pytest.mark.parametrize("value,expected", [
    ("64", (64, None)), (8, (8, None)), ("512MiB", (None, 512 * 2**20)), ("1.5 GiB", (None, int(1.5 * 2**30))),
    ("300kib", (None, 300 * 1024)),
])
def test_max_loaded_is_a_count_or_a_size(value, expected):
    assert parse_max_loaded(value) == expected


@pytest.mark.parametrize("value", ["0", "lots", "2.5", "12MB", "-3", "0MiB"])
def test_max_loaded_refuses_what_it_cannot_read(value):
    with pytest.raises(MmloraError, match="--max-loaded"):
        parse_max_loaded(value)


def test_budget_evicts_least_recently_used_never_one_in_use():
    budget = Budget(None, 100)
    for name, size in (("a", 40), ("b", 30), ("c", 20)):
        budget.loaded[name] = size
    budget.touch("a")  # order now b, c, a
    assert budget.victims({"d": 10}, keep=()) == []  # 90 + 10 fits
    assert budget.victims({"d": 35}, keep=()) == ["b"]  # 125 - 30 = 95
    assert budget.victims({"d": 35}, keep={"b"}) == ["c", "a"]  # b in use: c, then a
    with pytest.raises(MmloraError, match="do not fit beside those in use"):
        budget.victims({"d": 80}, keep={"a", "b"})
    assert not budget.fits({"x": 101}) and budget.fits({"x": 60, "y": 40})
    count = Budget(2, None)
    count.loaded |= {"a": 1, "b": 1}
    assert count.victims({"c": 1}, keep={"a"}) == ["b"] and not count.fits({"a": 1, "b": 1, "c": 1})


def test_pager_reads_in_the_background_and_wakes_the_caller():
    release, woken = threading.Event(), threading.Event()

    def read(name):
        assert release.wait(10)
        if name == "bad":
            raise MmloraError("bad: no adapter_config.json")
        return name.upper()

    pager = Pager(read, notify=woken.set)
    pager.request("a")
    pager.request("a")  # once
    assert not pager.ready("a")
    release.set()
    assert woken.wait(10) and pager.ready("a") and pager.take("a") == "A" and not pager.ready("a")
    pager.request("bad")
    woken.clear()
    assert woken.wait(10)
    with pytest.raises(MmloraError, match="no adapter_config"):
        pager.take("bad")
    pager.close()


def test_an_engine_with_a_byte_budget_keeps_what_fits(tmp_path, tiny_llava_dir, shapes_small):
    from PIL import Image

    from mmlora.serve.engine import Engine, Item
    from tests.adapter_runs import make_run

    runs = {n: make_run(tmp_path / n, "tiny-llava", {"language": {"mode": "lora", "rank": r}}, s)
            for n, r, s in (("small", 2, 1), ("big", 16, 2), ("mid", 4, 3))}
    probe = Engine("tiny-llava", runs, mode="gathered")
    sizes = {n: run.nbytes for n, run in probe.runs.items()}
    assert sizes["small"] < sizes["mid"] < sizes["big"]
    limit = sizes["big"] + sizes["small"]  # big with small fits; big with mid does not
    engine = Engine("tiny-llava", runs, mode="gathered", max_loaded=f"{limit / 2**20:.6f}MiB", max_new_tokens=2)
    image = Image.open(next((shapes_small / "world_B/images/test").glob("*.png"))).convert("RGB")
    for name in ("small", "big", "mid"):
        engine.run([Item("caption", name, image, "Describe.")])
    assert engine.loaded == ["mid"]  # small (least recent) and then big had to go
    assert engine.budget.nbytes <= limit and abs(engine.loaded_mib() * 2**20 - sum(sizes[n] for n in engine.loaded)) < 1
    with pytest.raises(MmloraError, match="at most"):
        engine.run([Item("caption", "big", image, "x"), Item("caption", "mid", image, "x")])
