"""The recipe schema: typed, validated, and exported as JSON schema for editors.

A recipe is YAML validated into :class:`Recipe`. Unknown keys are errors that name the closest valid
key (see ``mmlora.config.loading``). Sections: ``model``, ``placement``, ``data``, ``train``, and
``continual`` (learning after earlier runs).

Example::

    model:
      name: tiny-llava
    placement:
      vision:    {mode: lora, targets: [q, v], layers: {last: 1}, rank: 4}
      projector: {mode: full, lr: 1.0e-3}
      language:  {mode: dora, targets: all-linear, rank: 8, precision: 4bit}
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["frozen", "lora", "dora", "qalora", "full"]
Precision = Literal["4bit", "8bit", "bf16", "fp16", "fp32"]
#: PEFT's ``init_lora_weights`` values that mmlora exposes ("default" = PEFT's ``True``).
Init = Literal["default", "gaussian", "pissa", "olora"]
#: Named target groups; anything else in ``targets`` is a module-name pattern.
TARGET_GROUPS = ("q", "k", "v", "o", "attention", "mlp", "all-linear")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LayerRange(_Strict):
    """Exactly one of: ``first: N``, ``last: N``, ``range: [start, stop)``, ``every: K`` (+ ``offset``)."""

    first: Annotated[int, Field(gt=0)] | None = None
    last: Annotated[int, Field(gt=0)] | None = None
    range: tuple[int, int] | None = None
    every: Annotated[int, Field(gt=0)] | None = None
    offset: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _exactly_one(self) -> LayerRange:
        chosen = [k for k in ("first", "last", "range", "every") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError(f"layers: give exactly one of first, last, range, every (got {', '.join(chosen) or 'none'})")
        if self.offset and self.every is None:
            raise ValueError("layers: offset only goes with every")
        if self.range is not None and not (0 <= self.range[0] < self.range[1]):
            raise ValueError(f"layers: range {list(self.range)} must be [start, stop) with 0 <= start < stop")
        return self

    def select(self, n_layers: int) -> list[int]:
        if self.first is not None:
            return list(range(min(self.first, n_layers)))
        if self.last is not None:
            return list(range(max(n_layers - self.last, 0), n_layers))
        if self.range is not None:
            return [i for i in range(*self.range) if i < n_layers]
        return list(range(self.offset, n_layers, self.every))


class RankSchedule(_Strict):
    """Rank over depth: ``linear`` from ``min`` at the first selected layer to ``max`` at the last."""

    kind: Literal["linear"] = "linear"
    min: Annotated[int, Field(gt=0)]
    max: Annotated[int, Field(gt=0)]

    def rank_at(self, position: int, count: int) -> int:
        if count <= 1:
            return self.max
        return round(self.min + (self.max - self.min) * position / (count - 1))


Layers = Literal["all"] | list[Annotated[int, Field(ge=0)]] | LayerRange


class ModalitySpec(_Strict):
    """How one modality (vision, projector, language; or text for CLIP) is trained."""

    mode: Mode = "frozen"
    targets: list[str] | None = Field(
        default=None,
        description="named groups (q, k, v, o, attention, mlp, all-linear) or module-name patterns "
        "(glob on the name inside the modality, or 're:REGEX'); default all-linear for lora/dora, "
        "every parameter for full",
    )
    layers: Layers = "all"
    rank: Annotated[int, Field(gt=0)] | None = None
    alpha: Annotated[float, Field(gt=0)] | None = Field(default=None, description="default: 2 x rank")
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    rslora: bool = False
    init: Init = "default"
    rank_schedule: RankSchedule | None = None
    lr: Annotated[float, Field(gt=0)] | None = Field(default=None, description="absolute learning rate")
    lr_multiplier: Annotated[float, Field(gt=0)] | None = Field(default=None, description="x the base learning rate")
    precision: Precision | None = None
    group_size: Annotated[int, Field(gt=1)] | None = Field(
        default=None, description="qalora: input columns per INT4 quantization group (default 32)")

    @field_validator("targets", mode="before")
    @classmethod
    def _one_target(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self) -> ModalitySpec:
        adapter_only = ("rank", "alpha", "rslora", "rank_schedule")
        if self.mode in ("frozen", "full"):
            set_here = [k for k in adapter_only if getattr(self, k) not in (None, False)]
            if self.dropout:
                set_here.append("dropout")
            if self.init != "default":
                set_here.append("init")
            if set_here:
                raise ValueError(f"{', '.join(set_here)} set, but mode is {self.mode}: these apply to lora/dora/qalora only")
        if self.mode == "frozen" and (self.targets is not None or self.layers != "all" or self.lr or self.lr_multiplier):
            raise ValueError("targets, layers and lr do not apply to a frozen modality")
        if self.rank is not None and self.rank_schedule is not None:
            raise ValueError("give rank or rank_schedule, not both")
        if self.lr is not None and self.lr_multiplier is not None:
            raise ValueError("give lr or lr_multiplier, not both")
        if self.targets == []:
            raise ValueError("targets is empty: name at least one group or pattern")
        if self.group_size is not None and self.mode != "qalora":
            raise ValueError(f"group_size set, but mode is {self.mode}: it applies to qalora only")
        if self.mode == "qalora":
            if self.precision is not None:
                raise ValueError("precision set, but mode qalora quantizes its layers to INT4 itself (see group_size)")
            if self.init != "default":
                raise ValueError("init applies to lora/dora; qalora starts from PEFT's default init")
        return self

    @property
    def effective_rank(self) -> int:
        return self.rank or 8

    def rank_for(self, position: int, count: int) -> int:
        """The rank of an adapter at ``position`` of ``count`` selected layers: ``rank_schedule``
        when given, else ``rank`` (default 8)."""
        if self.rank_schedule is not None:
            return self.rank_schedule.rank_at(position, count)
        return self.effective_rank

    def alpha_for(self, rank: int) -> float:
        """The LoRA alpha of an adapter of ``rank``: ``alpha`` when given, else 2 x rank."""
        return self.alpha if self.alpha is not None else 2.0 * rank

    @property
    def effective_group_size(self) -> int:
        return self.group_size or 32


class AdaLoraSpec(_Strict):
    """AdaLoRA (whole model: PEFT cannot mix AdaLoRA with LoRA adapters). Every lora modality becomes
    AdaLoRA with one shared budget; ranks start at ``init_r`` and are pruned toward ``target_r``."""

    init_r: Annotated[int, Field(gt=0)] = 12
    target_r: Annotated[int, Field(gt=0)] = 8
    tinit: Annotated[int, Field(ge=0)] = 0
    tfinal: Annotated[int, Field(ge=0)] = 0
    delta_t: Annotated[int, Field(gt=0)] = 1
    total_step: Annotated[int, Field(gt=0)] | None = None
    orth_reg_weight: Annotated[float, Field(ge=0)] = Field(
        default=0.5, description="weight of the orthogonality regulariser on the singular vectors (PEFT's default)")


class PlacementSpec(_Strict):
    """Per-modality policies. VLMs use vision / projector / language; CLIP models vision / text."""

    vision: ModalitySpec = ModalitySpec()
    projector: ModalitySpec | None = None
    language: ModalitySpec | None = None
    text: ModalitySpec | None = None
    adalora: AdaLoraSpec | None = None

    def items(self) -> list[tuple[str, ModalitySpec]]:
        return [(n, s) for n in ("vision", "projector", "language", "text") if (s := getattr(self, n)) is not None]

    @model_validator(mode="after")
    def _adalora_is_whole_model(self) -> PlacementSpec:
        if self.adalora is not None:
            bad = [n for n, s in self.items() if s.mode == "dora"]
            if bad:
                raise ValueError(f"adalora applies to the whole model and cannot mix with dora ({', '.join(bad)})")
        return self


class ModelSpec(_Strict):
    name: str = Field(description="preset name, local folder, or Hugging Face id (must be cached when offline)")
    config: str | None = Field(
        default=None, description="a config.json to plan from without weights (e.g. a 7B model's config)"
    )
    modalities: dict[Literal["vision", "projector", "language", "text"], str] | None = Field(
        default=None,
        description="override discovery: modality -> regex on module names (for a model mmlora cannot read)",
    )
    trust_remote_code: bool = False


class DatasetSpec(_Strict):
    """One dataset. ``weight`` multiplies its size per epoch (2 = each sample twice, 0.5 = half)."""

    format: Literal["llava", "coco", "messages", "hf", "seg"]
    path: str
    images: str | None = Field(default=None, description="image root; default: the data file's folder")
    weight: Annotated[float, Field(gt=0)] = 1.0
    prompt: str | None = Field(default=None, description="coco/hf captions: the question each caption answers")
    captions: Literal["all", "first"] = "all"
    hf_format: Literal["disk", "parquet", "imagefolder"] = "disk"
    split: str = "train"
    limit: Annotated[int, Field(gt=0)] | None = None
    ignore_classes: list[str] = Field(
        default=[], description="seg: classes whose pixels are never supervised (held out as unseen)")

    @model_validator(mode="after")
    def _seg_only(self) -> DatasetSpec:
        if self.ignore_classes and self.format != "seg":
            raise ValueError("ignore_classes applies to format: seg only")
        return self


class DataSpec(_Strict):
    """The datasets and how samples become model inputs. ``image_min_pixels``/``image_max_pixels`` and
    ``image_max_tiles`` set the processor's own image budget (``mmlora.data.image_budget``) for
    training, evaluation, predict and ``data check`` alike; a family whose processor has no such
    setting refuses the key."""

    train: list[DatasetSpec]
    val: list[DatasetSpec] = []
    max_length: Annotated[int, Field(gt=0)] = 2048
    on_bad_sample: Literal["error", "skip"] = "error"
    max_image_pixels: Annotated[int, Field(gt=0)] = Field(
        default=89_478_485, description="images with more pixels are refused before decoding (decompression bombs)")
    image_min_pixels: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="Qwen2-VL/2.5-VL/3-VL: smaller images are upscaled to at least this many pixels "
                                  "(the image processor's size.shortest_edge); default: the processor's")
    image_max_pixels: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="Qwen2-VL/2.5-VL/3-VL: larger images are downscaled to at most this many pixels "
                                  "(size.longest_edge), so fewer image tokens; default: the processor's")
    image_max_tiles: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="tiling processors: at most this many crops per image besides the global view "
                                  "(Idefics3/SmolVLM: a square, 1 = no splitting; InternVL: max_patches)")
    group_by_length: bool = True

    @model_validator(mode="after")
    def _pixel_range(self) -> DataSpec:
        lo, hi = self.image_min_pixels, self.image_max_pixels
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"image_min_pixels {lo} is over image_max_pixels {hi}; give min <= max")
        return self


class QuantSpec(_Strict):
    """How ``4bit`` modalities are quantized (bitsandbytes)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    quant_storage: Literal["uint8", "bf16", "fp16", "fp32"] = Field(
        default="uint8", description="storage dtype of 4-bit weights; bf16 for QLoRA under FSDP")


