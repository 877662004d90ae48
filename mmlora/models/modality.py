"""Modality discovery: which modules are the vision tower, the projector, the language model.

Structural, not a table of module paths per model (transformers 5 lists 100 image-text-to-text
types, and their paths change between releases):

* the **vision tower** is the sub-module whose ``config`` is the model's ``vision_config``;
* the **language model** is the sub-module whose ``config`` is the model's text config
  (``config.get_text_config()``); the output embeddings (LM head) count as language too;
* the **projector** is every remaining module with parameters outside both (LLaVA's
  ``multi_modal_projector``, Idefics3's ``connector``); where a model keeps it inside the vision
  tower (Qwen2-VL's merger), it is the tower's top-level child, outside its layer stack, whose last
  linear layer writes the language model's hidden size;
* for open_clip CLIP, vision is ``model.visual`` and text is everything else but the logit scale.

A recipe's ``model.modalities`` (modality -> regex on module names) overrides discovery for a model it
cannot read. Each modality also records its **layer stack** (the longest ``ModuleList`` of identical
blocks) so placements can select layers, and, for vision towers read at an inner layer
(``vision_feature_layer``), how many layers the projector actually reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from mmlora.errors import MmloraError


@dataclass
class Modality:
    name: str
    roots: list[str]
    exclude: list[str] = field(default_factory=list)
    layer_stack: str | None = None
    n_layers: int = 0
    #: Layers whose output reaches the rest of the model; None = all of them.
    read_layers: int | None = None

    def contains(self, name: str) -> bool:
        def under(prefixes: list[str]) -> bool:
            return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)

        return under(self.roots) and not under(self.exclude)

    def layer_of(self, name: str) -> int | None:
        if self.layer_stack is None or not name.startswith(self.layer_stack + "."):
            return None
        return int(name[len(self.layer_stack) + 1 :].split(".", 1)[0])


@dataclass
class ModalityMap:
    kind: str  # "vlm" | "clip"
    modalities: dict[str, Modality]
    #: Output-embedding modules (LM head): in the language modality, never in "all-linear".
    heads: list[str] = field(default_factory=list)

    def modality_of(self, name: str) -> str | None:
        for m in self.modalities.values():
            if m.contains(name):
                return m.name
        return None

    def summary(self) -> dict[str, dict]:
        return {
            n: {"roots": m.roots, "exclude": m.exclude, "layer_stack": m.layer_stack, "n_layers": m.n_layers,
                "read_layers": m.read_layers}
            for n, m in self.modalities.items()
        }


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under a PEFT wrapper (names are then the base model's own)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_open_clip(model: nn.Module) -> bool:
    return hasattr(model, "visual") and hasattr(model, "encode_text") and hasattr(model, "encode_image")


def _modules_with_config(model: nn.Module, config: object) -> list[str]:
    """Top-most modules whose ``config`` is ``config`` (several for, e.g., image + video towers)."""
    from transformers import PreTrainedModel

    holders = [(n, m) for n, m in model.named_modules() if n and getattr(m, "config", None) is config]
    # Towers are models of their own; a layer that merely keeps the config (e.g. a cross-attention
    # inside a projector) is not one.
    models = [(n, m) for n, m in holders if isinstance(m, PreTrainedModel)] or holders
    found: list[str] = []
    for name, _ in models:
        if not any(_is_ancestor(f, name) for f in found):
            found.append(name)
    return found


def _layer_count(config: object) -> int | None:
    for key in ("num_hidden_layers", "depth", "num_layers", "n_layers", "layers"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _layer_stack(model: nn.Module, modality: Modality, expected: int | None = None) -> tuple[str | None, int]:
    """The modality's stack of blocks: a ``ModuleList`` whose length is the config's layer count if
    there is one (blocks may differ in class, e.g. mllama's cross-attention layers), else the
    longest ``ModuleList`` of identical blocks."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) and modality.contains(n)]
    if expected:
        exact = [(n, len(m)) for n, m in lists if len(m) == expected]
        if exact:
            return exact[0]
    best: tuple[str | None, int] = (None, 0)
    for name, module in lists:
        if len(module) > best[1] and len({type(child) for child in module}) == 1:
            best = (name, len(module))
    return best


def _last_linear_out(module: nn.Module) -> int | None:
    out = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear) or hasattr(sub, "out_features"):
            out = getattr(sub, "out_features", out)
    return out


