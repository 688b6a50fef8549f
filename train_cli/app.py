"""``mtp-train``: the Typer command. Training is the root command: ``mtp-train --loss soft-kl ...``.

Options mirror ``TrainConfig``; an option left out keeps the recipe's value (``--config``) or the
dataclass default, shown in ``--help``.
"""

from __future__ import annotations

import os
import shlex
import sys
from enum import Enum
from typing import Any, Optional

STARTUP_INTERRUPTED = "mtp-train: interrupted during start-up, before the first step; nothing was trained or saved"

try:  # Ctrl-C while the command is still importing: the same one line as later in the start-up
    import typer

    from train_cli.config import TrainConfig
except KeyboardInterrupt:
    print(STARTUP_INTERRUPTED, file=sys.stderr)
    sys.exit(130)

D = TrainConfig()  # the defaults, shown in --help; they live in the dataclass only


def _help(text: str, field: str) -> str:
    return f"{text} [default: {getattr(D, field)}]"


class Template(str, Enum):
    plain = "plain"
    chat = "chat"
    completion = "completion"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


class Trainable(str, Enum):
    all = "all"
    mask_embeddings = "mask-embeddings"
    gated_lora = "gated-lora"


class Export(str, Enum):
    adapter = "adapter"
    full = "full"


class Dtype(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp32 = "fp32"
    fp16 = "fp16"
    bfloat16 = "bfloat16"  # the names torch, transformers and lm-eval use; recorded as bf16, fp32, fp16
    float32 = "float32"
    float16 = "float16"


class OnNonfinite(str, Enum):
    stop = "stop"
    skip = "skip"


def print_plugins() -> None:
    """Every loss, decoder and hook plugin installed, with its distribution, and the broken ones."""
    from rich.console import Console
    from rich.table import Table

    from mtp_plugins.hooks import HookPluginError, opt_in_names
    from mtp_plugins.registry import list_plugins, load_plugin

    statuses = list_plugins()
    opt_in = set(opt_in_names())
    table = Table(title="mtp-plugins: installed plugins", title_justify="left")
    for column in ("kind", "name", "distribution", "object", "status"):
        table.add_column(column, overflow="fold")
    for status in statuses:
        e = status.entry
        state = "ok" if status.ok else "BROKEN: " + status.error.replace(f"{e.kind} {e.origin}: ", "")
        if status.ok and e.group.endswith("hooks"):
            state = f"ok, opt-in (--report-to {e.name})" if e.name in opt_in else "ok, always on"
            try:
                getattr(load_plugin(e.group, e.name), "require", lambda: None)()
            except HookPluginError as error:  # the plugin's own words: what is missing and how to get it
                state += f"; cannot run: {error}"
        table.add_row(e.kind, e.name, f"{e.distribution} {e.version}", e.value, state)
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)  # a log or a pipe: wide rows rather than folded ones
    console.print(table)
    broken = sum(not s.ok for s in statuses)
    console.print(f"{len(statuses)} plugins, {broken} broken" + (" (the others work; fix or uninstall the broken ones)" if broken else ""))


def _list_plugins(value: bool) -> None:
    if value:
        print_plugins()
        raise typer.Exit(0)


app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)