class CaptionEvalSpec(_Strict):
    """Caption metrics on a validation subset during training (logged with the other metrics)."""

    coco: str = Field(description="COCO caption annotations of the validation images")
    every: Annotated[int, Field(gt=0)]
    limit: Annotated[int, Field(gt=0)] = 32
    max_new_tokens: Annotated[int, Field(gt=0)] = 64
    prompt: str | None = None


class DenseSpec(_Strict):
    """The dense segmentation objective (CLIP trained on ``seg`` data): per-pixel cross-entropy of
    patch-text cosine logits against the masks, over the seen classes."""

    mode: Literal["vanilla", "maskclip", "sclip", "clearclip", "naclip"] = Field(
        default="vanilla", description="how the last vision block makes patch features (mmlora.models.dense)")
    templates: str = Field(default="shapes", description="class prompts: shapes | shapes-captions | imagenet | 'a {}.;a photo of a {}.'")


class ChunkedLossSpec(_Strict):
    """The LM head and the cross-entropy in chunks of supervised rows, each chunk's gradient computed
    on the spot: the ``[tokens, vocabulary]`` logits never exist whole (``mmlora.objectives.chunked_loss``)."""

    enabled: bool = True
    chunk_size: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="rows per chunk; default: as many as keep a chunk's fp32 logits near 32 MiB")


