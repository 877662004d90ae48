"""``generate_answers``' per-row stop: a row whose caller is gone stops at the next token, the rows
beside it keep exactly their answer alone, and a batch whose every row is gone stops."""

from __future__ import annotations

from mmlora.generate import generate_answers
from tests.generate.test_iteration import _images, shapes_llava  # noqa: F401  (the module's fixture)


def _forwards(model) -> list[int]:
    calls = [0]
    model._count = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a_gone_row_stops_and_the_others_keep_their_answers(shapes_llava, shapes_small):  # noqa: F811
    model, processor = shapes_llava
    images = _images(shapes_small, 2)
    alone = [generate_answers(model, processor, [im], max_new_tokens=12)[0] for im in images]
    assert all(len(a.split()) > 2 for a in alone)  # answers of several tokens, so a stop shows
    calls = _forwards(model)
    try:
        both = generate_answers(model, processor, images, max_new_tokens=12, gone=[lambda: False, lambda: False])
        full = calls[0]
        calls[0] = 0
        one_gone = generate_answers(model, processor, images, max_new_tokens=12, gone=[lambda: True, lambda: False])
        assert calls[0] == full  # the other row still runs to its end
        calls[0] = 0
        all_gone = generate_answers(model, processor, images, max_new_tokens=12, gone=[lambda: True, lambda: True])
        assert calls[0] == 1 and full > 3  # the prefill's token, then the stop
    finally:
        model._count.remove()
    assert both == alone and one_gone[1] == alone[1]
    first = processor.tokenizer(alone[0], add_special_tokens=False)["input_ids"][0]
    assert one_gone[0] == all_gone[0] == processor.tokenizer.decode([first]).strip()  # what it had: one token
