"""Learning after earlier runs of the same base (a recipe's ``continual`` section), each method a small
piece the training loop calls:

* ``sequential`` — the new run's adapters start from one earlier run's trained adapters (and full
  modules) and train on, the forgetting baseline of continual learning.
* ``olora`` — O-LoRA (Wang et al., 2023): the earlier runs' adapters stay in the model, frozen and
  active; the new adapters train with ``orth_weight · Σ_layers Σ_earlier ‖A_earlier A_newᵀ‖²_F`` added
  to the loss (PEFT's ``lora_A`` rows are the subspace directions), which pushes the new update into
  directions the earlier ones do not use. The run saves every adapter (the earlier ones copied in), so
  it reloads in plain PEFT with all of them active.
* ``router`` — a mixture of the earlier runs' adapters (``mmlora.adapters.mixture``) with a router that
  weighs them per sample; only the router trains, towards each sample's best expert
  (``mmlora.objectives.route``), or through the mixture's own loss (``objective: mixture``, where the
  experts may train too: ``train_experts``). The run saves the router
  (``router.safetensors``) and its experts' PEFT folders (``mmlora.runs.save``).
* ``distill`` — the objective (``mmlora.objectives.distill``): this recipe's adapters learn a teacher
  run's output distributions; nothing here.

Layer: train.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mmlora.adapters.mixture import BASE_EXPERT, LoraMixture, Router
from mmlora.adapters.parts import read_adapter
from mmlora.config.schema import ContinualSpec, Recipe
from mmlora.data.processing import IGNORE
from mmlora.errors import MmloraError
from mmlora.models.build import load_model
from mmlora.models.loading import resolve_pretrained
from mmlora.placement.plan import PlacementPlan
from mmlora.runs.compose import adapter_path
from mmlora.runs.layout import Run, require_weights
from mmlora.runs.save import attach_adapters, save_placement, save_router


def orthogonality(model: nn.Module, new: list[str], old: list[str]) -> torch.Tensor | None:
    """``Σ_layers Σ_{i∈old, j∈new} ‖A_i A_jᵀ‖²_F`` over the LoRA layers of PEFT ``model`` (None: no layer
    holds both). Only the new adapters' ``A`` get gradient."""
    total = None
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict):
            continue
        for j in new:
            if j not in lora_a:
                continue
            for i in old:
                if i in lora_a:
                    term = (lora_a[i].weight.detach() @ lora_a[j].weight.T).pow(2).sum()
                    total = term if total is None else total + term
    return total


