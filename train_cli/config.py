"""The one place every training default lives: ``TrainConfig``, filled from a recipe YAML and flags."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_DATA = "jwkirchenbauer/metamathqa-grouped-split"


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message names the setting and what is allowed."""


@dataclass(frozen=True)
class TrainConfig:
    """Self-distillation settings (METHOD.md sections 3-5). Flag ``--seq-len`` is field ``seq_len``."""

    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # HF id or local dir: student and teacher start from it
    data: str = DEFAULT_DATA  # HF dataset id, or a local .jsonl/.json/.parquet file
    prompt_field: str = "query"
    response_field: str = "response"
    template: Literal["plain", "chat", "completion"] = "plain"  # plain: prompt, blank line, response; chat: the model's template; completion: prompt then response, as they are
    eval_rows: int = 64  # held-out rows (from a validation/test split if the data has one)
    loss: str = "hard-label"  # a loss registered under mtp_plugins.losses
    teacher_temperature: float = 1.0  # the teacher's logits are divided by it before the loss: below 1 sharpens soft-kl's targets toward the teacher's greedy token (hard-label's argmax does not change)
    output_dir: str = "mtp-out"
    max_steps: int | None = 1000  # optimizer steps; or use max_tokens
    max_tokens: int | None = None  # stop after this many real tokens seen by the student
    seq_len: int = 160
    regions: int = 5
    k_min: int = 2
    k_max: int = 16
    mask_tokens: int = 1  # 1: one shared mask token; n >= k_max - 1: one per slot
    lr: float | None = None  # peak AdamW lr; None: the trainable mode's (DEFAULT_LR), recorded as the value used
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 50
    weight_decay: float = 0.1  # AdamW, on the trained matrices: all weight matrices (all), the adapters (gated-lora); not on embedding rows
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    micro_batch_size: int = 8
    grad_accum: int = 1
    prefix_loss_weight: float = 0.0  # weight of an ordinary next-token loss on the real tokens
    entropy_weight: float = 0.0  # weight of the student's mean entropy at the supervised positions
    save_every: int = 500
    keep_last: int = 2
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss or gradient norm: stop the run, or skip that step's update
    max_nonfinite: int = 10  # with on_nonfinite skip: one more non-finite step than this stops the run
    eval_every: int = 100
    log_every: int = 1
    seed: int = 0
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"  # auto: bf16 where supported, else fp32
    device: str = "auto"  # auto: cuda if available, else cpu
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load pickle weights (pytorch_model.bin) of a model without safetensors; unpickling can run code
    activation_checkpointing: bool = False  # recompute layer activations in backward (less memory)
    shard_teacher: bool = False  # with several processes: FSDP-shard the teacher too (else each rank holds it)
    trainable: Literal["all", "mask-embeddings", "gated-lora"] = "all"  # mask-embeddings: only the mask tokens' rows learn; gated-lora: low-rank adapters that act only at mask tokens (+ the mask rows); both keep real tokens exactly the original model
    lora_rank: int = 16  # gated-lora: rank of every adapter
    lora_alpha: float = 32.0  # gated-lora: the adapter's output is scaled by alpha / rank
    lora_targets: str = "residual"  # gated-lora: projections with adapters: residual (o_proj, down_proj), all, attention, mlp, or names (benchmarks/results/adapter_targets.md)
    export: Literal["adapter", "full"] = "adapter"  # gated-lora: the final directory holds the adapter only, or also the base weights (loadable as the exact base elsewhere)
    rollouts: int = 0  # >0: train on the teacher's own greedy responses to this many training prompts
    rollout_shots: int = 0  # worked examples (the first training rows) before each rollout prompt
    rollout_max_tokens: int = 160  # longest rollout response
    context_shots: int = 0  # worked examples (training rows, drawn afresh each step) before every training document: context the mask slots learn in, never supervised, as a few-shot evaluation prompts them
    follow_example: bool = False  # every training document is followed, as in a few-shot prompt, by a blank line and another training row (instead of EOS): the slots learn how an answer ends (the separator an evaluation stops at)
    report_to: str = ""  # opt-in hook plugins to run, comma-separated (wandb, tensorboard, or a plugin's)

    def __post_init__(self) -> None:
        if self.lr is None and self.trainable in DEFAULT_LR:
            object.__setattr__(self, "lr", DEFAULT_LR[self.trainable])
        if isinstance(self.dtype, str):  # the names torch, transformers and lm-eval use
            object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _check_counts(self)
        _check_numbers(self)
        _check_adapter(self)
        if not self.output_dir.strip():
            raise ConfigError(f"--output-dir {self.output_dir!r}: give the run's directory (a new one, or a run's to --resume)")

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The learning rate of each trainable mode when --lr is not given: the paper's for full weights (and
#: the mask rows alone); for gated adapters the best of those measured on SmolLM2-135M at rank 16 on
#: the residual-stream projections (benchmarks/results/adapter_targets.md; the reference's long runs used 2e-4
#: at rank 128: the llama-3.2-1b-gated-lora recipe).
DEFAULT_LR = {"all": 1e-5, "mask-embeddings": 1e-5, "gated-lora": 3e-3}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
SEED_LIMIT = 2**64  # torch.manual_seed takes seeds below 2**64
# (field, lowest, lowest allowed itself, highest, highest allowed itself): each float must be finite and in range.
NUMBER_RANGES = (
    ("lr", 0.0, False, None, False),
    ("weight_decay", 0.0, True, None, False),
    ("adam_beta1", 0.0, True, 1.0, False),
    ("adam_beta2", 0.0, True, 1.0, False),
    ("grad_clip", 0.0, False, None, False),
    ("prefix_loss_weight", 0.0, True, None, False),
    ("entropy_weight", None, False, None, False),
    ("lora_alpha", 0.0, False, None, False),
    ("teacher_temperature", 0.0, False, None, False),
)


