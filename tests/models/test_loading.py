import socket

import pytest

from mmlora.errors import MmloraError
from mmlora.models.loading import resolve_pretrained


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of waiting on a timeout."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_id_offline_fails_fast_with_what_to_pass(no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(MmloraError) as err:
        resolve_pretrained("llava-hf/llava-1.5-7b-hf")
    msg = str(err.value)
    assert "llava-hf/llava-1.5-7b-hf" in msg and "HF_HUB_OFFLINE" in msg
    assert "folder" in msg and "mmlora models list" in msg


def test_missing_local_folder_is_named(tmp_path):
    with pytest.raises(MmloraError, match="no model folder at"):
        resolve_pretrained(str(tmp_path / "nope") + "/")


def test_preset_and_folder_resolve(tiny_llava_dir):
    assert resolve_pretrained("tiny-llava") == tiny_llava_dir
    assert resolve_pretrained(tiny_llava_dir) == tiny_llava_dir
    with pytest.raises(MmloraError, match="is a llava model"):
        resolve_pretrained("tiny-llava", kind="clip")


def test_load_llava_offline_error_reaches_the_user_as_one_line(no_network, capsys):
    from mmlora.cli import main

    assert main(["models", "info", "llava-hf/llava-1.5-7b-hf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmlora: error: ") and err.count("\n") == 1 and "Traceback" not in err
