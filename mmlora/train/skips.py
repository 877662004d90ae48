"""The training samples a run skipped as bad (``data.on_bad_sample: skip``), kept the same on every
process: the count in each metrics row, ``bad_samples.jsonl`` (training and validation, one JSON
line each), what a resumed run reads back from it, and the first usable sample of a kind (what a
process with nothing usable in its slice takes part with).

Layer: train. Imports data and the foundation.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from mmlora.data.batching import ConversationDataset, skip_entry, write_skip_report
from mmlora.errors import MmloraError
from mmlora.train.processes import Processes


class SkipLedger:
    """The skipped training samples of a run (``entries``, by key), its report at ``report``;
    ``enabled`` is ``data.on_bad_sample == "skip"`` (otherwise a bad sample stops the run)."""

    def __init__(self, train_set: ConversationDataset, val_set: ConversationDataset | None, processes: Processes,
                 report: Path, enabled: bool):
        self.train_set, self.val_set, self.processes = train_set, val_set, processes
        self.report, self.enabled = report, enabled
        self.entries: dict[str, dict[str, Any]] = {}
        self._usable: dict[bool | None, int | None] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def new(self) -> dict[str, dict[str, Any]]:
        """Samples this process skipped that are not in ``entries`` yet (add them with :meth:`add`)."""
        return {k: skip_entry(b) for k, b in self.train_set.skipped.items() if k not in self.entries}

    def add(self, new: dict[str, dict[str, Any]]) -> None:
        """Every process's ``new`` entries (a collective: every process calls it)."""
        self.entries.update(self.processes.unite(new))

    def write(self) -> Path | None:
        """``bad_samples.jsonl``: every sample skipped so far on any process, training and validation.
        A collective: every process calls it. None when skipping is off."""
        if not self.enabled:
            return None
        self.entries.update(self.processes.unite(self.train_set.skip_entries()))
        val = self.processes.unite(self.val_set.skip_entries()) if self.val_set is not None else {}
        lines = [{"split": "train", **e} for e in self.entries.values()] + [{"split": "val", **e} for e in val.values()]
        self.processes.on_main(self.report.name, self.report, lambda: write_skip_report(self.report, lines))
        return self.report

    def read_back(self) -> None:
        """The training samples an earlier part of this run reported (a resumed run's count and report
        go on from there); lines that do not parse are passed over."""
        if not self.enabled or not self.report.is_file():
            return
        for line in self.report.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("split", "train") == "train":
                    key = f"{entry.get('where')}#{entry.get('id')}"
                    self.entries[key] = {k: entry.get(k) for k in ("where", "id", "problem")}

    def all_skipped(self) -> MmloraError:
        """The error for a run none of whose training samples encodes (the report written first)."""
        self.write()
        return MmloraError(f"every sample of the training data was skipped as bad ({len(self.entries)}); see {self.report}")

    def first_usable(self, has_image: bool | None) -> int | None:
        """The first training sample (with images, without, or either: None) that encodes; cached."""
        if has_image not in self._usable:
            self._usable[has_image] = next(
                (i for i, s in enumerate(self.train_set.samples)
                 if (has_image is None or s.has_image == has_image) and self.train_set[i] is not None), None)
        return self._usable[has_image]
