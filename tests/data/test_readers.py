"""Every reader on small fixtures of its real format, and every bad-sample kind under both policies."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlora.data.batching import ConversationDataset
from mmlora.data.processing import ConversationEncoder
from mmlora.data.readers import read_coco, read_hf, read_llava, read_messages
from mmlora.data.samples import BadSample, Sample
from mmlora.errors import MmloraError


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_dir)


def _img(path: Path, mode="RGB", size=(24, 24)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray((np.arange(size[0] * size[1]).reshape(size) * 40).astype(np.uint16)).save(path)
    elif mode == "CMYK":
        Image.new("CMYK", size, (10, 200, 30, 0)).save(path.with_suffix(".jpg"))
        return path.with_suffix(".jpg").name
    else:
        colour = {"RGB": (200, 10, 10), "L": 128, "LA": (128, 100), "RGBA": (1, 2, 3, 100), "P": 3}[mode]
        Image.new(mode, size, colour).save(path)
    return path.name


def _llava_item(sid: str, image: str | None, question="<image>\nDescribe.", answer="a red circle.", extra=None):
    item = {"id": sid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image is not None:
        item["image"] = image
    item.update(extra or {})
    return item


def test_llava_json_and_jsonl(tmp_path, processor):
    _img(tmp_path / "a.png")
    items = [_llava_item("1", "a.png"), _llava_item("2", None, question="Say hi.", answer="hi.")]
    (tmp_path / "d.json").write_text(json.dumps(items))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    for name in ("d.json", "d.jsonl"):
        records = read_llava(tmp_path / name)
        assert [type(r) for r in records] == [Sample, Sample]
        assert records[0].images == [(tmp_path / "a.png").resolve()] and not records[1].images
        assert records[0].messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe."}]
    ds = ConversationDataset(records, ConversationEncoder(processor))
    assert ds[0]["pixel_values"].shape[0] == 1 and "pixel_values" not in ds[1]


def test_coco_captions_with_image_folder(shapes_small):
    root = shapes_small / "world_A"
    records = read_coco(root / "annotations" / "captions_val.json")
    assert len(records) == 10 * 5 and all(isinstance(r, Sample) for r in records)
    assert records[0].images[0] == (root / "images" / "val" / "A_val_00000.png").resolve()
    assert len(read_coco(root / "annotations" / "captions_val.json", captions="first")) == 10


def test_messages_jsonl(tmp_path):
    _img(tmp_path / "imgs" / "x.png")
    rows = [
        {"messages": [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "a star."}],
         "images": ["imgs/x.png"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "hello"}]}]},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = read_messages(tmp_path / "m.jsonl")
    assert all(isinstance(r, Sample) for r in records)
    assert records[0].messages[0]["content"][0] == {"type": "image"} and records[1].messages[0]["role"] == "system"


def test_hf_datasets_disk_parquet_imagefolder(tmp_path):
    import datasets

    images = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(3)]
    table = datasets.Dataset.from_dict({
        "id": ["a", "b", "c"], "image": images,
        "conversations": [[{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": f"answer {i}"}] for i in range(3)],
    }).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "disk"))
    table.to_parquet(str(tmp_path / "t.parquet"))
    for kind, path in (("disk", tmp_path / "disk"), ("parquet", tmp_path / "t.parquet")):
        records = read_hf(path, kind)
        assert [r.id for r in records] == ["a", "b", "c"]
        assert records[2].messages[1]["content"][0]["text"] == "answer 2" and len(records[2].images) == 1
    folder = tmp_path / "folder" / "train"
    for i, img in enumerate(images):
        _img(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "caption": f"shape {i}"}) for i in range(3)))
    records = read_hf(tmp_path / "folder", "imagefolder")
    assert sorted(r.messages[1]["content"][0]["text"] for r in records) == ["shape 0", "shape 1", "shape 2"]


# ---------------------------------------------------------------- bad samples, one test per kind

def _write_llava(tmp_path, items) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(items))
    return path


def _bad_kinds(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """kind -> (data file with one good sample and one bad one, expected message fragment)."""
    _img(tmp_path / "good.png")
    cases: dict[str, tuple[list | bytes, str]] = {}
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    Image.new("RGB", (64, 64)).save(tmp_path / "trunc.png")
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    Image.new("L", (400, 400)).save(tmp_path / "big.png")  # over the 100_000-pixel limit used below
    cases["missing image file"] = ([_llava_item("bad", "nope.png")], "image file not found")
    cases["zero-byte file"] = ([_llava_item("bad", "empty.png")], "empty (0 bytes)")
    cases["corrupt image"] = ([_llava_item("bad", "corrupt.png")], "cannot be decoded")
    cases["truncated image"] = ([_llava_item("bad", "trunc.png")], "cannot be decoded")
    cases["decompression bomb"] = ([_llava_item("bad", "big.png")], "over the limit of 100,000")
    cases["empty conversation"] = ([{"id": "bad", "image": "good.png", "conversations": []}], "empty conversation")
    cases["missing placeholder"] = ([_llava_item("bad", "good.png", question="Describe.")], "missing <image> placeholder")
    cases["extra placeholder"] = ([_llava_item("bad", "good.png", question="<image><image>\nDescribe.")], "extra <image> placeholder")
    cases["unknown role"] = ([{"id": "bad", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}], "unknown role 'robot'")
    cases["path escapes root (..)"] = ([_llava_item("bad", "../outside.png")], "escapes the data root")
    cases["absolute path elsewhere"] = ([_llava_item("bad", "/etc/hostname")], "escapes the data root")
    out = {}
    for kind, (items, msg) in cases.items():
        d = tmp_path / kind.replace(" ", "_").replace("(", "").replace(")", "").replace(".", "")
        d.mkdir()
        for f in ("good.png", "empty.png", "corrupt.png", "trunc.png", "big.png"):
            (d / f).write_bytes((tmp_path / f).read_bytes())
        out[kind] = (_write_llava(d, [_llava_item("good", "good.png"), *items]), msg)
    jl = tmp_path / "jsonl"
    jl.mkdir()
    (jl / "good.png").write_bytes((tmp_path / "good.png").read_bytes())
    good_line = json.dumps(_llava_item("good", "good.png")).encode()
    (jl / "utf8.jsonl").write_bytes(good_line + b"\n" + b'{"id": "bad", "conversations": "\xff\xfe"}\n')
    (jl / "json.jsonl").write_bytes(good_line + b"\n" + b'{"id": "bad", "conversations": [\n')
    out["invalid UTF-8"] = (jl / "utf8.jsonl", "invalid UTF-8")
    out["malformed JSON line"] = (jl / "json.jsonl", "malformed JSON line")
    return out


BAD_KINDS = ["missing image file", "zero-byte file", "corrupt image", "truncated image", "decompression bomb",
             "empty conversation", "missing placeholder", "extra placeholder", "unknown role",
             "path escapes root (..)", "absolute path elsewhere", "invalid UTF-8", "malformed JSON line"]


@pytest.mark.parametrize("policy", ["error", "skip"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_sample(kind, policy, tmp_path, processor):
    path, message = _bad_kinds(tmp_path)[kind]
    encoder = ConversationEncoder(processor, max_image_pixels=100_000)

    def run_epoch():
        ds = ConversationDataset(read_llava(path), encoder, on_bad_sample=policy)
        return ds, [ds[i] for i in range(len(ds))]

    if policy == "error":
        with pytest.raises(BadSample) as err:
            run_epoch()
        text = str(err.value)
        assert message in text and str(path) in text
        assert "line" in kind or "UTF" in kind or "JSON" in kind or "(id bad)" in text
    else:
        ds, items = run_epoch()
        good = [it for it in items if it is not None]
        assert len(good) == 1 and len(ds.skipped) == 1
        report = ds.write_skip_report(tmp_path / "skipped.jsonl")
        rows = [json.loads(line) for line in report.read_text().splitlines()]
        assert len(rows) == 1 and message in rows[0]["problem"] and str(path) in rows[0]["where"]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_non_rgb_modes_load_as_rgb(mode, tmp_path, processor):
    name = _img(tmp_path / "m.png", mode)
    path = _write_llava(tmp_path, [_llava_item("x", name)])
    out = ConversationEncoder(processor).encode(read_llava(path)[0])
    assert out["pixel_values"].shape == (1, 3, 32, 32) and out["pixel_values"].abs().sum() > 0


def test_file_level_problems_are_clear_errors(tmp_path):
    with pytest.raises(MmloraError, match="no data file at"):
        read_llava(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(MmloraError, match=r"x.json: not valid JSON: .* line 1"):
        read_llava(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"a": 1}')
    with pytest.raises(MmloraError, match="expected a JSON list"):
        read_llava(tmp_path / "y.json")
