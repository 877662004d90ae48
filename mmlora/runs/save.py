"""Save a placed model so any tool can reassemble it without mmlora.

Layout of the folder::

    adapters/<name>/adapter_config.json, adapter_model.safetensors   one standard PEFT folder each
    full_modules.safetensors                                         parameters trained in place
    qalora.safetensors                                               QA-LoRA adapters (mmlora's own layer)
    router.safetensors, router.json, experts/<name>/                 a router over LoRA experts (MoLoRA)
    manifest.json                                                    base model, adapters, modalities

Reassembling in plain transformers + PEFT: load the base, ``load_state_dict`` the full modules
(``strict=False``), ``PeftModel.from_pretrained(base, adapters/<first>)``, ``load_adapter`` the rest and
activate them all (``model.base_model.set_adapter([...])``). PiSSA/OLoRA adapters are converted at
save time into LoRA adapters (twice the rank) that apply to the *original* base weights. QA-LoRA
layers are mmlora's own, not PEFT's: ``mmlora.adapters.qalora.load_qalora`` re-quantizes the base
layers the manifest lists and loads their adapters. A router run (``continual.method: router``) holds
no PEFT adapter of its own: its experts' PEFT folders (copied under ``experts/``), the router's weights
and the experts' parts as mixed (``router.safetensors``) and their layout (``router.json``);
``mmlora.adapters.mixture`` mixes them (PEFT has no per-sample mixture of adapters).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmlora import __version__
from mmlora.adapters.mixture import LoraMixture, Router
from mmlora.adapters.qalora import load_qalora, save_qalora
from mmlora.placement.plan import PlacementPlan
from mmlora.errors import MmloraError
from mmlora.runs.legacy import in_layout_of
from mmlora.runs.layout import FINAL, FULL_MODULES, MANIFEST, QALORA_FILE, ROUTER_CONFIG, ROUTER_FILE, Weights, find_weights



def save_placement(model: nn.Module, plan: PlacementPlan, out_dir: str | Path, base_model: str,
                   convert: bool = True, initial_adapters: Mapping[str, str] | None = None) -> Path:
    """Write adapters, full modules and manifest of a model placed with ``apply_placement``.

    PiSSA/OLoRA adapters are converted with their initial state, ``initial_adapters`` (what
    ``save_initial_state`` returned right after placing). ``convert=False`` keeps them as trained
    (for checkpoints that resume training).
    """
    init_dirs = dict(initial_adapters or {})
    unconvertible = [a.name for a in plan.adapters if convert and a.lora.converts_at_save and a.name not in init_dirs]
    if unconvertible:
        raise MmloraError(
            f"save_placement: adapter(s) {', '.join(unconvertible)} start from PiSSA/OLoRA and convert with their "
            "initial state: pass initial_adapters=save_initial_state(model, plan) (saved right after "
            "apply_placement), or convert=False"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"mmlora_version": __version__, "base_model": base_model, "kind": plan.kind, "adapters": []}
    for adapter in plan.adapters:
        model.peft_config[adapter.name].base_model_name_or_path = base_model
        with tempfile.TemporaryDirectory() as tmp:
            kwargs = {}
            if convert and adapter.name in init_dirs:
                kwargs["path_initial_model_for_weight_conversion"] = init_dirs[adapter.name]
            model.save_pretrained(tmp, selected_adapters=[adapter.name], **kwargs)
            src = Path(tmp) if adapter.name == "default" else Path(tmp) / adapter.name
            dest = out / "adapters" / adapter.name
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*[a.name for a in plan.adapters if a.name != "default"]))
        manifest["adapters"].append({
            "name": adapter.name, "path": f"adapters/{adapter.name}", "variant": adapter.variant,
            "modalities": adapter.modalities, "converted_from": adapter.lora.init if kwargs else None,
        })
    if plan.full_params:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = dict(base.named_parameters())
        save_file({n: params[n].detach().to("cpu").contiguous() for n in plan.full_params}, str(out / FULL_MODULES))
        manifest["full_modules"] = {
            "path": FULL_MODULES,
            "modalities": [n for n, m in plan.modalities.items() if m.full_params],
            "tensors": len(plan.full_params),
        }
    if plan.qalora:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        manifest["qalora"] = {"path": QALORA_FILE, "modalities": [m.name for m in plan.qalora],
                              "modules": save_qalora(base, out / QALORA_FILE)}
    Weights(out).write_manifest(manifest)
    return out


def load_placement(base: nn.Module, folder: str | Path) -> nn.Module:
    """Reassemble a saved placement on ``base`` with plain PEFT (what the module docstring describes)."""
    from peft import PeftModel

    folder = Path(folder)
    manifest = Weights(folder).manifest()
    full = manifest.get("full_modules")
    if full:
        state = load_file(str(folder / full["path"]))
        missing = [k for k in state if k not in dict(base.named_parameters())]
        if missing:
            raise KeyError(f"{folder / full['path']}: tensors not in the base model: {missing[:3]}")
        with torch.no_grad():
            params = dict(base.named_parameters())
            for k, v in state.items():
                params[k].copy_(v)
    if manifest.get("qalora"):
        load_qalora(base, folder / manifest["qalora"]["path"], manifest["qalora"]["modules"])
    if manifest.get("router"):
        load_router(base, folder)
    adapters = manifest["adapters"]
    if not adapters:
        return base
    # Adapters saved under another transformers layout (4.x names) are renamed to this model's; keys
    # naming no module of it are refused rather than dropped.
    with in_layout_of(base, *[folder / a["path"] for a in adapters]) as paths:
        model = PeftModel.from_pretrained(base, paths[0], adapter_name=adapters[0]["name"])
        for a, path in zip(adapters[1:], paths[1:]):
            model.load_adapter(path, adapter_name=a["name"])
    rest = adapters[1:]
    if rest:
        model.base_model.set_adapter([a["name"] for a in adapters])
    return model


def attach_adapters(folder: str | Path, adapters: list[tuple[str, Path]]) -> None:
    """Copy further PEFT adapters (``(name, PEFT folder)``) into a saved placement, all active with its
    own (e.g. an O-LoRA run's frozen earlier adapters beside the new ones)."""
    weights = Weights(Path(folder))
    manifest = weights.manifest()
    for name, src in adapters:
        dest = weights.path(f"adapters/{name}")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)
        manifest["adapters"].append({"name": name, "path": f"adapters/{name}", "variant": "lora", "modalities": [],
                                     "frozen_from": str(src)})
    weights.write_manifest(manifest)


