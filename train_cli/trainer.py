"""The self-distillation training loop (METHOD.md sections 3-5).

Per optimizer step: draw k (and the region-grid offset, from an independent generator); for each
micro-batch, lay the documents out, run the student, write its greedy drafts into the mask slots
(student forcing), run the frozen teacher on that copy, and apply the loss strategy to the
supervised positions. The student keeps float32 master weights; ``dtype`` bf16/fp16 is the compute
precision (autocast), so that updates of lr 1e-5 are not rounded away.

A step whose loss or gradient norm is NaN/inf stops the run before its update (``--on-nonfinite
stop``) or has its update skipped (``skip``, up to ``--max-nonfinite`` steps). Ctrl-C (SIGINT) lets
the current step finish, saves its checkpoint and raises ``TrainingInterrupted``; a second Ctrl-C
stops at once (a single process only: torchrun forwards the first one to its workers again).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mtp_plugins.checkpoint import add_mask_tokens, loading, read_mtp_spec, weights_source
from mtp_plugins.hooks import plugin_manager
from mtp_plugins.layout import Layout, LayoutGeometry, build_layout
from mtp_plugins.modeling import attention_for, logits_at
from mtp_plugins.registry import load_loss
from train_cli import checkpoints, distributed
from train_cli.config import ConfigError, TrainConfig
from train_cli.data import DataPosition, Documents, Sampler, held_out_indices, load_rows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TAU = 0.9  # the ConfAdapt threshold whose Eff. k validation reports


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss or gradient norm stopped the run; no checkpoint was written from that state."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run after ``step``, whose checkpoint is ``checkpoint``."""

    def __init__(self, step: int, checkpoint: Path, main: bool) -> None:
        super().__init__(f"interrupted after step {step}, saved as {checkpoint}")
        self.step, self.checkpoint, self.main = step, checkpoint, main


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, with grad in training
    tokens: int  # real tokens the student saw
    student: torch.Tensor  # [B, R, k, V] logits at the supervised positions
    teacher: torch.Tensor | None
    supervised: torch.Tensor  # [B, R] bool


