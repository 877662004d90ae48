"""Real tokenizers for the tiny presets, trained offline on the shapes-world vocabulary.

Both are byte-fallback BPE tokenizers from the ``tokenizers`` library, wrapped as transformers'
``PreTrainedTokenizerFast`` and saved with ``save_pretrained`` so they load with ``AutoTokenizer``:

* the LLaVA tokenizer behaves like Llama's: metaspace pre-tokenization ("▁" marks a word start, one
  prepended to the first word), byte fallback for anything unseen, ``<s>`` prepended, ``</s>`` as the
  end-of-turn token, ``<image>`` and ``<pad>`` added after the base vocabulary as in llava-hf;
* the CLIP tokenizer lowercases like OpenAI CLIP, wraps text as ``<start_of_text> ... <end_of_text>``
  and pads with id 0.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ...</s>"; the BOS comes from the
# tokenizer, as in llava-hf), written with {% generation %} markers so transformers can return an
# assistant-token mask. Content may be a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_BYTES = [f"<0x{i:02X}>" for i in range(256)]


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    front_specials: list[str],
    lowercase: bool,
    split_punctuation: bool = False,
) -> Tokenizer:
    """A byte-fallback BPE trained on ``texts`` (metaspace pre-tokenization, as Llama's), with
    ``front_specials`` as its first ids; shared by the LLaVA presets and the family folders.

    ``split_punctuation`` keeps punctuation out of word pieces. A BPE trained on a small caption
    corpus otherwise merges a word with the punctuation that follows it ("star;", "center."), so a
    new caption style becomes new words; a real LLM's tokenizer, trained on far more text, keeps
    "star" one piece whatever follows it."""
    tok = Tokenizer(models.BPE(unk_token=front_specials[0] if "<unk>" in front_specials else None, byte_fallback=True))
    norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(norm)
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Punctuation("isolated"), metaspace])
                         if split_punctuation else metaspace)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(_BYTES),
        special_tokens=front_specials,
        limit_alphabet=1000,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    # Byte-fallback tokens must be ordinary vocabulary (as in Llama's), not special tokens, or
    # decoding with skip_special_tokens would drop them. The trainer cannot do that, so rebuild the
    # vocabulary: specials, then the 256 byte tokens, then the learned pieces in their order.
    state = json.loads(tok.to_str())
    learned = sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])
    ordered = front_specials + _BYTES + [t for t, _ in learned if t not in front_specials and t not in _BYTES]
    state["model"]["vocab"] = {t: i for i, t in enumerate(ordered)}
    state["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(front_specials)
    ]
    return Tokenizer.from_str(json.dumps(state))


def build_llava_tokenizer(texts: Iterable[str], vocab_size: int = 640, split_punctuation: bool = False):
    """A Llama-style tokenizer (see module docstring) with LLaVA's ``<image>`` and ``<pad>`` tokens."""
    from transformers import PreTrainedTokenizerFast

    # The chat template's role words are part of the tokenizer's language, as in a real model.
    texts = list(texts) + ["USER: ASSISTANT: SYSTEM: A chat between a user and an assistant."] * 200
    tok = train_bpe(texts, vocab_size, ["<unk>", "<s>", "</s>"], lowercase=False, split_punctuation=split_punctuation)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",  # generation-friendly; the collator pads explicitly where it matters
        model_max_length=2048,
        add_bos_token=True,
        add_eos_token=False,
    )
    fast.add_special_tokens({"pad_token": "<pad>"})
    fast.add_tokens(["<image>"], special_tokens=True)
    fast.chat_template = LLAVA_CHAT_TEMPLATE
    return fast


def build_clip_tokenizer(texts: Iterable[str], vocab_size: int = 512, context_length: int = 32):
    """A lowercasing CLIP tokenizer; ``<end_of_text>`` is pooled by open_clip (``pool_type='eos'``)."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(texts, vocab_size, ["<pad>", "<unk>", "<start_of_text>", "<end_of_text>"], lowercase=True)
    sot, eot = tok.token_to_id("<start_of_text>"), tok.token_to_id("<end_of_text>")
    tok.post_processor = processors.TemplateProcessing(
        single="<start_of_text> $A <end_of_text>",
        special_tokens=[("<start_of_text>", sot), ("<end_of_text>", eot)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<start_of_text>",
        eos_token="<end_of_text>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=context_length,
    )
