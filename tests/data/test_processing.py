import pytest
import torch
from PIL import Image

from mmlora.data.processing import IGNORE, ConversationEncoder
from mmlora.data.samples import BadSample, Sample
from tests.data.chat_templates import TEMPLATES


def _processor(name: str, tiny_llava_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    template, specials, bos, _ = TEMPLATES[name]
    if template is not None:
        tok = processor.tokenizer
        tok.add_special_tokens({"additional_special_tokens": specials})
        if bos:
            tok.bos_token = bos
        processor.chat_template = template
        tok.chat_template = template
    return processor


def _image(tmp_path, name="img.png"):
    path = tmp_path / name
    Image.new("RGB", (40, 40), (200, 30, 30)).save(path)
    return path


def _conversations(tmp_path):
    img = _image(tmp_path)
    q = lambda text, image=False: {"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}  # noqa: E731
    a = lambda text: {"role": "assistant", "content": [{"type": "text", "text": text}]}  # noqa: E731
    return {
        "single-image": (Sample("s1", "t", [q("Describe.", True), a("a red circle.")], [img]), ["a red circle."]),
        "multi-turn-image": (
            Sample("s2", "t", [q("Describe.", True), a("a red square."), q("Where?"), a("top left and center.")], [img]),
            ["a red square.", "top left and center."],
        ),
        "text-only": (Sample("s3", "t", [q("Say hi."), a("hi there."), q("Again."), a("hello.")]), ["hi there.", "hello."]),
        "system": (
            Sample("s4", "t", [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, q("Name it.", True), a("star.")], [img]),
            ["star."],
        ),
    }


def _runs(labels: torch.Tensor) -> list[list[int]]:
    runs, cur = [], []
    for t in labels.tolist():
        if t == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(t)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("case", ["single-image", "multi-turn-image", "text-only", "system"])
def test_labels_are_exactly_the_answers_and_end_of_turn(template, case, tiny_llava_dir, tmp_path):
    if template == "gemma" and case == "system":
        pytest.skip("Gemma's template has no system role")
    processor = _processor(template, tiny_llava_dir)
    encoder = ConversationEncoder(processor, max_length=512)
    sample, answers = _conversations(tmp_path)[case]
    out = encoder.encode(sample)
    eot = TEMPLATES[template][3]
    decoded = [processor.tokenizer.decode(run).strip() for run in _runs(out["labels"])]
    assert decoded == [f"{a}{eot}" for a in answers]
    # Everything else is masked, image tokens included; the ids are the processor's own.
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (out["labels"][out["input_ids"] == image_id] == IGNORE).all()
    assert int((out["input_ids"] == image_id).sum()) == 16 * len(sample.images)
    if sample.images:
        assert out["pixel_values"].shape == (1, 3, 32, 32)
    bos = processor.tokenizer.bos_token_id
    assert int((out["input_ids"] == bos).sum()) == 1  # one BOS, whether the template or the tokenizer adds it


def test_labels_come_from_one_tokenization(tiny_llava_dir, tmp_path):
    """The supervised ids equal the ids at those positions in the whole conversation's tokenization."""
    processor = _processor("llava-1.5", tiny_llava_dir)
    encoder = ConversationEncoder(processor)
    sample, _ = _conversations(tmp_path)["multi-turn-image"]
    out = encoder.encode(sample)
    mask = out["labels"] != IGNORE
    assert torch.equal(out["labels"][mask], out["input_ids"][mask])


def test_truncation_shortens_text_but_never_cuts_image_tokens(tiny_llava_dir, tmp_path):
    processor = _processor("llava-1.5", tiny_llava_dir)
    sample, _ = _conversations(tmp_path)["multi-turn-image"]
    full = ConversationEncoder(processor, max_length=512).encode(sample)
    n = len(full["input_ids"])
    cut = ConversationEncoder(processor, max_length=n - 4).encode(sample)
    assert len(cut["input_ids"]) == n - 4 and torch.equal(cut["input_ids"], full["input_ids"][: n - 4])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((cut["input_ids"] == image_id).sum()) == 16
    with pytest.raises(BadSample, match="image tokens are never cut"):
        ConversationEncoder(processor, max_length=10).encode(sample)
    first_answer = int((full["labels"] != IGNORE).nonzero()[0])
    with pytest.raises(BadSample, match="no answer token left"):
        ConversationEncoder(processor, max_length=first_answer).encode(sample)
