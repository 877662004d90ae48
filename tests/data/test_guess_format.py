"""``mmlora data check PATH`` guesses the format from the content, however large the file and in
whatever order its keys come; when it cannot tell, the error says which ``--format`` to give."""

import json

import pytest

from mmlora.data.readers import guess_format
from mmlora.errors import MmloraError


def test_the_shapes_worlds_own_files(shapes_small):
    world = shapes_small / "world_B"
    coco = world / "annotations" / "captions_train.json"
    assert coco.read_text()[:4096].count('"images"') == 0  # the case the first 4 KiB got wrong
    assert guess_format(coco) == "coco"
    assert guess_format(world / "llava_train.json") == "llava"
    assert guess_format(world) == "hf"


def test_records_and_jsonl(tmp_path):
    conv = {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nhi"}]}
    msgs = {"messages": [{"role": "user", "content": "<image>hi"}], "images": ["x.png"]}
    (tmp_path / "l.jsonl").write_text("\n" + json.dumps(conv) + "\n")
    (tmp_path / "m.jsonl").write_text(json.dumps(msgs) + "\n")
    (tmp_path / "m.json").write_text(json.dumps([msgs, msgs]))
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    assert guess_format(tmp_path / "l.jsonl") == "llava"
    assert guess_format(tmp_path / "m.jsonl") == "messages"
    assert guess_format(tmp_path / "m.json") == "messages"
    assert guess_format(tmp_path / "t.parquet") == "hf"


def test_a_large_file_whose_keys_come_late(tmp_path):
    """COCO with megabytes of annotations before "images", and a first record larger than any prefix."""
    anns = [{"id": i, "image_id": 0, "caption": "a red star " * 20} for i in range(20000)]
    (tmp_path / "coco.json").write_text(json.dumps({"annotations": anns, "info": {"x": 1}, "images": [{"id": 0}]}))
    assert (tmp_path / "coco.json").stat().st_size > 4 << 20
    assert guess_format(tmp_path / "coco.json") == "coco"
    big = {"id": "a", "notes": "x" * (3 << 20), "conversations": []}
    (tmp_path / "big.json").write_text(json.dumps([big]))
    assert guess_format(tmp_path / "big.json") == "llava"


@pytest.mark.parametrize("name, text, why", [
    ("rows.json", json.dumps({"rows": [1, 2]}), "rows"),
    ("list.json", json.dumps([{"id": 1, "text": "hi"}]), "id, text"),
    ("empty.json", "", "empty"),
    ("broken.json", "[{oops", "not JSON"),
    ("numbers.json", "[1, 2]", "list of"),
    ("odd.jsonl", json.dumps({"caption": "x"}) + "\n", "caption"),
])
def test_when_it_cannot_tell_it_names_the_formats(tmp_path, name, text, why):
    (tmp_path / name).write_text(text)
    with pytest.raises(MmloraError) as err:
        guess_format(tmp_path / name)
    message = str(err.value)
    assert "--format coco|llava|messages|hf" in message and why in message and str(tmp_path / name) in message


def test_data_check_reads_mmloras_coco_file(shapes_small, capsys):
    from mmlora.cli import main

    coco = shapes_small / "world_B" / "annotations" / "captions_train.json"
    assert main(["data", "check", str(coco)]) == 0
    out = capsys.readouterr().out
    assert "(coco)" in out and " 0 bad" in out