class Trainer:
    def __init__(self, config: TrainConfig, plugins: tuple[object, ...] = ()) -> None:
        self.config = config
        self.hook = plugin_manager(*plugins, report_to=config.report_to).hook
        self.dist = distributed.init(_device(config.device))
        self.device = _device(config.device, self.dist.local_rank if self.dist.enabled else None)
        self.compute_dtype = _compute_dtype(config.dtype, self.device)
        # On GPUs with several processes FSDP casts parameters itself; elsewhere autocast does.
        self.fsdp_casts = self.dist.enabled and self.device.type == "cuda"
        self.autocast = self.compute_dtype != torch.float32 and not self.fsdp_casts
        self.loss_fn = load_loss(config.loss)()
        self.output_dir = config.output_path

    # ------------------------------------------------------------------ set-up

    def _load_model(self, source: str | Path, dtype: torch.dtype) -> Any:
        from transformers import AutoModelForCausalLM

        weights = weights_source(source, allow_pickle=self.config.allow_pickle, opt_in="--allow-pickle")
        with loading(source):
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, trust_remote_code=self.config.trust_remote_code, **weights
            )
        return model.to(self.device)

    def setup(self, resume: bool = False) -> None:
        """Load models, data, optimizer; with ``resume``, restore the newest checkpoint's state."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress display is the one to watch

        c = self.config
        resume_from = self._resume_point(resume)
        train_rows, held = load_rows(c)  # before the models: a bad data file is named without waiting for them
        source = resume_from or c.model
        with loading(source):
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=c.trust_remote_code)
        self.student = self._load_model(source, torch.float32)
        self.spec = add_mask_tokens(self.student, self.tokenizer, num_tokens=c.mask_tokens, k_max=c.k_max)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.teacher = None
        if self.loss_fn.needs_teacher:
            self.teacher = self._load_model(c.model, self.compute_dtype).eval().requires_grad_(False)
        if self.dist.enabled:
            param_dtype = self.compute_dtype if self.fsdp_casts else None
            distributed.shard(self.student, param_dtype, c.activation_checkpointing)
            if self.teacher is not None and c.shard_teacher:
                distributed.shard(self.teacher, None, False)
        elif c.activation_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if c.rollouts and c.max_steps != 0:  # nothing is trained at --max-steps 0: no data needed
            train_rows = self._rollouts(train_rows)
        self.documents = Documents(train_rows, self.tokenizer, c)
        if held is not None:
            self.eval_documents = Documents(held, self.tokenizer, c)
            self.eval_indices = list(range(min(c.eval_rows, len(held))))
            excluded: set[int] = set()
        else:
            self.eval_documents = self.documents
            self.eval_indices = held_out_indices(len(train_rows), c.eval_rows, c.seed)
            excluded = set(self.eval_indices)
        if c.trainable == "mask-embeddings":
            self._train_mask_rows_only()
        params = [p for p in self.student.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2 and c.trainable == "all"]
        rest = [p for p in params if p.dim() < 2 or c.trainable != "all"]
        # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop: about
        # 0.3 s of a 5 s CPU step for 135M parameters. Sharded (DTensor) parameters keep the default.
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}],
            lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), fused=not self.dist.enabled,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        # k: one stream per rank (each rank draws its own horizon); the grid offset: one stream shared
        # by all ranks and independent of k (the original coupled the two).
        self.k_generator = torch.Generator().manual_seed(_stream(c.seed, 1, self.dist.rank))
        self.offset_generator = torch.Generator().manual_seed(_stream(c.seed, 2))
        self.step, self.tokens_seen, self.nonfinite_skipped = 0, 0, 0
        self.interrupted = False  # set by the SIGINT handler
        self.stopping = False  # some rank was interrupted (agreed by all ranks at each step)
        position = DataPosition()
        if resume_from is not None:
            state = checkpoints.load_state(resume_from)
            launch = (state.get("world_size", 1), state.get("torchrun", state.get("world_size", 1) > 1))
            if launch != (self.dist.world_size, self.dist.enabled):
                def describe(world: int, torchrun: bool) -> str:
                    return f"torchrun with {world} process(es)" if torchrun else "a single plain process"

                raise ConfigError(
                    f"--resume: {resume_from} was written by {describe(*launch)}; resume it the same way "
                    f"(this run is {describe(self.dist.world_size, self.dist.enabled)})"
                )
            distributed.load_optimizer_state(self.student, self.optimizer, state["optimizer"], self.dist)
            self.scheduler.load_state_dict(state["scheduler"])
            self.k_generator.set_state(state["rng"]["k"][self.dist.rank])
            self.offset_generator.set_state(state["rng"]["offset"])
            torch.set_rng_state(state["rng"]["torch"][self.dist.rank])
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
            position = DataPosition(**state["data"])
        self.sampler = Sampler(len(train_rows), c.seed, excluded, position)

    def _train_mask_rows_only(self) -> None:
        """Freeze every weight but the input embedding, and let only the mask tokens' rows move (their
        gradient is kept, every other row's is zeroed; no weight decay). Real tokens never see a
        mask token, so their forward pass, and greedy decoding, stay exactly the original model's."""
        if self.dist.enabled:
            raise ConfigError("--trainable mask-embeddings runs in one process (a sharded embedding cannot be row-masked here)")
        embedding = self.student.get_input_embeddings().weight
        for p in self.student.parameters():
            p.requires_grad_(p is embedding)
        rows = torch.zeros(embedding.shape[0], 1, dtype=embedding.dtype, device=embedding.device)
        rows[list(self.spec.mask_token_ids)] = 1
        embedding.register_hook(lambda grad: grad * rows)

    def _rollouts(self, rows: Any) -> Any:
        """The frozen model's own responses (generated once, on rank 0, kept in the run directory)."""
        from datasets import Dataset

        from train_cli.rollouts import rollout_rows

        if self.dist.enabled and (self.teacher is None or self.config.shard_teacher):
            raise ConfigError("--rollouts under torchrun needs a replicated teacher (a teacher loss, no --shard-teacher)")
        if self.dist.is_main:
            model = self.teacher if self.teacher is not None else self.student
            rows = rollout_rows(rows, model, self.tokenizer, self.config)
        distributed.barrier(self.dist)
        if not self.dist.is_main:
            from train_cli.rollouts import FILE

            rows = checkpoints.complete_jsonl(self.output_dir / FILE)[: self.config.rollouts]
        return Dataset.from_list(rows)

    def _resume_point(self, resume: bool) -> Path | None:
        existing = checkpoints.complete_checkpoints(self.output_dir)
        if resume:
            if not existing:
                raise ConfigError(f"--resume: no complete checkpoint in {checkpoints.checkpoint_dir(self.output_dir)}")
            return existing[-1]
        if existing or (self.output_dir / "config.json").exists():
            raise ConfigError(
                f"--output-dir {self.output_dir} already holds a run; pass --resume to continue it, "
                "or choose another --output-dir"
            )
        return None

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.schedule == "cosine" and c.max_steps:
            progress = (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    # ------------------------------------------------------------------ steps

    def forward(self, layout: Layout, *, train: bool) -> StepResult:
        """Student on the layout, student forcing, teacher, loss (and the optional extra terms)."""
        c = self.config
        B, R, k = layout.input_ids.shape[0], layout.geometry.regions, layout.geometry.k
        columns = layout.supervised_columns.flatten()
        real_columns = layout.real.any(dim=0).nonzero().flatten()
        keep = torch.cat([columns, real_columns]) if c.prefix_loss_weight and train else columns
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.autocast):
            logits = logits_at(
                self.student, keep, input_ids=layout.input_ids,
                attention_mask=attention_for(self.student, layout.attention, self.compute_dtype),
                position_ids=layout.position_ids,
            ).float()
        student = logits[:, : R * k].reshape(B, R, k, -1)
        teacher = None
        if self.teacher is not None:
            forced = layout.input_ids.clone()
            drafts = student[:, :, : k - 1].detach().argmax(dim=-1)  # offsets 1..k-1
            forced[:, layout.mask_columns.flatten()] = drafts.reshape(B, -1)
            with torch.no_grad():
                teacher = logits_at(
                    self.teacher, columns, input_ids=forced,
                    attention_mask=attention_for(self.teacher, layout.attention, self.compute_dtype),
                    position_ids=layout.position_ids,
                ).float().reshape(B, R, k, -1)
            extra = student.shape[-1] - teacher.shape[-1]
            if extra > 0:  # the mask rows the teacher lacks: it never predicts them
                teacher = F.pad(teacher, (0, extra), value=-1e4)
        weights = layout.supervised[:, :, None].expand(B, R, k).reshape(-1).float()
        V = student.shape[-1]
        loss = self.loss_fn(
            student.reshape(-1, V), None if teacher is None else teacher.reshape(-1, V), layout.targets.reshape(-1), weights
        )
        if c.prefix_loss_weight and train:
            targets = layout.next_tokens[:, real_columns]
            loss = loss + c.prefix_loss_weight * F.cross_entropy(
                logits[:, R * k :].reshape(-1, V), targets.reshape(-1), ignore_index=-100
            ).nan_to_num(0.0)
        if c.entropy_weight and train:
            log_p = F.log_softmax(student.reshape(-1, V), dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            loss = loss + c.entropy_weight * (entropy * weights).sum() / weights.sum().clamp(min=1)
        return StepResult(loss, int(layout.real.sum()), student, teacher, layout.supervised)

    def _layout(self, documents: Documents, indices: list[int], k: int, offset: int) -> Layout:
        geometry = LayoutGeometry(self.config.seq_len, self.config.regions, k, offset)
        tokens = documents.tokens(indices, geometry.tokens_needed)
        return build_layout(tokens, geometry, self.spec.mask_ids(k - 1), self.pad_id).to(self.device)

    def train_step(self) -> dict[str, Any]:
        c = self.config
        start = time.perf_counter()
        k = int(torch.randint(c.k_min, c.k_max + 1, (1,), generator=self.k_generator))
        real_per_region = c.seq_len // c.regions - (k - 1)
        offset = int(float(torch.rand(1, generator=self.offset_generator)) * real_per_region)
        self.student.train()
        total, tokens = 0.0, 0
        rank, world = self.dist.rank, self.dist.world_size
        for _ in range(c.grad_accum):
            # One global micro-batch per step of the shared data order; each rank takes its share.
            rows = self.sampler.take(c.micro_batch_size * world)[rank::world]
            layout = self._layout(self.documents, rows, k, offset)
            result = self.forward(layout, train=True)
            (result.loss / c.grad_accum).backward()
            total += result.loss.item() / c.grad_accum
            tokens += result.tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.grad_clip))
        lr = self.scheduler.get_last_lr()[0]
        # Every rank's loss and Ctrl-C before the update, so that all ranks step, skip or stop alike
        # (the loss was read for the log anyway: checking it adds no device sync).
        per_rank = distributed.gather((k, total, tokens, self.interrupted), self.dist)
        loss = sum(l for _, l, _, _ in per_rank) / len(per_rank)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self._nonfinite(loss, grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.stopping = any(stop for *_, stop in per_rank)
        tokens = sum(t for _, _, t, _ in per_rank)
        self.tokens_seen += tokens
        seconds = time.perf_counter() - start
        metrics = {"step": self.step, "k": k, "offset": offset, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens": tokens, "tokens_seen": self.tokens_seen, "seconds": seconds, "tokens_per_s": tokens / seconds,
                   "nonfinite_skipped": self.nonfinite_skipped}
        if self.dist.enabled:
            metrics["k_per_rank"] = [k for k, *_ in per_rank]
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def _nonfinite(self, loss: float, grad_norm: float) -> None:
        """The step being taken has a NaN/inf loss or gradient norm: raise ``NonFiniteLoss``, or count
        it and return (its update is then skipped) under ``--on-nonfinite skip`` within the limit."""
        c = self.config
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm} (loss {loss:.4g})"
        newest = checkpoints.complete_checkpoints(self.output_dir)
        kept = f"the last checkpoint, {newest[-1]}, is untouched" if newest else "no checkpoint was written"
        if c.on_nonfinite == "skip":
            self.nonfinite_skipped += 1
            if self.nonfinite_skipped <= c.max_nonfinite:
                return
            raise NonFiniteLoss(
                f"step {self.step + 1}: non-finite {what}; {self.nonfinite_skipped} such steps in this run, more than "
                f"--max-nonfinite {c.max_nonfinite} skipped; stopped, {kept}"
            )
        raise NonFiniteLoss(
            f"step {self.step + 1}: non-finite {what}; stopped before its update, {kept} "
            "(--on-nonfinite skip skips such steps instead)"
        )

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Held-out loss at k = k_max; per offset j the rate at which the student's argmax equals the
        teacher's (or the data's, without a teacher); and the Eff. k ConfAdapt at tau 0.9 would get."""
        c = self.config
        k = c.k_max
        self.student.eval()
        losses, agree, counted, emitted, regions = [], torch.zeros(k), 0, 0, 0
        for i in range(0, len(self.eval_indices), c.micro_batch_size):
            layout = self._layout(self.eval_documents, self.eval_indices[i : i + c.micro_batch_size], k, 0)
            result = self.forward(layout, train=False)
            mask = result.supervised  # [B, R]
            if not mask.any():
                continue
            losses.append((result.loss.item(), int(mask.sum())))
            reference = result.teacher.argmax(-1) if result.teacher is not None else layout.targets
            agree += (result.student.argmax(-1) == reference)[mask].float().sum(0).cpu()
            counted += int(mask.sum())
            confidence = result.student.softmax(-1).amax(-1)[mask]  # [n, k]
            run = (confidence >= TAU).long().cumprod(dim=1).sum(dim=1).clamp(min=1)
            emitted += int(run.sum())
            regions += int(mask.sum())
        total = sum(n for _, n in losses)
        return {
            "step": self.step,
            "k": k,
            "loss": sum(v * n for v, n in losses) / total if total else float("nan"),
            "agreement": (agree / max(counted, 1)).tolist(),
            "eff_k_tau_0.9": emitted / regions if regions else 0.0,
            "regions": regions,
        }

    # ------------------------------------------------------------------ run

    def run(self, resume: bool = False) -> Path:
        self.setup(resume)
        c = self.config
        main = self.dist.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpoints.remove_leftovers(self.output_dir)
            self.hook.mtp_train_start(config=c.to_dict(), output_dir=str(self.output_dir), start_step=self.step, total_steps=c.max_steps)
        last: dict[str, Any] = {}
        with self._sigint_stops_after_the_step():
            while not self._done():
                last = self.train_step()
                if main and (self.step % c.log_every == 0 or self._done()):
                    self.hook.mtp_step_end(step=self.step, metrics=last)
                if self.stopping and not self._done():
                    self._save()
                    raise TrainingInterrupted(self.step, checkpoints.checkpoint_path(self.output_dir, self.step), main)
                if self.eval_indices and (self.step % c.eval_every == 0 or self._done()):
                    metrics = self.validate()  # every rank takes part in the sharded forward passes
                    if main:
                        self.hook.mtp_validation_end(step=self.step, metrics=metrics)
                if self.step % c.save_every == 0 or self._done():
                    self._save()
        weights = distributed.full_model_state(self.student, self.dist)
        if main:
            checkpoints.export_model(self.output_dir, self.student, self.tokenizer, weights, c.to_dict())
            summary = {"output_dir": str(self.output_dir), "step": self.step, "tokens_seen": self.tokens_seen, "last": last}
            self.hook.mtp_train_end(summary=summary)
        distributed.barrier(self.dist)
        return self.output_dir

    @contextmanager
    def _sigint_stops_after_the_step(self) -> Iterator[None]:
        """Ctrl-C asks the loop to stop after the current step (signal handlers: main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """The first Ctrl-C asks for a stop after the step; a second one stops at once."""
        if self.interrupted:
            if not self.dist.enabled:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, the last checkpoint stays
            return
        self.interrupted = True
        if self.dist.is_main:  # os.write: print() could re-enter a write to stderr it interrupted
            os.write(2, b"mtp-train: Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: stop at once)\n")

    def _done(self) -> bool:
        c = self.config
        return (c.max_steps is not None and self.step >= c.max_steps) or (
            c.max_tokens is not None and self.tokens_seen >= c.max_tokens
        )

    def _save(self) -> None:
        """Gathered checkpoint: rank 0 writes the whole model and optimizer state, every rank's RNG."""
        weights = distributed.full_model_state(self.student, self.dist)
        optimizer = distributed.full_optimizer_state(self.student, self.optimizer, self.dist)
        rngs = distributed.gather((self.k_generator.get_state(), torch.get_rng_state()), self.dist)
        if self.dist.is_main:
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "world_size": self.dist.world_size,
                "torchrun": self.dist.enabled,
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "data": self.sampler.position.to_dict(),
                "nonfinite_skipped": self.nonfinite_skipped,
                "rng": {"k": [k for k, _ in rngs], "offset": self.offset_generator.get_state(),
                        "torch": [t for _, t in rngs]},
            }
            path = checkpoints.save_checkpoint(
                self.output_dir, self.step, self.student, self.tokenizer, state, self.config.to_dict(),
                self.config.keep_last, weights,
            )
            self.hook.mtp_checkpoint_saved(path=str(path), step=self.step)
        distributed.barrier(self.dist)


def _stream(seed: int, stream: int, rank: int = 0) -> int:
    """Independent generator seeds from one user seed (k and the offset must not move together)."""
    return (seed * 0x9E3779B1 + stream * 0x85EBCA77 + rank * 0xC2B2AE3D) % (2**63)


def _device(name: str, local_rank: int | None = None) -> torch.device:
    """The device of this process (``cuda`` means this process's GPU under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16
    return DTYPES[name]
