"""``mtp-sweep``'s timing phase: the generation speed of every point, interleaved, on the same prompts.

Speeds measured one point after another also measure whatever else the machine did meanwhile (a
load change between two points reads as a speed-up). So the accuracy pass (lm-eval, point after
point) gives accuracy and Eff. k, and this phase gives speed: the same prompts (the task's formatted
contexts from the accuracy pass), generated with every point's settings through the same backend
code as the accuracy pass (lm-eval's ``hf`` ``_model_generate``, i.e. transformers ``generate``, for
``hf``; the ``mtp`` model's, i.e. the MTP engine, for the others), in one process, at each batch size
(batch 1 and the accuracy pass's), round-robin over the points for ``repeats`` rounds (the order
rotates every round), after one untimed warm-up batch per point.

Per point and batch size it keeps every round's tokens, seconds and, for ``mtp`` points, the Eff. k
of those very generations (at batch 1 it can differ from the accuracy pass's: ``verify`` feeds
slots by the batch's cost). The summary is the median
tokens/s with its min..max over the rounds, and the speed-up against a reference point (``hf``)
taken round by round (each point against the reference's measurement of the same round, minutes
apart at most), as median and min..max.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TimingPrompts:
    """What every point generates: contexts as lm-eval formats them, and the task's generation kwargs.

    ``count`` prompts are timed at batch 1; at batch b, the first ``max(count, b)`` (as many as there
    are), so that a batch is full."""

    contexts: list[str]
    gen_kwargs: dict[str, Any]
    count: int | None = None

    def at(self, batch_size: int) -> list[str]:
        return self.contexts[: max(self.count or len(self.contexts), batch_size)]


def _encode_batches(lm: Any, prompts: TimingPrompts, batch_size: int) -> tuple[list[tuple[Any, Any]], dict[str, Any]]:
    """The prompts as lm-eval's generate_until batches them (longest first, left-padded, truncated to
    leave room for max_gen_toks), and the generation kwargs its ``_model_generate`` receives."""
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

    kwargs = normalize_gen_kwargs(dict(prompts.gen_kwargs), lm.max_gen_toks)
    until = handle_stop_sequences(kwargs.pop("until", None), eos=lm.tok_decode(lm.eot_token_id, skip_special_tokens=False))
    max_gen_toks = kwargs.pop("max_gen_toks")
    kwargs.pop("max_length", None)
    order = sorted(prompts.at(batch_size), key=lambda c: -len(lm.tok_encode(c)))
    batches = []
    for start in range(0, len(order), batch_size):
        ids, mask = lm.tok_batch_encode(order[start : start + batch_size], left_truncate_len=lm.max_length - max_gen_toks,
                                        truncation=lm.truncation)
        batches.append((ids.to(lm.device), mask.to(lm.device)))
    return batches, {"until": until, "max_gen_toks": max_gen_toks, **kwargs}


def _generate(lm: Any, batches: list[tuple[Any, Any]], kwargs: dict[str, Any],
              count: Callable[[str], int]) -> tuple[int, float, float | None]:
    """(tokens generated, seconds, Eff. k) for all batches through ``lm``'s own ``_model_generate``;
    Eff. k (the engine's tokens per row-pass in these very generations) for ``mtp`` models, else None."""
    from lm_eval.models.utils import postprocess_generated_text

    samples = getattr(lm, "_samples", None)
    seen = len(samples) if samples is not None else 0
    extra = {k: v for k, v in kwargs.items() if k not in ("until", "max_gen_toks")}
    tokens, seconds = 0, 0.0
    for ids, mask in batches:
        start = time.perf_counter()
        out = lm._model_generate(context=ids, attention_mask=mask, stop=list(kwargs["until"]),
                                 max_length=ids.shape[1] + kwargs["max_gen_toks"], **dict(extra))
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        seconds += time.perf_counter() - start
        for row in out[:, ids.shape[1] :].tolist():
            text = postprocess_generated_text(lm.tok_decode(row), kwargs["until"], None)
            tokens += count(text)
    if samples is None:
        return tokens, seconds, None
    new = samples[seen:]
    passes = sum(s.forward_passes for s in new)
    return tokens, seconds, sum(s.tokens for s in new) / passes if passes else None


def time_points(
    lms: dict[str, Any], prompts: TimingPrompts, batch_sizes: list[int], repeats: int, count: Callable[[str], int],
    say: Callable[[str], None] = print,
) -> dict[str, dict[str, dict[str, list]]]:
    """batch size -> point -> {"tokens": [per round], "seconds": [per round], and for ``mtp`` points
    "eff_k": [per round]}; ``lms``
    maps point names to ready lm-eval models (``hf`` or ``mtp``) sharing one tokenizer."""
    names = list(lms)
    results: dict[str, dict[str, dict[str, list]]] = {}
    for batch_size in batch_sizes:
        batches, kwargs = _encode_batches(lms[names[0]], prompts, batch_size)
        say(f"timing at batch {batch_size}: {len(prompts.at(batch_size))} prompts, {len(names)} points, {repeats} "
            "interleaved rounds (after one warm-up batch each)")
        with torch.inference_mode():
            for name in names:
                _generate(lms[name], batches[:1], kwargs, count)
            runs: dict[str, dict[str, list]] = {name: {"tokens": [], "seconds": []} for name in names}
            for round_ in range(repeats):
                shift = round_ % len(names)
                for name in names[shift:] + names[:shift]:
                    tokens, seconds, eff_k = _generate(lms[name], batches, kwargs, count)
                    runs[name]["tokens"].append(tokens)
                    runs[name]["seconds"].append(seconds)
                    if eff_k is not None:
                        runs[name].setdefault("eff_k", []).append(eff_k)
        results[str(batch_size)] = runs
    return results


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float

    def text(self, digits: int = 1, unit: str = "") -> str:
        return f"{self.median:.{digits}f}{unit} ({self.low:.{digits}f}..{self.high:.{digits}f})"


def _spread(values: list[float]) -> Spread | None:
    return Spread(statistics.median(values), min(values), max(values)) if values else None


def tokens_per_second(run: dict[str, list]) -> list[float]:
    return [t / s if s > 0 else 0.0 for t, s in zip(run["tokens"], run["seconds"])]


def summarize(runs: dict[str, dict[str, list]], reference: str | None) -> dict[str, dict[str, Spread | None]]:
    """point -> {"tokens_per_second": Spread, "speedup": Spread vs ``reference``, round by round, and
    "eff_k": Spread of the timed generations' Eff. k (None for ``hf``)}."""
    ref = tokens_per_second(runs[reference]) if reference in runs else None
    out = {}
    for name, run in runs.items():
        speed = tokens_per_second(run)
        ratios = [a / b for a, b in zip(speed, ref) if b > 0] if ref else []
        out[name] = {"tokens_per_second": _spread(speed), "speedup": _spread(ratios), "eff_k": _spread(run.get("eff_k", []))}
    return out