def _check_adapter(c: TrainConfig) -> None:
    """The gated-lora settings (and what that mode cannot do)."""
    from mtp_plugins.adapter_settings import AdapterError, parse_targets

    if c.lora_rank < 1:
        raise ConfigError(f"--lora-rank must be >= 1, got {c.lora_rank}")
    try:
        parse_targets(c.lora_targets)
    except AdapterError as error:
        raise ConfigError(f"--lora-targets: {error}") from None
    if c.trainable == "gated-lora" and c.prefix_loss_weight:
        raise ConfigError(
            f"--prefix-loss-weight {c.prefix_loss_weight} does nothing with --trainable gated-lora: the real tokens "
            "compute the frozen base model exactly, so a next-token loss on them has no gradient; leave it at 0"
        )
    if c.trainable == "gated-lora" and c.activation_checkpointing:
        raise ConfigError(
            "--activation-checkpointing is not for --trainable gated-lora: its backward pass runs over the mask "
            "slots alone (the real tokens are one pass without gradient), so there is little to recompute"
        )
    if c.export != "adapter" and c.trainable != "gated-lora":
        raise ConfigError(f"--export {c.export} is for --trainable gated-lora (the other modes export a full model)")


def _check_counts(c: TrainConfig) -> None:
    """The integer settings: counts, their relations, and the seed."""
    positive = ("seq_len", "regions", "k_min", "k_max", "mask_tokens", "micro_batch_size", "grad_accum",
                "save_every", "keep_last", "eval_every", "log_every", "rollout_max_tokens")
    for name in positive:
        if getattr(c, name) < 1:
            raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(c, name)}")
    if c.max_steps is None and c.max_tokens is None:
        raise ConfigError("give --max-steps or --max-tokens")
    for name in ("max_steps", "max_tokens", "warmup_steps", "eval_rows", "rollouts", "rollout_shots", "context_shots",
                 "max_nonfinite"):
        value = getattr(c, name)
        if value is not None and value < 0:
            raise ConfigError(f"{_flag(name)} must be >= 0, got {value}")
    if not 0 <= c.seed < SEED_LIMIT:
        raise ConfigError(f"--seed must be an integer in [0, 2**64 - 1] (torch's seed range), got {c.seed}")
    if c.k_min > c.k_max:
        raise ConfigError(f"--k-min ({c.k_min}) must be <= --k-max ({c.k_max})")
    if c.mask_tokens > 1 and c.mask_tokens < c.k_max - 1:
        raise ConfigError(
            f"--mask-tokens {c.mask_tokens}: per-slot mask tokens need one per slot, at least "
            f"k_max - 1 = {c.k_max - 1} (or 1 for a shared mask token)"
        )
    if c.seq_len // c.regions < c.k_max:
        raise ConfigError(
            f"--seq-len {c.seq_len} is too short for --regions {c.regions} and --k-max {c.k_max}: "
            f"each region needs k_max - 1 mask slots plus a real token (seq_len >= {c.regions * c.k_max})"
        )


def _check_numbers(c: TrainConfig) -> None:
    """Every float setting is a finite number in its range (inf and NaN train a broken model)."""
    for name, low, low_ok, high, high_ok in NUMBER_RANGES:
        value = getattr(c, name)
        inside = math.isfinite(value) and (low is None or value > low or (low_ok and value == low)) and (
            high is None or value < high or (high_ok and value == high))
        if not inside:
            raise ConfigError(f"{_flag(name)} must be {_describe_range(low, low_ok, high, high_ok)}, got {value}")