def save_router(folder: str | Path, mixture: LoraMixture, experts: Mapping[str, Path]) -> None:
    """Write a router run's parts into a saved placement: the experts' PEFT folders (``experts/<name>``),
    the mixture's state (router and experts as mixed) and layout, and the manifest's ``router`` entry."""
    weights = Weights(Path(folder))
    for name, src in experts.items():
        dest = weights.path(f"experts/{name}")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)
    state = {k: v.detach().to("cpu").contiguous() for k, v in mixture.state_dict().items()}
    save_file(state, str(weights.path(ROUTER_FILE)))
    r = mixture.router
    layout = {"experts": mixture.names, "layers": mixture.layer_names, "gate": r.gate, "hard": r.hard,
              "image_dim": r.image_dim, "text_dim": r.text_dim}
    weights.path(ROUTER_CONFIG).write_text(json.dumps(layout, indent=2) + "\n")
    manifest = weights.manifest()
    manifest["router"] = {"path": ROUTER_FILE, "config": ROUTER_CONFIG, "experts": [
        {"name": n, "path": f"experts/{n}" if n in experts else None} for n in mixture.names]}
    weights.write_manifest(manifest)


def load_router(base: nn.Module, folder: str | Path) -> LoraMixture:
    """Attach a saved router run's mixture to ``base`` (the experts as the run mixed them)."""
    return read_router(folder).attach(base)


def read_router(folder: str | Path) -> LoraMixture:
    """A saved router run's mixture, not attached to any model (e.g. to route requests by its router)."""
    folder = Path(folder)
    layout = json.loads((folder / ROUTER_CONFIG).read_text())
    state = load_file(str(folder / ROUTER_FILE))
    experts = {n: {} for n in layout["experts"]}
    for layer in layout["layers"]:  # every expert's parts, as stacked (zero rows where an expert has none: exact)
        key = layer.replace(".", "__")
        for k, n in enumerate(layout["experts"]):
            experts[n][layer] = (state[f"A.{key}"][k], state[f"B.{key}"][k], None)
    router = Router(layout["image_dim"], layout["text_dim"], layout["experts"], gate=layout["gate"],
                    hard=layout.get("hard", False))
    mixture = LoraMixture(experts, router)
    mixture.load_state_dict(state)
    return mixture


def init_from_run(model: nn.Module, ref: str | Path) -> None:
    """Start ``model`` from an earlier run's weights: its full modules copied in, its adapters merged
    into the base (the new stage trains adapters of its own on top)."""
    weights = find_weights(ref)
    if weights is None:
        raise MmloraError(f"train.init_from: no {FINAL}/{MANIFEST} in {ref}")
    manifest = weights.manifest()
    if manifest.get("full_modules"):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in load_file(str(weights.path(manifest["full_modules"]["path"]))).items():
                if k not in params:
                    raise MmloraError(f"train.init_from: {k} (from {weights.folder}) is not a parameter of this model")
                params[k].copy_(v.to(params[k].dtype))
    if manifest["adapters"]:
        load_placement(model, weights.folder).merge_and_unload()
