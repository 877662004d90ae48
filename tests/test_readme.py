"""The README's Python example runs as written (on the small shapes world, in a scratch folder)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_block(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```python", text.index(section)) + len("```python\n")
    return text[start:text.index("```", start)]


@pytest.mark.slow
def test_the_from_python_example_runs(tmp_path, monkeypatch, shapes_small):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shapes").symlink_to(shapes_small)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_python_block("## From Python"), "README.md", "exec"), {})
    answers = eval(out.getvalue().strip().splitlines()[-1])  # the printed list of answers
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)
    assert (tmp_path / "runs" / "try" / "final" / "manifest.json").is_file()
