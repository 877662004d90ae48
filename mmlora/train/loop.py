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

Run: ``mmlora train RECIPE [key=value ...]``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmlora.config.loading import recipe_to_yaml
from mmlora.config.schema import Recipe
from mmlora.data.batching import ConversationDataset, GroupedBatchSampler
from mmlora.errors import MmloraError
from mmlora.runs import checkpoint as ckpt


class Trainer:
    """``setup()`` → ``train()``; the run folder is ``train.output_dir`` (default ``runs/<recipe>``)."""

    def __init__(self, recipe: Recipe, recipe_name: str = "run", base_dir: Path | None = None):
        if recipe.data is None:
            raise MmloraError("the recipe has no data section: nothing to train on")
        self.recipe, self.base_dir = recipe, base_dir
        self.out = Path(recipe.train.output_dir or Path("runs") / recipe_name)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from mmlora.data.build import mix, read_dataset
        from mmlora.models.loading import resolve_pretrained
        from mmlora.objectives.core import objective_for
        from mmlora.placement.apply import apply_placement, enable_gradient_checkpointing
        from mmlora.placement.plan import plan_placement
        from mmlora.train.optim import build_optimizer, param_groups
        from mmlora.models.precision import load_for_training
        from mmlora.train.speed import apply_speedups

        r, t = self.recipe, self.recipe.train
        # Without CUDA, say cpu=True: only then does Accelerate read torchrun's environment as a
        # multi-process CPU (gloo) run instead of starting every process as a single-process run.
        self.accelerator = Accelerator(mixed_precision=t.mixed_precision, log_with=t.trackers or None,
                                       project_dir=str(self.out), cpu=not torch.cuda.is_available())
        self.is_main = self.accelerator.is_main_process
        set_seed(t.seed)
        model, self.mmap = load_for_training(r.model, r.placement, t.quantization, t.attn_implementation)
        data = r.data
        self.objective = objective_for(model, resolve_pretrained(r.model.name), data, t.dense, self.base_dir)

        def dataset(specs):
            records = mix([(read_dataset(d, self.base_dir), d.weight) for d in specs], t.seed)
            return ConversationDataset(records, self.objective.encoder, data.on_bad_sample)

        self.train_set = dataset(data.train)
        self.val_set = dataset(data.val) if data.val else None
        if len(self.train_set) == 0:
            raise MmloraError("the training data has no usable sample")
        if t.init_from:
            self._init_from(model, Path(t.init_from))
        self.global_batch = t.batch_size * t.grad_accum * self.accelerator.num_processes
        image_tokens = self._image_tokens()
        self.sampler = GroupedBatchSampler(self.train_set.lengths(image_tokens), self.train_set.has_image(),
                                           self.global_batch, seed=t.seed, group_by_length=data.group_by_length)
        steps_per_epoch = len(self.sampler.batches(0))
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        placement = r.placement
        if placement.adalora is not None and placement.adalora.total_step is None:
            placement = placement.model_copy(update={"adalora": placement.adalora.model_copy(update={"total_step": self.total_steps})})
        self.placement = placement
        self.plan = plan_placement(model, self.mmap, placement)
        model = apply_placement(model, self.plan, placement)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.speedups = apply_speedups(model, self.mmap, t, self.objective)
        groups, self.group_infos = param_groups(model, self.mmap, placement, t)
        optimizer, self.scheduler = build_optimizer(groups, t, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.collate = self.objective.collate
        self.step = 0
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

    def _init_from(self, model, run: Path) -> None:
        """Start from an earlier run's final weights: full modules into the base now, adapters after
        placement (by matching adapter and module names)."""
        final = run / "final" if (run / "final").is_dir() else run
        if not (final / "manifest.json").is_file():
            raise MmloraError(f"train.init_from: no final/manifest.json in {run}")
        manifest = json.loads((final / "manifest.json").read_text())
        if manifest.get("full_modules"):
            from safetensors.torch import load_file

            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in load_file(str(final / manifest["full_modules"]["path"])).items():
                    if k not in params:
                        raise MmloraError(f"train.init_from: {k} (from {final}) is not a parameter of this model")
                    params[k].copy_(v.to(params[k].dtype))
        if manifest["adapters"]:
            # Merge earlier adapters into the base: the new stage trains its own adapters on top.
            from mmlora.runs.save import load_placement

            merged = load_placement(model, final)
            merged.merge_and_unload()

    def _write_run_info(self) -> None:
        import importlib.metadata as md
        import subprocess

        (self.out / "recipe.yaml").write_text(recipe_to_yaml(self.recipe))
        versions = {p: md.version(p) for p in ("torch", "transformers", "peft", "accelerate", "bitsandbytes",
                                                "datasets", "open_clip_torch")}
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
        from mmlora import __version__

        info = {"mmlora": __version__, "git_commit": commit, "versions": versions, "python": sys.version.split()[0],
                "processes": self.accelerator.num_processes, "global_batch": self.global_batch,
                "total_steps": self.total_steps, "groups": [g.__dict__ for g in self.group_infos],
                "speedups": self.speedups}
        (self.out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        (self.out / "metrics.jsonl").write_text("")

    # ------------------------------------------------------------------ checkpoints

    def _resume(self) -> None:
        t = self.recipe.train
        if t.resume == "never":
            return
        found = ckpt.latest(self.out / "checkpoints") if t.resume == "auto" else Path(t.resume)
        if found is None:
            return
        if not (found / ckpt.COMPLETE).is_file():
            raise MmloraError(f"train.resume: {found} is not a complete checkpoint")
        from safetensors.torch import load_file

        state = torch.load(found / "trainer_state.pt", weights_only=True)
        model = self.accelerator.unwrap_model(self.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in load_file(str(found / "trainable.safetensors")).items():
                params[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        self.step = int(state["step"])
        if self.is_main:  # the metrics after the checkpoint are rewritten by the resumed run
            rows = [line for line in (self.out / "metrics.jsonl").read_text().splitlines()
                    if line and json.loads(line)["step"] <= self.step]
            (self.out / "metrics.jsonl").write_text("".join(row + "\n" for row in rows))
        self.accelerator.print(f"resumed from {found} at step {self.step}")

    def save_checkpoint(self) -> Path | None:
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        from safetensors.torch import save_file

        from mmlora.runs.save import save_placement

        root = self.out / "checkpoints"
        tmp = ckpt.begin(root, self.step)
        model = self.accelerator.unwrap_model(self.model)
        save_placement(model, self.plan, tmp, self.recipe.model.name, convert=False)
        save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                  str(tmp / "trainable.safetensors"))
        self._maybe_die("during-save")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "sampler": self.sampler.state_dict(), "rng": ckpt.rng_state(), "step": self.step},
                   tmp / "trainer_state.pt")
        self.objective.save_processor(tmp)
        (tmp / "recipe.yaml").write_text(recipe_to_yaml(self.recipe))
        return ckpt.commit(root, tmp, self.step, self.recipe.train.keep_last)

    def _maybe_die(self, where: str) -> None:
        """Test hook: ``MMLORA_TEST_KILL=<where>@<step>`` SIGKILLs this process there."""
        if os.environ.get("MMLORA_TEST_KILL") == f"{where}@{self.step}":
            os.kill(os.getpid(), signal.SIGKILL)

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
            last = ckpt.latest(self.out / "checkpoints")
            raise MmloraError(f"loss is {loss} at step {self.step + 1}; stopping. Last good checkpoint: {last or 'none'}")
        if self.step == 0:
            from mmlora.placement.audit import audit_gradients

            audit_gradients(self.accelerator.unwrap_model(self.model))
        if self.recipe.train.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.recipe.train.max_grad_norm)
        self.optimizer.step()
        self.step_lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}  # the rates this step used
        if self.placement.adalora is not None:
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
    def caption_metrics(self) -> dict[str, float]:
        """The in-training hook: caption a validation subset, score it (main process; the others wait)."""
        from mmlora.data.samples import CAPTION_PROMPT
        from mmlora.eval.caption import CaptionSet, score_captions
        from mmlora.generate import generate_answers
        from mmlora.showcase.slots import mean_slot_accuracy

        spec = self.recipe.train.caption_eval
        out: dict[str, float] = {}
        if self.is_main and hasattr(self.objective, "processor"):
            from mmlora.data.samples import load_image

            data = CaptionSet.from_coco(spec.coco, limit=spec.limit)
            images = [load_image(data.files[i], str(data.files[i]), str(i)) for i in data.image_ids]
            model = self.accelerator.unwrap_model(self.model)
            model.eval()
            captions = generate_answers(model, self.objective.processor, images, spec.prompt or CAPTION_PROMPT,
                                         max_new_tokens=spec.max_new_tokens)
            results = dict(zip(data.image_ids, captions))
            scores = score_captions(results, data.references) | mean_slot_accuracy(results, data.objects)
            out = {f"caption/{k}": v for k, v in scores.items() if isinstance(v, float)}
        self.accelerator.wait_for_everyone()
        return out

    def train(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

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
            if t.caption_eval and (self.step % t.caption_eval.every == 0 or self.step == self.total_steps):
                row.update(self.caption_metrics())
            rate = done_samples / max(time.perf_counter() - start, 1e-9)
            row["samples_per_s"] = rate
            if self.is_main and (self.step % t.log_every == 0 or "val_loss" in row or self.step == self.total_steps):
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            if t.trackers:
                self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=self.step)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{next(iter(self.step_lrs.values())):.2e}", samples_s=f"{rate:.1f}")
            bar.update(1)
            self._maybe_die("after-step")
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
        from mmlora.runs.save import save_placement
        from mmlora.runs.card import loss_curve, model_card

        final = self.out / "final"
        model = self.accelerator.unwrap_model(self.model)
        save_placement(model, self.plan, final, self.recipe.model.name)
        self.objective.save_processor(final)
        (final / "recipe.yaml").write_text(recipe_to_yaml(self.recipe))
        rows = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line]
        loss_curve(rows, self.out / "loss_curve.png", self.objective.unit)
        (final / "README.md").write_text(model_card(self.recipe, self.plan, rows))
        return final