class Continual:
    """What a ``continual`` recipe adds to a run: set up on the placed model, a term for the loss, and
    what the saved run holds beside the plan's adapters."""

    def __init__(self, spec: ContinualSpec, base_ref: str):
        self.spec, self.base_ref = spec, base_ref
        self.old: list[str] = []  # olora: the earlier adapters' names in the model
        self.old_folders: list[tuple[str, Path]] = []
        self.mixture: LoraMixture | None = None
        self.experts: dict[str, Path] = {}

    def _weights(self, run: str, what: str):
        weights = require_weights(run, what)
        base = weights.manifest()["base_model"]
        if str(resolve_pretrained(base)) != str(resolve_pretrained(self.base_ref)):
            raise MmloraError(f"{what} {run} adapted {base}, not this recipe's model {self.base_ref}")
        return weights

    def setup(self, model: nn.Module, plan: PlacementPlan) -> nn.Module:
        """Apply the method to ``model`` (placed by ``apply_placement``); returns the model to train."""
        method = self.spec.method
        if method == "sequential":
            self._start_from(model, plan, self.spec.previous[0])
        elif method == "olora":
            self._attach_earlier(model, plan)
        elif method == "router":
            self._attach_router(model)
        return model

    def _start_from(self, model: nn.Module, plan: PlacementPlan, run: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = self._weights(run, "continual.previous")
        manifest = weights.manifest()
        saved = {a["name"]: weights.path(a["path"]) for a in manifest["adapters"]}
        mine = [a.name for a in plan.adapters]
        if sorted(saved) != sorted(mine):
            raise MmloraError(f"continual.previous {run}: its adapters {sorted(saved)} are not this placement's "
                              f"{sorted(mine)}; continue a run with the placement it was trained with")
        for name in mine:
            state = load_file(str(saved[name] / "adapter_model.safetensors"))
            try:
                result = set_peft_model_state_dict(model, state, adapter_name=name)
            except RuntimeError as err:  # shapes differ: another rank or layer width
                first = str(err).strip().splitlines()[-1].strip()
                raise MmloraError(f"continual.previous {run}: adapter {name} does not fit this placement ({first})") from None
            expected = {k for k in model.state_dict() if f".{name}." in k and "lora_" in k}
            missing = sorted(k for k in result.missing_keys if k in expected)
            if missing or result.unexpected_keys:
                raise MmloraError(f"continual.previous {run}: adapter {name} does not fit this placement "
                                  f"(missing {missing[:2]}, unexpected {list(result.unexpected_keys)[:2]})")
        if manifest.get("full_modules"):
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            params = dict(base.named_parameters())
            with torch.no_grad():
                for k, v in load_file(str(weights.path(manifest["full_modules"]["path"]))).items():
                    if k in params:
                        params[k].copy_(v.to(params[k].dtype))

    def _attach_earlier(self, model: nn.Module, plan: PlacementPlan) -> None:
        if not hasattr(model, "load_adapter"):
            raise MmloraError("continual.method olora trains new adapters: give the placement a lora modality")
        new = [a.name for a in plan.adapters]
        for k, run in enumerate(self.spec.previous):
            weights = self._weights(run, "continual.previous")
            for a in weights.manifest()["adapters"]:
                name = f"earlier{k}_{a['name']}"
                model.load_adapter(str(weights.path(a["path"])), adapter_name=name)
                self.old.append(name)
                self.old_folders.append((name, weights.path(a["path"])))
        model.base_model.set_adapter(new + self.old)  # all active; PEFT makes them trainable: the earlier ones go back
        for n, p in model.named_parameters():
            if any(f".{name}." in n for name in self.old):
                p.requires_grad_(False)

    def _attach_router(self, model: nn.Module) -> None:
        r = self.spec.router
        parts = {}
        if r.include_base:
            parts[BASE_EXPERT] = {}
        for name, run in r.experts.items():
            weights = self._weights(run, f"continual.router.experts.{name}")
            path = adapter_path(weights)  # adapter-only runs of one PEFT adapter
            self.experts[name] = path
            parts[name] = read_adapter(path, model, advice="train the experts as plain LoRA runs")
        width = model.get_input_embeddings().weight.shape[1]  # the projector writes the LM's width
        router = Router(2 * width, width, list(parts), gate=r.gate, hard=r.gate == "learned" and r.objective == "best-expert")
        self.mixture = LoraMixture(parts, router, train_experts=r.train_experts).attach(model)

    def prepare(self, objective) -> None:
        """A router trained through the mixture's loss sees conversations whose answers are in its inputs;
        it must route by the prompt alone, as it will when it answers: its text features pool only the
        tokens without a label. (``best-expert`` routers do this in their objective.)"""
        if self.mixture is None or self.spec.router.objective != "mixture":
            return
        loss_sum, mixture = objective.loss_sum, self.mixture

        def prompt_only(model: nn.Module, batch: dict):
            mixture.text_mask = batch["labels"] == IGNORE
            try:
                return loss_sum(model, batch)
            finally:
                mixture.text_mask = None

        objective.loss_sum = prompt_only

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """O-LoRA's orthogonality term, weighted (None for the other methods)."""
        if self.spec.method != "olora":
            return None
        term = orthogonality(model, [n for n in model.peft_config if n not in self.old], self.old)
        return None if term is None else self.spec.orth_weight * term

    def save(self, folder: Path) -> None:
        """What the run folder holds beside the plan's adapters (call after ``save_placement``)."""
        if self.spec.method == "olora":
            attach_adapters(folder, self.old_folders)
        elif self.spec.method == "router":
            save_router(folder, self.mixture, self.experts)

    def fingerprint(self) -> dict:
        return json.loads(self.spec.model_dump_json())


def write_router_run(out: str | Path, base_ref: str, experts: dict[str, str], include_base: bool = True,
                     gate: str = "uniform") -> Path:
    """A router run written without training (``gate: uniform`` weighs every expert alike): the mixing
    bound of a router study, evaluated and served like any run. Returns ``out``."""
    from transformers import AutoProcessor

    recipe = Recipe.model_validate({"model": {"name": base_ref}, "continual": {
        "method": "router", "router": {"experts": experts, "include_base": include_base, "gate": gate}}})
    model = load_model(recipe.model)
    continual = Continual(recipe.continual, base_ref)
    continual.setup(model, PlacementPlan("vlm", {}, [], []))
    final = Run(out).final
    save_placement(model, PlacementPlan("vlm", {}, [], []), final.folder, base_ref)
    continual.save(final.folder)
    final.write_recipe(recipe)
    AutoProcessor.from_pretrained(resolve_pretrained(base_ref)).save_pretrained(final.folder)
    return Path(out)


def router_params(spec: ContinualSpec, model: nn.Module) -> int:
    """Parameters of the router a ``router`` recipe trains on ``model`` (real or meta weights)."""
    r = spec.router
    experts = len(r.experts) + (1 if r.include_base else 0)
    width = model.get_input_embeddings().weight.shape[1]
    return (3 * width + 1) * experts if r.gate == "learned" else 0


def describe(spec: ContinualSpec, model: nn.Module | None = None) -> str:
    """One paragraph for ``mmlora plan``: what the continual section does."""
    if spec.method == "sequential":
        return f"continual: sequential — the adapters start from {spec.previous[0]} and train on"
    if spec.method == "olora":
        return (f"continual: olora — {', '.join(spec.previous)} stay frozen and active; the new adapters train with "
                f"{spec.orth_weight:g} x sum ||A_earlier A_new^T||^2")
    if spec.method == "router":
        r = spec.router
        experts = ([BASE_EXPERT] if r.include_base else []) + [f"{n} ({run})" for n, run in r.experts.items()]
        size = f" ({router_params(spec, model):,} parameters)" if model is not None and r.gate == "learned" else ""
        trains = f"the router{size}" + (" and the experts train" if r.train_experts else " trains")
        how = "towards each sample's lowest-loss expert" if r.objective == "best-expert" else "through the mixture's loss"
        return (f"continual: router ({r.gate} gate on pooled image features and prompt) over {', '.join(experts)}; "
                f"{trains} {how}")
    return f"continual: distill — the adapters learn {spec.teacher}'s output distributions (temperature {spec.temperature:g})"
