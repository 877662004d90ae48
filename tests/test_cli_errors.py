"""No traceback reaches a user: the command line's one error path, its debug switch, interrupts and
closed pipes, the known noise of libraries silenced (and only it), and results that would otherwise
be silently empty (an empty answer, empty captions) said on stderr."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import mmlora.commands.plan as plan_command
from mmlora.cli import main
from mmlora.errors import MmloraError
from mmlora.optional import quiet_known_noise

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny/llava-train.yaml"
BUG_LINE = ("mmlora: internal error: this is a bug in mmlora; please report it with the command and the "
            "traceback above")
KERNELS = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
           "`pip install kernels` and the kernels >= 0.11.1")


def _raising(exc: BaseException):
    def run(args):
        raise exc
    return run


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("MMLORA_DEBUG", raising=False)


# ----------------------------------------------------------------------------- the one error path

def test_a_user_error_is_one_line_and_status_2(capsys):
    assert main(["plan", "no/such/recipe.yaml"]) == 2
    assert capsys.readouterr().err == "mmlora: error: no recipe at no/such/recipe.yaml\n"


def test_debug_flag_and_environment_reraise_with_the_traceback(monkeypatch, capsys):
    with pytest.raises(MmloraError, match="no recipe at"):
        main(["--debug", "plan", "no/such/recipe.yaml"])
    monkeypatch.setenv("MMLORA_DEBUG", "1")
    with pytest.raises(MmloraError, match="no recipe at"):
        main(["plan", "no/such/recipe.yaml"])
    for off in ("0", "", "false", "no"):
        monkeypatch.setenv("MMLORA_DEBUG", off)
        assert main(["plan", "no/such/recipe.yaml"]) == 2
    assert main(["--debug"]) == 0 and "--debug" in capsys.readouterr().out  # help, documented


def test_an_internal_error_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    monkeypatch.setattr(plan_command, "run", _raising(RuntimeError("boom")))
    assert main(["plan", RECIPE]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: boom" in err
    assert err.splitlines()[-1] == BUG_LINE and err.count("mmlora: ") == 1
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "plan", RECIPE])


def test_an_interrupt_is_one_line_and_status_130(monkeypatch, capsys):
    monkeypatch.setattr(plan_command, "run", _raising(KeyboardInterrupt()))
    assert main(["plan", RECIPE]) == 130
    assert capsys.readouterr().err == "mmlora: interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        main(["--debug", "plan", RECIPE])


def test_a_closed_pipe_in_process_is_quiet(monkeypatch, capsys):
    monkeypatch.setattr(plan_command, "run", _raising(BrokenPipeError(32, "Broken pipe")))
    assert main(["plan", RECIPE]) == 141
    assert capsys.readouterr().err == ""


def _env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MMLORA_DEBUG": ""}


@pytest.mark.slow
def test_a_closed_pipe_is_quiet():
    """``mmlora plan ... --json | head``: the reader goes away; no traceback, no 'Exception ignored'."""
    proc = subprocess.Popen([sys.executable, "-m", "mmlora", "plan", RECIPE, "--json"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the plan is written: the write must fail with EPIPE
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err
    shell = subprocess.run(f"'{sys.executable}' -m mmlora plan {RECIPE} --json | head -c 10", shell=True, cwd=ROOT,
                           env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert shell.stdout.startswith("{") and len(shell.stdout) == 10
    assert "Traceback" not in shell.stderr and "Exception ignored" not in shell.stderr, shell.stderr


# ----------------------------------------------------------------------------- known noise, and only it

@pytest.mark.slow
def test_plan_prints_no_bitsandbytes_kernels_line():
    out = subprocess.run([sys.executable, "-m", "mmlora", "plan", RECIPE], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr and "FutureWarning" not in out.stderr, out.stderr


@pytest.mark.slow
def test_importing_bitsandbytes_after_quieting_prints_no_kernels_line():
    pytest.importorskip("bitsandbytes")
    code = "from mmlora.optional import quiet_known_noise\nquiet_known_noise()\nimport bitsandbytes\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and "kernels-community" not in out.stderr, out.stderr


def test_only_the_known_lines_are_silenced(caplog):
    quiet_known_noise()
    quiet_known_noise()  # idempotent
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert sum(type(f).__name__ == "_KnownNoise" for f in log.filters) == 1
    with caplog.at_level(logging.WARNING):
        log.warning(KERNELS, ModuleNotFoundError("No module named 'kernels'"))
        log.warning(KERNELS, RuntimeError("the hub is unreachable"))  # kernels installed but failing: shown
        log.warning("some other bitsandbytes warning")
    assert [r.getMessage()[:40] for r in caplog.records] == [
        KERNELS[:40], "some other bitsandbytes warning"[:40]]
    assert "hub is unreachable" in caplog.records[0].getMessage()


def test_only_the_known_future_warnings_are_silenced():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        known = ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                 "`is_activation_checkpointing` instead.")
        warnings.warn_explicit(known, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("`other_thing` is deprecated", FutureWarning, "modeling_utils.py", 2,
                               module="transformers.modeling_utils")
        warnings.warn_explicit(known, UserWarning, "x.py", 3, module="elsewhere")
    assert [(w.category, str(w.message)[:13]) for w in seen] == [(FutureWarning, "`other_thing`"),
                                                                 (UserWarning, "`is_gradient_")]


def test_adaloras_pruned_modules_are_not_taken_for_ungathered_shards():
    tail = (" A 1-D or zero-sized lora_A / lora_B tensor indicates that DeepSpeed ZeRO-3 / FSDP shards were not "
            "gathered before save_pretrained() and are therefore incomplete.")
    pruned = ("Adapter 'default': 2 LoRA tensor(s) have invalid shape: base_model.model.q.lora_A:(0, 64), "
              "base_model.model.q.lora_B:(64, 0)." + tail)
    sharded = "Adapter 'default': 1 LoRA tensor(s) have invalid shape: base_model.model.q.lora_A:(0,)." + tail
    patterns = "The following rank_pattern keys did not match any targeted module and were ignored: "
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        warnings.warn_explicit(pruned, UserWarning, "save_and_load.py", 1, module="peft.utils.save_and_load")
        warnings.warn_explicit(sharded, UserWarning, "save_and_load.py", 2, module="peft.utils.save_and_load")
        warnings.warn_explicit(patterns + "['model.a.q.lora_E', 'model.b.v.lora_E']", RuntimeWarning,
                               "tuners_utils.py", 3, module="peft.tuners.tuners_utils")
        warnings.warn_explicit(patterns + "['model.a.q_proj']", RuntimeWarning, "tuners_utils.py", 4,
                               module="peft.tuners.tuners_utils")
    assert [str(w.message) for w in seen] == [sharded, patterns + "['model.a.q_proj']"]


# ----------------------------------------------------------------------------- predict

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_llava_dir):
    from tests.adapter_runs import LLAVA_PLACEMENT, make_run

    tmp = tmp_path_factory.mktemp("errors")
    return [make_run(tmp / name, "tiny-llava", LLAVA_PLACEMENT, seed) for name, seed in (("red", 1), ("blue", 2))]


def _test_image(shapes_small) -> str:
    return str(min((shapes_small / "world_B/images/test").glob("*.png")))


def test_predict_names_the_adapters_a_composition_has(two_runs, shapes_small, capsys):
    ref = "+".join(str(r) for r in two_runs)
    image = _test_image(shapes_small)
    assert main(["predict", ref, "--image", image, "--adapter", "nope", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("mmlora:")] == [
        "mmlora: error: --adapter nope: the composition has no such adapter; give one of red, blue, __base__"]
    assert main(["predict", ref, "--image", image, "--adapter", "__base__", "--max-new-tokens", "2"]) == 0


def test_predict_says_when_the_answer_is_empty(monkeypatch, shapes_small, tiny_llava_dir, capsys):
    import mmlora.generate

    monkeypatch.setattr(mmlora.generate, "generate_answers", lambda model, processor, images, *a, **k: [""] * len(images))
    image = _test_image(shapes_small)
    assert main(["predict", "tiny-llava", "--image", image]) == 0
    out, err = capsys.readouterr()
    assert out == "\n"
    assert [line for line in err.splitlines() if line.startswith("mmlora:")] == [(f"mmlora: warning: the model produced an empty answer (for {image}): the base may not have "
                   "learned to answer this prompt; try --max-new-tokens or another prompt")]


# ----------------------------------------------------------------------------- eval caption

def test_eval_caption_warns_about_empty_captions(monkeypatch, shapes_small, tmp_path, capsys):
    import json

    from mmlora.eval import caption

    answers = {"empty": lambda n: [""] * n, "half": lambda n: ["a red star."] + [""] * (n - 1),
               "full": lambda n: ["a red star."] * n}
    monkeypatch.setattr(caption, "load_captioner", lambda ref: (ref, None, lambda n: None))
    monkeypatch.setattr(caption, "generate_answers", lambda model, processor, images, *a, **k: answers[model](len(images)))
    monkeypatch.setattr(caption, "score_captions", lambda results, refs: {"CIDEr": 0.0, "mean_length": 0.0})
    coco = shapes_small / "world_B" / "annotations" / "captions_test.json"
    argv = ["eval", "caption", "--coco", str(coco), "--limit", "3", "--out", str(tmp_path)]
    assert main(argv + ["--model", "a=empty", "--model", "b=half", "--model", "c=full"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmlora:")]
    hint = ("captions are empty (its scores count them as wrong); the model may not have learned to answer the "
            "prompt: try --max-new-tokens or another --prompt")
    assert err == [f"mmlora: warning: a: 3 of 3 {hint}", f"mmlora: warning: b: 2 of 3 {hint}"]
    scores = {n: m["scores"] for n, m in json.loads((tmp_path / "metrics.json").read_text())["models"].items()}
    assert {n: s["empty_captions"] for n, s in scores.items()} == {"a": 3, "b": 2, "c": 0}
