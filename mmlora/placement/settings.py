"""Typed adapter settings that a placement plan carries: one PEFT adapter, in mmlora's words.

``mmlora.placement.plan`` fills them from the recipe; ``mmlora.placement.peft_backend`` is the one
module that turns them into PEFT's config objects (and knows PEFT's keyword names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmlora.config.schema import Init


@dataclass
class LoraSettings:
    """One LoRA/DoRA adapter: a default rank and alpha, and the modules whose rank or alpha differs."""

    rank: int
    alpha: float
    #: Full module names the adapter goes on.
    targets: list[str]
    #: Module name → rank, for the modules whose rank is not ``rank``.
    rank_overrides: dict[str, int] = field(default_factory=dict)
    #: Module name → alpha, for the modules whose alpha is not ``alpha``.
    alpha_overrides: dict[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    dora: bool = False
    rslora: bool = False
    init: Init = "default"

    @property
    def converts_at_save(self) -> bool:
        """PiSSA/OLoRA: both factors start non-zero and the base weights move, so the adapter's initial
        state is kept and saving converts it into a plain LoRA adapter on the original base."""
        return self.init in ("pissa", "olora")


@dataclass
class AdaLoraSettings:
    """AdaLoRA's budget (whole model): ranks start at ``init_r`` and are pruned toward ``target_r``."""

    init_r: int
    target_r: int
    tinit: int
    tfinal: int
    delta_t: int
    #: Training steps; ``None`` until the trainer knows them (applying then refuses).
    total_step: int | None = None
    orth_reg_weight: float = 0.5
