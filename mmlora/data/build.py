"""Recipe ``data:`` section → datasets: read every source, mix by weight, encode with the processor."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from mmlora.config.schema import DatasetSpec
from mmlora.data.readers import read_coco, read_hf, read_llava, read_messages
from mmlora.data.samples import BadSample, Sample
from mmlora.data.segmentation import SegmentationFolder


def read_dataset(spec: DatasetSpec, base_dir: Path | None = None) -> list[Sample | BadSample]:
    """All records of one dataset (relative paths resolve against ``base_dir``, e.g. the recipe's folder)."""
    def rel(p: str | None) -> Path | None:
        if p is None:
            return None
        path = Path(p).expanduser()
        return path if path.is_absolute() or base_dir is None else base_dir / path

    path = rel(spec.path)
    if spec.format == "llava":
        records = read_llava(path, rel(spec.images))
    elif spec.format == "messages":
        records = read_messages(path, rel(spec.images))
    elif spec.format == "coco":
        records = read_coco(path, rel(spec.images), spec.prompt or "", spec.captions)
    elif spec.format == "seg":
        records = SegmentationFolder(path, spec.split).as_samples()
    else:
        records = read_hf(path, spec.hf_format, spec.split, spec.prompt or "")
    return records[: spec.limit] if spec.limit else records


def mix(sources: list[tuple[list[Any], float]], seed: int = 0) -> list[Any]:
    """Concatenate sources, each repeated/subsampled to ``weight x size`` (deterministic from ``seed``)."""
    out: list[Any] = []
    rng = random.Random(seed)
    for records, weight in sources:
        whole, frac = int(weight), weight - int(weight)
        out += records * whole
        extra = math.floor(frac * len(records) + 0.5)
        out += rng.sample(records, extra) if extra else []
    return out


