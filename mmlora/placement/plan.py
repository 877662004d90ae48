"""Placement plan: a recipe's per-modality spec → the exact modules, ranks and adapters.

``plan_placement(model, modality_map, spec)`` resolves every modality's mode, targets and layers to
concrete module names, computes the parameters each adds, and compiles the LoRA/DoRA modalities into
as few PEFT adapters as possible: modalities that share variant, dropout, init and rsLoRA go into one
adapter (typed :class:`LoraSettings`) whose per-module overrides give each module its rank. The plan
carries everything applying needs (AdaLoRA's budget, QA-LoRA's dropout and rsLoRA), so nothing reads
the spec once it exists. It refuses plans
that cannot work (a spec that matches nothing, a pattern that reaches into another modality, layers
that do not exist) and warns about adapters on layers the model never reads. It needs only module
structure, so it runs on a model built on the meta device (a 7B model plans in seconds).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from torch import nn

from mmlora.config.schema import Init, ModalitySpec, PlacementSpec
from mmlora.errors import MmloraError
from mmlora.models.layers import is_adaptable, is_linear, linear_wrappers
from mmlora.models.modality import ModalityMap, unwrap
from mmlora.placement.peft_backend import lora_kwargs
from mmlora.placement.settings import AdaLoraSettings, LoraSettings
from mmlora.placement.targets import TARGET_GROUPS_SET, compile_pattern, matches_group


@dataclass
class ModuleTarget:
    name: str
    layer: int | None
    rank: int
    alpha: float
    params: int


@dataclass
class ModalityPlan:
    name: str
    mode: str
    targets: list[ModuleTarget] = field(default_factory=list)
    #: Parameters trained in place (mode full).
    full_params: list[str] = field(default_factory=list)
    layers: list[int] | None = None
    n_layers: int = 0
    total_params: int = 0
    trainable_params: int = 0
    precision: str | None = None
    lr: float | None = None
    lr_multiplier: float | None = None
    #: QA-LoRA's INT4 group size (mode qalora only).
    group_size: int | None = None
    #: Adapter settings of lora/dora/qalora modalities (the defaults otherwise).
    dropout: float = 0.0
    rslora: bool = False
    init: Init = "default"

    @property
    def variant(self) -> str | None:
        """The PEFT variant (qalora is mmlora's own layer, outside PEFT's adapters)."""
        return self.mode if self.mode in ("lora", "dora") else None


@dataclass
class AdapterPlan:
    """One PEFT adapter: its name, variant, the modalities it covers, and its settings (with AdaLoRA's
    budget when the variant is adalora)."""

    name: str
    variant: str
    modalities: list[str]
    lora: LoraSettings
    adalora: AdaLoraSettings | None = None


@dataclass
class PlacementPlan:
    kind: str
    modalities: dict[str, ModalityPlan]
    adapters: list[AdapterPlan]
    warnings: list[str] = field(default_factory=list)

    @property
    def full_params(self) -> list[str]:
        return [p for m in self.modalities.values() for p in m.full_params]

    @property
    def adalora(self) -> AdaLoraSettings | None:
        """AdaLoRA's budget when the plan's (single) adapter is AdaLoRA."""
        return next((a.adalora for a in self.adapters if a.adalora is not None), None)

    @property
    def qalora(self) -> list[ModalityPlan]:
        """Modalities placed with QA-LoRA (``mmlora.adapters.qalora``)."""
        return [m for m in self.modalities.values() if m.mode == "qalora"]

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "modalities": {
                n: {
                    "mode": m.mode, "precision": m.precision, "layers": m.layers, "n_layers": m.n_layers,
                    "total_params": m.total_params, "trainable_params": m.trainable_params,
                    "lr": m.lr, "lr_multiplier": m.lr_multiplier, "group_size": m.group_size,
                    "modules": [asdict(t) for t in m.targets],
                    "full_params": m.full_params,
                }
                for n, m in self.modalities.items()
            },
            "adapters": [{"name": a.name, "variant": a.variant, "modalities": list(a.modalities),
                          "config": lora_kwargs(a.lora)} for a in self.adapters],
            "warnings": self.warnings,
        }


def _lora_params(module: nn.Module, rank: int, dora: bool) -> int:
    if isinstance(module, nn.Embedding):
        return rank * (module.num_embeddings + module.embedding_dim)
    if type(module).__name__ == "Conv1D":  # transposed linear: weight is [in, out]
        n_in, n_out = module.weight.shape
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        k = module.weight[0, 0].numel()
        n_in, n_out = module.in_channels * k, module.out_channels
    else:
        n_in, n_out = module.in_features, module.out_features
    return rank * (n_in + n_out) + (n_out if dora else 0)


def _as_yaml(value) -> str:
    """A recipe value as the recipe writes it, for messages: ``{first: 1}``, ``[q, v]``, ``all``."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_defaults=True)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_as_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_as_yaml(v) for v in value) + "]"
    return str(value)


