"""The one place every training default lives: ``TrainConfig``, filled from a recipe YAML and flags."""

from __future__ import annotations

import dataclasses
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
    output_dir: str = "mtp-out"
    max_steps: int | None = 1000  # optimizer steps; or use max_tokens
    max_tokens: int | None = None  # stop after this many real tokens seen by the student
    seq_len: int = 160
    regions: int = 5
    k_min: int = 2
    k_max: int = 16
    mask_tokens: int = 1  # 1: one shared mask token; n >= k_max - 1: one per slot
    lr: float = 1e-5
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 50
    weight_decay: float = 0.1
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
    trainable: Literal["all", "mask-embeddings"] = "all"  # mask-embeddings: only the mask tokens' rows learn; real tokens compute exactly as before
    rollouts: int = 0  # >0: train on the teacher's own greedy responses to this many training prompts
    rollout_shots: int = 0  # worked examples (the first training rows) before each rollout prompt
    rollout_max_tokens: int = 160  # longest rollout response
    report_to: str = ""  # opt-in hook plugins to run, comma-separated (wandb, tensorboard, or a plugin's)

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        positive = ("seq_len", "regions", "k_min", "k_max", "mask_tokens", "micro_batch_size", "grad_accum",
                    "save_every", "keep_last", "eval_every", "log_every", "rollout_max_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("give --max-steps or --max-tokens")
        for name in ("max_steps", "max_tokens", "warmup_steps", "eval_rows", "rollouts", "rollout_shots", "max_nonfinite"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{_flag(name)} must be >= 0, got {value}")
        if self.k_min > self.k_max:
            raise ConfigError(f"--k-min ({self.k_min}) must be <= --k-max ({self.k_max})")
        if self.mask_tokens > 1 and self.mask_tokens < self.k_max - 1:
            raise ConfigError(
                f"--mask-tokens {self.mask_tokens}: per-slot mask tokens need one per slot, at least "
                f"k_max - 1 = {self.k_max - 1} (or 1 for a shared mask token)"
            )
        if self.seq_len // self.regions < self.k_max:
            raise ConfigError(
                f"--seq-len {self.seq_len} is too short for --regions {self.regions} and --k-max {self.k_max}: "
                f"each region needs k_max - 1 mask slots plus a real token (seq_len >= {self.regions * self.k_max})"
            )
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def build_config(recipe: str | Path | None = None, **flags: Any) -> TrainConfig:
    """Defaults <- recipe YAML <- flags given on the command line (None means "not given")."""
    settings = load_recipe(recipe) if recipe else {}
    settings.update({k: v for k, v in flags.items() if v is not None})
    if isinstance(settings.get("report_to"), (list, tuple)):  # YAML may list the names
        settings["report_to"] = ",".join(map(str, settings["report_to"]))
    if settings.get("max_tokens") is not None and "max_steps" not in settings:
        settings["max_steps"] = None  # a token budget alone governs the run
    try:
        return TrainConfig(**settings)
    except TypeError as error:  # a wrong kind of value that __post_init__ did not get to see
        raise ConfigError(str(error)) from None
