"""Readers: the formats users have → :class:`~mmlora.data.samples.Sample` (or ``BadSample``).

* ``llava``: LLaVA conversation JSON (a list) or JSONL: ``{"id", "image": path | [paths],
  "conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}``.
* ``coco``: COCO caption annotations + an image folder; each caption (or the first per image) is a
  one-turn sample answering ``prompt``.
* ``messages``: JSONL of ``{"messages": [{"role", "content": str | parts}], "images": [paths]}``
  (the chat format of LLaMA-Factory / ms-swift), ``<image>`` placeholders in string content.
* ``hf``: a ``datasets`` table — ``save_to_disk`` folder, parquet file(s), or an ``imagefolder`` with
  ``metadata.jsonl`` — with an image column (``image``/``images``) and ``conversations``,
  ``messages``, or a caption column (``caption``/``text``).

Every record is checked for structure here (roles, placeholders, paths inside the data root, valid
UTF-8 and JSON per line); images are checked when they are loaded. Problems become ``BadSample``
values naming the file and line (or table index) and the sample id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmlora.data.samples import (CAPTION_PROMPT, SPEAKERS, BadSample, Sample, check_messages, error_reason, parts_from_text,
                                 resolve_image_path)
from mmlora.errors import MmloraError
from mmlora.optional import require

Record = Sample | BadSample


def _read_json_records(path: Path) -> list[tuple[str, Any]]:
    """``[(where, record)]`` from a JSON list or a JSONL file; a broken line is a ``BadSample``."""
    if not path.is_file():
        raise MmloraError(f"no data file at {path}")
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        out: list[tuple[str, Any]] = []
        for i, line in enumerate(raw.splitlines(), start=1):
            where = f"{path}:{i}"
            if not line.strip():
                continue
            try:
                out.append((where, json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as err:
                out.append((where, BadSample(where, None, f"invalid UTF-8 at byte {err.start} of the line")))
            except json.JSONDecodeError as err:
                out.append((where, BadSample(where, None, f"malformed JSON line: {err.msg} at column {err.colno}")))
        return out
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise MmloraError(f"{path}: invalid UTF-8 at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise MmloraError(f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(data, list):
        raise MmloraError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
    return [(f"{path}[{i}]", rec) for i, rec in enumerate(data)]


def _image_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _sample_id(rec: Any, fallback: str) -> str:
    return str(rec.get("id", fallback)) if isinstance(rec, dict) else fallback


def _from_conversations(rec: dict, where: str, sid: str, images: list[Any]) -> Sample:
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        raise BadSample(where, sid, "'conversations' must be a list of turns")
    messages = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadSample(where, sid, f"turn {i} must be {{'from': ..., 'value': str}}")
        speaker = turn.get("from")
        if speaker not in SPEAKERS:
            raise BadSample(where, sid, f"turn {i} has unknown role {speaker!r} (known: {', '.join(SPEAKERS)})")
        messages.append({"role": SPEAKERS[speaker], "content": parts_from_text(turn["value"])})
    check_messages(messages, len(images), where, sid)
    return Sample(sid, where, messages, images)


def _from_messages(rec: dict, where: str, sid: str, images: list[Any]) -> Sample:
    msgs = rec.get("messages")
    if not isinstance(msgs, list):
        raise BadSample(where, sid, "'messages' must be a list")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadSample(where, sid, f"message {i} must be an object with role and content")
        content = m.get("content")
        if isinstance(content, str):
            parts = parts_from_text(content)
        elif isinstance(content, list):
            parts = []
            for p in content:
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind == "image":
                    parts.append({"type": "image"})
                else:
                    raise BadSample(where, sid, f"message {i} has a content part that is neither text nor image: {p!r}")
        else:
            raise BadSample(where, sid, f"message {i} content must be a string or a list of parts")
        messages.append({"role": m.get("role"), "content": parts})
    check_messages(messages, len(images), where, sid)
    return Sample(sid, where, messages, images)


def _caption_sample(sid: str, where: str, image: Any, caption: Any, prompt: str) -> Sample:
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample(where, sid, f"caption must be a non-empty string, got {caption!r}")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption.strip()}]},
    ]
    return Sample(sid, where, messages, [image])


def _read_json_samples(path: str | Path, image_root: str | Path | None, image_key: str, build) -> list[Record]:
    """Records of a JSON/JSONL file → samples via ``build(rec, where, id, images)``; images under
    ``image_key`` resolve inside ``image_root`` (default: the file's folder)."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    out: list[Record] = []
    for where, rec in _read_json_records(path):
        if isinstance(rec, BadSample):
            out.append(rec)
            continue
        sid = _sample_id(rec, where)
        try:
            if not isinstance(rec, dict):
                raise BadSample(where, sid, "a sample must be a JSON object")
            images = [resolve_image_path(root, v, where, sid) for v in _image_list(rec.get(image_key))]
            out.append(build(rec, where, sid, images))
        except BadSample as bad:
            out.append(bad)
    return out


def read_llava(path: str | Path, image_root: str | Path | None = None) -> list[Record]:
    return _read_json_samples(path, image_root, "image", _from_conversations)


def read_messages(path: str | Path, image_root: str | Path | None = None) -> list[Record]:
    return _read_json_samples(path, image_root, "images", _from_messages)


def read_coco(path: str | Path, image_root: str | Path | None = None, prompt: str = "", captions: str = "all") -> list[Record]:
    """COCO captions; ``image_root`` defaults to the annotation file's folder (and its parent, where
    COCO's ``annotations/`` sits beside the image folders)."""

    path = Path(path)
    if not path.is_file():
        raise MmloraError(f"no COCO annotation file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {img["id"]: img for img in data["images"]}
        anns = data["annotations"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise MmloraError(f"{path}: not a COCO caption file ({type(err).__name__}: {err})") from None
    root = Path(image_root) if image_root else (path.parent.parent if path.parent.name == "annotations" else path.parent)
    out: list[Record] = []
    seen: set = set()
    for i, ann in enumerate(anns):
        where = f"{path}:annotations[{i}]"
        sid = f"{ann.get('image_id')}_{ann.get('id', i)}"
        try:
            img = images.get(ann.get("image_id"))
            if img is None:
                raise BadSample(where, sid, f"annotation refers to unknown image_id {ann.get('image_id')!r}")
            if captions == "first" and img["id"] in seen:
                continue
            seen.add(img["id"])
            image = resolve_image_path(root, img.get("file_name"), where, sid)
            out.append(_caption_sample(sid, where, image, ann.get("caption"), prompt or CAPTION_PROMPT))
        except BadSample as bad:
            out.append(bad)
    return out


def read_hf(path: str | Path, kind: str = "disk", split: str = "train", prompt: str = "") -> list[Record]:
    """A ``datasets`` table (see module docstring for the columns it reads)."""
    datasets = require("datasets", "data", "the hf reader (Hugging Face datasets)")

    path = Path(path)
    if kind == "disk":
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    elif kind == "parquet":
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    elif kind == "imagefolder":
        ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    else:
        raise MmloraError(f"unknown hf format {kind!r}: use disk, parquet or imagefolder")
    columns = set(ds.column_names)
    image_col = "images" if "images" in columns else "image" if "image" in columns else None
    text_col = next((c for c in ("conversations", "messages", "caption", "text") if c in columns), None)
    if text_col is None:
        raise MmloraError(f"{path}: no conversations, messages, caption or text column (columns: {', '.join(sorted(columns))})")
    out: list[Record] = []
    for i, rec in enumerate(ds):
        where = f"{path}[{i}]"
        sid = _sample_id(rec, f"{path.name}[{i}]")
        try:
            images = [_hf_image(v, where, sid) for v in _image_list(rec.get(image_col))] if image_col else []
            if text_col == "conversations":
                out.append(_from_conversations(rec, where, sid, images))
            elif text_col == "messages":
                out.append(_from_messages(rec, where, sid, images))
            else:
                if len(images) != 1:
                    raise BadSample(where, sid, f"a caption sample needs exactly one image, got {len(images)}")
                out.append(_caption_sample(sid, where, images[0], rec[text_col], prompt or CAPTION_PROMPT))
        except BadSample as bad:
            out.append(bad)
    return out


def _hf_image(value: Any, where: str, sid: str) -> Any:
    """``datasets`` gives decoded PIL images, or ``{"bytes", "path"}`` dicts when not decoded."""
    if isinstance(value, dict) and value.get("bytes"):
        import io

        from PIL import Image

        try:
            return Image.open(io.BytesIO(value["bytes"]))
        except Exception as err:  # noqa: BLE001
            raise BadSample(where, sid, f"embedded image cannot be decoded ({error_reason(err)})") from None
    if value is None:
        raise BadSample(where, sid, "image column is empty")
    return value


READERS = {"llava": read_llava, "messages": read_messages, "coco": read_coco, "hf": read_hf}


class _CannotTell(Exception):
    """Why a data file's format cannot be guessed (the message says what the file holds)."""


class _NeedMore(Exception):
    """The prefix read so far ends inside the value that decides."""


def _record_format(rec: Any) -> str:
    """The format of one record: ``conversations`` → llava, ``messages`` → messages."""
    if not isinstance(rec, dict):
        raise _CannotTell(f"a list of {type(rec).__name__} values, not records")
    if "conversations" in rec:
        return "llava"
    if "messages" in rec:
        return "messages"
    raise _CannotTell(f"its first record has keys {', '.join(sorted(rec)) or '(none)'} (LLaVA records have "
                      "conversations, messages records have messages)")


def _format_of_text(text: str, jsonl: bool, complete: bool) -> str | None:
    """The format of a data file whose first characters are ``text`` (all of it when ``complete``);
    None when the answer needs more of the file."""
    decoder, n = json.JSONDecoder(), len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def value(i: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            if not complete:
                raise _NeedMore from None
            raise _CannotTell(f"not JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None

    i = skip(0)
    if i == n:
        if complete:
            raise _CannotTell("the file is empty")
        return None
    try:
        if jsonl:
            end = text.find("\n", i)
            if end < 0 and not complete:
                return None
            try:
                return _record_format(json.loads(text[i:end if end >= 0 else n]))
            except json.JSONDecodeError as err:
                raise _CannotTell(f"its first line is not JSON ({err.msg} at column {err.colno})") from None
        if text[i] == "[":
            i = skip(i + 1)
            if i < n and text[i] == "]":
                raise _CannotTell("an empty JSON list")
            return _record_format(value(i)[0])
        if text[i] != "{":
            raise _CannotTell(f"not JSON (it starts with {text[i:i + 10]!r})")
        keys: list[str] = []
        i = skip(i + 1)
        while i < n and text[i] != "}":
            key, i = value(i)
            keys.append(str(key))
            if {"images", "annotations"} <= set(keys):
                return "coco"
            i = skip(i)
            if i < n and text[i] != ":":
                raise _CannotTell("not JSON (a key without a value)")
            _, i = value(skip(i + 1))
            i = skip(i)
            if i < n and text[i] == ",":
                i = skip(i + 1)
        if i == n:
            if complete:
                raise _CannotTell("not JSON (the object is not closed)")
            return None
        raise _CannotTell(f"a JSON object with keys {', '.join(keys) or '(none)'} (COCO captions have images and "
                          "annotations; LLaVA and messages files are lists of records)")
    except _NeedMore:
        return None


def guess_format(path: Path) -> str:
    """Format of a data file from its content (for ``mmlora data check PATH``): a folder or a parquet
    file is ``hf``; a JSON object with ``images`` and ``annotations`` is ``coco`` (whatever the key
    order); records (a JSON list, or JSONL) with ``conversations`` are ``llava``, with ``messages``
    ``messages``. The file is read in growing prefixes, only as far as the answer needs. When it
    cannot tell, the :class:`MmloraError` says what the file holds and to give ``--format``."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        return "hf"
    if not path.is_file():
        raise MmloraError(f"no data file at {path}")
    size, limit = path.stat().st_size, 1 << 16
    try:
        with open(path, "rb") as f:
            while True:
                f.seek(0)
                complete = limit >= size
                text = f.read(limit).decode("utf-8", errors="replace").lstrip("\ufeff")
                found = _format_of_text(text, path.suffix == ".jsonl", complete)
                if found is not None:
                    return found
                limit *= 16
    except _CannotTell as why:
        raise MmloraError(f"{path}: cannot tell the data format: {why}; give --format coco|llava|messages|hf") from None
