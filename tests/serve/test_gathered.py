"""Gathered multi-adapter LoRA: each row of a batch equals its adapter alone in plain PEFT (LoRA of
different ranks, rsLoRA, DoRA, adapters on different layers, the base), and the work per layer does
not grow with the number of different adapters in the batch."""

import pytest
import torch
from torch import nn

from mmlora.errors import MmloraError
from mmlora.serve.engine import Engine, Item
from mmlora.adapters.parts import read_adapter
from mmlora.serve.gathered import LoraPool
from tests.adapter_runs import caption_alone, make_run


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.down = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _base() -> _Toy:
    torch.manual_seed(0)
    return _Toy().eval()


CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["up", "down"]),
    "b": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["up"]),  # one layer only
    "c": dict(r=6, lora_alpha=12, use_dora=True, target_modules=["up", "down"]),
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """``(PEFT model holding adapters a, b, c with random non-zero weights, {name: saved folder})``."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_base(), LoraConfig(**CONFIGS["a"]), adapter_name="a")
    for name in ("b", "c"):
        model.add_adapter(name, LoraConfig(**CONFIGS[name]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if "magnitude" in n else 0.0))
    out = tmp_path_factory.mktemp("toy-adapters")
    folders = {}
    for name in CONFIGS:
        model.save_pretrained(out / name, selected_adapters=[name])
        folders[name] = next(p.parent for p in (out / name).rglob("adapter_config.json"))
    return model.eval(), folders


def _pool(folders, names=("a", "b", "c")):
    base = _base()
    pool = LoraPool(base)
    for n in names:
        pool.add(n, read_adapter(folders[n], base))
    return base, pool


def test_each_row_equals_its_adapter_alone_in_peft(toy):
    model, folders = toy
    base, pool = _pool(folders)
    x = torch.randn(5, 3, 12)
    adapters = ["c", "__base__", "a", "b", "c"]
    with torch.no_grad(), pool.route(adapters):
        gathered = base(x)
    for row, name in enumerate(adapters):
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(x[row:row + 1])
            else:
                model.set_adapter(name)
                alone = model(x[row:row + 1])
        assert torch.allclose(gathered[row:row + 1], alone, atol=1e-5), name
    for name in ("a", "c"):  # a batch with one adapter takes the plain-matmul path
        with torch.no_grad(), pool.route([name] * 5):
            together = base(x)
        model.set_adapter(name)
        with torch.no_grad():
            assert torch.allclose(together, model(x), atol=1e-5), name
    with torch.no_grad(), pool.route(["a", "b", "c", "__base__"]):
        same = base(x[:1].expand(4, -1, -1))  # one input through every adapter and the base
    assert all(not torch.allclose(same[i], same[3], atol=1e-3) for i in range(3))  # every adapter changes it
    with torch.no_grad():
        assert torch.equal(base(x), _base()(x))  # outside a route the base is the base


def test_stacks_are_rank_exact_and_freed_rows_are_reused(toy):
    model, folders = toy
    base, pool = _pool(folders, ("a", "c"))  # rank 4 and rank 6 (DoRA), both on up and down
    up, down = pool.kind("up"), pool.kind("down")
    assert up.rows.end == down.rows.end == 1 + 4 + 6  # row 0, then each adapter's own rank
    pool.remove("a")
    pool.add("b", read_adapter(folders["b"], base))  # rank 8 on up only: a's 4 rows do not fit it
    assert pool.slot == {"c": 2, "b": 1}  # a's slot reused
    assert up.rows.end == 1 + 4 + 6 + 8 and up.rows.holes == [(1, 4)] and down.rows.holes == [(1, 4)]
    pool.add("a", read_adapter(folders["a"], base))  # rank 4 fits a's old rows again, in both layers
    assert up.rows.holes == down.rows.holes == [] and up.rows.end == 19 and down.rows.end == 11
    parts = [read_adapter(folders[n], base) for n in ("a", "b", "c")]
    own = sum(t.numel() * 4 for p in parts for a, b, g in p.values() for t in (a, b, g) if t is not None)
    zero_rows = 4 * (12 + 16 + 16 + 16 + 8 + 8)  # row 0 of A, B and g in each kind
    stacks = sum(kind.nbytes() for kind in pool.kinds.values())
    assert own <= stacks <= 1.25 * (own + zero_rows)  # the adapters' own size, and a quarter to grow into
    assert pool.nbytes() - stacks <= 5 * 2 * 4 * 8  # five tables of 2 kinds or layers × 4 slots
    x = torch.randn(3, 12)
    with torch.no_grad(), pool.route(["b", "c", "a"]):
        out = base(x)
    for row, name in enumerate(["b", "c", "a"]):
        model.set_adapter(name)
        with torch.no_grad():
            assert torch.allclose(out[row], model(x[row:row + 1])[0], atol=1e-5), name


def test_freed_rows_merge_and_the_end_comes_back():
    from mmlora.serve.gathered import _Rows

    rows = _Rows()
    a, b, c, d = (rows.take(n) for n in (4, 4, 8, 2))
    assert (a, b, c, d, rows.end) == (1, 5, 9, 17, 19)
    rows.give(b, 4)
    rows.give(a, 4)  # beside b's rows: one hole of 8
    assert rows.holes == [(1, 8)] and rows.take(8) == 1  # an 8-row adapter fits where two 4-row ones were
    rows.give(1, 8)
    rows.give(c, 8)  # merges with the hole before it: 16 rows from 1
    rows.give(d, 2)  # the last block: the end comes back over everything freed
    assert rows.holes == [] and rows.end == 1


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 12) for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def test_a_kind_stacks_all_its_layers_and_reused_rows_start_clean(tmp_path):
    """The three blocks are one kind (one gather for all of them); an adapter taking the rows of an
    evicted one that adapted more blocks sees zeros, not the old adapter, in the blocks it leaves out."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    folders, models = {}, {}
    for name, targets, seed in (("x", ["blocks.0", "blocks.1", "blocks.2"], 1), ("y", ["blocks.1"], 2)):
        torch.manual_seed(0)
        model = get_peft_model(_Blocks().eval(), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.save_pretrained(tmp_path / name)
        folders[name], models[name] = tmp_path / name, model.eval()
    torch.manual_seed(0)
    base = _Blocks().eval()
    pool = LoraPool(base)
    pool.add("x", read_adapter(folders["x"], base))
    assert len(pool.kinds) == 1 and len(pool.kind("blocks.0").stacks) == 3
    pool.remove("x")
    pool.add("y", read_adapter(folders["y"], base))  # x's rows, in blocks 0 and 2 too
    assert pool.kind("blocks.1").rows.holes == []
    pool.add("x", read_adapter(folders["x"], base))  # new rows; its blocks 0 and 2 gather y's rows there too
    x = torch.randn(2, 12)
    for adapters in (["y", "y"], ["y", "__base__"], ["y", "x"]):
        with torch.no_grad(), pool.route(adapters):
            out = base(x)
        with torch.no_grad():
            assert torch.allclose(out[0], models["y"](x[:1])[0], atol=1e-5), adapters
    with torch.no_grad():
        assert torch.allclose(out[1], models["x"](x[1:])[0], atol=1e-5)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof, pool.route(["x", "y", "x"]):
        pass
    gathers = {e.key: e.count for e in prof.key_averages()}.get("aten::index_select", 0)
    assert gathers == 2  # A and B of the one kind, for its three layers


def test_work_per_layer_does_not_grow_with_the_adapters_in_a_batch(toy):
    from torch.profiler import ProfilerActivity, profile

    model, folders = toy
    base, pool = _pool(folders)
    x = torch.randn(6, 3, 12)

    def ops(adapters, gathered):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            if gathered:
                with pool.route(adapters):
                    base(x)
            else:
                model(x, adapter_names=adapters)
        counts = {e.key: e.count for e in prof.key_averages()}
        return sum(counts.get(k, 0) for k in ("aten::bmm", "aten::baddbmm_", "aten::mm", "aten::addmm", "aten::addmm_", "aten::linear"))

    one, two, three = ["a"] * 6, ["a", "b"] * 3, ["a", "b", "c"] * 2
    assert ops(one, True) == ops(two, True) == ops(three, True)
    assert ops(one, False) < ops(["a", "b", "a", "b", "a", "b"], False)  # PEFT's mixed batch loops per adapter


def test_what_cannot_be_gathered_is_refused(toy, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, folders = toy
    base, pool = _pool(folders, ("a",))
    with pytest.raises(RuntimeError, match="got 4 rows for 2 samples"), pool.route(["a", "__base__"]):
        base(torch.randn(4, 12))
    with pytest.raises(KeyError, match="not paged in"), pool.route(["b"]):
        pass
    saved = get_peft_model(_base(), LoraConfig(r=2, target_modules=["up"], modules_to_save=["down"]))
    saved.save_pretrained(tmp_path / "mts")
    with pytest.raises(MmloraError, match="modules_to_save cannot be read as plain LoRA parts; serve it with --mode switch or merged"):
        read_adapter(tmp_path / "mts", _base())


GATHER_PLACEMENT = {"vision": {"mode": "lora", "targets": ["q", "v"], "layers": [0], "rank": 4},
                    "projector": {"mode": "lora", "rank": 4},
                    "language": {"mode": "lora", "rank": 8}}
DORA_PLACEMENT = {"vision": {"mode": "dora", "targets": ["q", "v"], "layers": [0], "rank": 4},
                  "language": {"mode": "dora", "rank": 4}}


@pytest.fixture(scope="module")
def gather_runs(tmp_path_factory, tiny_llava_dir):
    tmp = tmp_path_factory.mktemp("serve-gathered")
    return {"wide": make_run(tmp / "wide", "tiny-llava", GATHER_PLACEMENT, 5),
            "dora": make_run(tmp / "dora", "tiny-llava", DORA_PLACEMENT, 6),
            "lm": make_run(tmp / "lm", "tiny-llava", {"language": {"mode": "lora", "rank": 4}}, 7)}


def test_gathered_engine_answers_each_sample_as_its_run_alone(gather_runs, shapes_small):
    from PIL import Image

    from mmlora.data.samples import CAPTION_PROMPT

    paths = sorted((shapes_small / "world_B/images/test").glob("*.png"))[:4]
    images = [Image.open(p).convert("RGB") for p in paths]
    names = ["dora", "wide", "__base__", "lm"]
    expected = [caption_alone(gather_runs.get(n), im) for n, im in zip(names, images)]
    assert len(set(expected)) > 1
    engine = Engine("tiny-llava", gather_runs, mode="gathered", max_loaded=3, max_new_tokens=5)
    items = [Item("caption", n, im, CAPTION_PROMPT) for n, im in zip(names, images)]
    assert [r["caption"] for r in engine.run(items)] == expected
    assert engine.pool.names == ["dora", "lm", "wide"] and engine.pool.nbytes() > 0 and engine.peft is None
    # a later batch in another order, after an eviction and a reload, still routes each sample right
    engine.max_loaded = 2
    assert [r["caption"] for r in engine.run(items[1:3])] == expected[1:3]
    assert [r["caption"] for r in engine.run(items[::-1][:2])] == expected[::-1][:2]