class PackingSpec(_Strict):
    """Exact sequence packing: each micro-batch's samples laid end to end in rows of at most
    ``max_tokens`` (first-fit-decreasing), positions restarting and attention confined per sample,
    so every sample gets the loss and gradients it gets unpacked (``mmlora.data.packing``)."""

    enabled: bool = False
    max_tokens: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="tokens per packed row (image tokens included); default: data.max_length")


class TrainSpec(_Strict):
    """The training loop. Batch sizes are per optimizer step: ``batch_size`` samples per device per
    micro-step, ``grad_accum`` micro-steps, times the number of processes."""

    output_dir: str | None = Field(default=None, description="default: runs/<recipe name>")
    init_from: str | None = Field(default=None, description="a run folder whose final/ adapters and full modules start this run")
    resume: Literal["auto", "never"] | str = Field(default="auto", description="auto: latest checkpoint in output_dir; or a path")
    seed: int = 0
    max_steps: Annotated[int, Field(gt=0)] | None = None
    epochs: Annotated[float, Field(gt=0)] = 1.0
    batch_size: Annotated[int, Field(gt=0)] = 8
    batch_tokens: Annotated[int, Field(gt=0)] | None = Field(
        default=None, description="token-budget batches: a micro-batch holds as many samples as fit this many token "
        "cells per process (padded samples x longest, or the sum when packed); replaces batch_size")
    grad_accum: Annotated[int, Field(gt=0)] = 1
    lr: Annotated[float, Field(gt=0)] = 2.0e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    lora_plus_ratio: Annotated[float, Field(gt=0)] | None = Field(default=None, description="LoRA+: lr of B = ratio x lr of A")
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    max_grad_norm: Annotated[float, Field(gt=0)] | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = None
    chunked_loss: ChunkedLossSpec = ChunkedLossSpec()
    packing: PackingSpec = PackingSpec()
    frozen_no_grad: bool = Field(
        default=True, description="run sub-models with nothing to train (e.g. a frozen vision tower) without autograd")
    lean_dora: bool = Field(
        default=True, description="DoRA layers use mmlora's lean forward (PEFT's values, less work); false: PEFT's own")
    quantization: QuantSpec = QuantSpec()
    log_every: Annotated[int, Field(gt=0)] = 1
    eval_every: Annotated[int, Field(gt=0)] | None = None
    save_every: Annotated[int, Field(gt=0)] | None = None
    keep_last: Annotated[int, Field(gt=0)] = 2
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    caption_eval: CaptionEvalSpec | None = None
    dense: DenseSpec = DenseSpec()


