"""The training loop: one readable file on Accelerate.

Supports: per-modality precision (QLoRA/QDoRA on 4-bit or 8-bit towers, verified after load);
placement through PEFT; optimizer groups per modality with their own learning rate, LoRA+ and no
decay on norms, biases and DoRA magnitudes; cosine/linear/constant schedules with warmup; gradient
accumulation with the loss normalised by the supervised tokens of the whole global batch (across
micro-steps and processes, so batch 2 x accumulation 4 is batch 8); logits only at supervised
positions; clipping; mixed precision; non-reentrant gradient checkpointing; AdaLoRA's rank
allocation; the gradient-flow audit at the first step; validation loss; atomic checkpoints with an
exact resume; NaN/inf detection; metrics.jsonl, trackers, a progress bar and a loss curve.

Distributed runs are whatever ``accelerate launch`` / ``torchrun`` starts (DDP, FSDP2, DeepSpeed):
every process draws the same seeded global batch and trains on its own slice of it.

In-training evaluations (``train.caption_eval``) and event callbacks are passed in
(``mmlora.train.hooks``): the loop imports no evaluation.

Run: ``mmlora train RECIPE [key=value ...]``.

Layer: train. Imports objectives, runs, data, placement, models, config and the foundation.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import math
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mmlora import __version__
from mmlora.config.loading import recipe_to_yaml as recipe_yaml
from mmlora.config.schema import Recipe
from mmlora.data.batching import ConversationDataset, GroupedBatchSampler
from mmlora.data.build import mix, read_dataset
from mmlora.errors import MmloraError
from mmlora.models.loading import resolve_pretrained
from mmlora.models.precision import load_for_training
from mmlora.objectives.select import objective_for
from mmlora.placement.apply import apply_placement, enable_gradient_checkpointing, save_initial_state
from mmlora.placement.audit import audit_gradients
from mmlora.placement.plan import plan_placement
from mmlora.runs import checkpoint as ckpt
from mmlora.runs.card import loss_curve, model_card
from mmlora.runs.layout import Run, Weights
from mmlora.runs.save import init_from_run, save_placement
from mmlora.train.hooks import Evaluator, EventHook
from mmlora.train.optim import build_optimizer, param_groups
from mmlora.train.speed import apply_speedups


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
        set_seed(t.seed)

    def _setup_model(self) -> nn.Module:
        """The base in its per-modality precision, its objective, and an earlier run's weights."""
        r, t = self.recipe, self.recipe.train
        model, self.mmap = load_for_training(r.model, r.placement, t.quantization, t.attn_implementation)
        self.objective = objective_for(model, resolve_pretrained(r.model.name), r.data, t.dense, self.base_dir)
        self.collate = self.objective.collate
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
        if len(self.train_set) == 0:
            raise MmloraError("the training data has no usable sample")
        self.global_batch = t.batch_size * t.grad_accum * self.accelerator.num_processes
        self.sampler = GroupedBatchSampler(self.train_set.lengths(self._image_tokens()), self.train_set.has_image(),
                                           self.global_batch, seed=t.seed, group_by_length=data.group_by_length)
        steps_per_epoch = len(self.sampler.batches(0))
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))

    def _setup_placement(self, model: nn.Module) -> nn.Module:
        """Plan and apply the placement; checkpointing and the speed switches on top."""
        t, placement = self.recipe.train, self.recipe.placement
        if placement.adalora is not None and placement.adalora.total_step is None:
            placement = placement.model_copy(update={"adalora": placement.adalora.model_copy(update={"total_step": self.total_steps})})
        self.plan = plan_placement(model, self.mmap, placement)
        model = apply_placement(model, self.plan)
        self.initial_adapters = save_initial_state(model, self.plan)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.speedups = apply_speedups(model, self.mmap, t, self.objective)
        return model

    def _setup_optimizer(self, model: nn.Module) -> None:
        groups, self.group_infos = param_groups(model, self.mmap, self.plan, self.recipe.train)
        optimizer, self.scheduler = build_optimizer(groups, self.recipe.train, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def _setup_run_folder(self) -> None:
        """The run folder: resume from its latest checkpoint, or start it (recipe, run info, metrics)."""
        t = self.recipe.train
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._resume()
        if self.is_main and self.step == 0:
            self._write_run_info()
        if t.trackers:
            self.accelerator.init_trackers(self.out.name, config={"recipe": json.loads(self.recipe.model_dump_json())})

    def _image_tokens(self) -> int:
        for i, s in enumerate(self.train_set.samples):
            if s.images:
                item = self.train_set[i]
                if item is not None and self.train_set.encoder.image_token_id is not None:
                    return int((item["input_ids"] == self.train_set.encoder.image_token_id).sum())
        return 0

    def _write_run_info(self) -> None:
        self.run.recipe_file.write_text(recipe_yaml(self.recipe))
        versions = {p: md.version(p) for p in ("torch", "transformers", "peft", "accelerate")}
        for p in ("bitsandbytes", "datasets", "open_clip_torch"):  # optional extras
            with contextlib.suppress(md.PackageNotFoundError):
                versions[p] = md.version(p)
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
        info = {"mmlora": __version__, "git_commit": commit, "versions": versions, "python": sys.version.split()[0],
                "processes": self.accelerator.num_processes, "global_batch": self.global_batch,
                "total_steps": self.total_steps, "groups": [g.__dict__ for g in self.group_infos],
                "speedups": self.speedups}
        self.run.run_info_file.write_text(json.dumps(info, indent=2) + "\n")
        self.run.metrics_file.write_text("")

    def _event(self, where: str) -> None:
        if self.on_event is not None:
            self.on_event(where, self.step)

    # ------------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        t = self.recipe.train
        if t.resume == "never":
            return
        found = ckpt.latest(self.run.checkpoints) if t.resume == "auto" else Path(t.resume)
        if found is None:
            return
        if not ckpt.is_complete(found):
            raise MmloraError(f"train.resume: {found} is not a complete checkpoint")
        state = ckpt.load_trainer_state(found)
        ckpt.load_trainable(found, self.accelerator.unwrap_model(self.model))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.is_main:  # the metrics after the checkpoint are rewritten by the resumed run
            rows = [line for line in self.run.metrics_file.read_text().splitlines()
                    if line and json.loads(line)["step"] <= self.step]
            self.run.metrics_file.write_text("".join(row + "\n" for row in rows))
        self.accelerator.print(f"resumed from {found} at step {self.step}")

    def save_checkpoint(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        root = self.run.checkpoints
        tmp = ckpt.begin(root, self.step)
        model = self.accelerator.unwrap_model(self.model)
        save_placement(model, self.plan, tmp, self.recipe.model.name, convert=False)
        ckpt.save_trainable(tmp, model)
        self._event("during-save")
        ckpt.save_trainer_state(tmp, {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                                      "sampler": self.sampler.state_dict(), "rng": ckpt.rng_state(), "step": self.step})
        self.objective.save_processor(tmp)
        Weights(tmp).write_recipe(self.recipe)
        return ckpt.commit(root, tmp, self.step, self.recipe.train.keep_last)

    # ------------------------------------------------------------------ the loop

    def _global_batches(self):
        while True:
            yield from self.sampler

    def _micro_batches(self, indices: list[int]) -> tuple[list[dict[str, torch.Tensor]], bool]:
        """This process's slice of a global batch, encoded and cut into ``grad_accum`` micro-batches.

        A process whose slice is empty (a last, short global batch) runs the last sample with weight
        0 instead, so that every process takes part in each forward and backward as DDP requires.
        Returns ``(batches, counts)``: ``counts`` is False for such a stand-in.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        per_process = math.ceil(len(indices) / world)
        mine = indices[rank * per_process:(rank + 1) * per_process]
        counts = bool(mine)
        mine = mine or indices[-1:]
        size = self.recipe.train.batch_size
        batches = []
        for k in range(0, len(mine), size):
            batch = self.collate([self.train_set[i] for i in mine[k:k + size]])
            if batch is not None:
                batches.append(batch)
        return batches, counts

    def _all_sum(self, value: float) -> float:
        if self.accelerator.num_processes == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum"))

    def train_step(self, indices: list[int]) -> tuple[float, int]:
        """One optimizer step on a global batch; returns (mean loss per unit, units): units are
        supervised tokens for captioning, samples for contrastive training."""
        micro, counts = self._micro_batches(indices)
        local_tokens = sum(self.objective.units(b) for b in micro) if counts else 0
        total_tokens = self._all_sum(local_tokens)
        if total_tokens == 0:
            raise MmloraError(f"step {self.step + 1}: the global batch has nothing to learn from (no supervised {self.objective.unit})")
        world = self.accelerator.num_processes
        weight = world / total_tokens if counts else 0.0
        loss_sum = 0.0
        self.model.train()
        for k, batch in enumerate(micro):
            batch = {key: v.to(self.accelerator.device) for key, v in batch.items()}
            sync = k == len(micro) - 1
            ctx = self.accelerator.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx, self.accelerator.autocast():
                s, _ = self.objective.loss_sum(self.model, batch)
                # DDP averages gradients over processes: scale so the result is sum / global tokens.
                self.accelerator.backward(s * weight)
            loss_sum += float(s.detach()) if counts else 0.0
        loss = self._all_sum(loss_sum) / total_tokens
        if not math.isfinite(loss):
            last = ckpt.latest(self.run.checkpoints)
            raise MmloraError(f"loss is {loss} at step {self.step + 1}; stopping. Last good checkpoint: {last or 'none'}")
        if self.step == 0:
            audit_gradients(self.accelerator.unwrap_model(self.model), initial_adapters=self.initial_adapters)
        if self.recipe.train.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.recipe.train.max_grad_norm)
        self.optimizer.step()
        self.step_lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}  # the rates this step used
        if self.plan.adalora is not None:
            self.accelerator.unwrap_model(self.model).base_model.update_and_allocate(self.step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, int(total_tokens)

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
            batch = self.collate([self.val_set[i] for i in idx[k:k + size]])
            if batch is None:
                continue
            batch = {key: v.to(self.accelerator.device) for key, v in batch.items()}
            with self.accelerator.autocast():
                s, n = self.objective.loss_sum(model, batch)
            total, tokens = total + float(s), tokens + n
        total, tokens = self._all_sum(total), self._all_sum(tokens)
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
        t = self.recipe.train
        batches = self._global_batches()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.is_main, desc="train", dynamic_ncols=True)
        start, done_samples = time.perf_counter(), 0
        last_val = None
        while self.step < self.total_steps:
            indices = next(batches)
            loss, tokens = self.train_step(indices)
            done_samples += len(indices)
            row: dict[str, Any] = {"step": self.step, "epoch": self.sampler.epoch, "loss": loss, f"{self.objective.unit}s": tokens,
                                   "lr": self.step_lrs}
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == self.total_steps):
                last_val = row["val_loss"] = self.evaluate()
            row.update(self.run_evaluators(final=self.step == self.total_steps))
            rate = done_samples / max(time.perf_counter() - start, 1e-9)
            row["samples_per_s"] = rate
            if self.is_main and (self.step % t.log_every == 0 or "val_loss" in row or self.step == self.total_steps):
                with open(self.run.metrics_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
            if t.trackers:
                self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=self.step)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{next(iter(self.step_lrs.values())):.2e}", samples_s=f"{rate:.1f}")
            bar.update(1)
            self._event("after-step")
            if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        final = self.save_final()
        if t.trackers:
            self.accelerator.end_training()
        return {"steps": self.step, "final": final, "val_loss": last_val}

    def save_final(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        final = self.run.final
        model = self.accelerator.unwrap_model(self.model)
        save_placement(model, self.plan, final.folder, self.recipe.model.name, initial_adapters=self.initial_adapters)
        self.objective.save_processor(final.folder)
        final.write_recipe(self.recipe)
        rows = self.run.metrics()
        loss_curve(rows, self.run.loss_curve_file, self.objective.unit)
        final.card_file.write_text(model_card(self.recipe, self.plan, rows))
        return final.folder
