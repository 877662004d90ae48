"""A mixture of LoRA experts chosen per input (MoLoRA): one LoRA adapter per world (or task) on one
base, and a small router that weighs them per sample.

Every linear layer any expert adapts computes, for the rows ``b`` of a batch,

    y_b = W x_b + Σ_k g[b, k] · (s_k B_k A_k) x_b

with ``g = softmax(router(features_b))`` over the experts ``k`` (optionally the base itself: an expert
of no update, for inputs the base already handles). The features are the sample's image features (the
base's own, through its vision tower and projector, the mixture off; mean and max over its tokens) and
its mean prompt embedding (the prompt alone: in training, ``text_mask`` leaves the answers out), computed once per forward that starts sequences (training; a prefill) or once per
``generate`` call (before it encodes the images), then kept for the decoding steps of the same rows. With a one-hot ``g`` a row is exactly that expert's adapter alone.

The experts are read as plain LoRA parts (``mmlora.adapters.parts``: PEFT's own scaling); DoRA experts
are refused (a DoRA layer's norm does not mix linearly). By default only the router trains; with
``train_experts`` the experts' A and B train too. Gradients reach nothing else of the base.

``Router(gate="uniform")`` weighs every expert alike (no parameters): the mixing bound without a router.

Layer: adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlora.adapters.parts import Parts
from mmlora.errors import MmloraError

#: the expert of no update: the base alone
BASE_EXPERT = "base"
GATES = ("learned", "uniform")


class Router(nn.Module):
    """The gate: ``[B, d_image]``, ``[B, d_text]`` → ``[B, K]`` expert weights (rows sum to 1). A linear
    layer on the two pooled features, each layer-normalised; it starts at zero (every expert alike).
    ``hard``: outside training, the expert it weighs most, alone (one-hot)."""

    def __init__(self, image_dim: int, text_dim: int, experts: Sequence[str], gate: str = "learned", hard: bool = False):
        super().__init__()
        if gate not in GATES:
            raise MmloraError(f"router gate {gate!r}: use one of {', '.join(GATES)}")
        self.experts, self.gate, self.hard = list(experts), gate, hard
        self.image_dim, self.text_dim = image_dim, text_dim
        self.linear = nn.Linear(image_dim + text_dim, len(self.experts)) if gate == "learned" else None
        if self.linear is not None:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.linear is None:
            return torch.full((image.shape[0], len(self.experts)), 1.0 / len(self.experts), device=image.device)
        features = torch.cat([F.layer_norm(image, image.shape[-1:]), F.layer_norm(text, text.shape[-1:])], dim=-1)
        weights = torch.softmax(self.linear(features.to(self.linear.weight.dtype)), dim=-1)
        if self.hard and not self.training:  # a router trained to name the best expert: that expert alone
            return F.one_hot(weights.argmax(-1), len(self.experts)).to(weights.dtype)
        return weights


class _MixedLayer:
    """One base linear layer's experts (``A [K, r, in]``, ``s·B [K, out, r]``; zeros where an expert does
    not adapt it, ranks padded: exact); takes over the layer's ``forward`` while attached."""

    def __init__(self, mixture: LoraMixture, module: nn.Linear, key: str):
        self.mixture, self.module, self.key = mixture, module, key
        self._base_forward = type(module).forward.__get__(module)
        module.forward = self.forward

    def release(self) -> None:
        self.module.__dict__.pop("forward", None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output = self._base_forward(x, *args, **kwargs)
        g = self.mixture.weights
        if g is None or self.mixture.paused:
            return output
        rows = x.shape[0]
        if g.shape[0] != rows:
            raise RuntimeError(f"a mixed LoRA layer got {rows} rows for {g.shape[0]} samples")
        a, b = self.mixture.A[self.key], self.mixture.B[self.key]
        h = x.reshape(rows, -1, x.shape[-1]).to(a.dtype)
        xa = torch.einsum("bli,kri->blkr", h, a) * g.to(a.dtype)[:, None, :, None]
        delta = torch.einsum("blkr,kor->blo", xa, b)
        return output + delta.reshape(output.shape).to(output.dtype)


class LoraMixture(nn.Module):
    """The experts' parts on one base and their router (see the module docstring). ``experts``:
    ``{name: parts}`` (``{}`` for :data:`BASE_EXPERT`), in the router's order."""

    def __init__(self, experts: dict[str, dict[str, Parts]], router: Router, train_experts: bool = False):
        super().__init__()
        if list(experts) != router.experts:
            raise MmloraError(f"the router weighs experts {router.experts}, but the mixture holds {list(experts)}")
        dora = [n for n, parts in experts.items() if any(g is not None for _, _, g in parts.values())]
        if dora:
            raise MmloraError(f"experts {dora} are DoRA adapters: a DoRA layer's norm does not mix linearly; "
                              "train the experts with mode: lora")
        self.router, self.names = router, list(experts)
        layers = sorted({layer for parts in experts.values() for layer in parts})
        if not layers:
            raise MmloraError("the mixture's experts adapt no layer")
        self.layer_names = layers
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for layer in layers:
            shapes = [parts[layer] for parts in experts.values() if layer in parts]
            r = max(a.shape[0] for a, _, _ in shapes)
            n_in, n_out = shapes[0][0].shape[1], shapes[0][1].shape[0]
            A, B = torch.zeros(len(experts), r, n_in), torch.zeros(len(experts), n_out, r)
            for k, parts in enumerate(experts.values()):
                if layer in parts:
                    a, b, _ = parts[layer]
                    A[k, : a.shape[0]], B[k, :, : b.shape[1]] = a, b
            key = layer.replace(".", "__")
            self.A[key] = nn.Parameter(A, requires_grad=train_experts)
            self.B[key] = nn.Parameter(B, requires_grad=train_experts)
        self.weights: torch.Tensor | None = None  # [B, K] of the rows running now
        #: [B, T] the prompt's tokens, where a forward's inputs hold more (training: the answers, which the
        #: router must not read — it sees only the prompt when it routes a request)
        self.text_mask: torch.Tensor | None = None
        self.paused = False
        self._preset = False  # the weights were set for a whole ``generate`` call
        self._layers: list[_MixedLayer] = []
        self._hook = None

    # ------------------------------------------------------------------ attaching

    def attach(self, model: nn.Module) -> LoraMixture:
        """Install on ``model`` (a transformers image-text-to-text model): its adapted layers take the
        mixture, and each forward that carries images sets the expert weights first."""
        modules = dict(model.named_modules())
        missing = [n for n in self.layer_names if not isinstance(modules.get(n), nn.Linear)]
        if missing:
            raise MmloraError(f"the experts adapt {missing[:3]}, which are not linear layers of this base")
        device = next(model.parameters()).device
        self.to(device)
        self._layers = [_MixedLayer(self, modules[n], n.replace(".", "__")) for n in self.layer_names]
        self._hook = model.register_forward_pre_hook(self._route, with_kwargs=True)
        if hasattr(model, "generate"):
            # ``generate`` encodes the images (``get_image_features``) before its first forward, and
            # passes their features instead of the pixels: the weights are set from the whole request first.
            model.generate = self._routed_generate(model, type(model).generate.__get__(model))
        model.mmlora_mixture = self  # a submodule: its parameters train, checkpoint and move with the model
        return self

    def _routed_generate(self, model: nn.Module, generate):
        def routed(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            extra = {k: kwargs[k] for k in ("image_sizes",) if kwargs.get(k) is not None}
            image, text = self.features(model, kwargs.get("pixel_values"), ids, kwargs.get("attention_mask"), **extra)
            self.weights, self._preset = self.router(image, text), True
            try:
                return generate(*args, **kwargs)
            finally:
                self._preset = False
        return routed

    def detach(self, model: nn.Module) -> None:
        """Give ``model`` its own layers back."""
        for layer in self._layers:
            layer.release()
        if self._hook is not None:
            self._hook.remove()
        if getattr(model, "mmlora_mixture", None) is self:
            del model.mmlora_mixture
        model.__dict__.pop("generate", None)
        self._layers, self._hook = [], None

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        """Within: the base alone (the router's own features are the base's)."""
        paused, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = paused

    # ------------------------------------------------------------------ routing

    def features(self, model: nn.Module, pixel_values: torch.Tensor | None, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None, **image_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, d_image], [B, d_text])``: each sample's image features (the base's vision tower and
        projector, mean and max over the image's tokens: ``d_image`` = 2 × the projector's width; zeros
        without images) and its mean prompt embedding (``text_mask``'s tokens, if set)."""
        rows = input_ids.shape[0]
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        if self.text_mask is not None:
            mask = mask * self.text_mask.to(mask.dtype)
        embeds = model.get_input_embeddings()(input_ids)
        text = (embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        if pixel_values is None:
            return torch.zeros(rows, self.router.image_dim, device=embeds.device, dtype=embeds.dtype), text
        with self.off():
            out = model.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kwargs)
        feats = getattr(out, "pooler_output", None)
        if feats is None:
            feats = out.last_hidden_state
        per_image = [f.reshape(-1, f.shape[-1]) for f in feats] if isinstance(feats, (list, tuple)) else \
            list(feats.reshape(feats.shape[0], -1, feats.shape[-1]))
        # mean and max over the image's tokens: the max keeps an object that covers a few patches
        pooled = [torch.cat([f.mean(0), f.max(0).values]) for f in per_image]
        if len(pooled) != rows:
            raise MmloraError(f"the router needs one image per sample; this batch has {len(pooled)} for {rows} samples")
        return torch.stack(pooled).to(text.dtype), text

    def _route(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: a forward that starts sequences (images, or no cache yet) sets
        the expert weights of its rows; a decoding step keeps them (as does every forward of a
        ``generate`` call, whose weights were set from its whole request)."""
        if self._preset:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        fresh = kwargs.get("pixel_values") is not None or cache is None or cache.get_seq_length() == 0
        if ids is None or not fresh:
            return
        extra = {k: kwargs[k] for k in ("image_sizes",) if kwargs.get(k) is not None}
        image, text = self.features(model, kwargs.get("pixel_values"), ids, kwargs.get("attention_mask"), **extra)
        self.weights = self.router(image, text)

    @torch.no_grad()
    def choose(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> list[str]:
        """The expert the router weighs most for each sample of a processor ``batch`` (hard routing)."""
        extra = {k: batch[k] for k in ("image_sizes",) if k in batch}
        image, text = self.features(model, batch.get("pixel_values"), batch["input_ids"], batch.get("attention_mask"), **extra)
        return [self.names[i] for i in self.router(image, text).argmax(-1).tolist()]
