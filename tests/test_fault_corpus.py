"""The fault corpus: bad inputs a user can make, each with the one line mmlora must answer.

Every case builds its bad input in a fresh folder (recipes, overrides, data files, images, run folders,
checkpoints), runs the command line in-process and checks: the exit status, that stderr holds exactly
one error line ``mmlora: error: ...`` with the expected fragment, and that no traceback is printed. Server
requests are checked the same way through the HTTP API (status and message). Tiny models only; the
only training is one two-step run shared by the run-folder and checkpoint cases.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from mmlora.cli import main
from tests.train.conftest import BASE


@dataclass(frozen=True)
class Case:
    name: str
    #: ``(tmp, world_B, trained_run) -> argv`` (the bad input is written under ``tmp``)
    argv: Callable[[Path, Path, Path], list[str]]
    fragment: str
    status: int = 2


def _recipe(tmp: Path, world: Path, name: str = "r", **changes) -> str:
    data = copy.deepcopy(BASE)
    data["data"]["train"] = [{"format": "llava", "path": str(world / "llava_train.json")}]
    data["data"]["val"] = []
    data["train"]["output_dir"] = str(tmp / "out")
    for key, value in changes.items():
        node, parts = data, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _text(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def _llava_data(tmp: Path, world: Path, records: list) -> str:
    path = tmp / "data.json"
    path.write_text(json.dumps(records))
    return str(path)


def _good_record(world: Path, **changes) -> dict:
    """A valid LLaVA record; its image is ``img.png`` beside the data file (``_train_on`` copies it)."""
    rec = {"id": "s0", "image": "img.png",
           "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a star."}]}
    rec.update(changes)
    return rec


def _train_on(tmp: Path, world: Path, records: list) -> list[str]:
    shutil.copy(world / "images" / "train" / "B_train_00000.png", tmp / "img.png")
    data = _llava_data(tmp, world, records)
    return ["train", _recipe(tmp, world, **{"data.train": [{"format": "llava", "path": data}]})]


def _image(tmp: Path, name: str, payload: bytes) -> str:
    (tmp / name).write_bytes(payload)
    return str(tmp / name)


def _broken_run(tmp: Path, run: Path, manifest: str) -> str:
    copy_ = tmp / "run"
    shutil.copytree(run, copy_)
    (copy_ / "final" / "manifest.json").write_text(manifest)
    return str(copy_)


def _incomplete_checkpoint(tmp: Path, world: Path, run: Path) -> list[str]:
    ckpt = tmp / "ckpt"
    shutil.copytree(sorted((run / "checkpoints").glob("step-*"))[-1], ckpt)
    (ckpt / ".complete").unlink()
    return ["train", _recipe(tmp, world, **{"train.resume": str(ckpt)})]


def _resumed_with(tmp: Path, world: Path, run: Path, **changes) -> list[str]:
    out = tmp / "out"
    shutil.copytree(run, out)
    return ["train", _recipe(tmp, world, **changes)]


PNG_HEADER = b"\x89PNG\r\n\x1a\n"
IMAGE_ARG = "images/test/B_test_00000.png"

CASES = [
    # ---------------------------------------------------------------- recipes
    Case("recipe-missing", lambda t, w, r: ["plan", str(t / "nope.yaml")], "no recipe at"),
    Case("recipe-not-yaml", lambda t, w, r: ["plan", _text(t, "r.yaml", "model: [tiny-llava\n")], "not valid YAML"),
    Case("recipe-not-a-mapping", lambda t, w, r: ["plan", _text(t, "r.yaml", "- model\n- placement\n")],
         "a recipe is a mapping of sections"),
    Case("recipe-unknown-section", lambda t, w, r: ["plan", _text(t, "r.yaml", "model: {name: tiny-llava}\nplacment: {}\n")],
         "placement"),
    Case("recipe-unknown-modality-key", lambda t, w, r: ["plan", _recipe(t, w, **{"placement.language.rnak": 4})], "rank"),
    Case("recipe-bad-mode", lambda t, w, r: ["plan", _recipe(t, w, **{"placement.language.mode": "lorra"})], "lora"),
    Case("recipe-rank-zero", lambda t, w, r: ["plan", _recipe(t, w, **{"placement.language.rank": 0})], "rank"),
    Case("recipe-frozen-with-targets", lambda t, w, r: ["plan", _recipe(t, w, **{"placement.vision": {"mode": "frozen", "targets": ["q"]}})],
         "do not apply to a frozen modality"),
    Case("recipe-rank-and-schedule", lambda t, w, r: ["plan", _recipe(t, w, **{"placement.language.rank_schedule": {"min": 2, "max": 8}})],
         "not both"),
    Case("recipe-everything-frozen", lambda t, w, r: ["plan", _recipe(t, w, placement={"vision": {"mode": "frozen"}})],
         "nothing would train"),
    Case("recipe-targets-match-nothing", lambda t, w, r: ["plan", _recipe(t, w, **{"placement.language.targets": ["nonexistent_proj"]})],
         "match no module"),
    Case("recipe-layers-out-of-range", lambda t, w, r: ["plan", _recipe(t, w, **{"placement.vision.layers": [7]})],
         "do not exist"),
    Case("recipe-bad-regex", lambda t, w, r: ["plan", _recipe(t, w, **{"placement.language.targets": ["re:layers.(["]})],
         "re:layers.(["),
    Case("recipe-modality-the-model-lacks", lambda t, w, r: ["plan", _recipe(t, w, **{"placement.text": {"mode": "lora"}})],
         "has no text modality"),
    Case("recipe-model-not-offline", lambda t, w, r: ["plan", _recipe(t, w, **{"model.name": "someone/not-a-model"})],
         "downloads are off"),
    Case("recipe-model-folder-missing", lambda t, w, r: ["plan", _recipe(t, w, **{"model.name": "./no/such/folder"})],
         "no model folder at"),
    # ---------------------------------------------------------------- overrides
    Case("override-not-key-value", lambda t, w, r: ["plan", _recipe(t, w), "train.lr"], "is not key=value"),
    Case("override-bad-yaml", lambda t, w, r: ["plan", _recipe(t, w), "train.lr=[1,"], "train.lr"),
    Case("override-into-a-value", lambda t, w, r: ["plan", _recipe(t, w), "train.lr.x=1"], "is not a section"),
    Case("override-unknown-key", lambda t, w, r: ["plan", _recipe(t, w), "train.max_step=3"], "max_steps"),
    # ---------------------------------------------------------------- data files
    Case("data-file-missing", lambda t, w, r: ["train", _recipe(t, w, **{"data.train": [{"format": "llava", "path": str(t / "no.json")}]})],
         "no.json"),
    Case("data-not-json", lambda t, w, r: ["train", _recipe(t, w, **{"data.train": [{"format": "llava", "path": _text(t, "d.json", "[{oops")}]})],
         "d.json"),
    Case("data-no-conversations", lambda t, w, r: _train_on(t, w, [{"id": "x7", "image": "img.png"}]), "x7"),
    Case("data-image-missing", lambda t, w, r: _train_on(t, w, [_good_record(w, image="gone.png")]), "gone.png"),
    Case("data-image-tokens-mismatch", lambda t, w, r: _train_on(t, w, [_good_record(w, conversations=[
        {"from": "human", "value": "<image>\n<image>\nDescribe."}, {"from": "gpt", "value": "a star."}])]), "image"),
    Case("data-unknown-speaker", lambda t, w, r: _train_on(t, w, [_good_record(w, conversations=[
        {"from": "robot", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a star."}])]), "robot"),
    Case("data-check-missing-file", lambda t, w, r: ["data", "check", str(t / "none.json")], "none.json"),
    Case("data-check-unknown-format", lambda t, w, r: ["data", "check", _text(t, "odd.json", json.dumps({"rows": [1, 2]}))],
         "--format"),
    # ---------------------------------------------------------------- images
    Case("image-not-an-image", lambda t, w, r: _train_on(t, w, [_good_record(w, image=Path(_image(t, "x.png", b"not a png")).name)]), "x.png"),
    Case("image-truncated", lambda t, w, r: _train_on(t, w, [_good_record(w, image=Path(_image(
        t, "cut.png", (w / "images" / "train" / "B_train_00000.png").read_bytes()[:120])).name)]), "cut.png"),
    Case("predict-image-missing", lambda t, w, r: ["predict", str(r), "--image", str(t / "none.png")], "none.png"),
    Case("predict-image-not-an-image", lambda t, w, r: ["predict", str(r), "--image", _image(t, "bad.png", PNG_HEADER + b"junk")],
         "bad.png"),
    # ---------------------------------------------------------------- run folders
    Case("predict-not-a-run", lambda t, w, r: ["predict", str(t), "--image", str(w / IMAGE_ARG)], "not a run"),
    Case("run-manifest-corrupt", lambda t, w, r: ["predict", _broken_run(t, r, "{not json"), "--image", str(w / IMAGE_ARG)],
         "manifest"),
    Case("export-into-non-empty", lambda t, w, r: ["export", str(r), "--out", str(Path(_text(t, "keep.txt", "x")).parent)],
         "not empty"),
    Case("export-int4-without-merge", lambda t, w, r: ["export", str(r), "--out", str(t / "x"), "--int4", "32"], "--merge"),
    Case("export-not-a-run", lambda t, w, r: ["export", str(t), "--out", str(t / "x")], "not a run"),
    Case("eval-model-without-name", lambda t, w, r: ["eval", "caption", "--coco", str(w / "annotations" / "captions_test.json"),
                                                      "--model", "tiny-llava", "--out", str(t / "e")], "NAME=REF"),
    Case("compose-unknown-method", lambda t, w, r: ["predict", f"{r}+{r}:blend", "--image", str(w / IMAGE_ARG)],
         "unknown combination"),
    Case("compose-weights-not-numbers", lambda t, w, r: ["predict", f"{r}+{r}:linear:a,b", "--image", str(w / IMAGE_ARG)],
         "are not numbers"),
    Case("compose-weights-count", lambda t, w, r: ["predict", f"{r}+{r}:linear:0.5", "--image", str(w / IMAGE_ARG)],
         "1 weights for 2 runs"),
    Case("compose-full-modules", lambda t, w, r: ["predict", f"{r}+{r}", "--image", str(w / IMAGE_ARG)],
         "changed the base"),
    # ---------------------------------------------------------------- checkpoints
    Case("resume-incomplete-checkpoint", lambda t, w, r: _incomplete_checkpoint(t, w, r), "not a complete checkpoint"),
    Case("init-from-not-a-run", lambda t, w, r: ["train", _recipe(t, w, **{"train.init_from": str(t)})], "train.init_from"),
    Case("resume-changed-rank", lambda t, w, r: _resumed_with(t, w, r, **{"placement.language.rank": 8}), "train.resume"),
    Case("output-under-a-file", lambda t, w, r: ["train", _recipe(t, w, **{"train.output_dir": str(Path(_text(t, "f", "x")) / "run")})],
         "/f/run"),
    # ---------------------------------------------------------------- serving: start-up
    Case("serve-adapter-without-name", lambda t, w, r: ["serve", "--base", "tiny-llava", "--adapter", str(r)], "NAME=RUN"),
    Case("serve-adapter-twice", lambda t, w, r: ["serve", "--base", "tiny-llava", "--adapter", f"a={r}", "--adapter", f"a={r}"],
         "given twice"),
    Case("serve-adapter-not-a-run", lambda t, w, r: ["serve", "--base", "tiny-llava", "--adapter", f"a={t}"], "not a run"),
    Case("serve-full-run-in-peft-mode", lambda t, w, r: ["serve", "--base", "tiny-llava", "--adapter", f"a={r}"],
         "trained in place (full): serve it with --mode gathered or merged"),
    Case("serve-max-loaded-unreadable", lambda t, w, r: ["serve", "--base", "tiny-llava", "--max-loaded", "lots"],
         "give a number of adapters (64) or a size (512MiB, 2GiB)"),
    Case("serve-router-without-name", lambda t, w, r: ["serve", "--base", "tiny-llava", "--router", str(r)],
         "use NAME=RUN"),
    Case("serve-router-not-a-router", lambda t, w, r: ["serve", "--base", "tiny-llava", "--mode", "gathered",
                                                        "--router", f"auto={r}"], "not a router run"),
    Case("serve-adapters-from-nothing", lambda t, w, r: ["serve", "--base", "tiny-llava", "--adapters-from", str(t)],
         "no run in it"),
    Case("serve-bad-adapter-name", lambda t, w, r: ["serve", "--base", "tiny-llava", "--adapter", f"a b={r}"], "adapter names"),
    Case("serve-base-missing", lambda t, w, r: ["serve", "--base", str(t / "nothing")], "no model folder at"),
]

#: Requests the app test (tests/serve/test_app.py) does not already cover: ``(route, form, files, status, fragment)``.
REQUESTS = [
    ("/caption", {"adapter": "__base__"}, {"image": ("x.txt", b"hello", "text/plain")}, 400, "could not be decoded"),
    ("/caption", {"adapter": "../../etc"}, "png", 404, "unknown adapter"),
    ("/segment", {"adapter": "__base__", "classes": "background"}, "png", 400, "at least two class names"),
    ("/segment", {"adapter": "__base__", "classes": "background,circle"}, "png", 400, "use /caption"),
    ("/caption", {"adapter": "__base__", "prompt": "\x00" * 10}, "png", 200, ""),
]


@pytest.fixture(scope="module")
def api(tiny_llava_dir):
    from fastapi.testclient import TestClient

    from mmlora.serve.app import create_app
    from mmlora.serve.engine import Engine

    with TestClient(create_app(Engine("tiny-llava", {}, max_new_tokens=2))) as client:
        yield client


@pytest.mark.parametrize("route,form,files,status,fragment", REQUESTS, ids=[f"{r[0]}-{i}" for i, r in enumerate(REQUESTS)])
def test_a_bad_request_gets_a_status_and_a_message(api, route, form, files, status, fragment):
    import io

    from PIL import Image

    if files == "png":
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (10, 200, 10)).save(buf, format="PNG")
        files = {"image": ("x.png", buf.getvalue(), "image/png")}
    r = api.post(route, data=form, files=files)
    assert r.status_code == status, r.text
    if status >= 400:
        assert fragment in str(r.json()["detail"]) and "Traceback" not in r.text


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shapes_small) -> Path:
    """A two-step run with one checkpoint (the recipe the cases start from, with a full projector)."""
    tmp = tmp_path_factory.mktemp("fault-run")
    recipe = _recipe(tmp, shapes_small / "world_B", **{"train.max_steps": 2, "train.save_every": 1, "train.eval_every": None})
    assert main(["train", recipe]) == 0
    return tmp / "out"


def test_the_corpus_is_large_and_named_once():
    assert len(CASES) + len(REQUESTS) >= 40 and len({c.name for c in CASES}) == len(CASES)


def test_a_full_disk_during_a_checkpoint_gets_one_line(tmp_path, shapes_small, monkeypatch, capsys):
    """The disk fills up while step 2's checkpoint is written (an injected ENOSPC): one line names the
    file and the last good checkpoint (step 1), which stays complete."""
    import errno

    import mmlora.runs.checkpoint as ckpt

    real = ckpt.save_trainer_state

    def full_at_step_2(folder, state):
        if state["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / ckpt.TRAINER_STATE))
        return real(folder, state)

    monkeypatch.setattr(ckpt, "save_trainer_state", full_at_step_2)
    recipe = _recipe(tmp_path, shapes_small / "world_B", **{"train.max_steps": 3, "train.save_every": 1, "train.eval_every": None})
    capsys.readouterr()
    assert main(["train", recipe]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("mmlora: error:")]
    assert "Traceback" not in err and "no space left on device" in line.lower() and "step-000001" in line
    assert ckpt.is_complete(tmp_path / "out" / "checkpoints" / "step-000001")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_gets_one_clear_line(case, tmp_path, shapes_small, trained_run, capsys):
    argv = case.argv(tmp_path, shapes_small / "world_B", trained_run)
    capsys.readouterr()
    status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mmlora: error:")]
    assert status == case.status, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    assert case.fragment in lines[0], lines[0]
