"""``generate_answers``' per-row stop: a row whose caller is gone stops at the next token, the rows
beside it keep exactly their answer alone, and a batch whose every row is gone stops."""

from __future__ import annotations

import pytest

from mmlora.generate import generate_answers
from tests.generate.test_iteration import _images, shapes_llava  # noqa: F401  (the module's fixture)


def test_a_gone_row_stops_and_the_others_keep_their_answers(shapes_llava, shapes_small):  # noqa: F811
    model, processor = shapes_llava
    images = _images(shapes_small, 2)
    calls = [0]
    hook = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def answer(*args, **kwargs) -> tuple[list[str], int]:
        calls[0] = 0
        return generate_answers(model, processor, *args, max_new_tokens=12, **kwargs), calls[0]

    try:
        alone = [answer([im]) for im in images]
        both, _ = answer(images, gone=[lambda: False, lambda: False])
        one_gone, forwards = answer(images, gone=[lambda: True, lambda: False])
        all_gone, forwards_all_gone = answer(images, gone=[lambda: True, lambda: True])
    finally:
        hook.remove()
    assert both == [a[0][0] for a in alone] and one_gone[1] == alone[1][0][0]
    assert forwards == alone[1][1] > 3  # the batch runs as long as the row that stays needs
    assert forwards_all_gone == 1  # the prefill's token, then the stop
    # a gone row's answer is what it had: its first token, the start of its answer alone
    assert one_gone[0] == all_gone[0] and alone[0][0][0].startswith(one_gone[0]) and len(one_gone[0]) < len(alone[0][0][0])
    with pytest.raises(ValueError, match="1 gone"):
        generate_answers(model, processor, images, gone=[lambda: True])
