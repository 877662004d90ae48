"""The two training arms, each run in a fresh process by ``bench_train.py``.

* ``reference``: HF ``transformers.Trainer`` + PEFT, the standard LLaVA LoRA setup — LoRA on every
  linear layer of the language model, the projector fully trainable, the vision tower frozen — with
  SDPA attention, non-reentrant gradient checkpointing and the same precision; QLoRA/QDoRA quantize
  the language model to 4-bit NF4 through ``BitsAndBytesConfig`` (as mmlora's recipe does).
* ``mmlora``: ``mmlora.train.loop.Trainer`` on an equivalent recipe, written as YAML to the job's folder.

Both read the same LLaVA JSON through mmlora's encoder (so tokens and answer-only labels are
identical) and see the same global batches: the reference gets mmlora's length-grouped batch order
with a sequential sampler. Steps are timed from the end of the first step (warm-up) to the end of
the last; the peak memory is read at the end of the last step. Saving is not part of either arm.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from train_bench.measure import Breakdown, MemoryMeter, cpu_seconds, now, touch_weights

LANGUAGE_LINEAR = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class Job:
    arm: str  # reference | mmlora
    variant: str  # lora | dora | qlora | qdora
    model_dir: str
    data_json: str
    image_root: str
    work_dir: str
    rank: int
    batch_size: int
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    dropout: float = 0.0
    lr: float = 2.0e-4
    profile: bool = False
    threads: int = 1  # 0: torch's default
    max_length: int = 2048
    train_overrides: dict[str, Any] = field(default_factory=dict)  # mmlora's train section
    group_by_length: bool = False  # reference: HF's own length-grouped sampler instead of mmlora's order
    gradient_checkpointing: bool = True  # both arms: non-reentrant activation checkpointing of every layer


@dataclass
class Result:
    arm: str
    variant: str
    step_ends: list[float] = field(default_factory=list)
    step_cpu: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    cells: list[int] = field(default_factory=list)  # token cells of each batch, padding included
    start: float | None = None  # when the first batch began to be collated: the pass's start
    start_cpu: float | None = None
    peak_bytes: int = 0
    baseline_bytes: int = 0
    breakdown: dict[str, float] = field(default_factory=dict)
    trainable: int = 0
    device: str = "cpu"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------- shared data


def ordered_dataset(job: Job, processor) -> tuple[list[int], Any, int]:
    """mmlora's dataset for ``job.data_json`` and its epoch-0 batch order (flattened); the reference
    reads the same samples in that order, so both arms train on identical global batches."""
    from mmlora.data.batching import ConversationDataset, GroupedBatchSampler
    from mmlora.data.processing import ConversationEncoder
    from mmlora.data.readers import read_llava

    ds = ConversationDataset(read_llava(job.data_json, job.image_root), ConversationEncoder(processor, job.max_length))
    first = ds[0]
    image_tokens = int((first["input_ids"] == ds.encoder.image_token_id).sum())
    sampler = GroupedBatchSampler(ds.lengths(image_tokens), ds.has_image(), job.batch_size, seed=0)
    return [i for batch in sampler.batches(0) for i in batch], ds, image_tokens


def _counting(collate, result: Result):
    """``collate`` that records each batch's real tokens and its token cells (padding included) in ``result``."""
    def counted(items):
        if result.start is None:
            result.start, result.start_cpu = now(device()), cpu_seconds()
        batch = collate(items)
        result.tokens.append(sum(len(it["input_ids"]) for it in items if it is not None))
        result.cells.append(int(batch["input_ids"].numel()))
        return batch

    return counted


class _Ordered(torch.utils.data.Dataset):
    def __init__(self, ds, order: list[int]):
        self.ds, self.order = ds, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        return self.ds[self.order[i]]


# ---------------------------------------------------------------------- reference


