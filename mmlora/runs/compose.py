"""Several runs' adapters on one base: switching, weighted merges, and mixed-adapter batches.

A model reference (``--model NAME=REF`` in ``mmlora eval caption|seg`` and ``mmlora predict``) may
compose runs that adapted the same base::

    RUN_A+RUN_B                       every run's adapter loaded once; samples routed round robin
    RUN_A+RUN_B:mixed                 the same, said explicitly (one batch mixes adapters)
    RUN_A+RUN_B:linear:0.5,0.5        a weighted merge into one new adapter (PEFT add_weighted_adapter)
    RUN_A+RUN_B:ties:0.5,0.5:density=0.7     (also dare_linear, dare_ties, svd, cat, magnitude_prune, ...)

Everything here is PEFT's: adapters load with ``load_adapter``, merges are ``add_weighted_adapter``
and mixed batches are PEFT's ``adapter_names`` (one name per sample; ``__base__`` = no adapter).
Composable runs hold exactly one PEFT LoRA adapter and nothing trained in place (full modules or
QA-LoRA layers change the base, which the other adapters did not train against).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path


from mmlora.data.image_budget import apply_image_budget
from mmlora.errors import MmloraError
from mmlora.models.precision import load_for_training
from mmlora.runs.layout import FINAL, Weights, require_weights
from mmlora.runs.legacy import in_layout_of

BASE = "__base__"
#: PEFT's ``add_weighted_adapter`` combination types.
COMBINATIONS = ("linear", "svd", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
MERGED = "merged"


@dataclass
class Composition:
    """A parsed composite reference: runs, how they combine, and the adapter name of each run."""

    runs: list[Path]
    method: str = "mixed"
    weights: list[float] | None = None
    options: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return adapter_names_for(self.runs)


def adapter_names_for(runs: list[Path]) -> list[str]:
    """Adapter names from run folder names (``runs/x/final`` → ``x``), made unique and PEFT-safe."""
    names = []
    for run in runs:
        stem = run.parent.name if run.name == FINAL else run.name
        name = re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "adapter"
        while name in names or name in (BASE, MERGED):
            name += "_"
        names.append(name)
    return names


def parse_composition(ref: str) -> Composition | None:
    """``REF[+REF...][:METHOD[:W1,W2,...][:key=value...]]`` → :class:`Composition`; None for a plain ref."""
    head, *parts = ref.split(":")
    if "+" not in head and not parts:
        return None
    runs = [Path(r) for r in head.split("+") if r]
    method = parts[0] if parts else "mixed"
    if method not in ("mixed", *COMBINATIONS):
        raise MmloraError(f"{ref!r}: unknown combination {method!r}; use mixed or one of {', '.join(COMBINATIONS)}")
    comp = Composition(runs, method)
    for part in parts[1:]:
        if "=" in part:
            key, _, value = part.partition("=")
            if key not in ("density", "svd_rank"):
                raise MmloraError(f"{ref!r}: unknown option {key!r} (density, svd_rank)")
            comp.options[key] = float(value)
        else:
            try:
                comp.weights = [float(w) for w in part.split(",")]
            except ValueError:
                raise MmloraError(f"{ref!r}: weights {part!r} are not numbers (e.g. 0.5,0.5)") from None
    if method != "mixed":
        comp.weights = comp.weights or [1.0 / len(runs)] * len(runs)
        if len(comp.weights) != len(runs):
            raise MmloraError(f"{ref!r}: {len(comp.weights)} weights for {len(runs)} runs")
    elif comp.weights or comp.options:
        raise MmloraError(f"{ref!r}: mixed takes no weights or options")
    if len(runs) < 2 and method == "mixed":
        raise MmloraError(f"{ref!r}: compose at least two runs (RUN_A+RUN_B)")
    return comp


def check_adapter_names(names: list[str], known: list[str], flag: str = "--adapter") -> None:
    """Every name in ``names`` is one of ``known`` (or ``__base__``), else a one-line error listing them."""
    choices = [*known, BASE]
    unknown = [n for n in dict.fromkeys(names) if n not in choices]
    if unknown:
        which = "such adapter" if len(unknown) == 1 else "such adapters"
        raise MmloraError(f"{flag} {', '.join(unknown)}: the composition has no {which}; give one of {', '.join(choices)}")


def adapter_only(weights: Weights) -> dict:
    """The manifest of a run that holds exactly one PEFT adapter and nothing trained in place (what
    composes, and what a server can switch), else a one-line error."""
    manifest = weights.manifest()
    if len(manifest["adapters"]) != 1:
        raise MmloraError(f"{weights.folder}: composition needs runs with exactly one PEFT adapter "
                          f"(this one has {len(manifest['adapters'])})")
    if manifest.get("full_modules") or manifest.get("qalora"):
        raise MmloraError(f"{weights.folder}: this run also changed the base (full modules or QA-LoRA layers); only "
                          "adapter-only runs compose on one base")
    return manifest


def adapter_path(weights: Weights) -> Path:
    """The PEFT folder of an adapter-only run."""
    return weights.path(adapter_only(weights)["adapters"][0]["path"])


def load_adapter_set(runs: list[Path], names: list[str] | None = None):
    """The runs' common base (in the first run's precision) carrying each run's adapter under its name.

    Returns ``(peft_model, processor, recipe)`` (processor None for CLIP); the first adapter is active."""
    from peft import PeftModel
    from transformers import AutoProcessor

    all_weights = [require_weights(r, "composition") for r in runs]
    names = names or adapter_names_for(runs)
    manifests = [adapter_only(w) for w in all_weights]
    recipes = [w.recipe() for w in all_weights]
    bases = {m["base_model"] for m in manifests}
    if len(bases) > 1:
        raise MmloraError(f"these runs adapted different bases ({', '.join(sorted(bases))}); compose runs of one base")
    precisions = {json.dumps({n: s.precision for n, s in r.placement.items()}, sort_keys=True) for r in recipes}
    if len(precisions) > 1:
        raise MmloraError("these runs trained their base in different precisions; compose runs of one precision")
    base, _ = load_for_training(recipes[0].model, recipes[0].placement, recipes[0].train.quantization)
    with in_layout_of(base, *[adapter_path(w) for w in all_weights]) as paths:  # 4.x key names renamed
        model = PeftModel.from_pretrained(base, paths[0], adapter_name=names[0])
        for path, name in zip(paths[1:], names[1:]):
            model.load_adapter(path, adapter_name=name)
    processor = AutoProcessor.from_pretrained(all_weights[0].folder) if all_weights[0].has_processor else None
    if processor is not None:
        apply_image_budget(processor, recipes[0].data)
    return model.eval(), processor, recipes[0]


def weighted_merge(model, names: list[str], weights: list[float], method: str, options: dict | None = None,
                   new_name: str = MERGED) -> str:
    """PEFT ``add_weighted_adapter`` of ``names`` into ``new_name``, which becomes the active adapter."""
    options = dict(options or {})
    if "svd_rank" in options:
        options["svd_rank"] = int(options["svd_rank"])
    if method in ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                  "magnitude_prune", "magnitude_prune_svd"):
        options.setdefault("density", 0.5)
    try:
        model.add_weighted_adapter(names, weights, new_name, combination_type=method, **options)
    except (ValueError, TypeError) as err:
        raise MmloraError(f"weighted merge ({method}) of {', '.join(names)}: {err}") from None
    model.set_adapter(new_name)
    return new_name


def load_composition(comp: Composition):
    """``(model, processor, recipe, adapters)``: ``adapters`` are the names samples are routed to
    (mixed), None after a weighted merge."""
    model, processor, recipe = load_adapter_set(comp.runs, comp.names)
    if comp.method == "mixed":
        return model, processor, recipe, comp.names
    weighted_merge(model, comp.names, comp.weights, comp.method, comp.options)
    return model, processor, recipe, None


@contextlib.contextmanager
def adapters_per_sample(model, names: list[str] | None):
    """Inside: every LoRA layer of PEFT ``model`` applies ``names[i]`` to row ``i`` of its input
    (PEFT's mixed-batch forward), whatever function runs the model (e.g. dense CLIP features)."""
    if names is None:
        yield
        return
    if model.training:
        raise MmloraError("mixed-adapter batches are for inference: call model.eval() first")
    try:
        with model.base_model._enable_peft_forward_hooks(adapter_names=list(names)):
            yield
    except ValueError as err:
        if "non-existing adapter" in str(err):
            raise MmloraError(str(err)) from None
        raise




