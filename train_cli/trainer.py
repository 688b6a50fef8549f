"""The self-distillation training loop (METHOD.md sections 3-5).

Per optimizer step: draw k (and the region-grid offset, from an independent generator); for each
micro-batch, lay the documents out, run the student, write its greedy drafts into the mask slots
(student forcing), run the frozen teacher on that copy, and apply the loss strategy to the
supervised positions. The student keeps float32 master weights; ``dtype`` bf16/fp16 is the compute
precision (autocast), so that updates of lr 1e-5 are not rounded away.

A step's loss is the uniform mean over every supervised position of the global batch (METHOD.md
section 4): each micro-batch's mean is weighted by its share of the step's supervised positions,
across micro-batches and ranks (with per-rank k, a rank with a larger k has more positions). Mask
ids are never a prediction: they are left out of the student's drafts, of the teacher's targets
and of the validation's argmax.

A step whose loss or gradient norm is NaN/inf stops the run before its update (``--on-nonfinite
stop``) or has its update skipped (``skip``, up to ``--max-nonfinite`` steps). Ctrl-C (SIGINT) lets
the current step finish, saves its checkpoint and raises ``TrainingInterrupted``; a second Ctrl-C
stops at once (a single process only: torchrun forwards the first one to its workers again).
Weights that are not finite after an update are never written: a checkpoint or the export of them
raises ``NonFiniteWeights``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from mtp_plugins import adapter_checkpoint, adapters
from mtp_plugins.checkpoint import add_mask_tokens, loading, read_mtp_spec, weights_source
from mtp_plugins.hooks import plugin_manager
from mtp_plugins.layout import Layout, LayoutGeometry, build_layout
from mtp_plugins.modeling import attention_for, logits_at
from mtp_plugins.registry import load_loss
from train_cli import checkpoints, distributed
from train_cli.config import ConfigError, TrainConfig, check_resumed
from train_cli.data import SHOT_SEPARATOR, DataPosition, Documents, Sampler, held_out_indices, load_rows
from train_cli.gated import gated_logits

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TAU = 0.9  # the ConfAdapt threshold whose Eff. k validation estimates
# An estimate from one pass over ground-truth text (the leading run of confident offsets per region),
# not the Eff. k of decoding, which feeds the model's own tokens: named for what it is.
EST_EFF_K = f"est_eff_k_tau_{TAU}_one_pass"
NEVER = -1e4  # the logit of an id that is never a target (finite: soft-kl's 0 * log 0 stays 0)


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss or gradient norm stopped the run; no checkpoint was written from that state."""


class NonFiniteWeights(NonFiniteLoss):
    """An update left weights that are not finite; they were not written (checkpoint or export)."""


