"""AdaLoRA in the training loop: PEFT's budget step, its record, and its regulariser.

Each optimizer step calls PEFT's ``update_and_allocate`` (it scores the singular values and, at
allocation steps, masks the least important ones to the budget's total rank); after an allocation step
the tracker records every module's effective rank (``mmlora.runs.allocation``). The orthogonality
regulariser PEFT would add inside the model's forward is added to the step's loss here instead
(``mmlora.placement.allocation``). The allocator's scores and the record go into each checkpoint, so
a resumed run allocates and reports exactly as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlora.placement.allocation import (allocation_step, allocator_state, effective_ranks, load_allocator_state,
                                         orthogonal_regularizer)
from mmlora.placement.plan import PlacementPlan
from mmlora.runs.allocation import ALLOCATION_FILE, RankAllocation, allocation_figures, card_section, format_allocation


class AllocationTracker:
    """One per AdaLoRA run; ``model`` is always the unwrapped PEFT model."""

    def __init__(self, model: nn.Module, plan: PlacementPlan):
        self.record = RankAllocation.for_plan(plan)
        self.record.record(0, int(model.base_model.rankallocator.init_bgt), effective_ranks(model))

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """PEFT's orthogonality term for this step's loss (None when its weight is 0)."""
        return orthogonal_regularizer(model)

    def step(self, model: nn.Module, step: int) -> dict[str, int] | None:
        """PEFT's budget step for optimizer step ``step`` (0-based, after ``optimizer.step()``);
        the per-modality totals when it allocated, else None."""
        allocates, budget = allocation_step(model, step)
        model.base_model.update_and_allocate(step)
        if not allocates:
            return None
        self.record.record(step + 1, budget, effective_ranks(model))
        return self.record.totals() | {"budget": budget}

    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        return {"allocator": allocator_state(model), "record": self.record.to_dict()}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        load_allocator_state(model, state["allocator"])
        self.record = RankAllocation.from_dict(state["record"])

    def write(self, root: Path) -> Path:
        """``rank_allocation.json`` in the run folder."""
        return self.record.write(root / ALLOCATION_FILE)

    def finish(self, root: Path) -> tuple[str, str]:
        """The record, heatmap and shares chart in the run folder; returns ``(text, card section)``."""
        self.write(root)
        allocation_figures(self.record, root)
        return format_allocation(self.record, "AdaLoRA rank allocation"), card_section(self.record)
