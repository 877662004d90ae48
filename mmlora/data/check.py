"""``mmlora data check``: validate a dataset without training.

Reads every record, opens every image and encodes every sample with the model's processor, then
reports counts, a token-length histogram, an image-size summary, every bad sample by id, and — for
image-text data — how much of a training batch would be padding, padded and packed
(:func:`padding_line`): whether ``train.packing`` pays on this data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmlora.data.batching import batch_sampler
from mmlora.data.build import mix
from mmlora.data.packing import first_fit_decreasing
from mmlora.data.samples import BadSample, Sample
from mmlora.data.segmentation import SegmentationFolder


@dataclass(frozen=True)
class Batching:
    """How training would batch the data (one process, no accumulation): ``batch_size`` samples, or
    ``batch_tokens`` token cells when set; packed rows of ``max_tokens``; the sampler's seed."""

    batch_size: int = 4
    batch_tokens: int | None = None
    max_tokens: int = 2048
    seed: int = 0
    group_by_length: bool = True

    def describe(self) -> str:
        size = f"{self.batch_tokens} token cells" if self.batch_tokens else f"{self.batch_size} samples"
        grouped = "length-grouped, " if self.group_by_length else ""
        return f"batches of {size} ({grouped}seed {self.seed})"


def padding_shares(lengths: list[int], has_image: list[bool], batching: Batching) -> tuple[float, float]:
    """The share of token cells that would be padding over one epoch of ``batching``'s seeded
    sampler (``mmlora.data.batching``, on the exact lengths where training groups by estimates):
    (padded — each batch to its longest sample; packed — each batch's samples first-fit-decreasing
    into rows of ``max_tokens``, rows to the fullest, as ``PackedCollator`` lays them out). Every
    length must fit a row."""
    out = []
    for packed in (False, True):
        sampler = batch_sampler(lengths, has_image, batching.batch_size, batching.batch_tokens, packed, batching.seed,
                                batching.group_by_length)
        tokens = cells = 0
        for batch in sampler.batches(0):
            n = [lengths[i] for i in batch]
            tokens += sum(n)
            if packed:
                rows = [sum(n[j] for j in row) for row in first_fit_decreasing(n, batching.max_tokens)]
                cells += len(rows) * max(rows)
            else:
                cells += len(n) * max(n)
        out.append(1 - tokens / cells if cells else 0.0)
    return out[0], out[1]


@dataclass
class CheckReport:
    source: str
    records: int = 0
    with_image: int = 0
    text_only: int = 0
    turns: int = 0
    token_lengths: list[int] = field(default_factory=list)
    has_image: list[bool] = field(default_factory=list)  # of each sample in token_lengths
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    image_modes: Counter = field(default_factory=Counter)
    bad: list[BadSample] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def format(self) -> str:
        lines = [f"{self.source}: {self.records} records, {self.records - len(self.bad)} good, {len(self.bad)} bad",
                 f"  with image: {self.with_image}, text-only: {self.text_only}, assistant turns: {self.turns}"]
        if self.token_lengths:
            lens = np.array(self.token_lengths)
            lines.append(f"  tokens: min {lens.min()}, median {int(np.median(lens))}, p95 {int(np.percentile(lens, 95))}, max {lens.max()}")
            edges = np.histogram_bin_edges(lens, bins=min(8, max(1, len(set(lens.tolist())))))
            counts, _ = np.histogram(lens, edges)
            top = max(counts.max(), 1)
            for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
                lines.append(f"    {int(lo):>6}-{int(hi):<6} {'#' * max(1 if c else 0, round(30 * c / top)):<30} {c}")
        if self.image_sizes:
            w = np.array([s[0] for s in self.image_sizes])
            h = np.array([s[1] for s in self.image_sizes])
            lines.append(f"  images: {len(w)}, width {w.min()}..{w.max()} (median {int(np.median(w))}), "
                         f"height {h.min()}..{h.max()} (median {int(np.median(h))}); modes "
                         + ", ".join(f"{m}: {n}" for m, n in self.image_modes.most_common()))
        for b in self.bad:
            lines.append(f"  BAD {b}")
        return "\n".join(lines)


def padding_line(reports: list[tuple[CheckReport, float]], batching: Batching, what: str) -> str:
    """One line: the padding of the training data — ``reports`` of its files, each with its weight, mixed
    as the trainer mixes them (``mmlora.data.build.mix``) — in ``batching``'s batches, padded and packed
    (:func:`padding_shares`); a sample longer than the rows is named instead. ``what`` names the data."""
    mixed = mix([(list(zip(r.token_lengths, r.has_image)), weight) for r, weight in reports], batching.seed)
    lengths, has_image = [n for n, _ in mixed], [h for _, h in mixed]
    if not lengths:
        return f"{what}: no usable sample to batch"
    head = f"{what}: padding in {batching.describe()}"
    if max(lengths) > batching.max_tokens:
        return (f"{head}: a sample of {max(lengths)} tokens is longer than the packed rows of {batching.max_tokens} "
                "(train.packing refuses it: raise train.packing.max_tokens to data.max_length)")
    padded, packed = padding_shares(lengths, has_image, batching)
    return f"{head}: {padded:.1%} of token cells; packed in rows of {batching.max_tokens} (train.packing): {packed:.1%}"


def check_records(source: str, records: list[Sample | BadSample], encoder: Any) -> CheckReport:
    from PIL import Image

    report = CheckReport(source, records=len(records))
    for r in records:
        if isinstance(r, BadSample):
            report.bad.append(r)
            continue
        report.with_image += bool(r.images)
        report.text_only += not r.images
        report.turns += sum(m["role"] == "assistant" for m in r.messages)
        try:
            for img in r.images:
                if isinstance(img, (str, Path)) and Path(img).is_file() and Path(img).stat().st_size:
                    try:
                        with Image.open(img) as probe:
                            report.image_modes[probe.mode] += 1
                            report.image_sizes.append(probe.size)
                    except Exception:  # noqa: BLE001 - encode() below reports it with a clear message
                        pass
                elif hasattr(img, "size"):
                    report.image_modes[img.mode] += 1
                    report.image_sizes.append(img.size)
            out = encoder.encode(r)
            ids = out["input_ids"] if "input_ids" in out else out["text"][out["text"] != 0]  # CLIP: unpadded caption
            report.token_lengths.append(len(ids))
            report.has_image.append(bool(r.images))
        except BadSample as bad:
            report.bad.append(bad)
    return report


def check_segmentation(root: Path) -> list[CheckReport]:
    splits = sorted(p.stem for p in (root / "ImageSets" / "Segmentation").glob("*.txt")) or \
        sorted(p.name for p in (root / "masks").iterdir() if p.is_dir())
    reports = []
    for split in splits:
        folder = SegmentationFolder(root, split)
        report = CheckReport(f"{root} [{split}]", records=len(folder))
        for i in range(len(folder)):
            try:
                image, _ = folder.load(i)
                report.image_sizes.append(image.size)
                report.image_modes["RGB"] += 1
                report.with_image += 1
            except BadSample as bad:
                report.bad.append(bad)
        reports.append(report)
    return reports
