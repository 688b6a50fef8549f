"""Training on several processes with PyTorch's own machinery: torchrun, torch.distributed, FSDP2.

A plain single process (``mtp-train ...``, ``python -m train_cli ...``) never initialises a process
group: ``Context.enabled`` is False (saving a checkpoint on one GPU must not need one). A torchrun
launch always does, even with one process (``--nproc-per-node 1`` then runs FSDP on one device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    distributed: bool = False  # a process group exists (torchrun), even of one process

    @property
    def enabled(self) -> bool:
        return self.distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: torch.device) -> Context:
    """Join the process group torchrun describes; a process not started by torchrun stays alone."""
    if not launched_by_torchrun():
        return Context()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    context = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)
    if device.type == "cuda":
        torch.cuda.set_device(context.local_rank)
    return context


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets these for every worker; a plain process has neither."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated transformer blocks of an HF causal LM (the units FSDP shards one by one)."""
    base = model.base_model
    for name in ("layers", "h", "blocks", "block"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    raise ValueError(f"cannot find the transformer layers of {type(model).__name__} to shard")


def shard(model: Any, param_dtype: torch.dtype | None, checkpoint_activations: bool) -> None:
    """FSDP2 ``fully_shard`` per transformer layer, then the root; bf16 compute on GPUs when asked."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if checkpoint_activations:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def mean(value: float, context: Context) -> float:
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / context.world_size


def total(value: int, context: Context) -> int:
    """The sum of every rank's ``value`` (an integer count), on every rank."""
    if not context.enabled:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor)
    return int(tensor)


def gather(value: Any, context: Context) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not context.enabled:
        return [value]
    out: list[Any] = [None] * context.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(context: Context) -> None:
    if context.enabled:
        dist.barrier()


def full_model_state(model: Any, context: Context) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); the plain state dict in one process."""
    if not context.enabled:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if context.is_main else None


def full_optimizer_state(model: Any, optimizer: Any, context: Context) -> dict[str, Any] | None:
    if not context.enabled:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if context.is_main else None


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any] | None, context: Context) -> None:
    """Restore a gathered optimizer state (read on rank 0, broadcast into every rank's shards)."""
    if not context.enabled:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state if context.is_main else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
    )


def shutdown(context: Context) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()
