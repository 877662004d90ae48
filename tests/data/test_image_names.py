"""An image in memory (an upload, a dataset's embedded bytes) is named in words in every message,
never as a Python repr such as ``<_io.BytesIO object at 0x...>``, and a broken one is a BadSample."""

import io

import pytest
from PIL import Image

from mmlora.data.samples import BadSample, image_name, load_image


def _png(size=(24, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (200, 10, 10, 128)).save(buf, format="PNG")
    return buf.getvalue()


def test_an_uploaded_image_loads_as_rgb():
    image = load_image(io.BytesIO(_png()), "upload", None)
    assert image.mode == "RGB" and image.size == (24, 24)


@pytest.mark.parametrize("payload", [b"not an image", b"\x89PNG\r\n\x1a\njunk", b""])
def test_a_broken_upload_is_named_in_words(payload):
    buf = io.BytesIO(payload)
    with pytest.raises(BadSample) as err:
        load_image(buf, repr(buf), "s1")
    message = str(err.value)
    assert "the uploaded image" in message and "cannot be decoded" in message
    assert "object at 0x" not in message and "BytesIO" not in message


def test_a_truncated_in_memory_image_is_a_bad_sample_not_a_traceback():
    opened = Image.open(io.BytesIO(_png((64, 64))[:80]))  # the header reads; the pixels do not
    with pytest.raises(BadSample) as err:
        load_image(opened, "data[3]", "s3")
    message = str(err.value)
    assert message.startswith("data[3] (id s3): the in-memory image cannot be decoded") and "object at 0x" not in message


def test_a_pixel_limit_names_the_upload():
    with pytest.raises(BadSample, match="the uploaded image has 24x24 = 576 pixels"):
        load_image(io.BytesIO(_png()), "upload", None, max_pixels=100)


def test_image_names(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png())
    assert image_name(path) == str(path) and image_name(str(path)) == str(path)
    assert image_name(io.BytesIO()) == "the uploaded image"
    with open(path, "rb") as f:
        assert image_name(f) == str(path)
    with Image.open(path) as img:
        assert image_name(img) == str(path)
    assert image_name(Image.new("RGB", (2, 2))) == "the in-memory image"