#: Ctrl-Cs during start-up, recorded by ``mtp-train``'s handler (which also raises KeyboardInterrupt
#: at once). A library that swallows the KeyboardInterrupt (seen inside ``datasets`` while it builds a
#: split) cannot lose one: ``run`` raises it again before the loop starts and anything is written.
startup_sigints: list[int] = []


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
        if config.teacher_temperature != 1.0 and not self.loss_fn.needs_teacher:
            raise ConfigError(
                f"--teacher-temperature {config.teacher_temperature} does nothing with --loss {config.loss}: it uses no "
                "teacher; leave it at 1"
            )
        self.output_dir = config.output_path
        # Gated adapters over the frozen base: the teacher is the same weights with the gate off.
        self.gated = config.trainable == "gated-lora"
        self.training = False  # the loop has started (a Ctrl-C before it saves nothing)
        self.damaged: list[tuple[Path, str]] = []  # checkpoints newer than the resumed one, not intact
        self._banned: torch.Tensor | None = None

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
        """Check the inputs, load models, data, optimizer; with ``resume``, restore the newest intact
        checkpoint's state. Every check that needs no model comes before the first one loads."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress display is the one to watch

        c = self.config
        checkpoints.check_output_dir(self.output_dir)
        resume_from, state = self._resume_point(resume)
        train_rows, held = load_rows(c)  # before the models: a bad data file is named without waiting for them
        source = resume_from or c.model
        self._check_model_spec(c.model if self.gated else source)
        if self.gated:
            self._load_gated(source)
        else:
            self._load_models(source)
        examples = Documents(train_rows, self.tokenizer, c)  # the data's own rows: --context-shots' examples
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
        self._make_optimizer()
        self.step, self.tokens_seen, self.nonfinite_skipped = 0, 0, 0
        self.interrupted = False  # set by the SIGINT handler
        self.stopping = False  # some rank was interrupted (agreed by all ranks at each step)
        position = self._restore(resume_from, state) if resume_from is not None else DataPosition()
        self.sampler = Sampler(len(train_rows), c.seed, excluded, position)
        self.examples = examples
        # Examples are the data's rows, never a held-out one (rollout row i answers data row i +
        # rollout_shots); validation always shows the first ones.
        held_rows = {i + c.rollout_shots for i in excluded} if c.rollouts and c.max_steps != 0 else excluded
        self.example_pool = [i for i in range(len(examples)) if i not in held_rows]
        if c.context_shots and len(self.example_pool) < c.context_shots:
            raise ConfigError(f"--context-shots {c.context_shots}: only {len(self.example_pool)} training rows to draw examples from")
        if c.follow_example and not self.example_pool:
            raise ConfigError("--follow-example: no training rows to follow the documents with")
        self.eval_context = self._context(self.example_pool[: c.context_shots])

    def _load_models(self, source: str | Path) -> None:
        """Tokenizer and student from ``source`` (the model, or the checkpoint resumed), the frozen
        teacher from the model; sharded under torchrun."""
        from transformers import AutoTokenizer

        c = self.config
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

    def _load_gated(self, source: str | Path) -> None:
        """``--trainable gated-lora``: the base model, frozen, once (in the compute dtype on one
        process), with gated adapters and trainable mask rows in float32; ``source``, a checkpoint
        being resumed, gives the tokenizer and the adapter's weights. No teacher is loaded."""
        from transformers import AutoTokenizer

        c = self.config
        with loading(source):
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=c.trust_remote_code)
        self.student = self._load_model(c.model, torch.float32 if self.dist.enabled else self.compute_dtype)
        self.student.requires_grad_(False)
        self.spec = add_mask_tokens(self.student, self.tokenizer, num_tokens=c.mask_tokens, k_max=c.k_max)
        settings = adapters.AdapterSettings(c.lora_rank, c.lora_alpha, adapters.parse_targets(c.lora_targets))
        adapters.attach_gated_lora(self.student, self.spec.mask_token_ids, settings, dtype=torch.float32,
                                   seed=_stream(c.seed, 3))
        adapters.train_mask_rows(self.student, self.spec.mask_token_ids, dtype=torch.float32)
        if Path(source) != Path(c.model):
            adapter_checkpoint.load_adapter_weights(self.student, Path(source), self.spec.mask_token_ids)
        self.base_hash = adapter_checkpoint.weights_hash(c.model)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.teacher = None
        if self.dist.enabled:
            distributed.shard(self.student, self.compute_dtype if self.fsdp_casts else None, False)

    def _adapter(self) -> dict[str, Any] | None:
        """How checkpoints and the export are written: ``save_adapter``'s arguments (gated-lora)."""
        if not self.gated:
            return None
        return {"base": self.config.model, "base_hash": self.base_hash}

    def _check_model_spec(self, source: str | Path) -> None:
        """An MTP checkpoint given as ``--model`` keeps its mask tokens: a ``--mask-tokens`` or
        ``--k-max`` it cannot serve is refused from its config alone, before its weights load."""
        from transformers import AutoConfig

        c = self.config
        with loading(source):
            model_config = AutoConfig.from_pretrained(source, trust_remote_code=c.trust_remote_code)
        spec = read_mtp_spec(model_config)
        if spec is None:
            return
        have = len(spec.mask_token_ids)
        if have != c.mask_tokens:
            raise ConfigError(
                f"--mask-tokens {c.mask_tokens}: {source} is an MTP checkpoint with {have} mask token(s) "
                f"(config.mtp.mask_token_ids {list(spec.mask_token_ids)}); use --mask-tokens {have}"
            )
        if not spec.shared_mask and c.k_max > have + 1:
            raise ConfigError(f"--k-max {c.k_max}: {source} has {have} per-slot mask tokens, so k_max <= {have + 1}")

    def _make_optimizer(self) -> None:
        c = self.config
        # Weight decay on the trained matrices: every weight matrix (all), the adapters' A and B
        # (gated-lora); never on embedding rows (mask-embeddings, the mask rows of gated-lora).
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        decays = {"all": lambda n, p: p.dim() >= 2, "gated-lora": lambda n, p: "mtp_lora_" in n}.get(
            c.trainable, lambda n, p: False)
        decay = [p for n, p in named if decays(n, p)]
        rest = [p for n, p in named if not decays(n, p)]
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

    def _restore(self, resume_from: Path, state: dict[str, Any]) -> DataPosition:
        """Optimizer, scheduler, RNG states and counters of the checkpoint; its data position."""
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
        return DataPosition(**state["data"])

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

    def _resume_point(self, resume: bool) -> tuple[Path | None, dict[str, Any] | None]:
        """With ``resume``: the newest intact checkpoint and its trainer state (a damaged newer one is
        named in a warning and set aside when the run starts), after checking that this config is
        the run's recorded one; without: a check that ``--output-dir`` holds no run yet."""
        if not resume:
            if checkpoints.complete_checkpoints(self.output_dir) or any((self.output_dir / m).exists() for m in checkpoints.MARKERS):
                raise ConfigError(
                    f"--output-dir {self.output_dir} already holds a run; pass --resume to continue it, "
                    "or choose another --output-dir"
                )
            return None, None
        path, state, self.damaged = checkpoints.resume_point(self.output_dir)
        recorded = path / checkpoints.CONFIG_FILE
        check_resumed(yaml.safe_load(recorded.read_text(encoding="utf-8")), self.config.to_dict(), recorded)
        if self.dist.is_main:
            for bad, why in self.damaged:
                print(f"mtp-train: warning: --resume: {bad} is damaged ({why}); resuming from {path.name} instead "
                      f"(it moves to {bad.with_name('damaged-' + bad.name)})", file=sys.stderr)
        return path, state

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
        if self.gated:  # three passes over one cache (train_cli/gated.py); no prefix loss (refused)
            student, teacher = gated_logits(
                self.student, layout, self.spec.mask_ids(k - 1), list(self.spec.mask_token_ids),
                dtype=self.compute_dtype, autocast=self.autocast, teacher=self.loss_fn.needs_teacher,
            )
            V = student.shape[-1]
        else:
            keep = torch.cat([columns, real_columns]) if c.prefix_loss_weight and train else columns
            with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.autocast):
                logits = logits_at(
                    self.student, keep, input_ids=layout.input_ids,
                    attention_mask=attention_for(self.student, layout.attention, self.compute_dtype),
                    position_ids=layout.position_ids,
                ).float()
            student = logits[:, : R * k].reshape(B, R, k, -1)
            teacher = None
            V = student.shape[-1]
            if self.teacher is not None:
                teacher = self._teacher_logits(layout, columns, self._drafts(student[:, :, : k - 1]), V)
        if teacher is not None and c.teacher_temperature != 1.0:
            teacher = teacher.float() / c.teacher_temperature  # the targets the loss sees (and validation's loss)
        weights = layout.supervised[:, :, None].expand(B, R, k).reshape(-1).float()
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

    def never_predicted(self, vocab: int) -> torch.Tensor:
        """[vocab] bool: ids that are never a prediction: the mask tokens, and the rows only the
        student has (past the teacher's embedding: the teacher could not even read them)."""
        if self._banned is None or self._banned.shape[0] != vocab:
            banned = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            banned[list(self.spec.mask_token_ids)] = True
            if self.teacher is not None:
                banned[self.teacher.get_input_embeddings().num_embeddings :] = True
            self._banned = banned
        return self._banned

    def _drafts(self, logits: torch.Tensor) -> torch.Tensor:
        """The student's greedy drafts at ``logits`` [..., V]: its argmax over the real tokens."""
        return logits.detach().masked_fill(self.never_predicted(logits.shape[-1]), -math.inf).argmax(dim=-1)

    def _teacher_logits(self, layout: Layout, columns: torch.Tensor, drafts: torch.Tensor, vocab: int) -> torch.Tensor:
        """Student forcing: the teacher on the layout with the student's drafts (offsets 1..k-1) in
        the mask slots; its logits at the supervised columns, [B, R, k, vocab], where the ids that are
        never a prediction (mask ids, the rows it lacks) get ``NEVER``."""
        B, R, k = drafts.shape[0], layout.geometry.regions, layout.geometry.k
        forced = layout.input_ids.clone()
        forced[:, layout.mask_columns.flatten()] = drafts.reshape(B, -1)
        with torch.no_grad():
            teacher = logits_at(
                self.teacher, columns, input_ids=forced,
                attention_mask=attention_for(self.teacher, layout.attention, self.compute_dtype),
                position_ids=layout.position_ids,
            ).float().reshape(B, R, k, -1)
        if teacher.shape[-1] < vocab:
            teacher = F.pad(teacher, (0, vocab - teacher.shape[-1]), value=NEVER)
        return teacher[..., :vocab].masked_fill(self.never_predicted(vocab), NEVER)

    def _context(self, examples: list[int]) -> list[int]:
        """Token ids of the worked examples at ``examples`` as a few-shot prompt shows them (each text
        followed by a blank line); [] for none."""
        text = self.examples.few_shot(examples)
        return list(self.tokenizer(text, add_special_tokens=True).input_ids) if text else []

    def _step_context(self) -> list[int]:
        """This step's ``--context-shots`` examples: distinct training rows drawn from a generator seeded
        by the seed and the step (so a resumed run draws what the uninterrupted one would have)."""
        n = self.config.context_shots
        if not n:
            return []
        generator = torch.Generator().manual_seed((_stream(self.config.seed, 4) + self.step) % 2**63)
        picked = torch.randperm(len(self.example_pool), generator=generator)[:n].tolist()
        return self._context([self.example_pool[i] for i in picked])

    def _follow(self, count: int, draw: int | None) -> list[str] | None:
        """``--follow-example``: the text after each of ``count`` documents, a blank line and a
        training row (never a held-out one) as a few-shot prompt shows the next example; None
        without it. ``draw``: drawn from a generator seeded by the seed, the step and ``draw``
        (a resumed run draws alike); None: the pool's rows in order after validation's context."""
        if not self.config.follow_example:
            return None
        pool = self.example_pool
        if draw is None:
            picked = [(self.config.context_shots + j) % len(pool) for j in range(count)]
        else:
            # One seed per (step, micro-batch) while grad_accum stays below 1009.
            seed = (_stream(self.config.seed, 5) + 1009 * self.step + draw) % 2**63
            picked = torch.randint(len(pool), (count,), generator=torch.Generator().manual_seed(seed)).tolist()
        return [SHOT_SEPARATOR + (self.examples.text(pool[i]) or "") for i in picked]

    def _layout(self, documents: Documents, indices: list[int], k: int, offset: int,
                context: list[int] | None = None, after: list[str] | None = None) -> Layout:
        """The step's layout of ``documents[indices]``, each after the ``context`` token ids (and
        followed by ``after``, see ``Documents.tokens``)."""
        context = context or []
        geometry = LayoutGeometry(self.config.seq_len, self.config.regions, k, offset, context=len(context))
        tokens = documents.tokens(indices, geometry.tokens_needed - len(context), special_tokens=not context,
                                  after=after)
        rows = [context + t if t else [] for t in tokens]
        return build_layout(rows, geometry, self.spec.mask_ids(k - 1), self.pad_id).to(self.device)

    def train_step(self) -> dict[str, Any]:
        c = self.config
        start = time.perf_counter()
        k = int(torch.randint(c.k_min, c.k_max + 1, (1,), generator=self.k_generator))
        real_per_region = c.seq_len // c.regions - (k - 1)
        offset = int(float(torch.rand(1, generator=self.offset_generator)) * real_per_region)
        self.student.train()
        rank, world = self.dist.rank, self.dist.world_size
        # One global micro-batch per step of the shared data order; each rank takes its share.
        context = self._step_context()
        layouts = []
        for micro in range(c.grad_accum):
            after = self._follow(c.micro_batch_size * world, micro)
            layouts.append(self._layout(self.documents, self.sampler.take(c.micro_batch_size * world)[rank::world], k,
                                        offset, context, None if after is None else after[rank::world]))
        counts = [int(layout.supervised.sum()) * k for layout in layouts]  # supervised positions
        everywhere = distributed.total(sum(counts), self.dist)
        total, tokens = 0.0, 0
        for layout, count in zip(layouts, counts):
            result = self.forward(layout, train=True)
            share = count / everywhere if everywhere else 1 / (c.grad_accum * world)
            # FSDP averages the gradients of the ranks: times world, each position weighs the same.
            (result.loss * (share * world)).backward()
            total += result.loss.item() * share
            tokens += result.tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.grad_clip))
        lr = self.scheduler.get_last_lr()[0]
        # Every rank's loss and Ctrl-C before the update, so that all ranks step, skip or stop alike
        # (the loss was read for the log anyway: checking it adds no device sync).
        per_rank = distributed.gather((k, total, tokens, self.interrupted, sum(counts)), self.dist)
        loss = sum(l for _, l, *_ in per_rank)  # each rank's part of the uniform mean
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self._nonfinite(loss, grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.stopping = any(stop for _, _, _, stop, _ in per_rank)
        tokens = sum(t for _, _, t, *_ in per_rank)
        self.tokens_seen += tokens
        seconds = time.perf_counter() - start
        metrics = {"step": self.step, "k": k, "offset": offset, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens": tokens, "tokens_seen": self.tokens_seen, "seconds": seconds, "tokens_per_s": tokens / seconds,
                   "nonfinite_skipped": self.nonfinite_skipped, "supervised_positions": everywhere}
        if self.dist.enabled:
            metrics["k_per_rank"] = [k for k, *_ in per_rank]
            metrics["supervised_positions_per_rank"] = [n for *_, n in per_rank]
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
        """Held-out loss at k = k_max; per offset j the rate at which the student's argmax (over the
        real tokens) equals the teacher's (or the data's, without a teacher); and a one-pass estimate
        of ConfAdapt's Eff. k at tau 0.9 on the ground-truth text (``EST_EFF_K``: per region, the
        leading run of offsets whose confidence is >= tau, at least 1; decoding feeds its own tokens
        instead, so this is not the Eff. k that ``generate`` reports)."""
        c = self.config
        k = c.k_max
        self.student.eval()
        losses, agree, counted, emitted, regions = [], torch.zeros(k), 0, 0, 0
        for i in range(0, len(self.eval_indices), c.micro_batch_size):
            indices = self.eval_indices[i : i + c.micro_batch_size]
            layout = self._layout(self.eval_documents, indices, k, 0, self.eval_context, self._follow(len(indices), None))
            result = self.forward(layout, train=False)
            mask = result.supervised  # [B, R]
            if not mask.any():
                continue
            losses.append((result.loss.item(), int(mask.sum())))
            reference = result.teacher.argmax(-1) if result.teacher is not None else layout.targets
            student = result.student.masked_fill(self.never_predicted(result.student.shape[-1]), -math.inf)
            agree += (student.argmax(-1) == reference)[mask].float().sum(0).cpu()
            counted += int(mask.sum())
            confidence = student.softmax(-1).amax(-1)[mask]  # [n, k]
            run = (confidence >= TAU).long().cumprod(dim=1).sum(dim=1).clamp(min=1)
            emitted += int(run.sum())
            regions += int(mask.sum())
        total = sum(n for _, n in losses)
        return {
            "step": self.step,
            "k": k,
            "loss": sum(v * n for v, n in losses) / total if total else float("nan"),
            "agreement": (agree / max(counted, 1)).tolist(),
            EST_EFF_K: emitted / regions if regions else 0.0,
            "regions": regions,
        }

    # ------------------------------------------------------------------ run

    def run(self, resume: bool = False) -> Path:
        self.setup(resume)
        if startup_sigints:  # a Ctrl-C of the start-up that a library swallowed
            raise KeyboardInterrupt
        c = self.config
        main = self.dist.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpoints.remove_leftovers(self.output_dir)
            for bad, _ in self.damaged:  # named in the warning at set-up
                checkpoints.move_aside(bad)
        distributed.barrier(self.dist)
        if main:
            self.hook.mtp_train_start(config=c.to_dict(), output_dir=str(self.output_dir), start_step=self.step, total_steps=c.max_steps)
        last: dict[str, Any] = {}
        self.training = True
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
        self.export()
        if main:
            summary = {"output_dir": str(self.output_dir), "step": self.step, "tokens_seen": self.tokens_seen, "last": last}
            self.hook.mtp_train_end(summary=summary)
        distributed.barrier(self.dist)
        return self.output_dir

    def export(self) -> None:
        """The final directory at ``--output-dir`` (an HF model, or a gated adapter checkpoint; rank 0)."""
        self._check_weights("the export")
        weights = distributed.full_model_state(self.student, self.dist)
        if self.dist.is_main:
            adapter = self._adapter()
            if adapter is not None:
                adapter["full"] = self.config.export == "full"
            checkpoints.export_model(self.output_dir, self.student, self.tokenizer, weights, self.config.to_dict(), adapter)

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

    def _check_weights(self, what: str) -> None:
        """Raise ``NonFiniteWeights`` (on every rank) before ``what`` is written from weights that are
        not all finite: an update can overflow them even when its loss and gradient were finite."""
        bad = [name for name, p in self.student.named_parameters()  # only updates change weights
               if p.requires_grad and not bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())]
        bad = sorted({name for names in distributed.gather(bad, self.dist) for name in names})
        if not bad:
            return
        newest = checkpoints.complete_checkpoints(self.output_dir)
        kept = f"the last checkpoint, {newest[-1]}, is untouched" if newest else "there is no earlier checkpoint"
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteWeights(
            f"step {self.step}: the weights are not finite after its update (NaN/inf in {bad[0]}{more}); "
            f"{what} is not written and {kept} (a smaller --lr keeps the updates finite)"
        )

    def _save(self) -> None:
        """Gathered checkpoint: rank 0 writes the whole model and optimizer state, every rank's RNG."""
        self._check_weights(f"the checkpoint of step {self.step}")
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
                self.config.keep_last, weights, self._adapter(),
            )
            self.hook.mtp_checkpoint_saved(path=str(path), step=self.step)
        distributed.barrier(self.dist)


def _stream(seed: int, stream: int, rank: int = 0) -> int:
    """Independent generator seeds from one user seed (k and the offset must not move together)."""
    return (seed * 0x9E3779B1 + stream * 0x85EBCA77 + rank * 0xC2B2AE3D) % (2**63)


def _device(name: str, local_rank: int | None = None) -> torch.device:
    """The device of this process (``cuda`` means this process's GPU under torchrun); a device this
    machine does not have is a ConfigError naming it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"--device {name}: {why}; use --device cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


def _compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16
    return DTYPES[name]
