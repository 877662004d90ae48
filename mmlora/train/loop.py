"""The training loop: one readable file on Accelerate.

Supports: per-modality precision (QLoRA/QDoRA on 4-bit or 8-bit towers, verified after load);
placement through PEFT; optimizer groups per modality with their own learning rate, LoRA+ and no
decay on norms, biases and DoRA magnitudes; cosine/linear/constant schedules with warmup; gradient
accumulation with the loss normalised by the supervised tokens of the whole global batch (across
micro-steps and processes, so batch 2 x accumulation 4 is batch 8); logits only at supervised
positions; clipping; mixed precision; non-reentrant gradient checkpointing; AdaLoRA's rank
allocation; the gradient-flow audit (each modality at the first batch that reaches it); validation
loss; atomic checkpoints with an exact resume, refused when the checkpoint's fingerprint (base model,
plan, data, processes, global batch, seed) differs from the run's; NaN/inf detection, and warnings for
a loss stuck at ln(vocabulary) or all-zero
gradients (``mmlora.train.watch``); under ``data.on_bad_sample: skip`` the skipped samples in ``bad_samples.jsonl`` and a
``skipped`` count in every metrics row; metrics.jsonl, trackers, a progress bar and a loss curve. A
failed write of the run folder (full disk, read-only folder, a path under a file) is a one-line error
naming the last good checkpoint.

Distributed runs are whatever ``accelerate launch`` / ``torchrun`` starts (DDP, FSDP2, DeepSpeed):
every process draws the same seeded global batch and trains on its own slice of it; the processes
agree on each step's work before it starts, so a process whose slice holds no usable sample still
takes part (with a zero-weight stand-in) instead of leaving the others waiting.

In-training evaluations (``train.caption_eval``) and event callbacks are passed in
(``mmlora.train.hooks``): the loop imports no evaluation.

Run: ``mmlora train RECIPE [key=value ...]``.

Layer: train. Imports objectives, runs, data, placement, models, config and the foundation.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mmlora.config.loading import recipe_to_yaml as recipe_yaml
from mmlora.config.schema import Recipe
from mmlora.data.batching import ConversationDataset, batch_sampler
from mmlora.data.build import mix, read_dataset
from mmlora.errors import MmloraError
from mmlora.models.loading import resolve_pretrained
from mmlora.models.precision import load_for_training
from mmlora.objectives.distill import Distill
from mmlora.objectives.route import BestExpert
from mmlora.objectives.select import objective_for
from mmlora.placement.apply import apply_placement, enable_gradient_checkpointing, save_initial_state
from mmlora.placement.plan import plan_placement
from mmlora.runs import checkpoint as ckpt
from mmlora.runs.card import loss_curve, model_card
from mmlora.runs.layout import Run, Weights
from mmlora.runs.reference import load_reference
from mmlora.runs.save import init_from_run, save_placement
from mmlora.train.allocation import AllocationTracker
from mmlora.train.continual import Continual
from mmlora.train.hooks import Evaluator, EventHook
from mmlora.train.optim import build_optimizer, param_groups
from mmlora.train.processes import Processes
from mmlora.train.record import fingerprint, run_info
from mmlora.train.skips import SkipLedger
from mmlora.train.slices import micro_batches, process_slice, stand_in
from mmlora.train.speed import apply_speedups, packed_collator
from mmlora.train.staged_audit import IMAGE_KEYS, StagedAudit
from mmlora.train.watch import SHARDED, TrainingWatch, vocab_size


class Trainer:
    """``setup()`` → ``train()``; the run folder is ``train.output_dir`` (default ``runs/<recipe>``).

    ``evaluators`` run during training (``mmlora.train.hooks.Evaluator``; a recipe with
    ``train.caption_eval`` needs one, see ``mmlora.eval.hooks.training_evaluators``); ``on_event``
    is told where the loop is (``mmlora.train.hooks.EventHook``)."""

    def __init__(self, recipe: Recipe, recipe_name: str = "run", base_dir: Path | None = None,
                 evaluators: Sequence[Evaluator] = (), on_event: EventHook | None = None):
        if recipe.data is None:
            raise MmloraError("the recipe has no data section: nothing to train on")
        if recipe.train.caption_eval is not None and not evaluators:
            raise MmloraError("train.caption_eval is set, but no caption evaluator was passed to the Trainer: "
                              "run `mmlora train`, or pass evaluators=mmlora.eval.hooks.training_evaluators(recipe)")
        self.recipe, self.base_dir = recipe, base_dir
        self.evaluators, self.on_event = list(evaluators), on_event
        self.out = Path(recipe.train.output_dir or Path("runs") / recipe_name)
        self.run = Run(self.out)
        self.step = 0
        self.step_lrs: dict[str, float] = {}
        #: The last step's sequence tokens and token cells (padding included), over all processes.
        self.step_tokens: tuple[int, int] = (0, 0)
        #: AdaLoRA runs: the budget's tracker, the totals of this step's allocation, the final table.
        self.allocation: AllocationTracker | None = None
        self.allocated: dict[str, int] | None = None
        self.allocation_text: str | None = None
        #: ``continual`` recipes: what the method adds (``mmlora.train.continual``).
        self.continual = Continual(recipe.continual, recipe.model.name) if recipe.continual is not None else None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Model, data, placement, optimizer, run folder: in that order, each its own step."""
        self._setup_accelerator()
        model = self._setup_model()
        self._setup_data()
        model = self._setup_placement(model)
        self._setup_optimizer(model)
        self._setup_run_folder()

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        t = self.recipe.train
        # Without CUDA, say cpu=True: only then does Accelerate read torchrun's environment as a
        # multi-process CPU (gloo) run instead of starting every process as a single-process run.
        self.accelerator = Accelerator(mixed_precision=t.mixed_precision, log_with=t.trackers or None,
                                       project_dir=str(self.out), cpu=not torch.cuda.is_available())
        self.is_main = self.accelerator.is_main_process
        self.processes = Processes(self.accelerator, self.run.checkpoints)
        set_seed(t.seed)

    def _setup_model(self) -> nn.Module:
        """The base in its per-modality precision, its objective, and an earlier run's weights."""
        r, t = self.recipe, self.recipe.train
        model, self.mmap = load_for_training(r.model, r.placement, t.quantization, t.attn_implementation)
        self.objective = objective_for(model, resolve_pretrained(r.model.name), r.data, t.dense, self.base_dir)
        if r.trains_router and r.continual.router.objective == "best-expert":
            self.objective = BestExpert(resolve_pretrained(r.model.name), r.data.max_length, r.data.max_image_pixels, r.data)
        if r.continual is not None and r.continual.method == "distill":
            teacher = load_reference(r.continual.teacher).model.to(self.accelerator.device)
            self.objective = Distill(teacher, r.continual.temperature, resolve_pretrained(r.model.name),
                                     r.data.max_length, r.data.max_image_pixels, r.data)
        self.collate = self.objective.collate
        self.packing: dict[str, Any] | None = None  # row length and attention, when packed
        if t.packing.enabled:
            self.collate, self.packing = packed_collator(model, t, r.data.max_length, self.objective,
                                                         self.accelerator.device.type, warn=self.is_main)
        vocab = vocab_size(model, self.objective.processor) if self.objective.unit == "token" else None
        self.watch = TrainingWatch(vocab, self.is_main, self.accelerator.distributed_type.name in SHARDED)
        if t.init_from:
            init_from_run(model, Path(t.init_from))
        return model

    def _setup_data(self) -> None:
        """Datasets, the seeded global-batch sampler, and the number of steps."""
        data, t = self.recipe.data, self.recipe.train

        def dataset(specs):
            records = mix([(read_dataset(d, self.base_dir), d.weight) for d in specs], t.seed)
            return ConversationDataset(records, self.objective.encoder, data.on_bad_sample)

        self.train_set = dataset(data.train)
        self.val_set = dataset(data.val) if data.val else None
        #: Training samples skipped as bad so far, the same on every process.
        self.skips = SkipLedger(self.train_set, self.val_set, self.processes, self.run.bad_samples_file,
                                data.on_bad_sample == "skip")
        if len(self.train_set) == 0:
            if self.train_set.skipped:
                raise self.skips.all_skipped()
            raise MmloraError("the training data has no usable sample")
        self.global_batch = t.batch_size * t.grad_accum * self.accelerator.num_processes
        if t.batch_tokens and self.objective.unit != "token":
            raise MmloraError(f"train.batch_tokens: {self.objective.unit}-level objectives have no token lengths to "
                              "budget; use train.batch_size")
        budget = t.batch_tokens * t.grad_accum * self.accelerator.num_processes if t.batch_tokens else None
        self.sampler = batch_sampler(self.train_set.lengths(self.train_set.image_tokens()), self.train_set.has_image(),
                                     self.global_batch, budget, t.packing.enabled, t.seed, data.group_by_length)
        if budget:
            self.global_batch = f"{budget} token cells"  # what run_info and the resume fingerprint record
        steps_per_epoch = len(self.sampler.batches(0))
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))

    def _setup_placement(self, model: nn.Module) -> nn.Module:
        """Plan and apply the placement; checkpointing and the speed switches on top."""
        t, placement = self.recipe.train, self.recipe.placement
        if placement.adalora is not None and placement.adalora.total_step is None:
            placement = placement.model_copy(update={"adalora": placement.adalora.model_copy(update={"total_step": self.total_steps})})
        self.plan = plan_placement(model, self.mmap, placement, allow_frozen=self.recipe.trains_router)
        model = apply_placement(model, self.plan)
        if self.continual is not None:
            model = self.continual.setup(model, self.plan)
            self.continual.prepare(self.objective)
            if self.recipe.trains_router:  # the router's weights reach into the vision tower: autograd must too
                t = t.model_copy(update={"frozen_no_grad": False})
        if not any(p.requires_grad for p in model.parameters()):
            raise MmloraError("nothing would train: the placement is all frozen and the continual section adds nothing "
                              "trainable (a uniform router over frozen experts: write it with "
                              "mmlora.train.continual.write_router_run instead)")
        self.initial_adapters = save_initial_state(model, self.plan)
        self.audit = StagedAudit(self.mmap, self.initial_adapters, self.accelerator.print)
        self.allocation = AllocationTracker(model, self.plan) if self.plan.adalora is not None else None
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.speedups = apply_speedups(model, self.mmap, t, self.objective)
        if self.packing is not None:
            self.speedups["packing"] = self.packing
        return model

    def _setup_optimizer(self, model: nn.Module) -> None:
        groups, self.group_infos = param_groups(model, self.mmap, self.plan, self.recipe.train)
        optimizer, self.scheduler = build_optimizer(groups, self.recipe.train, self.total_steps)
        if self.accelerator.num_processes > 1 and len(set(self.train_set.has_image())) > 1:
            # A text-only batch leaves the vision tower and the projector unused: DDP must expect that.
            from accelerate.utils import DistributedDataParallelKwargs

            handler = self.accelerator.ddp_handler or DistributedDataParallelKwargs()
            handler.find_unused_parameters = True
            self.accelerator.ddp_handler = handler
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def _setup_run_folder(self) -> None:
        """The run folder: resume from its latest checkpoint, or start it (recipe, run info, metrics)."""
        t = self.recipe.train
        self.fingerprint = fingerprint(self.recipe, self.plan, len(self.train_set), self.accelerator.num_processes,
                                       self.global_batch, self.continual.fingerprint() if self.continual is not None else None)
        self.processes.on_main("the run folder", self.out, lambda: self.out.mkdir(parents=True, exist_ok=True))
        self._resume()
        if self.step == 0:
            self.processes.on_main("the run info", self.out, self._write_run_info)
        if t.trackers:
            self.accelerator.init_trackers(self.out.name, config={"recipe": json.loads(self.recipe.model_dump_json())})

    def _write_run_info(self) -> None:
        self.run.recipe_file.write_text(recipe_yaml(self.recipe))
        info = run_info(self.accelerator.num_processes, self.global_batch, self.total_steps, self.group_infos, self.speedups)
        self.run.run_info_file.write_text(json.dumps(info, indent=2) + "\n")
        self.run.metrics_file.write_text("")

    def _event(self, where: str) -> None:
        if self.on_event is not None:
            self.on_event(where, self.step)

    # ------------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        found = ckpt.resumable(self.recipe.train.resume, self.run.checkpoints, self.fingerprint)
        if found is None:
            return
        state = ckpt.load_trainer_state(found)
        ckpt.load_trainable(found, self.accelerator.unwrap_model(self.model))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        if self.allocation is not None and "adalora" in state:
            self.allocation.load_state_dict(self.accelerator.unwrap_model(self.model), state["adalora"])
        self.audit.load_state_dict(state.get("audit"))
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.processes.on_main(self.run.metrics_file.name, self.run.metrics_file, lambda: self.run.keep_metrics(self.step))
        self.skips.read_back()
        self.accelerator.print(f"resumed from {found} at step {self.step}")

    def save_checkpoint(self) -> Path | None:
        """Checkpoint ``step-NNNNNN`` (and the skip report); the path on the main process, else None."""
        self.accelerator.wait_for_everyone()
        self.skips.write()
        root = self.run.checkpoints

        def write() -> Path:
            tmp = ckpt.begin(root, self.step)
            model = self.accelerator.unwrap_model(self.model)
            save_placement(model, self.plan, tmp, self.recipe.model.name, convert=False)
            if self.continual is not None:
                self.continual.save(tmp)
            ckpt.save_trainable(tmp, model)
            self._event("during-save")
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "sampler": self.sampler.state_dict(), "rng": ckpt.rng_state(), "step": self.step,
                     "audit": self.audit.state_dict()}
            if self.allocation is not None:
                state["adalora"] = self.allocation.state_dict(model)
                self.allocation.write(self.out)
            ckpt.save_trainer_state(tmp, state)
            ckpt.save_fingerprint(tmp, self.fingerprint)
            self.objective.save_processor(tmp)
            Weights(tmp).write_recipe(self.recipe)
            return ckpt.commit(root, tmp, self.step, self.recipe.train.keep_last)

        name = ckpt.step_name(self.step)
        return self.processes.on_main(f"checkpoint {name}", root / name, write, cleanup=ckpt.tmp_folder(root, self.step))

    # ------------------------------------------------------------------ the loop

    def _global_batches(self):
        while True:
            yield from self.sampler

    def train_step(self, indices: list[int]) -> tuple[float, int] | None:
        """One optimizer step on a global batch; returns (mean loss per unit, units): units are
        supervised tokens for captioning, samples for contrastive training. Returns None, taking no
        step, when every sample of the global batch was skipped as bad (``data.on_bad_sample: skip``).

        The processes first agree on the step's work (its units, and the samples skipped since the
        last step): a process without a usable micro-batch runs a zero-weight stand-in, and when no
        process has one, all of them skip the batch (or stop, if no training sample is usable)."""
        mine = process_slice(indices, self.accelerator.process_index, self.accelerator.num_processes)
        micro, bad, tokens = micro_batches(self.train_set, mine, self.collate, self.recipe.train, self.objective.unit)
        cells = sum(b["input_ids"].numel() for b in micro) if tokens else 0  # padding included
        new_skips = self.skips.new()
        total_units, total_bad, n_new, tokens, cells = self.processes.all_sums(
            sum(self.objective.units(b) for b in micro), bad, len(new_skips), tokens, cells)
        self.step_tokens = (int(tokens), int(cells))
        if n_new:
            self.skips.add(new_skips)
        if total_units == 0:
            if total_bad == len(indices):
                if self.skips.first_usable(None) is None:
                    raise self.skips.all_skipped()
                self.accelerator.print(f"step {self.step + 1}: every sample of the global batch was skipped as bad; "
                                       "training on the next one")
                return None
            raise MmloraError(f"step {self.step + 1}: the global batch has nothing to learn from (no supervised {self.objective.unit})")
        world = self.accelerator.num_processes
        weights = [world / total_units] * len(micro)
        if not micro:
            micro, weights = [stand_in(self.train_set, indices, self.collate, self.skips, self.step)], [0.0]
        has_images = any(key in b for b in micro for key in IMAGE_KEYS)
        loss_sum = 0.0
        self.model.train()
        for k, (batch, weight) in enumerate(zip(micro, weights)):
            batch = {key: v.to(self.accelerator.device) for key, v in batch.items()}
            sync = k == len(micro) - 1
            ctx = self.accelerator.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx, self.accelerator.autocast():
                s, _ = self.objective.loss_sum(self.model, batch)
                # DDP averages gradients over processes: scale so the result is sum / global tokens.
                total = s * weight
                if sync and self.allocation is not None:  # AdaLoRA's orthogonality term, once per step
                    reg = self.allocation.regularizer(self.accelerator.unwrap_model(self.model))
                    if reg is not None:
                        total = total + reg
                if sync and self.continual is not None:  # O-LoRA's orthogonality term, once per step
                    pen = self.continual.penalty(self.accelerator.unwrap_model(self.model))
                    if pen is not None:
                        total = total + pen
                self.accelerator.backward(total)
            loss_sum += float(s.detach()) if weight else 0.0
        loss = self.processes.all_sums(loss_sum)[0] / total_units
        if not math.isfinite(loss):
            last = ckpt.latest(self.run.checkpoints)
            raise MmloraError(f"loss is {loss} at step {self.step + 1}; stopping. Last good checkpoint: {last or 'none'}")
        self.watch.loss(loss)
        norm = None
        if self.recipe.train.max_grad_norm:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.recipe.train.max_grad_norm)
        self.watch.gradients(self.model, self.step + 1, norm)
        self.audit.after_backward(self.accelerator.unwrap_model(self.model), self.step, has_images)
        self.optimizer.step()
        self.step_lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}  # the rates this step used
        self.allocated = None
        if self.allocation is not None:
            self.allocated = self.allocation.step(self.accelerator.unwrap_model(self.model), self.step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, int(total_units)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss per supervised token over the validation set (all processes share the work)."""
        if self.val_set is None:
            return None
        # The unwrapped model: processes may run different numbers of validation batches, and a DDP
        # forward would wait for the others (buffer broadcast).
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        size = self.recipe.train.batch_size
        idx = list(range(rank, len(self.val_set), world))
        total, tokens = 0.0, 0
        for k in range(0, len(idx), size):
            batch = self.objective.collate([self.val_set[i] for i in idx[k:k + size]])
            if batch is None:
                continue
            batch = {key: v.to(self.accelerator.device) for key, v in batch.items()}
            with self.accelerator.autocast():
                s, n = self.objective.loss_sum(model, batch)
            total, tokens = total + float(s), tokens + n
        total, tokens = self.processes.all_sums(total, tokens)
        return total / tokens if tokens else None

    @torch.no_grad()
    def run_evaluators(self, final: bool = False) -> dict[str, float]:
        """The evaluators due at this step (main process; the others wait)."""
        due = [e for e in self.evaluators if final or self.step % e.every == 0]
        out: dict[str, float] = {}
        if due and self.is_main:
            model = self.accelerator.unwrap_model(self.model)
            model.eval()
            for evaluator in due:
                out.update(evaluator(model, self.objective.processor))
        if due:
            self.accelerator.wait_for_everyone()
        return out

    def train(self) -> dict[str, Any]:
        """Steps until ``total_steps``, then the last checkpoint and ``final/``; returns a summary."""
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.is_main, desc="train", dynamic_ncols=True)
        try:  # closed whatever happens, so that an error message starts on a line of its own
            last_val = self._steps(bar)
        finally:
            bar.close()
        self.save_checkpoint()
        final = self.save_final()
        self.model = self.accelerator.unwrap_model(self.model)  # the DDP wrapper goes first (Processes.end)
        self.processes.end()
        report = self.run.bad_samples_file if self.recipe.data.on_bad_sample == "skip" else None
        return {"steps": self.step, "final": final, "val_loss": last_val, "skipped": len(self.skips),
                "bad_samples": report, "allocation": self.allocation_text}

    def _steps(self, bar) -> float | None:
        """The loop: train, log, evaluate and checkpoint each step; returns the last validation loss."""
        t = self.recipe.train
        batches = self._global_batches()
        start, done_samples, done_seq_tokens = time.perf_counter(), 0, 0
        last_val = None
        while self.step < self.total_steps:
            indices = next(batches)
            done = self.train_step(indices)
            done_samples += len(indices)
            if done is None:  # every sample of the batch was skipped as bad
                continue
            loss, tokens = done
            row: dict[str, Any] = {"step": self.step, "epoch": self.sampler.epoch, "loss": loss, f"{self.objective.unit}s": tokens,
                                   "lr": self.step_lrs, "skipped": len(self.skips)}
            if self.allocated is not None:  # AdaLoRA allocated: the effective rank per modality and the budget
                row["adalora_rank"] = self.allocated
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == self.total_steps):
                last_val = row["val_loss"] = self.evaluate()
            row.update(self.run_evaluators(final=self.step == self.total_steps))
            elapsed = max(time.perf_counter() - start, 1e-9)
            rate = done_samples / elapsed
            row["samples_per_s"] = rate
            seq_tokens, cells = self.step_tokens
            if cells:  # sequence tokens (image tokens included) per second, and this step's share of padding cells
                done_seq_tokens += seq_tokens
                row["seq_tokens_per_s"], row["padding"] = done_seq_tokens / elapsed, round(1 - seq_tokens / cells, 4)
            if self.step % t.log_every == 0 or "val_loss" in row or "adalora_rank" in row or self.step == self.total_steps:
                self.processes.on_main(self.run.metrics_file.name, self.run.metrics_file, lambda row=row: self._append_metrics(row))
            if t.trackers:
                self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=self.step)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{next(iter(self.step_lrs.values())):.2e}", samples_s=f"{rate:.1f}")
            bar.update(1)
            self._event("after-step")
            if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        return last_val

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.run.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save_final(self) -> Path | None:
        self.accelerator.wait_for_everyone()

        def write() -> Path:
            final = self.run.final
            model = self.accelerator.unwrap_model(self.model)
            save_placement(model, self.plan, final.folder, self.recipe.model.name, initial_adapters=self.initial_adapters)
            if self.continual is not None:
                self.continual.save(final.folder)
            self.objective.save_processor(final.folder)
            final.write_recipe(self.recipe)
            rows = self.run.metrics()
            loss_curve(rows, self.run.loss_curve_file, self.objective.unit)
            card = model_card(self.recipe, self.plan, rows)
            if self.allocation is not None:
                self.allocation_text, section = self.allocation.finish(self.out)
                card += "\n" + section
            final.card_file.write_text(card)
            return final.folder

        return self.processes.on_main("the final adapters", self.run.final.folder, write)