@app.command(help="Distil a pretrained causal LM into a multi-token predictor (self-distillation, METHOD.md).")
def train(
    config: Optional[str] = typer.Option(None, "--config", help="Recipe YAML filling the same settings; flags override it."),
    model: Optional[str] = typer.Option(None, help=_help("HF model id or local directory; student and frozen teacher start from it.", "model")),
    data: Optional[str] = typer.Option(None, help=_help("HF dataset id, or a local .jsonl/.json/.parquet file.", "data")),
    prompt_field: Optional[str] = typer.Option(None, help=_help("Field holding the prompt.", "prompt_field")),
    response_field: Optional[str] = typer.Option(None, help=_help("Field holding the response.", "response_field")),
    template: Optional[Template] = typer.Option(None, help=_help("plain: prompt, blank line, response; chat: the model's chat template; completion: prompt then response as they are.", "template")),
    eval_rows: Optional[int] = typer.Option(None, help=_help("Held-out rows for validation.", "eval_rows")),
    loss: Optional[str] = typer.Option(None, help=_help("Loss strategy by name (hard-label, soft-kl, ground-truth, or a plugin's).", "loss")),
    teacher_temperature: Optional[float] = typer.Option(None, help=_help("The teacher's logits are divided by it before the loss: below 1 sharpens soft-kl's targets toward the teacher's greedy token, which is what greedy decoding emits (tried on the demo: benchmarks/results/demo.md); hard-label's argmax does not change.", "teacher_temperature")),
    output_dir: Optional[str] = typer.Option(None, help=_help("Run directory: the final HF model, checkpoints/, metrics.jsonl.", "output_dir")),
    max_steps: Optional[int] = typer.Option(None, help=_help("Optimizer steps (0 writes the prepared, untrained checkpoint).", "max_steps")),
    max_tokens: Optional[int] = typer.Option(None, help=_help("Stop after the student has seen this many real tokens.", "max_tokens")),
    seq_len: Optional[int] = typer.Option(None, help=_help("Columns of a training row.", "seq_len")),
    regions: Optional[int] = typer.Option(None, help=_help("Regions per row.", "regions")),
    k_min: Optional[int] = typer.Option(None, help=_help("Smallest horizon k drawn per step.", "k_min")),
    k_max: Optional[int] = typer.Option(None, help=_help("Largest horizon k drawn per step (recorded as the checkpoint's k_max).", "k_max")),
    mask_tokens: Optional[int] = typer.Option(None, help=_help("1: one shared mask token; n >= k_max-1: one per slot.", "mask_tokens")),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (AdamW). [default: 1e-5 with --trainable all or mask-embeddings (the paper's), 3e-3 with gated-lora (measured on SmolLM2)]"),
    schedule: Optional[Schedule] = typer.Option(None, help=_help("After warm-up: constant or cosine to 0.", "schedule")),
    warmup_steps: Optional[int] = typer.Option(None, help=_help("Linear warm-up steps.", "warmup_steps")),
    weight_decay: Optional[float] = typer.Option(None, help=_help("AdamW weight decay (matrices only).", "weight_decay")),
    adam_beta1: Optional[float] = typer.Option(None, help=_help("AdamW beta1, in [0, 1).", "adam_beta1")),
    adam_beta2: Optional[float] = typer.Option(None, help=_help("AdamW beta2, in [0, 1).", "adam_beta2")),
    grad_clip: Optional[float] = typer.Option(None, help=_help("Gradient norm clip (a finite number > 0).", "grad_clip")),
    micro_batch_size: Optional[int] = typer.Option(None, help=_help("Rows per forward pass.", "micro_batch_size")),
    grad_accum: Optional[int] = typer.Option(None, help=_help("Micro-batches per optimizer step.", "grad_accum")),
    prefix_loss_weight: Optional[float] = typer.Option(None, help=_help("Weight of an ordinary next-token loss on the real tokens.", "prefix_loss_weight")),
    entropy_weight: Optional[float] = typer.Option(None, help=_help("Weight of the student's entropy at the supervised positions.", "entropy_weight")),
    save_every: Optional[int] = typer.Option(None, help=_help("Checkpoint every N steps (and at the end).", "save_every")),
    keep_last: Optional[int] = typer.Option(None, help=_help("Checkpoints kept.", "keep_last")),
    on_nonfinite: Optional[OnNonfinite] = typer.Option(None, help=_help("A NaN/inf loss or gradient norm: stop the run before that update (the last checkpoint stays), or skip the update.", "on_nonfinite")),
    max_nonfinite: Optional[int] = typer.Option(None, help=_help("With --on-nonfinite skip: one more non-finite step than this stops the run.", "max_nonfinite")),
    eval_every: Optional[int] = typer.Option(None, help=_help("Validate every N steps (and at the end).", "eval_every")),
    log_every: Optional[int] = typer.Option(None, help=_help("Report metrics every N steps.", "log_every")),
    seed: Optional[int] = typer.Option(None, help=_help("Seed of the data order, k draws and region offsets.", "seed")),
    dtype: Optional[Dtype] = typer.Option(None, help=_help("Compute precision (weights stay float32): auto, bf16 (bfloat16), fp32 (float32), fp16 (float16).", "dtype")),
    device: Optional[str] = typer.Option(None, help=_help("auto, cpu, cuda, cuda:N.", "device")),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code/--no-trust-remote-code", help=_help("Run the model repository's own code.", "trust_remote_code")),
    allow_pickle: Optional[bool] = typer.Option(None, "--allow-pickle/--no-allow-pickle", help=_help("Load pickle weights (pytorch_model.bin) of a model without safetensors; unpickling can run arbitrary code.", "allow_pickle")),
    activation_checkpointing: Optional[bool] = typer.Option(None, "--activation-checkpointing/--no-activation-checkpointing", help=_help("Recompute layer activations in the backward pass (less memory, more time).", "activation_checkpointing")),
    shard_teacher: Optional[bool] = typer.Option(None, "--shard-teacher/--no-shard-teacher", help=_help("With several processes, FSDP-shard the frozen teacher too (else every rank holds a full copy).", "shard_teacher")),
    trainable: Optional[Trainable] = typer.Option(None, help=_help("all: every weight; mask-embeddings: only the mask tokens' embedding rows; gated-lora: low-rank adapters that act only at mask tokens, plus the mask rows, over the frozen base (one copy of the weights, no teacher copy). mask-embeddings and gated-lora keep the next-token path exactly the original.", "trainable")),
    lora_rank: Optional[int] = typer.Option(None, help=_help("gated-lora: adapter rank (measured on SmolLM2: benchmarks/results/adapter_targets.md).", "lora_rank")),
    lora_alpha: Optional[float] = typer.Option(None, help=_help("gated-lora: adapter scale alpha / rank.", "lora_alpha")),
    lora_targets: Optional[str] = typer.Option(None, help=_help("gated-lora: projections with adapters: residual (those writing into the residual stream: o_proj, down_proj), all (attention and MLP), attention, mlp, or names such as q_proj,v_proj. The default keeps a decoding pass within 1.1x of the plain model's on a CPU (benchmarks/results/adapter_pass_cost.md); all learns a little faster per step but costs about 1.3x per pass.", "lora_targets")),
    export: Optional[Export] = typer.Option(None, help=_help("gated-lora: the final directory holds the adapter only (small; loads through mtp-plugins), or also the base weights (full: any other tool loads the exact base model).", "export")),
    rollouts: Optional[int] = typer.Option(None, help=_help("Train on the frozen model's own greedy responses to this many training prompts (0: the data's responses).", "rollouts")),
    rollout_shots: Optional[int] = typer.Option(None, help=_help("Worked examples (the first training rows) put before each rollout prompt.", "rollout_shots")),
    context_shots: Optional[int] = typer.Option(None, help=_help("Worked examples (training rows, drawn afresh each step) put before every training document as context, never supervised: the slots learn in the context a few-shot evaluation gives them.", "context_shots")),
    follow_example: Optional[bool] = typer.Option(None, "--follow-example/--no-follow-example", help=_help("Follow every training document, as a few-shot prompt does, by a blank line and another training row (instead of EOS): the slots learn how an answer ends and what comes after it (the separator an evaluation stops at), which they otherwise never see supervised.", "follow_example")),
    rollout_max_tokens: Optional[int] = typer.Option(None, help=_help("Longest rollout response, in tokens.", "rollout_max_tokens")),
    report_to: Optional[str] = typer.Option(None, help=_help("Opt-in hook plugins to run, comma-separated: wandb, tensorboard, or an installed plugin's.", "report_to")),
    list_plugins: bool = typer.Option(False, "--list-plugins", is_eager=True, expose_value=False, callback=_list_plugins,
                                      help="List every installed loss, decoder and hook plugin (with its distribution), then exit."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output-dir from its newest intact checkpoint, "
                                "with its recorded settings (flags may change only how long it runs, how it saves, "
                                "logs and reacts, and the device; see docs/reliability.md)."),
) -> None:
    flags = {k: v.value if isinstance(v, Enum) else v for k, v in locals().items() if k not in ("config", "resume", "list_plugins")}
    trainer = None
    try:
        from train_cli.config import build_config, resume_config
        from train_cli.trainer import Trainer

        settings = resume_config(config, **flags) if resume else build_config(config, **flags)
        trainer = Trainer(settings)
        trainer.run(resume=resume)
    except KeyboardInterrupt as stop:
        _interrupted(stop, trainer, resume)


def _interrupted(stop: KeyboardInterrupt, trainer: object, resume: bool) -> None:
    """Ctrl-C: one line saying what was kept and how to continue; exit status 130."""
    from train_cli.trainer import TrainingInterrupted

    if isinstance(stop, TrainingInterrupted):
        if stop.main:
            from train_cli.distributed import launched_by_torchrun

            again = shlex.join(["mtp-train", *sys.argv[1:], *([] if resume else ["--resume"])])
            launch = " (under the same torchrun launch)" if launched_by_torchrun() else ""
            print(f"mtp-train: interrupted after step {stop.step}, saved as {stop.checkpoint}; continue with: {again}{launch}",
                  file=sys.stderr)
    elif trainer is None or not getattr(trainer, "training", False):
        print(STARTUP_INTERRUPTED, file=sys.stderr)
    else:
        print("mtp-train: interrupted; the newest checkpoint stays as it was (continue with --resume)", file=sys.stderr)
    sys.exit(130)


def quiet_startup_interrupts(recorded: list[int], original: Any) -> Any:
    """A ``sys.unraisablehook`` that stays silent about a start-up Ctrl-C raised where Python cannot
    propagate it (inside a weakref callback or ``__del__`` of a library): the handler recorded it
    in ``recorded`` and the trainer stops on it before writing anything. Everything else goes to
    ``original``."""

    def hook(unraisable: Any) -> None:
        if recorded and isinstance(unraisable.exc_value, KeyboardInterrupt):
            return
        original(unraisable)

    return hook


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2, not a traceback."""
    import signal

    # Ctrl-C while torch and transformers import is held until they are in: a KeyboardInterrupt
    # raised inside their native initialisation aborts the interpreter (SIGABRT) instead.
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        from mtp_plugins.checkpoint import CheckpointError
        from mtp_plugins.console import run_app
        from mtp_plugins.registry import PluginError
        from train_cli.config import ConfigError
        from train_cli.trainer import NonFiniteLoss, startup_sigints
    except BaseException:
        signal.signal(signal.SIGINT, previous)
        raise

    def startup(signum: int, frame: object) -> None:  # until the loop installs its own handler
        startup_sigints.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, startup)
    sys.unraisablehook = quiet_startup_interrupts(startup_sigints, sys.unraisablehook)
    if interrupted:
        print(STARTUP_INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    run_app(app, "mtp-train", (ConfigError, PluginError, CheckpointError, NonFiniteLoss), workload="train")


if __name__ == "__main__":
    main()