def run_reference(job: Job, result: Result) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoProcessor, BitsAndBytesConfig, LlavaForConditionalGeneration, Trainer,
                              TrainerCallback, TrainingArguments)
    from transformers.trainer_callback import PrinterCallback

    from mmlora.data.batching import Collator

    dev = device()
    bf16 = job.precision == "bf16"
    quantized = job.variant.startswith("q")
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch.bfloat16 if bf16 and dev.type == "cuda" else torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
            llm_int8_skip_modules=["model.vision_tower", "model.multi_modal_projector", "lm_head"])
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    model = LlavaForConditionalGeneration.from_pretrained(job.model_dir, **kwargs)
    # PEFT's prepare_model_for_kbit_training is not used for QLoRA: it upcasts every weight that is not
    # quantized (vision tower, projector, embeddings, head) to fp32, which would slow the reference
    # down for reasons that have nothing to do with the trainer; both arms keep them in one precision.
    lora = LoraConfig(r=job.rank, lora_alpha=2 * job.rank, lora_dropout=job.dropout, target_modules=LANGUAGE_LINEAR,
                      use_dora=job.variant.endswith("dora"), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.base_model.model.model.multi_modal_projector.requires_grad_(True)
    result.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    processor = AutoProcessor.from_pretrained(job.model_dir)
    order, ds, _ = ordered_dataset(job, processor)
    collate = Collator(processor.tokenizer.pad_token_id)
    args = TrainingArguments(
        output_dir=str(Path(job.work_dir) / "hf"), per_device_train_batch_size=job.batch_size, num_train_epochs=1,
        learning_rate=job.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        activation_checkpointing=job.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=bf16, use_cpu=dev.type == "cpu", train_sampling_strategy="sequential", dataloader_num_workers=0,
        remove_unused_columns=False, logging_strategy="steps", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )
    train_set = _Ordered(ds, order)
    if job.group_by_length:  # HF's own best setting for mixed lengths: its LengthGroupedSampler
        args.train_sampling_strategy, train_set = "group_by_length", ds
    meter = MemoryMeter(dev)
    n_steps = math.ceil(len(order) / job.batch_size)
    sizes = [min(job.batch_size, len(order) - k) for k in range(0, len(order), job.batch_size)]
    counted_collate = _counting(collate, result)
    data_fn = counted_collate

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            result.step_ends.append(now(dev))
            result.step_cpu.append(cpu_seconds())
            if len(result.step_ends) == n_steps:
                result.peak_bytes = meter.peak()
            if len(result.step_ends) == 1 and breakdown is not None:
                breakdown.seconds.clear()  # the first step is warm-up
                breakdown.batches = 0

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                result.losses.append(float(logs["loss"]))

        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            if breakdown is not None:
                optimizer.step = breakdown.timed("optimizer", optimizer.step)

    breakdown = None
    if job.profile:
        breakdown = Breakdown(model, dev)
        ds.encoder.encode = breakdown.timed("data", ds.encoder.encode)
        data_fn = breakdown.timed("data", counted_collate, batch=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=data_fn,
                      callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)
    if breakdown is not None:
        acc = trainer.accelerator
        backward, clip = acc.backward, acc.clip_grad_norm_
        acc.backward = lambda loss, **kw: breakdown.backward(lambda: backward(loss, **kw))
        acc.clip_grad_norm_ = breakdown.timed("optimizer", clip)
    touch_weights(model)
    meter.start()
    result.baseline_bytes = meter.baseline
    trainer.train()
    result.samples = sizes
    if breakdown is not None:
        result.breakdown = dict(breakdown.seconds) | {"data_batches": breakdown.batches}


# ---------------------------------------------------------------------- mmlora


def mmlora_recipe(job: Job) -> dict[str, Any]:
    """The equivalent mmlora recipe: frozen vision, full projector, LoRA/DoRA on the LM's linear layers;
    under bf16 (on a GPU) every modality is loaded in bf16, as the reference loads the model."""
    mode = "dora" if job.variant.endswith("dora") else "lora"
    language: dict[str, Any] = {"mode": mode, "targets": "all-linear", "rank": job.rank, "alpha": 2.0 * job.rank,
                                "dropout": job.dropout}
    vision: dict[str, Any] = {"mode": "frozen"}
    projector: dict[str, Any] = {"mode": "full"}
    if job.precision == "bf16" and device().type == "cuda":
        for spec in (vision, projector, language):
            spec["precision"] = "bf16"
    if job.variant.startswith("q"):
        language["precision"] = "4bit"
    train: dict[str, Any] = {
        "output_dir": str(Path(job.work_dir) / "mmlora"), "epochs": 1.0, "batch_size": job.batch_size, "lr": job.lr,
        "scheduler": "constant", "max_grad_norm": 1.0, "gradient_checkpointing": job.gradient_checkpointing, "attn_implementation": "sdpa",
        "mixed_precision": "bf16" if job.precision == "bf16" else "no", "resume": "never", "seed": 0,
    }
    if job.variant.startswith("q"):
        train["quantization"] = {"compute_dtype": "bf16" if job.precision == "bf16" else "fp32"}
    train |= job.train_overrides
    return {
        "model": {"name": job.model_dir},
        "placement": {"vision": vision, "projector": projector, "language": language},
        "data": {"train": [{"format": "llava", "path": job.data_json, "images": job.image_root}],
                 "max_length": job.max_length},
        "train": train,
    }


def run_mmlora(job: Job, result: Result) -> None:
    import yaml

    from mmlora.config.loading import load_recipe
    from mmlora.train.loop import Trainer

    dev = device()
    path = Path(job.work_dir) / "recipe.yaml"
    path.write_text(yaml.safe_dump(mmlora_recipe(job)))
    trainer = Trainer(load_recipe(path), recipe_name="bench")
    trainer.setup()
    trainer.save_checkpoint = trainer.save_final = lambda: None  # saving is not part of the comparison
    model = trainer.accelerator.unwrap_model(trainer.model)
    result.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meter = MemoryMeter(dev)
    step = trainer.train_step
    n_steps = trainer.total_steps
    collate = trainer.collate
    counted_collate = _counting(collate, result)
    trainer.collate = counted_collate

    def timed_step(indices):
        loss, tokens = step(indices)
        result.step_ends.append(now(dev))
        result.step_cpu.append(cpu_seconds())
        result.losses.append(loss)
        result.samples.append(len(indices))
        if len(result.step_ends) == n_steps:
            result.peak_bytes = meter.peak()
        if len(result.step_ends) == 1 and breakdown is not None:
            breakdown.seconds.clear()  # the first step is warm-up
            breakdown.batches = 0
        return loss, tokens

    trainer.train_step = timed_step
    breakdown = None
    if job.profile:
        breakdown = Breakdown(model, dev)
        enc = trainer.train_set.encoder
        enc.encode = breakdown.timed("data", enc.encode)
        trainer.collate = breakdown.timed("data", counted_collate, batch=True)
        acc = trainer.accelerator
        backward, clip = acc.backward, acc.clip_grad_norm_
        acc.backward = lambda loss, **kw: breakdown.backward(lambda: backward(loss, **kw))
        acc.clip_grad_norm_ = breakdown.timed("optimizer", clip)
        trainer.optimizer.step = breakdown.timed("optimizer", trainer.optimizer.step)
    touch_weights(model)
    meter.start()
    result.baseline_bytes = meter.baseline
    trainer.train()
    if breakdown is not None:
        result.breakdown = dict(breakdown.seconds) | {"data_batches": breakdown.batches}


def run_job(job_dict: dict, out_path: str) -> None:
    """Child-process entry: run one arm and write its :class:`Result` as JSON to ``out_path``."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"Seems like `optimizer.step\(\)` has been overridden")  # profiling
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    job = Job(**job_dict)
    if job.threads:
        torch.set_num_threads(job.threads)
    Path(job.work_dir).mkdir(parents=True, exist_ok=True)
    result = Result(job.arm, job.variant, device=str(device()))
    {"reference": run_reference, "mmlora": run_mmlora}[job.arm](job, result)
    Path(out_path).write_text(json.dumps(asdict(result)))