def _select_layers(where: str, spec: ModalitySpec, n_layers: int) -> list[int] | None:
    if spec.layers == "all":
        return None
    if not n_layers:
        raise MmloraError(f"{where}.layers: this modality has no stack of layers to select from; use layers: all")
    chosen = spec.layers.select(n_layers) if not isinstance(spec.layers, list) else list(spec.layers)
    outside = [i for i in chosen if i >= n_layers]
    if outside:
        raise MmloraError(f"{where}.layers: {outside} do not exist (this modality has layers 0..{n_layers - 1})")
    if not chosen:
        raise MmloraError(f"{where}.layers selects no layer of 0..{n_layers - 1}")
    return sorted(set(chosen))


def _check_patterns(where: str, spec: ModalitySpec, names: list[str], mmap: ModalityMap, modality: str) -> None:
    """A pattern must not reach into another modality (LLaVA's suffix matching leaks into vision)."""
    for pattern in spec.targets or []:
        if pattern in TARGET_GROUPS_SET:
            continue
        match = compile_pattern(pattern, f"{where}.targets")
        leaks = [n for n in names if match(n) and mmap.modality_of(n) not in (modality, None)]
        if leaks:
            other = mmap.modality_of(leaks[0])
            raise MmloraError(
                f"{where}.targets: pattern {pattern!r} also matches {len(leaks)} module(s) of {other} "
                f"(e.g. {leaks[0]}): anchor it to this modality (patterns match names inside the modality)"
            )