def _is_ancestor(prefix: str, name: str) -> bool:
    return prefix == "" or name.startswith(prefix + ".")


def _discover_vlm(model: nn.Module) -> ModalityMap:
    config = model.config
    vision_cfg = getattr(config, "vision_config", None)
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else None
    if vision_cfg is None or text_cfg is None or text_cfg is config:
        raise MmloraError(
            f"{type(model).__name__}: no vision and text sub-configs to find the towers by; "
            "name them in the recipe: model.modalities: {vision: REGEX, projector: REGEX, language: REGEX}"
        )
    vision_roots = _modules_with_config(model, vision_cfg)
    language_roots = _modules_with_config(model, text_cfg)
    if not vision_roots or not language_roots:
        missing = "vision tower" if not vision_roots else "language model"
        raise MmloraError(
            f"{type(model).__name__}: found no module holding the {missing}'s config; "
            "name the modalities in the recipe (model.modalities)"
        )
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [n for n, m in model.named_modules() if out_emb is not None and m is out_emb and n]
    # Other towers (audio, a VQ tokenizer, ...) hold their own sub-config: a modality of their own,
    # always frozen, never mistaken for the projector.
    others: dict[str, str] = {}
    for key, value in vars(config).items():
        if key.endswith("_config") and value is not vision_cfg and value is not text_cfg and hasattr(value, "to_dict"):
            roots = _modules_with_config(model, value)
            if not roots or any(_is_ancestor(roots[0], r) for r in vision_roots + language_roots):
                continue
            parent = roots[0].rpartition(".")[0]
            # A sibling of the towers is a tower; nested in another module (e.g. Idefics2's perceiver
            # inside the connector) it is part of that module.
            if any(_is_ancestor(parent, r) for r in vision_roots):
                others[key.removesuffix("_config")] = roots[0]
    claimed_roots = [*vision_roots, *language_roots, *heads, *others.values()]

    def claimed(name: str) -> bool:
        return any(name == r or name.startswith(r + ".") for r in claimed_roots)

    projector_roots: list[str] = []
    for name, module in model.named_modules():
        if not name or claimed(name) or any(_is_ancestor(p, name) for p in projector_roots):
            continue
        if any(_is_ancestor(name, r) for r in claimed_roots):
            continue  # a wrapper around the towers, not a module of its own
        if any(True for _ in module.parameters(recurse=True)):
            projector_roots.append(name)
    # The projector writes image features; a module that embeds another tower's features only (Gemma
    # 4's audio embedder, used by ``get_audio_features`` and not ``get_image_features``) is that tower's.
    other_parts: dict[str, list[str]] = {key: [] for key in others}
    for name in list(projector_roots):
        owner = _feature_owner(model, name, list(others))
        if owner is not None:
            projector_roots.remove(name)
            other_parts[owner].append(name)
    vision = Modality("vision", vision_roots)
    expected = {"vision": _layer_count(vision_cfg), "language": _layer_count(text_cfg)}
    if not projector_roots:  # the projector lives inside the vision tower (e.g. a patch merger)
        tower = model.get_submodule(vision_roots[0])
        stack, _ = _layer_stack(model, vision, expected["vision"])
        for child_name, child in tower.named_children():
            full = f"{vision_roots[0]}.{child_name}"
            if stack is not None and (full == stack or _is_ancestor(full, stack)):
                continue
            if any(isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Embedding)) for m in child.modules()):
                continue  # patch / position embeddings read pixels, they do not project features
            if _last_linear_out(child) == getattr(text_cfg, "hidden_size", None):
                projector_roots.append(full)
        vision.exclude = list(projector_roots)
    modalities = {"vision": vision}
    if projector_roots:
        modalities["projector"] = Modality("projector", projector_roots)
    modalities["language"] = Modality("language", [*language_roots, *heads])
    for key, root in others.items():
        modalities[key] = Modality(key, [root, *other_parts[key]])
    for m in modalities.values():
        m.layer_stack, m.n_layers = _layer_stack(model, m, expected.get(m.name))
    vision.read_layers = _read_layers(config, vision.n_layers)
    return ModalityMap("vlm", modalities, heads)


