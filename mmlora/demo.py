"""The embedded default: the shapes world and the tiny models, run on real batches.

For now this generates (or reuses) the shapes worlds and reports what the shipped world-A bases
(``shapes-llava-base``, ``shapes-clip-base``) produce on world-A validation images: the LLaVA's caption
loss on the reference captions (answer tokens only) against a uniform guess, a greedy caption, and the
CLIP's image-to-caption retrieval accuracy against chance. The before/after adaptation demo grows
from here.

Run: ``make demo`` or ``mmlora demo``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DemoResult:
    data_dir: Path
    llava_dir: Path
    clip_dir: Path
    caption_loss: float
    uniform_loss: float
    answer_tokens: int
    generated: str
    reference: str
    retrieval_top1: float
    retrieval_chance: float


def _val_samples(world_dir: Path, n: int) -> list[dict]:
    samples = json.loads((world_dir / "llava_val.json").read_text())[:n]
    for s in samples:
        s["image_path"] = world_dir / s["image"]
    return samples


def caption_loss(model, processor, images, prompt: str, answers: list[str]) -> tuple[float, int]:
    """Mean cross-entropy per answer token, through the training pipeline's encoder and loss."""
    import torch

    from mmlora.data.batching import Collator
    from mmlora.data.processing import ConversationEncoder
    from mmlora.data.samples import Sample
    from mmlora.train.objectives import supervised_loss_sum

    encoder = ConversationEncoder(processor)
    samples = [
        Sample(f"demo-{i}", "demo", [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": [{"type": "text", "text": ans}]},
        ], [img])
        for i, (img, ans) in enumerate(zip(images, answers))
    ]
    batch = Collator(processor.tokenizer.pad_token_id)([encoder.encode(s) for s in samples])
    with torch.no_grad():
        total, tokens = supervised_loss_sum(model, batch)
    return float(total) / tokens, tokens


def clip_retrieval(model, preprocess, tokenizer, images, captions: list[str]) -> float:
    """Top-1 image-to-caption retrieval accuracy within the batch."""
    import torch

    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(i) for i in images]).to(next(model.parameters()).dtype), normalize=True)
        txt = model.encode_text(tokenizer(captions), normalize=True)
    pred = (img @ txt.T).argmax(dim=1)
    return float((pred == torch.arange(len(images))).float().mean())


def run_demo(
    n: int = 16, llava: str = "shapes-llava-base", clip: str = "shapes-clip-base", data_dir: Path | None = None
) -> DemoResult:
    from PIL import Image

    from mmlora.data.shapes import CAPTION_PROMPT, cached_worlds
    from mmlora.eval.caption import generate_captions
    from mmlora.models.clip import load_clip
    from mmlora.models.llava import load_llava
    from mmlora.models.loading import resolve_pretrained

    data_dir = data_dir or cached_worlds()
    world_a = data_dir / "world_A"
    samples = _val_samples(world_a, n)
    images = [Image.open(s["image_path"]).convert("RGB") for s in samples]
    answers = [s["conversations"][1]["value"] for s in samples]

    model, processor = load_llava(llava)
    loss, n_tokens = caption_loss(model, processor, images, CAPTION_PROMPT, answers)
    generated = generate_captions(model, processor, images[:1], CAPTION_PROMPT, max_new_tokens=64)[0]

    clip_model, preprocess, tokenizer = load_clip(clip)
    top1 = clip_retrieval(clip_model, preprocess, tokenizer, images, answers)
    return DemoResult(
        data_dir=data_dir,
        llava_dir=Path(resolve_pretrained(llava)),
        clip_dir=Path(resolve_pretrained(clip, kind="clip")),
        caption_loss=loss,
        uniform_loss=math.log(model.config.text_config.vocab_size),
        answer_tokens=n_tokens,
        generated=generated,
        reference=answers[0],
        retrieval_top1=top1,
        retrieval_chance=1 / len(images),
    )


def format_result(r: DemoResult, seconds: float) -> str:
    return "\n".join([
        "mmlora demo: the shapes world and the pretrained world-A bases, world-A val",
        f"  data:   {r.data_dir}",
        f"  LLaVA:  {r.llava_dir}",
        f"  CLIP:   {r.clip_dir}",
        "",
        f"  LLaVA caption loss      {r.caption_loss:.3f} nats/token over {r.answer_tokens} answer tokens"
        f"  (uniform guess: {r.uniform_loss:.3f})",
        f"  LLaVA greedy caption    {r.generated!r}",
        f"  reference caption       {r.reference!r}",
        f"  CLIP image->caption R@1 {r.retrieval_top1:.3f}  (chance: {r.retrieval_chance:.3f})",
        "",
        f"  done in {seconds:.1f}s.",
    ])


def main(n: int = 16) -> int:
    start = time.time()
    result = run_demo(n=n)
    print(format_result(result, time.time() - start))
    return 0
