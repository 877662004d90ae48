import math

from mmlora.demo import format_result, run_demo


def test_demo_runs_the_models_on_real_batches(shapes_small, tiny_llava_dir, tiny_clip_dir):
    r = run_demo(n=4, llava="tiny-llava", clip="tiny-clip", data_dir=shapes_small)
    # Untrained: the caption loss sits near a uniform guess over the vocabulary.
    assert r.answer_tokens > 4 * 5
    assert abs(r.caption_loss - r.uniform_loss) < 1.0 and math.isfinite(r.caption_loss)
    assert 0.0 <= r.retrieval_top1 <= 1.0 and r.retrieval_chance == 0.25
    assert isinstance(r.generated, str) and r.reference.endswith(".")
    text = format_result(r, 1.0)
    assert "caption loss" in text and "R@1" in text and str(r.data_dir) in text
