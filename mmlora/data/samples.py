"""The canonical sample every reader produces, and the checks that make a bad one a clear error.

A :class:`Sample` is a conversation in the chat-template form processors take: ``messages`` with
roles ``system``/``user``/``assistant`` and content parts ``{"type": "image"}`` /
``{"type": "text", "text": ...}``, plus the images in the order their parts appear (paths resolved
inside the data root, or already-decoded PIL images from a ``datasets`` table).

A :class:`BadSample` names where the sample came from (file and line or index), its id, and what is
wrong; the dataset raises it as an error or skips and reports it, as the recipe says.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmlora.errors import MmloraError

IMAGE_TOKEN = "<image>"
#: The captioning protocol's default prompt (the common one-sentence COCO caption instruction).
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
ROLES = {"system", "user", "assistant"}
#: LLaVA / ShareGPT speaker names → chat-template roles.
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
#: Default pixel limit (PIL's own default): larger images are refused before they are decoded.
MAX_IMAGE_PIXELS = 89_478_485


@dataclass
class Sample:
    id: str
    where: str  # "file.json:12" or "dataset[3]"
    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)  # Path or PIL.Image
    target: Path | None = None  # segmentation samples: the index mask of images[0]

    @property
    def has_image(self) -> bool:
        return bool(self.images)

    def text(self) -> str:
        return " ".join(p["text"] for m in self.messages for p in m["content"] if p["type"] == "text")


class BadSample(MmloraError):
    """A sample that cannot be used; its message names file/line, sample id and the problem."""

    def __init__(self, where: str, sample_id: str | None, problem: str):
        self.where, self.sample_id, self.problem = where, sample_id, problem
        ident = f" (id {sample_id})" if sample_id is not None else ""
        super().__init__(f"{where}{ident}: {problem}")


def resolve_image_path(root: Path, value: object, where: str, sample_id: str | None) -> Path:
    """``value`` relative to ``root``; refuses paths that escape the data root (``../``, absolute)."""
    if not isinstance(value, str) or not value.strip():
        raise BadSample(where, sample_id, f"image path must be a non-empty string, got {value!r}")
    root = root.resolve()
    path = Path(os.path.normpath(root / value))
    if not path.is_relative_to(root):
        raise BadSample(where, sample_id, f"image path {value!r} escapes the data root {root}")
    return path


def parts_from_text(text: str, allow_images: bool = True) -> list[dict[str, Any]]:
    """Split a string with ``<image>`` placeholders into content parts (images first in reading order)."""
    parts: list[dict[str, Any]] = []
    pieces = text.split(IMAGE_TOKEN)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
        piece = piece.strip("\n") if allow_images else piece
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def check_messages(messages: list[dict[str, Any]], n_images: int, where: str, sample_id: str | None) -> None:
    """Structure checks: roles, an assistant answer, text, and one image part per image."""
    if not messages:
        raise BadSample(where, sample_id, "empty conversation")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise BadSample(where, sample_id, f"message {i} has unknown role {m.get('role')!r} (known: {', '.join(sorted(ROLES))})")
        if not m["content"]:
            raise BadSample(where, sample_id, f"message {i} ({m['role']}) is empty")
        if m["role"] == "assistant" and any(p["type"] == "image" for p in m["content"]):
            raise BadSample(where, sample_id, f"message {i}: an {IMAGE_TOKEN} placeholder in an assistant answer")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadSample(where, sample_id, "no assistant answer to learn from")
    placeholders = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
    if placeholders != n_images:
        kind = "missing" if placeholders < n_images else "extra"
        raise BadSample(
            where, sample_id,
            f"{kind} {IMAGE_TOKEN} placeholder: {placeholders} placeholder(s) for {n_images} image(s)",
        )


#: A Python object repr inside a library's message (PIL names a file object ``<_io.BytesIO object at 0x...>``).
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def image_name(image: Any) -> str:
    """How a message names ``image``: its path, or in words for an image in memory (an upload, a
    dataset's embedded bytes), never as a Python repr."""
    if isinstance(image, (str, Path)):
        return str(image)
    name = getattr(image, "name" if hasattr(image, "read") else "filename", None)
    if isinstance(name, (str, Path)) and str(name):
        return str(name)
    return "the uploaded image" if hasattr(image, "read") else "the in-memory image"


def error_reason(err: Exception) -> str:
    """An exception as words for a message: its type and text, object reprs removed."""
    text = " ".join(_OBJECT_REPR.sub("", str(err)).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def load_image(image: Any, where: str, sample_id: str | None, max_pixels: int = MAX_IMAGE_PIXELS):
    """Open ``image`` (a path, a file object such as an upload, or a PIL image) as RGB, with a clear
    error for each way it can be bad."""
    from PIL import Image, ImageFile

    name = image_name(image)
    where = _OBJECT_REPR.sub(name, where)
    if not isinstance(image, (str, Path)) and not hasattr(image, "read"):  # already a PIL image
        try:
            return to_rgb(image)
        except Exception as err:  # noqa: BLE001 - a lazily decoded image fails here
            raise BadSample(where, sample_id, f"{name} cannot be decoded ({error_reason(err)})") from None
    if isinstance(image, (str, Path)):
        source: Any = Path(image)
        subject = f"image {source}"
        if not source.is_file():
            raise BadSample(where, sample_id, f"image file not found: {source}")
        if source.stat().st_size == 0:
            raise BadSample(where, sample_id, f"image file is empty (0 bytes): {source}")
    else:
        source, subject = image, name
    try:
        with Image.open(source) as probe:  # reads the header only
            w, h = probe.size
            if w * h > max_pixels:
                raise BadSample(where, sample_id, f"{subject} has {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
            probe.verify()
        if not isinstance(source, Path):
            source.seek(0)
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with Image.open(source) as img:
            img.load()
            return to_rgb(img)
    except BadSample:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadSample(where, sample_id, f"{subject} cannot be decoded ({error_reason(err)})") from None


def to_rgb(img):
    """Any PIL mode → RGB: transparency composited on white, 16-bit scaled to 8-bit, CMYK converted."""
    from PIL import Image

    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype("uint8"), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
