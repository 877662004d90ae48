"""Human-readable placement plan: the table ``mmlora plan`` prints."""

from __future__ import annotations

from mmlora.placement.plan import ModalityPlan, PlacementPlan


def _layers(m: ModalityPlan) -> str:
    if m.mode == "frozen":
        return "-"
    if m.layers is None:
        return f"all ({m.n_layers})" if m.n_layers else "all"
    if len(m.layers) > 1 and m.layers == list(range(m.layers[0], m.layers[-1] + 1)):
        return f"{m.layers[0]}-{m.layers[-1]} of {m.n_layers}"
    return f"{','.join(map(str, m.layers))} of {m.n_layers}"


def _rank(m: ModalityPlan) -> str:
    if not m.targets:
        return "-"
    ranks = sorted({t.rank for t in m.targets})
    alphas = sorted({t.alpha for t in m.targets})
    r = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}"
    a = f"{alphas[0]:g}" if len(alphas) == 1 else f"{alphas[0]:g}..{alphas[-1]:g}"
    return f"{r}/{a}"


def format_plan(plan: PlacementPlan, title: str = "") -> str:
    header = ("modality", "mode", "modules", "layers", "rank/alpha", "precision", "lr", "trainable", "of modality")
    rows = []
    for m in plan.modalities.values():
        modules = str(len(m.targets)) if m.targets else (f"{len(m.full_params)} tensors" if m.full_params else "-")
        lr = f"{m.lr:g}" if m.lr else (f"x{m.lr_multiplier:g}" if m.lr_multiplier else "base" if m.mode != "frozen" else "-")
        share = f"{100 * m.trainable_params / m.total_params:.2f}%" if m.total_params else "-"
        rows.append((m.name, m.mode, modules, _layers(m), _rank(m), m.precision or "-", lr, f"{m.trainable_params:,}", share))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [title] if title else []
    out += [line(header), line(["-" * w for w in widths])]
    for row, m in zip(rows, plan.modalities.values()):
        out.append(line(row))
        names = [t.name for t in m.targets] or m.full_params
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            out.append(f"    e.g. {', '.join(names[:3])}{more}")
    total = sum(m.total_params for m in plan.modalities.values())
    trainable = sum(m.trainable_params for m in plan.modalities.values())
    out.append("")
    for a in plan.adapters:
        out.append(f"adapter {a.name!r}: {a.variant} on {', '.join(a.modalities)} "
                   f"({len(a.lora.targets)} modules, r={a.lora.rank}, "
                   f"{len(a.lora.rank_overrides)} rank overrides)")
    for m in plan.qalora:
        out.append(f"qalora on {m.name}: {len(m.targets)} linear layers quantized to INT4 (group size {m.group_size}), "
                   f"group-pooled adapters saved to qalora.safetensors; merge keeps them INT4")
    if plan.full_params:
        out.append(f"full: {len(plan.full_params)} tensors trained in place, saved to full_modules.safetensors")
    pct = f" ({100 * trainable / total:.2f}%)" if total else ""
    out.append(f"trainable: {trainable:,} of {total:,} parameters{pct}")
    out += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(out)
