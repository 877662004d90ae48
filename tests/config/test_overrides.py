"""``key=value`` overrides: a value that is not valid YAML is one clear error, not a traceback."""

import pytest

from mmlora.config.loading import apply_overrides
from mmlora.errors import MmloraError


def test_overrides_take_yaml_values():
    data = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "placement.vision.targets=[q, v]", "train.x="])
    assert data == {"train": {"lr": 0.5, "x": None}, "placement": {"vision": {"targets": ["q", "v"]}}}


@pytest.mark.parametrize("override", ["train.lr=[1,", "placement.vision={mode: lora", "train.output_dir='runs/x",
                                      "train.lr=: :", "train.output_dir=a: b: c", "train.output_dir=*x"])
def test_a_malformed_yaml_value_names_the_override(override):
    with pytest.raises(MmloraError) as err:
        apply_overrides({"train": {}}, [override])
    message = str(err.value)
    assert override in message and "not valid YAML" in message and "\n" not in message
    assert "quote" in message  # says how to pass a string that looks like YAML


def test_the_cli_answers_a_malformed_override_in_one_line(capsys):
    from mmlora.cli import main

    assert main(["plan", "recipes/tiny/llava-train.yaml", "train.lr=[1,"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mmlora: error: override 'train.lr=[1,'") and "Traceback" not in err