def _plan_modality(model: nn.Module, mmap: ModalityMap, name: str, spec: ModalitySpec, where: str,
                   wrappers: dict[str, str]) -> ModalityPlan:
    modality = mmap.modalities[name]
    params = {n: p for n, p in model.named_parameters() if mmap.modality_of(n) == name}
    plan = ModalityPlan(name, spec.mode, n_layers=modality.n_layers, precision=spec.precision,
                        total_params=sum(p.numel() for p in params.values()), lr=spec.lr, lr_multiplier=spec.lr_multiplier,
                        dropout=spec.dropout, rslora=spec.rslora, init=spec.init)
    if spec.mode == "frozen":
        return plan
    plan.layers = _select_layers(where, spec, modality.n_layers)

    def in_layers(module_name: str) -> bool:
        layer = modality.layer_of(module_name)
        return plan.layers is None or (layer is not None and layer in plan.layers)

    def relative(module_name: str) -> str:
        for root in modality.roots:
            if module_name.startswith(root + "."):
                return module_name[len(root) + 1 :]
        return module_name.rsplit(".", 1)[-1]

    names = [n for n, _ in model.named_modules() if n]
    _check_patterns(where, spec, names, mmap, name)
    adapter = spec.mode in ("lora", "dora", "qalora")
    targets = spec.targets or (["all-linear"] if adapter else None)

    def selected(module_name: str, module: nn.Module) -> bool:
        if mmap.modality_of(module_name) != name or not in_layers(module_name):
            return False
        # A linear inside a wrapper (models.layers.linear_wrappers) also goes by the wrapper's name:
        # ``q_proj.linear`` is in group q, and a pattern naming ``q_proj`` reaches the linear inside.
        full = [module_name] + ([wrappers[module_name]] if module_name in wrappers else [])
        rel = [relative(n) for n in full]
        for t in targets or []:
            if t in TARGET_GROUPS_SET:
                if is_linear(module) and module_name not in mmap.heads and any(matches_group(t, n) for n in rel):
                    return True
            elif (not adapter or (is_linear(module) if spec.mode == "qalora" else is_adaptable(module))) and any(map(compile_pattern(t), rel + full)):
                return True
        return False

    if spec.mode == "full":
        if targets is None:
            plan.full_params = [n for n in params if in_layers(n)]
        else:
            chosen = [n for n, m in model.named_modules() if n and selected(n, m)]
            plan.full_params = [n for n in params if any(n.startswith(c + ".") for c in chosen)]
        plan.trainable_params = sum(params[n].numel() for n in plan.full_params)
        if not plan.full_params:
            raise MmloraError(f"{where}: mode full with targets {_as_yaml(targets)} and layers {_as_yaml(spec.layers)} selects no parameter")
        return plan

    chosen = [(n, m) for n, m in model.named_modules() if n and selected(n, m)]
    if not chosen:
        leaves = sorted({wrappers.get(n, n).rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if mmap.modality_of(n) == name and is_linear(m)})
        raise MmloraError(
            f"{where}: targets {_as_yaml(targets)} (layers {_as_yaml(spec.layers)}) match no module of {name}; "
            f"its linear layers are named: {', '.join(leaves[:20]) or 'none'}"
        )
    if spec.mode == "qalora":
        plan.group_size = spec.effective_group_size
        plan.precision = f"int4 g{plan.group_size}"
        for module_name, module in chosen:
            if type(module) is not nn.Linear:
                raise MmloraError(f"{where}: qalora quantizes plain linear layers; {module_name} is {type(module).__name__}")
            if module.in_features % plan.group_size:
                raise MmloraError(f"{where}.group_size: {module_name} has {module.in_features} input features, "
                                  f"not a multiple of group_size {plan.group_size}")
    layer_positions = {layer: i for i, layer in enumerate(plan.layers or range(modality.n_layers))}
    for module_name, module in chosen:
        layer = modality.layer_of(module_name)
        pos = layer_positions.get(layer, len(layer_positions) - 1) if layer is not None else len(layer_positions) - 1
        rank = spec.rank_for(pos, len(layer_positions))
        alpha = spec.alpha_for(rank)
        if spec.mode == "qalora":  # A reads the group means: [r, in / group_size]
            params = rank * (module.in_features // plan.group_size + module.out_features)
        else:
            params = _lora_params(module, rank, spec.mode == "dora")
        plan.targets.append(ModuleTarget(module_name, layer, rank, alpha, params))
    plan.trainable_params = sum(t.params for t in plan.targets)
    return plan


def _compile_adapters(plans: dict[str, ModalityPlan], adalora: AdaLoraSettings | None) -> list[AdapterPlan]:
    groups: dict[tuple, list[str]] = {}
    for name, plan in plans.items():
        if plan.variant:
            groups.setdefault((plan.variant, plan.dropout, plan.init, plan.rslora), []).append(name)
    adapters = []
    for i, ((variant, dropout, init, rslora), names) in enumerate(groups.items()):
        targets = [t for n in names for t in plans[n].targets]
        rank = Counter(t.rank for t in targets).most_common(1)[0][0]
        alpha = Counter(t.alpha for t in targets if t.rank == rank).most_common(1)[0][0]
        lora = LoraSettings(
            rank, alpha, [t.name for t in targets],
            rank_overrides={t.name: t.rank for t in targets if t.rank != rank},
            alpha_overrides={t.name: t.alpha for t in targets if t.alpha != alpha},
            dropout=dropout, dora=variant == "dora", rslora=rslora, init=init,
        )
        adapter_name = "default" if i == 0 else "_".join(names)
        adapters.append(AdapterPlan(adapter_name, "adalora" if adalora else variant, names, lora, adalora))
    return adapters


def _adalora(spec: PlacementSpec) -> AdaLoraSettings | None:
    a = spec.adalora
    if a is None:
        return None
    return AdaLoraSettings(a.init_r, a.target_r, a.tinit, a.tfinal, a.delta_t, a.total_step, a.orth_reg_weight)


def plan_placement(model: nn.Module, mmap: ModalityMap, spec: PlacementSpec, allow_frozen: bool = False) -> PlacementPlan:
    """Resolve ``spec`` on ``model`` (real or meta weights) into a :class:`PlacementPlan`. ``allow_frozen``:
    every modality may be frozen (what trains is elsewhere: a router over earlier runs' adapters)."""
    model = unwrap(model)
    specs = dict(spec.items())
    unknown = [n for n in specs if n not in mmap.modalities]
    for n in unknown:
        if specs[n].mode != "frozen":
            raise MmloraError(
                f"placement.{n}: this model has no {n} modality (found: {', '.join(mmap.modalities)})"
            )
    plans: dict[str, ModalityPlan] = {}
    wrappers = linear_wrappers(model)
    for name in mmap.modalities:
        plans[name] = _plan_modality(model, mmap, name, specs.get(name, ModalitySpec()), f"placement.{name}", wrappers)
    if not allow_frozen and not any(p.mode != "frozen" for p in plans.values()):
        raise MmloraError("placement: every modality is frozen, so nothing would train")
    warnings = []
    vision = mmap.modalities.get("vision")
    if vision is not None and vision.read_layers is not None and "vision" in plans:
        unread = sorted({t.layer for t in plans["vision"].targets if t.layer is not None and t.layer >= vision.read_layers})
        unread_full = sorted({vision.layer_of(p) for p in plans["vision"].full_params
                              if (vision.layer_of(p) or 0) >= vision.read_layers and vision.layer_of(p) is not None})
        if unread or unread_full:
            warnings.append(
                f"placement.vision: layers {unread or unread_full} are never read (the projector takes features "
                f"from layer {vision.read_layers - 1}); what trains there gets no gradient. Select the read layers, "
                f"e.g. layers: {{range: [0, {vision.read_layers}]}}"
            )
    adapters = _compile_adapters(plans, _adalora(spec))
    if spec.adalora is not None:
        if len(adapters) > 1:
            raise MmloraError(
                "placement.adalora: AdaLoRA is one adapter over the whole model, so every lora modality must share "
                "dropout, init and rslora"
            )
        ranks = {t.rank for a in adapters for n in a.modalities for t in plans[n].targets}
        if len(ranks) > 1:
            raise MmloraError(
                f"placement.adalora: PEFT's AdaLoRA has one budget (init_r/target_r), so per-modality ranks {sorted(ranks)} "
                "cannot be expressed; remove rank from the modalities and set adalora.init_r / target_r"
            )
    return PlacementPlan(mmap.kind, plans, adapters, warnings)
