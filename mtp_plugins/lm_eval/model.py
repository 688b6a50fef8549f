"""The ``mtp`` lm-eval model: lm-eval's HF model with generation through the MTP decode engine.

Everything of ``--model hf`` is inherited (loading, batching, ``batch_size=auto``, data parallel,
chat templates, log-likelihood requests, which keep the ordinary next-token path). Only the
generation step differs: ``_model_generate`` calls ``mtp_plugins.generate`` with the chosen
strategy, so stop strings retire rows one by one, and every sample's decode statistics are kept.
"""

from __future__ import annotations

import difflib
import inspect
import re
import warnings
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from mtp_plugins.adapter_checkpoint import is_adapter_dir, read_adapter_record
from mtp_plugins.adapters import AdapterError
from mtp_plugins.checkpoint import CheckpointError, load_checkpoint, loading, read_mtp_spec, weights_source
from mtp_plugins.decoding import generate
from mtp_plugins.decoding.engine import check_cache, check_draft_lookup, check_mask_slots, make_decoder
from mtp_plugins.lm_eval.stats import (
    SampleStats,
    aggregate,
    default_stats_path,
    output_path_from_argv,
    summary_table,
    unwritable_reason,
    write_jsonl,
)
from mtp_plugins.hooks import plugin_manager
from mtp_plugins.registry import PluginError, UnknownPluginError, load_decoder

DEFAULT_K = 8


class MTPArgumentError(ValueError):
    """A bad ``--model_args`` value for ``--model mtp``."""


