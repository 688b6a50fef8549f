"""``mtp-sweep``'s checks of its arguments, run before the first point: numbers, the output
directory, the device, the checkpoint, the original model (the ``hf`` row) and the task.

Each failure is a ``SweepError`` whose one-line message names the flag, the value and what is allowed.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any


class SweepError(ValueError):
    """A bad sweep argument; printed as one line."""


def _numbers(text: str, kind: type, flag: str, allow_empty: bool = False) -> list:
    if allow_empty and text.strip().lower() in ("", "none"):
        return []
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SweepError(f"{flag} {text!r}: expected comma-separated {kind.__name__}s") from None
    if not values:
        raise SweepError(f"{flag} {text!r}: give at least one value")
    return values


def original_of(model: str) -> tuple[str, bool]:
    """The model a training run started from (its train_config.yaml; True), else the checkpoint itself."""
    config = Path(model) / "train_config.yaml"
    if config.exists():
        import yaml

        source = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("model")
        if source:
            return str(source), True
    return model, False


def task_manager() -> Any:
    from lm_eval.tasks import TaskManager

    from mtp_plugins.lm_eval._startup import tasks_dir

    ours = tasks_dir()
    return TaskManager(include_path=ours) if ours else TaskManager()


def check_numbers(*, taus: str, static: str, k: int | None, limit: int | None, batch_size: int, dtype: str,
                   num_fewshot: int | None, max_gen_toks: int | None, timing_prompts: int,
                   timing_repeats: int, verify_lookup: str = "0,3") -> tuple[list[float], list[int], list[int]]:
    """The tau values, the static k values and the verify points' n-gram lengths (``--verify-lookup``,
    in order, each once), or SweepError naming the first bad value."""
    tau_values = _numbers(taus, float, "--taus")
    if any(not 0 < t <= 1 for t in tau_values):
        raise SweepError(f"--taus {taus!r}: every tau must be in (0, 1]")
    static_ks = _numbers(static, int, "--static", allow_empty=True)
    if any(s < 1 for s in static_ks):
        raise SweepError(f"--static {static!r}: every k must be >= 1")
    lookups = _numbers(verify_lookup, int, "--verify-lookup", allow_empty=True)
    if any(n < 0 for n in lookups):
        raise SweepError(f"--verify-lookup {verify_lookup!r}: every n-gram length must be >= 0 "
                         "(0: drafts from the mask slots alone)")
    if dtype not in ("bfloat16", "float32", "float16"):
        raise SweepError(f"--dtype {dtype!r}: use bfloat16, float32 or float16")
    at_least = {"--k": (k, 1), "--limit": (limit, 1), "--batch-size": (batch_size, 1), "--num-fewshot": (num_fewshot, 0),
                "--max-gen-toks": (max_gen_toks, 1), "--timing-prompts": (timing_prompts, 1),
                "--timing-repeats": (timing_repeats, 0)}
    for flag, (value, least) in at_least.items():
        if value is not None and value < least:
            raise SweepError(f"{flag} {value}: must be >= {least}" + (" (or left out)" if flag in _OPTIONAL else ""))
    return tau_values, static_ks, list(dict.fromkeys(lookups))


_OPTIONAL = ("--k", "--limit", "--num-fewshot", "--max-gen-toks")


def check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SweepError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise SweepError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SweepError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0.."
                             f"cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type != "cpu":
        raise SweepError(f"--device {device!r}: use cpu, cuda or cuda:N")


def check_model(model: str, k: int | None, static_ks: list[int]) -> int:
    """The checkpoint is an MTP checkpoint that decodes every k asked for; returns confadapt's k."""
    from mtp_plugins.checkpoint import CheckpointError, checkpoint_spec

    try:
        spec = checkpoint_spec(model)
    except CheckpointError as error:
        raise SweepError(f"MODEL {model!r}: {error}") from None
    if spec is None:
        raise SweepError(f"MODEL {model!r} has no mask token (no `mtp` block in config.json): not an MTP checkpoint")
    k = k if k is not None else spec.k_max or 8
    most = spec.max_decodable_k
    for flag, value in [("--k", k)] + [("--static", s) for s in static_ks]:
        if most is not None and value > most:
            raise SweepError(f"{flag} {value}: {model} has per-slot mask tokens for k <= {most}")
    return k


def check_original(original: str, recorded: bool, model: str) -> None:
    """The original model (the hf row) can be found, before any point: a moved one is named."""
    from transformers import AutoConfig

    from mtp_plugins.checkpoint import CheckpointError, loading

    try:
        with loading(original):
            AutoConfig.from_pretrained(original)
    except CheckpointError as error:
        where = f" (recorded in {Path(model) / 'train_config.yaml'} as the model the run started from)" if recorded else ""
        raise SweepError(f"--original {original!r}{where}: {error}; pass --original PATH for the hf row, or --skip-hf") from None


def check_task(task: str) -> Any:
    """lm-eval's task manager (our tasks included), once the task is found in it."""
    manager = task_manager()
    if task not in manager.all_subtasks:
        close = difflib.get_close_matches(task, manager.all_subtasks, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        kind = " (a group of tasks; give one task)" if task in manager.all_tasks else ""
        raise SweepError(f"--task {task!r}: not an lm-eval task{kind}{hint} ours: synthetic_gsm, synthetic_gsm_easy, gsm8k_cot_mtp, "
                         "gsm8k_cot_mtp_zeroshot; `lm-eval ls tasks` lists all")
    return manager


def check_out(out: Path) -> None:
    from mtp_plugins.lm_eval.stats import unwritable_reason

    problem = unwritable_reason(out, directory=True)
    if problem:
        raise SweepError(f"--out {out}: {problem}")
