"""Placement errors read as the recipe is written: a bad ``re:`` pattern names itself and the regex
error; a ``layers`` spec reads like YAML (``{first: 1}``), never as a pydantic repr."""

import pytest

from mmlora.config.schema import PlacementSpec
from mmlora.errors import MmloraError
from mmlora.models.modality import discover_modalities
from mmlora.placement.plan import plan_placement
from mmlora.placement.targets import compile_pattern


def _plan(model, spec: dict):
    return plan_placement(model, discover_modalities(model), PlacementSpec.model_validate(spec))


@pytest.mark.parametrize("pattern", ["re:layers.([", "re:foo(", "re:*q", "re:(?P<x"])
def test_an_invalid_regex_names_the_pattern_and_the_regex_error(pattern):
    with pytest.raises(MmloraError) as err:
        compile_pattern(pattern)
    message = str(err.value)
    assert repr(pattern) in message and "not a valid regular expression" in message and "\n" not in message
    import re

    try:
        re.compile(pattern[3:])
    except re.error as exc:
        assert exc.msg in message


def test_valid_patterns_still_match():
    assert compile_pattern("re:layers\\.\\d+\\.q_proj")("layers.3.q_proj")
    assert not compile_pattern("re:q_proj")("layers.3.q_proj")  # full match
    assert compile_pattern("layers.*.q_proj")("layers.3.q_proj")


def test_plan_names_the_modality_of_a_bad_pattern(tiny_llava):
    with pytest.raises(MmloraError, match=r"placement\.language\.targets: pattern 're:layers\.\(\['"):
        _plan(tiny_llava[0], {"language": {"mode": "lora", "targets": ["re:layers.(["]}})


@pytest.mark.parametrize("layers, text", [
    ({"first": 1}, "layers {first: 1}"),
    ({"range": [0, 1]}, "layers {range: [0, 1]}"),
    ({"every": 2, "offset": 1}, "layers {every: 2, offset: 1}"),
    ([0], "layers [0]"),
])
def test_layers_read_like_the_recipe_in_messages(tiny_llava, layers, text):
    with pytest.raises(MmloraError) as err:
        _plan(tiny_llava[0], {"vision": {"mode": "lora", "targets": ["nomatch"], "layers": layers}})
    message = str(err.value)
    assert text in message and "targets [nomatch]" in message
    assert "=None" not in message and "first=" not in message and "['" not in message
    with pytest.raises(MmloraError) as err:
        _plan(tiny_llava[0], {"vision": {"mode": "full", "targets": ["nomatch"], "layers": layers}})
    assert text in str(err.value) and "=None" not in str(err.value)