class MTPLM(HFLM):
    """``lm_eval --model mtp --model_args pretrained=DIR,k=8,tau=0.9,strategy=confadapt``.

    Own model_args: ``k`` (default: the checkpoint's trained k_max, else 8), ``tau`` (0.9, in (0, 1]),
    ``strategy`` (a decoder name, default ``confadapt``), ``stats_path`` (the per-sample JSONL;
    default: beside lm-eval's ``--output_path`` results), ``report_to`` (opt-in hook plugins, joined
    by ``+``, e.g. ``report_to=wandb+tensorboard``), ``allow_pickle`` (default false: weights load
    from safetensors only), ``mask_slots`` (``auto`` or 0..k-1; default: ``generate``'s), ``draft_lookup``
    (n-gram drafts for ``verify``; 0 turns them off), ``cache`` (``dynamic`` or ``static``) and
    ``compile`` (``true`` or a ``torch.compile`` mode; implies ``cache=static``), as for
    ``mtp_plugins.generate``. A model_arg named in the chosen decoder's ``options`` goes to the decoder
    (``generate(..., decoder_options=...)``), e.g. ``strategy=entropy-confadapt,gate=0.5``. Every
    ``hf`` model_arg works as for ``hf``; any other key is refused with the names allowed.
    ``pretrained`` may be a gated adapter checkpoint (``mtp-train --trainable gated-lora``): it loads
    as its recorded base model with the adapter attached (``base=`` names the base elsewhere; its
    weights must hash as recorded). Log-likelihoods never give a mask token any probability.
    After each batch of generation requests the ``mtp_generation_finished`` hook of every active hook
    plugin receives the decode statistics.
    """

    def __init__(
        self,
        pretrained: Any,
        k: int | None = None,
        tau: float = 0.9,
        strategy: str = "confadapt",
        stats_path: str | None = None,
        report_to: str | None = None,
        trust_remote_code: bool | None = False,
        allow_pickle: bool = False,
        mask_slots: int | str | None = None,
        draft_lookup: int | None = None,
        cache: str | None = None,
        compile: bool | str = False,
        base: str | None = None,
        **kwargs: Any,
    ) -> None:
        decoder_cls = _check_args(k, tau, strategy)
        self._adapter_base, self._allow_pickle = base, allow_pickle  # read by _get_config/_create_model
        self.decoder_options = _decoder_options(kwargs, decoder_cls)
        _build_decoder(strategy, k if k is not None else DEFAULT_K, tau, self.decoder_options)  # a bad value fails now
        _checked("compile", compile, lambda: check_cache(None, compile))
        _checked("cache", cache, lambda: check_cache(cache, compile))
        if not isinstance(allow_pickle, bool):
            raise MTPArgumentError(f"model_args allow_pickle={allow_pickle!r} is not allowed: use true or false")
        if "use_safetensors" in kwargs:
            raise MTPArgumentError(
                "model_args use_safetensors is not an argument of --model mtp: weights load from safetensors "
                "only; pass allow_pickle=true to allow pickle weights"
            )
        if stats_path is not None and (problem := unwritable_reason(Path(str(stats_path)))):
            raise MTPArgumentError(f"model_args stats_path={stats_path!r} is not allowed: {problem}")
        try:
            self._hooks = plugin_manager(report_to=str(report_to).replace("+", ",") if report_to else None).hook
        except PluginError as error:
            raise MTPArgumentError(f"model_args report_to={report_to!r} is not allowed: {error}") from None
        spec = self._load_model(pretrained, trust_remote_code, allow_pickle, kwargs, decoder_cls, strategy)
        self.k = k if k is not None else (spec.k_max if spec is not None and spec.k_max else DEFAULT_K)
        self.tau = float(tau)
        self.strategy = strategy
        self.uses_tau = bool(decoder_cls.uses_tau)
        decoder = _build_decoder(strategy, self.k, self.tau, self.decoder_options)
        if mask_slots is not None:  # None: generate's own default
            _checked("mask_slots", mask_slots, lambda: check_mask_slots(mask_slots, decoder))
        _checked("draft_lookup", draft_lookup, lambda: check_draft_lookup(draft_lookup, decoder))
        self.mask_slots, self.draft_lookup = mask_slots, draft_lookup
        self.cache, self.compile = cache, compile
        if decoder.num_proposals > 1:
            _check_checkpoint_fits(spec, strategy, self.k, pretrained)
        self._enable_cpu_data_parallel()
        self._pretrained_name = pretrained if isinstance(pretrained, str) else type(pretrained).__name__
        self._stats_path = Path(stats_path) if stats_path else None
        self._samples: list[SampleStats] = []
        self._generation_seconds = 0.0
        self._model_calls = 0
        self._pending_requests: dict[str, deque] = defaultdict(deque)
        self._batch_contexts: list[str] = []

    def _load_model(
        self, pretrained: Any, trust_remote_code: Any, allow_pickle: bool, kwargs: dict[str, Any], decoder_cls: type,
        strategy: str,
    ) -> Any:
        """HFLM's loading, with every failure one MTPArgumentError; returns the checkpoint's MTP spec."""
        try:
            if isinstance(pretrained, str) and not kwargs.get("gguf_file") and not is_adapter_dir(pretrained):
                weights = Path(pretrained, kwargs.get("subfolder") or "")
                kwargs.update(weights_source(weights, allow_pickle=allow_pickle, opt_in="model_args allow_pickle=true"))
            with loading(pretrained):
                super().__init__(pretrained=pretrained, trust_remote_code=trust_remote_code, **kwargs)
            if self._adapter_base is not None and not is_adapter_dir(pretrained):
                raise CheckpointError(f"base= is only for gated adapter checkpoints; {pretrained} is a full model")
            spec = read_mtp_spec(self.model)
            self._never = torch.tensor(spec.mask_token_ids, device=self.device) if spec is not None else None
            return spec
        except CheckpointError as error:  # the message names the model
            raise MTPArgumentError(f"model_args pretrained: {error}") from None
        except TypeError as error:  # an unknown key reaches from_pretrained and the model's constructor
            key = _unexpected_keyword(error)
            if key is None or key not in kwargs:
                raise
            raise MTPArgumentError(unknown_key_message(key, kwargs[key], decoder_cls, strategy)) from None

    # ------------------------------------------------------------ gated adapter checkpoints

    def _get_config(self, pretrained: str, **kwargs: Any) -> None:
        """An adapter directory has no config.json: the config is its base model's."""
        if not is_adapter_dir(pretrained):
            return super()._get_config(pretrained, **kwargs)
        try:
            record = read_adapter_record(Path(pretrained))
        except AdapterError as error:
            raise CheckpointError(str(error)) from None
        base = self._adapter_base or (pretrained if record.get("full") else record["base"]["name_or_path"])
        with loading(base):
            super()._get_config(base, **kwargs)

    def _create_model(self, pretrained: str, revision: str | None = "main", dtype: Any = "auto",
                      trust_remote_code: bool | None = False, **kwargs: Any) -> None:
        """A gated adapter checkpoint loads as its base model with the adapter attached
        (``load_checkpoint``); any other model as lm-eval's ``hf`` loads it."""
        if not is_adapter_dir(pretrained):
            return super()._create_model(pretrained, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code,
                                         **kwargs)
        from lm_eval.models.utils_hf import get_dtype

        self._model, _, _ = load_checkpoint(pretrained, base=self._adapter_base, dtype=get_dtype(dtype),
                                            revision=revision, trust_remote_code=bool(trust_remote_code),
                                            allow_pickle=self._allow_pickle)
        self._config = self._model.config

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        """lm-eval's logits, with the mask tokens' at -inf: a mask token is never a prediction, so
        log-likelihoods are over the real vocabulary (those of the model the checkpoint came from)."""
        logits = super()._model_call(inps, attn_mask, labels)
        never = getattr(self, "_never", None)
        return logits if never is None else logits.index_fill(-1, never.to(logits.device), float("-inf"))

    def _enable_cpu_data_parallel(self) -> None:
        """Shard documents across ``accelerate launch`` processes on CPU too.

        lm-eval 0.4.13's HF model enables data parallelism only when it counts more than one GPU;
        on CPU every process would evaluate every document. The processes and their process group
        exist either way, so take rank and world size from the accelerator as ``hf`` does on GPUs.
        """
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self.world_size == 1 and self.device.type == "cpu":
            self._rank = accelerator.local_process_index
            self._world_size = accelerator.num_processes

    # ------------------------------------------------------------ generation

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        self._check_sampling(requests)
        # HFLM sorts and batches the requests itself; remember which request each context is, so
        # that every row's statistics can be tied to its (task, doc_id).
        for request in requests:
            self._pending_requests[request.args[0]].append(request)
        try:
            return super().generate_until(requests, disable_tqdm=disable_tqdm)
        finally:
            self._pending_requests.clear()
            self._finish_generation()

    def _check_sampling(self, requests: list[Any]) -> None:
        """Refuse sampled generation with a greedy-only strategy before any request runs."""
        if load_decoder(self.strategy).supports_sampling:
            return
        for request in requests:
            kwargs = request.args[1] if len(request.args) > 1 and isinstance(request.args[1], dict) else {}
            if kwargs.get("do_sample") and kwargs.get("temperature", 0.0):  # as _model_generate reads them
                raise MTPArgumentError(
                    f"model_args strategy={self.strategy} decodes greedily, but task {getattr(request, 'task_name', '?')} "
                    f"asks for sampling (do_sample=True, temperature={kwargs['temperature']}); use "
                    "strategy=confadapt, static or ar, or --gen_kwargs do_sample=false"
                )

    def tok_batch_encode(self, strings: list[str], *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._batch_contexts = list(strings)  # the batch _model_generate receives next
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        attention_mask = generation_kwargs.pop("attention_mask", None)
        do_sample = bool(generation_kwargs.pop("do_sample", False))
        temperature = generation_kwargs.pop("temperature", 0.0)
        top_p = generation_kwargs.pop("top_p", 1.0)
        if do_sample and not temperature:
            do_sample = False  # lm-eval's convention: temperature 0 means greedy
        generation_kwargs.pop("use_cache", None)
        if generation_kwargs:
            warnings.warn(
                f"--model mtp ignores the generation arguments {sorted(generation_kwargs)}; it supports "
                "until, max_gen_toks, do_sample, temperature and top_p",
                stacklevel=2,
            )
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            out = generate(
                self.model,
                context,
                attention_mask,
                strategy=self.strategy,
                k=self.k,
                tau=self.tau,
                max_new_tokens=max(0, max_length - context.shape[1]),
                stop_strings=[s for s in stop if s] or None,
                tokenizer=self.tokenizer,
                pad_token_id=self.tokenizer.pad_token_id,
                do_sample=do_sample,
                temperature=float(temperature) if do_sample else 1.0,
                top_p=float(top_p),
                **({"mask_slots": self.mask_slots} if self.mask_slots is not None else {}),
                draft_lookup=self.draft_lookup,
                cache=self.cache,
                compile=self.compile,
                decoder_options=self.decoder_options or None,
            )
        self._record(out.stats, context.shape[0])
        return out.sequences

    def _record(self, stats: Any, batch_size: int) -> None:
        contexts = self._batch_contexts if len(self._batch_contexts) == batch_size else [None] * batch_size
        for context, row in zip(contexts, stats.rows):
            queue = self._pending_requests.get(context)
            request = queue.popleft() if queue else None
            self._samples.append(
                SampleStats(
                    task=getattr(request, "task_name", None),
                    doc_id=getattr(request, "doc_id", None),
                    tokens=row.tokens,
                    forward_passes=row.forward_passes,
                    tokens_per_pass=list(row.tokens_per_pass),
                    eff_k=row.eff_k,
                    stop_reason=row.stop_reason,
                    batch_size=batch_size,
                    seconds=stats.wall_seconds,
                )
            )
        self._generation_seconds += stats.wall_seconds
        self._model_calls += stats.model_calls
        self._batch_contexts = []

    # ------------------------------------------------------------ statistics

    def _finish_generation(self) -> None:
        """Gather every rank's records on rank 0, write the JSONL and print the summary there."""
        gathered = self.gather_object((self._samples, self._generation_seconds, self._model_calls))
        if self.rank != 0:
            return
        self._all_samples = [s for part in gathered for s in part[0]]
        self._all_seconds = max(part[1] for part in gathered)  # ranks decode in parallel
        self._all_calls = sum(part[2] for part in gathered)
        if not self._all_samples:
            return
        path = self._stats_path
        if path is None and (output_path := output_path_from_argv()):
            path = default_stats_path(output_path, self._pretrained_name)
        if path is not None:
            write_jsonl(path, self._all_samples)
        self._written_stats_path = path
        summary = self.mtp_summary()
        summary_table(summary, path, uses_tau=self.uses_tau)
        self._hooks.mtp_generation_finished(summary=summary, samples_path=str(path) if path else None)

    @property
    def mtp_samples(self) -> list[SampleStats]:
        """This process's per-request MTP statistics so far, in the order generated (read-only use)."""
        return self._samples

    def mtp_summary(self) -> dict[str, Any]:
        """Aggregate MTP statistics of the generation requests so far (all ranks, on rank 0)."""
        samples = getattr(self, "_all_samples", self._samples)
        summary = aggregate(
            samples,
            strategy=self.strategy,
            k=self.k,
            tau=self.tau,
            seconds=getattr(self, "_all_seconds", self._generation_seconds),
            calls=getattr(self, "_all_calls", self._model_calls),
            decoder_options=self.decoder_options,
        )
        path = getattr(self, "_written_stats_path", None)
        summary["samples_path"] = str(path) if path else None
        return summary

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["mtp"] = self.mtp_summary()
        return info


def _checked(name: str, value: Any, check: Any) -> None:
    """Run an engine argument check; its ValueError becomes a model_args error naming the argument."""
    try:
        check()
    except ValueError as error:
        raise MTPArgumentError(f"model_args {name}={value!r} is not allowed: {error}") from None


def _check_args(k: Any, tau: Any, strategy: Any) -> type:
    """Validate our own model_args before any weights load; returns the decoder class."""
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise MTPArgumentError(f"model_args k={k!r} is not allowed: k must be an integer >= 1 (or left out)")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau <= 1:
        raise MTPArgumentError(f"model_args tau={tau!r} is not allowed: tau must be a number in (0, 1]")
    try:
        return load_decoder(str(strategy))
    except UnknownPluginError as error:
        raise MTPArgumentError(f"model_args strategy={strategy!r} is not allowed: {error}") from None


def _check_checkpoint_fits(spec: Any, strategy: str, k: int, pretrained: Any) -> None:
    """A strategy that feeds mask slots needs a checkpoint with mask tokens, enough of them for k."""
    if spec is None:
        raise MTPArgumentError(
            f"strategy={strategy} with k={k} needs an MTP checkpoint, but {pretrained} has no "
            "mask token (no `mtp` block in its config.json). Make one with "
            "mtp_plugins.add_mask_tokens + `mtp-train`, or pass strategy=ar or k=1."
        )
    if spec.max_decodable_k is not None and k > spec.max_decodable_k:
        raise MTPArgumentError(
            f"k={k} is too large for {pretrained}: its per-slot mask tokens allow k <= {spec.max_decodable_k}"
        )


def _decoder_options(kwargs: dict[str, Any], decoder_cls: type) -> dict[str, Any]:
    """Take the model_args the decoder declares in ``options`` out of ``kwargs`` (an hf model_arg of
    the same name stays lm-eval's)."""
    hf = set(_hf_args())
    return {name: kwargs.pop(name) for name in list(kwargs) if name in decoder_cls.options and name not in hf}


def _build_decoder(strategy: str, k: int, tau: float, options: dict[str, Any]) -> Any:
    """The decoder as ``generate`` builds it; a value it refuses is a model_args error naming it."""
    try:
        return make_decoder(strategy, k, float(tau), options=options)
    except ValueError as error:
        given = ",".join(f"{name}={value!r}" for name, value in options.items()) or f"strategy={strategy!r}"
        raise MTPArgumentError(f"model_args {given} is not allowed: {error}") from None


def _own_args() -> list[str]:
    return [p for p in inspect.signature(MTPLM.__init__).parameters if p not in ("self", "kwargs")]


def _hf_args() -> list[str]:
    return [p for p in inspect.signature(HFLM.__init__).parameters if p not in ("self", "kwargs")]


def _unexpected_keyword(error: TypeError) -> str | None:
    found = re.search(r"unexpected keyword argument '([^']+)'", str(error))
    return found.group(1) if found else None


def unknown_key_message(key: str, value: Any, decoder_cls: type, strategy: str) -> str:
    """One line: the unknown model_args key, the closest allowed name, and every name allowed."""
    ours, hf, options = _own_args(), _hf_args(), sorted(decoder_cls.options)
    close = difflib.get_close_matches(key, [*ours, *options, *hf], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return (
        f"model_args {key}={value!r} is not an argument of --model mtp{hint} allowed: mtp's "
        f"{', '.join(ours)}; strategy {strategy}'s options: {', '.join(options) or 'none'}; lm-eval hf's "
        f"{', '.join(n for n in hf if n not in ours)}; and the from_pretrained keywords of the model"
    )
