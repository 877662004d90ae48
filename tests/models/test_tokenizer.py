import pytest

from mmlora.showcase.shapes import corpus


@pytest.fixture(scope="module")
def llava_tok(tiny_llava_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def clip_tok(tiny_clip_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_clip_dir)


def test_llava_tokenizer_behaves_like_llama(llava_tok):
    ids = llava_tok("a large red circle in the top left").input_ids
    tokens = llava_tok.convert_ids_to_tokens(ids)
    assert ids[0] == llava_tok.bos_token_id and tokens[0] == "<s>"
    assert ids[-1] != llava_tok.eos_token_id  # Llama adds BOS only
    assert all(t.startswith("▁") for t in tokens[1:])  # metaspace: each shapes word is one "▁word" piece
    assert llava_tok.convert_ids_to_tokens(llava_tok("USER: hi").input_ids)[1].startswith("▁USER")


def test_llava_tokenizer_byte_fallback_round_trips_unseen_text(llava_tok):
    text = "Zebra über 🙂 — 東京"
    ids = llava_tok(text).input_ids
    assert llava_tok.unk_token_id not in ids
    assert "<0xF0>" in llava_tok.convert_ids_to_tokens(ids)
    assert llava_tok.decode(ids, skip_special_tokens=True) == text


def test_llava_special_tokens(llava_tok):
    image_id = llava_tok.convert_tokens_to_ids("<image>")
    assert llava_tok("<image>\nhi", add_special_tokens=False).input_ids[0] == image_id
    assert llava_tok.pad_token == "<pad>" and llava_tok.pad_token_id not in (llava_tok.bos_token_id, llava_tok.eos_token_id)
    assert image_id == len(llava_tok) - 1 and llava_tok.pad_token_id == len(llava_tok) - 2  # added after the vocab


def test_llava_chat_template_marks_only_the_answer(llava_tok):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "a red circle."},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "a blue star."},
    ]
    text = llava_tok.apply_chat_template(messages, tokenize=False)
    assert text == "USER: <image>\nDescribe. ASSISTANT: a red circle.</s>USER: And now? ASSISTANT: a blue star.</s>"
    out = llava_tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    answer = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    eos = llava_tok.eos_token_id
    assert answer.count(eos) == 2 and answer[-1] == eos
    cut = answer.index(eos) + 1
    assert [llava_tok.decode(part) for part in (answer[:cut], answer[cut:])] == ["a red circle.</s>", "a blue star.</s>"]
    prompt = llava_tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("ASSISTANT:")


def test_clip_tokenizer_lowercases_and_wraps(clip_tok):
    out = clip_tok(["A LARGE Red Circle", "a large red circle"], padding="max_length", max_length=12).input_ids
    assert out[0] == out[1]
    assert out[0][0] == clip_tok.bos_token_id and clip_tok.eos_token_id in out[0]
    eos_at = out[0].index(clip_tok.eos_token_id)
    assert all(t == clip_tok.pad_token_id == 0 for t in out[0][eos_at + 1:])


def test_tokenizer_training_is_deterministic():
    from mmlora.models.tokenizer import build_llava_tokenizer

    texts = corpus(("A",))[:300]
    a, b = build_llava_tokenizer(texts, 400), build_llava_tokenizer(texts, 400)
    assert a.get_vocab() == b.get_vocab()


def test_split_punctuation_keeps_words_whole_whatever_follows_them():
    from mmlora.models.tokenizer import build_llava_tokenizer

    corpus = ["top left holds a large purple star; bottom center: small blue cross."] * 50 + [
        "a small yellow star in the top right and a large green cross in the center."] * 50
    merged = build_llava_tokenizer(corpus, vocab_size=400)
    split = build_llava_tokenizer(corpus, vocab_size=400, split_punctuation=True)
    text = "top left holds a large purple star; bottom center: small blue star."
    assert "▁star;" in merged.tokenize(text)  # the default: a word and its punctuation may merge
    pieces = split.tokenize(text)
    assert pieces.count("▁star") == 2 and ";" in pieces and ":" in pieces and "." in pieces
    ids = split(text)["input_ids"]
    assert split.decode(ids, skip_special_tokens=True) == text
