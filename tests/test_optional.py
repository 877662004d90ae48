"""Optional extras: a missing one is one line that names the ``pip install`` which fixes it.

A package is "missing" here by putting ``None`` into ``sys.modules`` (the import system then raises
``ModuleNotFoundError`` for it), so these tests run with every extra installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mmlora.errors import MmloraError
from mmlora.optional import PIP_NAMES, require

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = {"quant": "bitsandbytes", "clip": "open_clip", "eval": "pycocoevalcap", "plot": "matplotlib",
          "data": "datasets", "serve": "fastapi", "smolvlm": "num2words"}


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_require_returns_the_module():
    assert require("json", "eval", "anything") is json


@pytest.mark.parametrize("extra, module", sorted(EXTRAS.items()))
def test_missing_module_names_its_extra(monkeypatch, extra, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MmloraError) as exc:
        require(module, extra, "this feature")
    assert _one_line(exc) == f"this feature needs {PIP_NAMES[module]} (pip install 'mmlora[{extra}]')"


def test_missing_submodule_is_the_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(MmloraError, match=r"needs pycocoevalcap \(pip install 'mmlora\[eval\]'\)$"):
        require("pycocoevalcap.bleu.bleu", "eval", "caption scoring")


def test_installed_but_broken_module_says_so(monkeypatch, tmp_path):
    (tmp_path / "mmlora_broken_extra.py").write_text("import mmlora_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MmloraError) as exc:
        require("mmlora_broken_extra", "plot", "plotting")
    message = _one_line(exc)
    assert "installed but failed to import" in message and "mmlora_dependency_that_is_not_installed" in message
    assert "pip install 'mmlora[plot]'" in message


def test_caption_scoring_without_the_eval_extra(monkeypatch):
    from mmlora.eval.caption import score_captions

    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)
    with pytest.raises(MmloraError) as exc:
        score_captions({1: "a red circle"}, {1: ["a red circle"]})
    assert _one_line(exc) == "caption scoring needs pycocoevalcap (pip install 'mmlora[eval]')"


def test_quantization_without_the_quant_extra(monkeypatch):
    from mmlora.models.precision import quantization_config

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MmloraError) as exc:
        quantization_config({"vision": None, "text": "4bit"}, None, None)  # fails before it reads the map
    assert _one_line(exc).endswith("needs bitsandbytes (pip install 'mmlora[quant]')")


def test_hf_reader_without_the_data_extra(monkeypatch, tmp_path):
    from mmlora.data.readers import read_hf

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MmloraError, match=r"needs datasets \(pip install 'mmlora\[data\]'\)$"):
        read_hf(tmp_path)


def test_loss_curve_is_skipped_without_the_plot_extra(monkeypatch, tmp_path):
    from mmlora.runs.card import loss_curve

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match=r"pip install 'mmlora\[plot\]'"):
        assert loss_curve([{"step": 1, "loss": 1.0}], tmp_path / "loss_curve.png") is None
    assert not (tmp_path / "loss_curve.png").exists()


def test_pyproject_extras():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    for extra, module in EXTRAS.items():
        package = PIP_NAMES[module]
        assert package not in core, f"{package} is a core dependency; it belongs in [{extra}]"
        assert any(dep.startswith(package) for dep in extras[extra]), f"[{extra}] does not install {package}"
    assert extras["all"] == ["mmlora[quant,clip,eval,serve,plot,data,smolvlm]"]
    assert "mmlora[all]" in extras["test"]  # `make setup` installs -e ".[test]": every extra