def _describe_range(low: float | None, low_ok: bool, high: float | None, high_ok: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
    if low is not None:
        return f"a finite number {'>=' if low_ok else '>'} {low:g}"
    return "a finite number"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_type(name: str, value: Any, annotation: Any) -> None:
    hint = typing.get_type_hints(TrainConfig)[name]
    allowed = _allowed(hint)
    if typing.get_origin(hint) is Literal:
        if value not in allowed:
            raise ConfigError(f"{_flag(name)} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return
    ok = any(
        (t is type(None) and value is None)
        or (t is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t not in (int, float, type(None)) and isinstance(value, t))
        for t in allowed
    )
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{_flag(name)} must be {names}; got {value!r} ({type(value).__name__})")


def _allowed(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return (hint,)


RECIPES = Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Settings from a recipe YAML (a path, or the name of a recipe shipped in ``train_cli/recipes``):
    a mapping of TrainConfig field names (dashes allowed)."""
    path = Path(path)
    if not path.exists() and len(path.parts) == 1 and (RECIPES / f"{path.name}.yaml").exists():
        path = RECIPES / f"{path.name}.yaml"
    elif not path.exists():
        raise ConfigError(f"--config {path}: no such file, and not a shipped recipe ({', '.join(shipped_recipes()) or 'none'})")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:  # its own text spans several lines; the message is one
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML{where} ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    settings = {str(key).replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - known)
    if unknown:
        import difflib

        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, known, n=1)) else repr(u) for u in unknown]
        raise ConfigError(f"--config {path}: unknown settings {', '.join(hints)}")
    return settings


# What may change when a run is resumed: how long it runs, how it saves, logs and reacts, and where
# (machine, memory, permissions). Every other setting is the run's own, read back from its newest
# checkpoint's train_config.yaml; a flag contradicting it is refused.
RESUMABLE = ("output_dir", "max_steps", "max_tokens", "save_every", "keep_last", "eval_every", "log_every", "report_to",
             "on_nonfinite", "max_nonfinite", "device", "activation_checkpointing", "shard_teacher", "trust_remote_code",
             "allow_pickle", "export")


def given_settings(recipe: str | Path | None = None, **flags: Any) -> dict[str, Any]:
    """The settings a recipe YAML and the command line give (None means "not given"), normalized."""
    settings = load_recipe(recipe) if recipe else {}
    settings.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(settings.get("report_to"), (list, tuple)):  # YAML may list the names
        settings["report_to"] = ",".join(map(str, settings["report_to"]))
    if isinstance(settings.get("dtype"), str):
        settings["dtype"] = DTYPE_ALIASES.get(settings["dtype"], settings["dtype"])
    return settings


def build_config(recipe: str | Path | None = None, **flags: Any) -> TrainConfig:
    """Defaults <- recipe YAML <- flags given on the command line (None means "not given")."""
    settings = given_settings(recipe, **flags)
    return _make(dict(settings), settings)


def resume_config(recipe: str | Path | None = None, **flags: Any) -> TrainConfig:
    """The config of ``--resume``: the run's recorded settings (its newest intact checkpoint's
    train_config.yaml in ``--output-dir``), with the given settings that may change (``RESUMABLE``);
    any other given setting must equal the recorded one (ConfigError naming both)."""
    from train_cli.checkpoints import recorded_settings

    given = given_settings(recipe, **flags)
    output_dir = Path(given.get("output_dir", TrainConfig.output_dir))
    recorded, where = recorded_settings(output_dir)
    check_resumed(recorded, given, where)
    known = {f.name for f in fields(TrainConfig)}
    settings = {k: v for k, v in recorded.items() if k in known}
    settings.update({k: v for k, v in given.items() if k in RESUMABLE})
    settings["output_dir"] = str(output_dir)  # where the run is now, however it was spelled then
    return _make(settings, given)


def _make(settings: dict[str, Any], given: dict[str, Any]) -> TrainConfig:
    if given.get("max_tokens") is not None and "max_steps" not in given:
        settings["max_steps"] = None  # a token budget alone governs the run
    try:
        return TrainConfig(**settings)
    except TypeError as error:  # a wrong kind of value that __post_init__ did not get to see
        raise ConfigError(str(error)) from None


def check_resumed(recorded: dict[str, Any], given: dict[str, Any], where: Path) -> None:
    """Refuse a given setting that contradicts the run's ``recorded`` one (from ``where``), unless it
    may change on resume (``RESUMABLE``); a setting the run did not record has its default."""
    defaults = TrainConfig.__dataclass_fields__
    for name, value in given.items():
        if name in RESUMABLE or name not in defaults:
            continue
        before = recorded.get(name, defaults[name].default)
        if not _same_setting(name, before, value):
            raise ConfigError(
                f"--resume: {_flag(name)} {value!r} contradicts the run's recorded {_flag(name)} {before!r} ({where}); "
                f"leave it out to continue the run as recorded, or start a new run in another --output-dir "
                f"(what may change on resume: {', '.join(_flag(n) for n in RESUMABLE)})"
            )


def _same_setting(name: str, recorded: Any, given: Any) -> bool:
    if isinstance(recorded, str) and isinstance(given, str) and name in ("model", "data") and recorded != given:
        a, b = Path(recorded).expanduser(), Path(given).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()  # one directory, spelled two ways
    if name == "dtype" and isinstance(recorded, str):
        recorded = DTYPE_ALIASES.get(recorded, recorded)
    return recorded == given
