"""Where an AdaLoRA run put its rank budget: ``rank_allocation.json``, its text table and pictures.

The record holds, for every AdaLoRA module (its modality, layer and kind, from the placement plan), the
effective rank after each allocation step (step 0 is the start: every module at ``init_r``), and the
budget PEFT's schedule set for that step. From it: per-modality totals and shares of the budget
(``totals``), the table ``mmlora train`` prints and the model card carries (``format_allocation``), a
heatmap of the final ranks (layers × module kinds, one panel per modality) and a line chart of each
modality's share of the budget over the steps (``allocation_figures``).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmlora.errors import MmloraError
from mmlora.optional import require
from mmlora.placement.plan import PlacementPlan

ALLOCATION_FILE = "rank_allocation.json"
HEATMAP_FILE = "rank_heatmap.png"
SHARES_FILE = "rank_shares.png"


@dataclass
class ModuleRanks:
    name: str
    modality: str
    layer: int | None
    kind: str
    #: Effective rank after each of the record's steps.
    ranks: list[int] = field(default_factory=list)


@dataclass
class RankAllocation:
    init_r: int
    target_r: int
    steps: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    modules: list[ModuleRanks] = field(default_factory=list)

    @classmethod
    def for_plan(cls, plan: PlacementPlan) -> RankAllocation:
        """An empty record naming every AdaLoRA module of ``plan``."""
        settings = plan.adalora
        if settings is None:
            raise MmloraError("rank allocation: the plan has no AdaLoRA adapter")
        modules = [ModuleRanks(t.name, m.name, t.layer, t.name.rsplit(".", 1)[-1])
                   for m in plan.modalities.values() if m.variant for t in m.targets]
        return cls(settings.init_r, settings.target_r, modules=modules)

    def record(self, step: int, budget: int, ranks: dict[str, int]) -> None:
        """Append the ranks after ``step``."""
        self.steps.append(step)
        self.budgets.append(budget)
        for m in self.modules:
            m.ranks.append(ranks[m.name])

    def until(self, step: int) -> RankAllocation:
        """The record as it was after ``step`` (what a resumed run goes on from)."""
        keep = sum(s <= step for s in self.steps)
        return RankAllocation(self.init_r, self.target_r, self.steps[:keep], self.budgets[:keep],
                              [ModuleRanks(m.name, m.modality, m.layer, m.kind, m.ranks[:keep]) for m in self.modules])

    def modalities(self) -> list[str]:
        return list(dict.fromkeys(m.modality for m in self.modules))

    def totals(self, index: int = -1) -> dict[str, int]:
        """Modality → the sum of its modules' effective ranks at the record's ``index``-th step."""
        out = {name: 0 for name in self.modalities()}
        for m in self.modules:
            out[m.modality] += m.ranks[index]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"variant": "adalora", "init_r": self.init_r, "target_r": self.target_r, "steps": self.steps,
                "budgets": self.budgets, "totals": {n: [self.totals(i)[n] for i in range(len(self.steps))]
                                                    for n in self.modalities()},
                "modules": [asdict(m) for m in self.modules]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankAllocation:
        return cls(data["init_r"], data["target_r"], list(data["steps"]), list(data["budgets"]),
                   [ModuleRanks(**m) for m in data["modules"]])

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def read(cls, path: Path) -> RankAllocation:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MmloraError(f"{path}: not a readable rank allocation ({err})") from None


def _layers_text(ranks: list[tuple[int | None, int]]) -> str:
    """Per-layer sums, e.g. ``L0 12 · L1 3``; modules outside a layer stack as one number."""
    by_layer: dict[int | None, int] = {}
    for layer, r in ranks:
        by_layer[layer] = by_layer.get(layer, 0) + r
    if list(by_layer) == [None]:
        return str(by_layer[None])
    return " · ".join(f"L{k} {v}" if k is not None else f"other {v}" for k, v in
                      sorted(by_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)))


def _final_rows(alloc: RankAllocation) -> list[tuple[str, str, str, str, str, str]]:
    """Per modality: name, modules, "kept of initial", share of the kept rank, modules pruned to 0,
    rank per layer — the cells both tables show."""
    final = alloc.totals()
    kept = sum(final.values())
    rows = []
    for name, total in final.items():
        mods = [m for m in alloc.modules if m.modality == name]
        share = f"{100 * total / kept:.1f}%" if kept else "-"
        rows.append((name, str(len(mods)), f"{total} of {alloc.init_r * len(mods)}", share,
                     str(sum(m.ranks[-1] == 0 for m in mods)), _layers_text([(m.layer, m.ranks[-1]) for m in mods])))
    return rows


def format_allocation(alloc: RankAllocation, title: str = "") -> str:
    """The final allocation per modality: modules, rank kept of the initial, share of the budget,
    modules pruned to rank 0, and the rank per layer."""
    header = ("modality", "modules", "rank kept", "share", "pruned to 0", "rank per layer")
    rows = _final_rows(alloc)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [title] if title else []
    out += [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    last = alloc.steps[-1] if alloc.steps else 0
    out.append(f"total rank {sum(alloc.totals().values())} after step {last} (budget "
               f"{alloc.budgets[-1] if alloc.budgets else '-'}; init_r {alloc.init_r}, target_r {alloc.target_r} per module)")
    return "\n".join(out)


def card_section(alloc: RankAllocation) -> str:
    """The model card's ``## AdaLoRA rank allocation`` section (a Markdown table)."""
    lines = ["## AdaLoRA rank allocation", "",
             f"Effective rank (singular values kept) after step {alloc.steps[-1]}, of init_r {alloc.init_r} per module "
             f"(target_r {alloc.target_r}); per module and step in `{ALLOCATION_FILE}`.", "",
             "| modality | modules | rank kept | share of the budget | rank per layer |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {modules} | {kept} | {share} | {layers} |" for name, modules, kept, share, _, layers in _final_rows(alloc)]
    return "\n".join(lines) + "\n"