def _method_source(owner: nn.Module, method: str) -> str:
    import inspect

    fn = getattr(type(owner), method, None)
    try:
        return inspect.getsource(fn) if fn is not None else ""
    except (OSError, TypeError):
        return ""


def _feature_owner(model: nn.Module, name: str, towers: list[str]) -> str | None:
    """The other tower (audio, ...) whose ``get_<tower>_features`` uses module ``name`` when
    ``get_image_features`` does not; None when it is the image projector (or nothing says)."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    used = re.compile(rf"\bself\.{re.escape(attr)}\b")
    if used.search(_method_source(parent, "get_image_features")):
        return None
    users = [t for t in towers if used.search(_method_source(parent, f"get_{t}_features"))]
    return users[0] if len(users) == 1 else None


def _read_layers(config: object, n_layers: int) -> int | None:
    """How many vision layers feed the projector when features come from an inner layer.

    ``hidden_states[k]`` is the output of layer ``k-1`` (index 0 is the embeddings), so
    ``vision_feature_layer = -2`` reads the output of layer ``n-2``: the last layer is never read.
    """
    vfl = getattr(config, "vision_feature_layer", None)
    if vfl is None or not n_layers:
        return None
    taps = vfl if isinstance(vfl, (list, tuple)) else [vfl]
    deepest = max(t if t >= 0 else n_layers + 1 + t for t in taps)
    return deepest if deepest < n_layers else None


def _discover_open_clip(model: nn.Module) -> ModalityMap:
    text_roots = [n for n, _ in model.named_children() if n != "visual"]
    text_roots += [n for n, _ in model.named_parameters(recurse=False) if not n.startswith("logit_")]
    modalities = {"vision": Modality("vision", ["visual"]), "text": Modality("text", text_roots)}
    for m in modalities.values():
        cfg = model.visual if m.name == "vision" else model
        m.layer_stack, m.n_layers = _layer_stack(model, m, _layer_count(getattr(cfg, "transformer", cfg)))
    return ModalityMap("clip", modalities)


def _discover_override(model: nn.Module, patterns: dict[str, str]) -> ModalityMap:
    modalities: dict[str, Modality] = {}
    names = [n for n, _ in model.named_modules() if n]
    for modality, pattern in patterns.items():
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise MmloraError(f"model.modalities.{modality}: bad regex {pattern!r}: {err}") from None
        roots: list[str] = []
        for n in names:
            if regex.fullmatch(n) and not any(_is_ancestor(r, n) for r in roots):
                roots.append(n)
        if not roots:
            raise MmloraError(f"model.modalities.{modality}: {pattern!r} matches no module name")
        m = Modality(modality, roots)
        m.layer_stack, m.n_layers = _layer_stack(model, m)
        modalities[modality] = m
    kind = "clip" if "text" in modalities else "vlm"
    return ModalityMap(kind, modalities)


def discover_modalities(model: nn.Module, overrides: dict[str, str] | None = None) -> ModalityMap:
    """Find the modalities of ``model`` (a transformers VLM or an open_clip CLIP; see module doc)."""
    model = unwrap(model)
    if overrides:
        return _discover_override(model, overrides)
    if is_open_clip(model):
        return _discover_open_clip(model)
    return _discover_vlm(model)
