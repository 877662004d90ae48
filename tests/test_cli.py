import subprocess
import sys

import pytest

from mmlora import __version__
from mmlora.cli import COMMANDS, main


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys, contextlib, io\n"
        "from mmlora.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'peft', 'PIL', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mmlora {__version__}"
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("plan", "train", "predict", "eval", "export", "demo", "data", "models"):
        assert cmd in out


def test_registry_names_every_command():
    assert [c.name for c in COMMANDS] == ["plan", "train", "predict", "eval", "export", "serve", "demo", "data", "models"]


def test_every_command_is_implemented_and_subcommands_are_required(capsys):
    assert all(c.module for c in COMMANDS)
    with pytest.raises(SystemExit) as err:
        main(["eval"])
    assert err.value.code == 2 and "required: TASK" in capsys.readouterr().err


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny-llava", "shapes-llava", "tiny-clip", "shapes-clip"):
        assert name in out


def test_models_build_writes_a_loadable_folder(tmp_path, capsys):
    assert main(["models", "build", "tiny-clip", "--out", str(tmp_path / "clip")]) == 0
    assert (tmp_path / "clip" / "open_clip_model.safetensors").is_file()
    assert main(["models", "build", "no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_models_tiny_and_info(tmp_path, capsys):
    assert main(["models", "tiny", "llava", "--out", str(tmp_path / "llava")]) == 0
    assert main(["models", "info", str(tmp_path / "llava")]) == 0
    out = capsys.readouterr().out
    assert "model_type: llava" in out and "LlavaForConditionalGeneration" in out
    assert main(["models", "tiny", "not_a_type", "--out", str(tmp_path / "x")]) == 2


def test_data_shapes(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path), "--worlds", "B", "--scale", "0.01", "--image-size", "64"]) == 0
    assert (tmp_path / "world_B" / "llava_train.json").is_file()
    assert not (tmp_path / "world_A").exists()
    assert main(["data", "shapes", "--out", str(tmp_path), "--worlds", "D"]) == 2
    assert "unknown world" in capsys.readouterr().err