class RouterSpec(_Strict):
    """A mixture of LoRA experts with a learned router (``continual.method: router``): the experts are
    earlier adapter-only LoRA runs of the same base; the router weighs them per sample."""

    experts: dict[str, str] = Field(description="expert name -> an adapter-only LoRA run of this base, e.g. {B: runs/b}")
    include_base: bool = Field(default=True, description="the base alone as one more expert (named base)")
    gate: Literal["learned", "uniform"] = Field(default="learned", description="uniform: every expert alike, nothing trains")
    train_experts: bool = Field(default=False, description="the experts' A and B train beside the router (objective: mixture)")
    objective: Literal["best-expert", "mixture"] = Field(
        default="best-expert", description="best-expert: learn each sample's lowest-loss expert; mixture: the mixture's LM loss, end to end")

    @model_validator(mode="after")
    def _trainable(self) -> RouterSpec:
        if self.train_experts and self.objective != "mixture":
            raise ValueError("router.train_experts: the experts learn only through the mixture's loss; set objective: mixture")
        return self

    @field_validator("experts")
    @classmethod
    def _named(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("router.experts: name at least one expert run")
        if "base" in v:
            raise ValueError("router.experts: 'base' is the base itself (include_base); give the runs other names")
        return v


class ContinualSpec(_Strict):
    """Learning after earlier runs of the same base (``mmlora.train.continual``): ``sequential`` continues
    one earlier run's adapters on new data; ``olora`` trains new adapters beside the earlier runs' (kept
    frozen), their A orthogonal to the earlier ones' (O-LoRA); ``router`` trains a router over earlier
    runs' adapters (MoLoRA); ``distill`` trains this recipe's adapters to match a teacher run's logits."""

    method: Literal["sequential", "olora", "router", "distill"]
    previous: list[str] = Field(default=[], description="sequential: the run continued; olora: the earlier stages' runs")
    orth_weight: Annotated[float, Field(ge=0)] = Field(default=0.5, description="olora: weight of the orthogonality penalty")
    router: RouterSpec | None = None
    teacher: str | None = Field(default=None, description="distill: the run (a router run too) whose logits are matched")
    temperature: Annotated[float, Field(gt=0)] = Field(default=1.0, description="distill: softmax temperature")

    @model_validator(mode="after")
    def _complete(self) -> ContinualSpec:
        needs = {"sequential": self.previous and len(self.previous) == 1, "olora": bool(self.previous),
                 "router": self.router is not None, "distill": self.teacher is not None}
        if not needs[self.method]:
            what = {"sequential": "previous: [exactly one run]", "olora": "previous: [the earlier runs]",
                    "router": "router: {experts: {...}}", "distill": "teacher: RUN"}[self.method]
            raise ValueError(f"continual.method {self.method} needs {what}")
        extra = [key for key, given, method in (("router", self.router is not None, ("router",)),
                                                ("teacher", self.teacher is not None, ("distill",)),
                                                ("previous", bool(self.previous), ("sequential", "olora")))
                 if given and self.method not in method]
        if extra:
            raise ValueError(f"continual.method {self.method} takes no {', '.join(extra)}")
        return self


class Recipe(_Strict):
    model: ModelSpec
    placement: PlacementSpec = PlacementSpec()
    data: DataSpec | None = None
    train: TrainSpec = TrainSpec()
    continual: ContinualSpec | None = None

    @property
    def trains_router(self) -> bool:
        """A router recipe trains the router alone: its placement may leave every modality frozen."""
        return self.continual is not None and self.continual.method == "router"