def allocation_figures(alloc: RankAllocation, folder: Path) -> list[Path]:
    """``rank_heatmap.png`` (final ranks: layers × module kinds, one panel per modality) and
    ``rank_shares.png`` (each modality's share of the kept rank after every allocation step) in
    ``folder``; none (with a one-line warning) without the ``plot`` extra."""
    try:
        matplotlib = require("matplotlib", "plot", "the rank-allocation pictures")
    except MmloraError as exc:
        warnings.warn(f"no {HEATMAP_FILE}: {exc}", stacklevel=2)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = alloc.modalities()
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1, 3.6), dpi=100, squeeze=False)
    image = None
    for ax, name in zip(axes[0], names):
        mods = [m for m in alloc.modules if m.modality == name]
        kinds = list(dict.fromkeys(m.kind for m in mods))
        layers = sorted({m.layer for m in mods}, key=lambda v: (v is None, v or 0))
        grid = [[float("nan")] * len(kinds) for _ in layers]
        for m in mods:
            grid[layers.index(m.layer)][kinds.index(m.kind)] = m.ranks[-1]
        image = ax.imshow(grid, vmin=0, vmax=alloc.init_r, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, fontsize=7)
        ax.set_yticks(range(len(layers)), ["-" if v is None else str(v) for v in layers], fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: {sum(m.ranks[-1] for m in mods)} of {alloc.init_r * len(mods)}", fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, str(int(v)), ha="center", va="center", fontsize=6, color="white" if v < alloc.init_r / 2 else "black")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="effective rank", shrink=0.8)
    fig.suptitle(f"AdaLoRA: final ranks (init_r {alloc.init_r})", fontsize=10)
    heatmap = folder / HEATMAP_FILE
    fig.savefig(heatmap, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    series = [alloc.totals(i) for i in range(len(alloc.steps))]
    for name in names:
        shares = [100 * t[name] / max(sum(t.values()), 1) for t in series]
        ax.plot(alloc.steps, shares, marker="o", markersize=2, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("share of the kept rank (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    shares_path = folder / SHARES_FILE
    fig.savefig(shares_path)
    plt.close(fig)
    return [heatmap, shares_path]
