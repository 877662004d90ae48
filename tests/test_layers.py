"""Imports run one way: the layer lint over the whole package, and proof that it catches a back-edge."""

from __future__ import annotations

import ast
from pathlib import Path

import mmlora
from tests.layering import module_sources, violations

ROOT = Path(mmlora.__file__).resolve().parent


def _package_sources() -> tuple[dict[str, str], set[str]]:
    sources = module_sources(ROOT)
    packages = {m for m in sources if (ROOT.parent / m.replace(".", "/") / "__init__.py").is_file()}
    return sources, packages


def test_the_package_imports_run_one_way():
    sources, packages = _package_sources()
    problems = violations(sources, packages)
    assert not problems, "\n".join(problems)


def test_a_planted_back_edge_is_named():
    sources, packages = _package_sources()
    sources["mmlora.models.planted"] = "def f():\n    from mmlora.train.loop import Trainer\n    return Trainer\n"
    problems = violations(sources, packages)
    assert any("mmlora.models.planted (models) imports mmlora.train.loop (train), a layer above" in p for p in problems)
    assert any("mmlora.models.planted imports mmlora.train.loop inside a function" in p for p in problems)


def test_a_planted_cycle_is_named():
    sources, packages = _package_sources()
    sources["mmlora.data.planted_a"] = "from mmlora.data import planted_b\n"
    sources["mmlora.data.planted_b"] = "from mmlora.data.planted_a import x\n"
    problems = violations(sources, packages)
    assert "import cycle: mmlora.data.planted_a -> mmlora.data.planted_b -> mmlora.data.planted_a" in problems


def test_commands_may_import_lazily_but_not_upwards():
    sources, packages = _package_sources()
    sources["mmlora.commands.planted"] = "def run():\n    from mmlora.train.loop import Trainer\n"
    sources["mmlora.showcase.planted"] = "from mmlora.commands import train\n"
    problems = violations(sources, packages)
    assert not any(p.startswith("mmlora.commands.planted") for p in problems)
    assert any(p.startswith("mmlora.showcase.planted (showcase) imports mmlora.commands.train (commands)") for p in problems)


def test_every_package_says_what_it_owns_and_its_layer():
    from tests.layering import layer_of

    for init in sorted(ROOT.rglob("__init__.py")):
        module = ".".join(init.relative_to(ROOT.parent).parent.parts)
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        if module == "mmlora":
            assert "Layers, bottom to top" in doc
            continue
        assert f"Layer: {layer_of(module)[1]}." in doc, f"{init}: the docstring must say 'Layer: {layer_of(module)[1]}.'"
