"""Gated low-rank adapters: mask slots learn, the next-token path never moves (METHOD.md section 10).

Every target projection ``W`` of the base model gets a low-rank path whose output counts only at
mask-token positions::

    y = W x + g(t) * B (A x) * alpha / rank,    g(t) = 1 exactly where token t is a mask token.

Real tokens never attend to mask slots (training layout, decode engine), so every real token
computes exactly the base model: its next-token predictions, ``ar`` and ``verify`` decoding and
every log-likelihood are the base model's by construction. The adapter cannot be merged into the
base weights (that would change the real tokens too); it travels as its own small checkpoint.

Where the gate applies is held by a ``Gate`` on the model. By default it is read from each call's
``input_ids`` (so ``model.generate`` or an lm-eval log-likelihood call, which hold no mask token,
run the base model and never touch the adapters); the decode engine and the trainer, which know
where their mask slots are, set it for a pass (``gate_tail``: the last n columns of every row;
``gate_all``; ``gate_off``), which keeps the shapes static for ``torch.compile``. The low-rank path
is computed only for the gated rows, and not at all in a pass without mask slots.

The adapter checkpoint on disk is ``mtp_plugins.adapter_checkpoint``.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mtp_plugins.adapter_settings import (  # noqa: F401  (part of this module's API)
    ATTENTION,
    MLP,
    TARGET_SETS,
    AdapterError,
    AdapterSettings,
    parse_targets,
)

ADAPTER_CONFIG = "mtp_adapter.json"
ADAPTER_WEIGHTS = "mtp_adapter.safetensors"
ADAPTER_FORMAT = 1
GATE_RULE = "mask-token"  # g(t) = 1 exactly where token t is one of the mask tokens, 0 elsewhere
MASK_ROWS = "mtp_mask_embeddings"  # [mask tokens, hidden]: the trained embedding rows of the mask tokens
_A, _B = "mtp_lora_A", "mtp_lora_B"


@dataclass
class Gate:
    """Which rows of the current forward pass get the adapters: ``tail`` (the last n columns of every
    row) or ``rows`` (flat indices into batch x columns); neither: none."""

    mask_ids: torch.Tensor
    tail: int = 0
    rows: torch.Tensor | None = None
    forced: bool = False  # set for a pass by gate_tail / gate_all / gate_off, else read from input_ids


@dataclass
class GatedAdapters:
    """What ``attach_gated_lora`` added to a model (kept on the model as ``model.mtp_adapters``)."""

    settings: AdapterSettings
    gate: Gate
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)  # name -> projection with A, B
    handles: list[Any] = field(default_factory=list, repr=False)

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in (getattr(m, _A), getattr(m, _B))]


def adapters_of(model: Any) -> GatedAdapters | None:
    return model.__dict__.get("mtp_adapters")


def _features(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a projection: ``nn.Linear``, or transformers' GPT-2 ``Conv1D``."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.shape[0], module.nf
    return None


def attach_gated_lora(
    model: Any, mask_ids: Sequence[int], settings: AdapterSettings = AdapterSettings(), *, dtype: torch.dtype | None = None,
    seed: int = 0,
) -> GatedAdapters:
    """Give every target projection of ``model`` a gated low-rank path (B starts at zero, so the
    model is unchanged until it trains). The parameters are registered on the projections
    themselves (``...q_proj.mtp_lora_A``), so FSDP shards them with their layer; ``dtype``: theirs
    (default: the projection's; the trainer keeps float32 master weights over a bf16 base). ``A`` is
    drawn from a generator seeded with ``seed``, so a run is reproducible."""
    if adapters_of(model) is not None:
        raise AdapterError("this model already has gated adapters attached")
    device = model.get_input_embeddings().weight.device
    gate = Gate(mask_ids=torch.tensor(list(mask_ids), dtype=torch.long, device=device))
    adapters = GatedAdapters(settings=settings, gate=gate)
    wanted = set(settings.targets)
    generator = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        features = _features(module)
        if features is None or name.rsplit(".", 1)[-1] not in wanted:
            continue
        kind = dtype or module.weight.dtype
        bound = 1.0 / math.sqrt(features[0])  # nn.Linear's default init (kaiming-uniform, a = sqrt(5))
        a = (torch.rand(settings.rank, features[0], generator=generator) * 2 - 1).mul_(bound)
        a = a.to(device=module.weight.device, dtype=kind)
        module.register_parameter(_A, torch.nn.Parameter(a))
        module.register_parameter(_B, torch.nn.Parameter(torch.zeros(features[1], settings.rank, dtype=kind, device=a.device)))
        # The gated path is the projection's own forward (a bound method; cheaper per call than a
        # forward hook, and a deepcopy of the model rebinds it to the copy), its state on the module.
        module.__dict__.update(_mtp_gate=gate, _mtp_scale=settings.scale)
        module.forward = types.MethodType(_gated_forward, module)
        adapters.modules[name] = module
    _group_shared_inputs(adapters.modules, settings.scale)
    if not adapters.modules:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _features(m) is not None})
        raise AdapterError(
            f"adapter targets {', '.join(settings.targets)} match no projection of {type(model).__name__}; "
            f"its projections: {', '.join(found)}"
        )
    adapters.handles.append(model.register_forward_pre_hook(_gate_from_inputs, with_kwargs=True))
    model.__dict__["mtp_adapters"] = adapters
    return adapters


def _gated_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The projection, plus its low-rank path on the gated rows of ``x`` ``[B, S, in]``."""
    output = type(module).forward(module, x)
    gate = module._mtp_gate
    tail, rows = gate.tail, gate.rows
    if not tail and rows is None:
        return output  # a pass without mask slots: the base projection alone
    if tail:
        tail = output.shape[1] if tail < 0 else tail
        if not torch.is_grad_enabled():  # decoding: per-call overhead is most of the cost at batch 1
            group = module.__dict__.get("_mtp_group")
            if group is not None:
                output[:, -tail:] += group[0].delta(group[1], x, tail).view(output.shape[0], tail, -1)
                return output
            a, b = _inference_weights(module)
            if torch.is_autocast_enabled(x.device.type):  # (the trainer's evaluation) products in its dtype
                low = torch.mm(torch.mm(x[:, -tail:].float().reshape(-1, a.shape[0]), a), b)
                output[:, -tail:] += low.view(output.shape[0], tail, -1)
                return output
            # The B product adds into a float32 copy of the tail in one fused call (addmm), written
            # back once: measurably cheaper per pass than a product and a mixed-dtype add.
            # narrow and copy_, not indexing: a pass calls this for every target projection, and at
            # batch 1 each tensor call counts.
            start = output.shape[1] - tail
            part = output.narrow(1, start, tail)
            held = part.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            held.view(-1, held.shape[-1]).addmm_(torch.mm(x.narrow(1, start, tail).reshape(-1, a.shape[0]).float(), a), b)
            part.copy_(held)
            return output
        a, b = getattr(module, _A), getattr(module, _B)
        delta = (F.linear(F.linear(x[:, -tail:], a), b) * module._mtp_scale).to(output.dtype)  # [B, tail, out]
        if tail == output.shape[1]:
            return output + delta
        return torch.cat([output[:, :-tail], output[:, -tail:] + delta], dim=1)
    a, b = getattr(module, _A), getattr(module, _B)
    flat = output.reshape(-1, output.shape[-1])
    delta = F.linear(F.linear(x.reshape(-1, x.shape[-1]).index_select(0, rows), a), b) * module._mtp_scale
    return flat.index_add(0, rows, delta.to(flat.dtype)).view(output.shape)


def _inference_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``A^T`` and ``scale * B^T`` as contiguous float32 matrices, made once per weight version.

    Without gradients the low-rank path runs in float32 whatever the model's dtype: on a CPU a
    bfloat16 matrix product this small costs about 4x a float32 one (per-call overhead), and the
    adapter runs 2 of them per projection per pass."""
    params = module._parameters  # not getattr: nn.Module's attribute lookup costs more than the check
    a, b = params[_A], params[_B]
    key = (a._version, b._version, a.data_ptr(), b.data_ptr())
    held = module.__dict__.get("_mtp_inference")
    if held is not None and held[0] == key:
        return held[1], held[2]
    # Trainable weights change under optimizers that do not bump the version counter (fused AdamW):
    # only frozen ones (a loaded checkpoint) are held (a key of None matches no call).
    if a.requires_grad or b.requires_grad:
        key = None
    with torch.no_grad():
        held = (key, a.detach().float().t().contiguous(), (b.detach().float() * module._mtp_scale).t().contiguous())
    module.__dict__["_mtp_inference"] = held
    return held[1], held[2]


#: Sibling projections that every supported architecture calls on the same input tensor, one after
#: the other: their low-rank paths share one pass over that input (one A product, one B product).
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _SharedInput:
    """The inference low-rank path of sibling projections on one input: ``[A_1 .. A_n]`` in one
    product, then a block-diagonal ``B`` in another, computed once for the first sibling called and
    handed to the others (each checks that it got the same input tensor)."""

    def __init__(self, members: list[torch.nn.Module], scale: float) -> None:
        self.members, self.scale = members, scale
        self._key: Any = None
        self._weights: Any = None
        self._input: torch.Tensor | None = None
        self._tail = 0
        self._parts: list[torch.Tensor] = []

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        params = [(getattr(m, _A), getattr(m, _B)) for m in self.members]
        trainable = any(a.requires_grad or b.requires_grad for a, b in params)  # see _inference_weights
        key = None if trainable else tuple((a._version, b._version, a.data_ptr(), b.data_ptr()) for a, b in params)
        if key is None or self._key != key:
            with torch.no_grad():
                a_cat = torch.cat([a.detach().float().t() for a, _ in params], dim=1).contiguous()  # [in, n*r]
                b_diag = torch.block_diag(*[b.detach().float().t() * self.scale for _, b in params])  # [n*r, sum out]
            self._key, self._weights = key, (a_cat, b_diag, [b.shape[0] for _, b in params])
        return self._weights

    def delta(self, index: int, x: torch.Tensor, tail: int) -> torch.Tensor:
        """[B * tail, out] float32: member ``index``'s low-rank path on the last ``tail`` columns of ``x``."""
        if self._input is not x or self._tail != tail or index == 0:
            a_cat, b_diag, outs = self._matrices()
            low = torch.mm(torch.mm(x[:, -tail:].to(torch.float32).reshape(-1, a_cat.shape[0]), a_cat), b_diag)
            self._input, self._tail, self._parts = x, tail, list(low.split(outs, dim=1))
        return self._parts[index]


def _group_shared_inputs(modules: dict[str, torch.nn.Module], scale: float) -> None:
    for names in SHARED_INPUT:
        parents: dict[str, list[torch.nn.Module]] = {}
        for name, module in modules.items():
            parent, _, last = name.rpartition(".")
            if last in names:
                parents.setdefault(parent, [None] * len(names))[names.index(last)] = module
        for members in parents.values():
            present = [m for m in members if m is not None]
            if len(present) > 1:
                group = _SharedInput(present, scale)
                for i, m in enumerate(present):
                    m.__dict__["_mtp_group"] = (group, i)


def _gate_from_inputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Unless a pass set the gate, it is where ``input_ids`` hold a mask token (none without ids)."""
    gate = model.__dict__["mtp_adapters"].gate
    if gate.forced:
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    gate.tail, gate.rows = 0, None
    if isinstance(ids, torch.Tensor):
        rows = torch.isin(ids.flatten(), gate.mask_ids).nonzero().flatten()
        gate.rows = rows if rows.numel() else None


@contextmanager
def _forced(model: Any, tail: int = 0, rows: torch.Tensor | None = None) -> Iterator[None]:
    adapters = adapters_of(model)
    if adapters is None:
        yield
        return
    gate = adapters.gate
    before = (gate.tail, gate.rows, gate.forced)
    gate.tail, gate.rows, gate.forced = tail, rows, True
    try:
        yield
    finally:
        gate.tail, gate.rows, gate.forced = before


def gate_tail(model: Any, columns: int) -> Any:
    """For the passes inside: the adapters act on the last ``columns`` columns of every row (the
    engine's mask slots) and nowhere else; 0: nowhere. A no-op for a model without adapters."""
    return _forced(model, tail=columns)


def gate_all(model: Any) -> Any:
    """The adapters act on every column (a pass that feeds only mask slots)."""

    @contextmanager
    def every_column() -> Iterator[None]:
        with _forced(model, tail=-1):
            yield

    return every_column()


def gate_off(model: Any) -> Any:
    """The base model alone (the teacher: the same weights with the gate off)."""
    return _forced(model)


# ---------------------------------------------------------------------------------- mask rows


def train_mask_rows(model: Any, mask_ids: Sequence[int], dtype: torch.dtype | None = None) -> torch.nn.Parameter:
    """A trainable copy of the mask tokens' embedding rows (in ``dtype``; default the matrix's), used
    wherever ``input_ids`` hold a mask token (the embedding matrix itself stays frozen: no gradient or
    optimizer state for its other rows). ``export_mask_rows`` writes it back into the matrix."""
    embedding = model.get_input_embeddings()
    ids = torch.tensor(list(mask_ids), dtype=torch.long, device=embedding.weight.device)
    rows = torch.nn.Parameter(embedding.weight.detach()[ids].to(dtype or embedding.weight.dtype, copy=True))
    embedding.register_parameter(MASK_ROWS, rows)
    slot = torch.full((embedding.weight.shape[0],), -1, dtype=torch.long, device=ids.device)
    slot[ids] = torch.arange(len(ids), device=ids.device)

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        which = slot[args[0]]  # [B, S]: mask index, or -1 for real tokens
        mine = getattr(module, MASK_ROWS)
        return torch.where((which >= 0)[..., None], mine[which.clamp(min=0)].to(output.dtype), output)

    embedding.register_forward_hook(hook)
    return rows


def export_mask_rows(model: Any, mask_ids: Sequence[int], rows: torch.Tensor | None = None) -> None:
    """Write the trained mask rows (``rows``, or the embedding's ``mtp_mask_embeddings``) into the
    embedding matrix, where plain lookups (inference) read them."""
    embedding = model.get_input_embeddings()
    if rows is None:
        rows = getattr(embedding, MASK_ROWS)
    with torch.no_grad():
        embedding.weight[list(mask_ids)] = rows.detach().to(embedding.weight.dtype, copy=True)


# --------------------------------------------------------------------------- checkpoint files
