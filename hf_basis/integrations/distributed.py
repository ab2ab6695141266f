"""Several processes (DDP, FSDP2): keep the compressed layers identical on every rank.

A converted model's compressed layers hold integer codes / packed values and level tables as buffers. Neither
gradients nor FSDP2 ever touch them (FSDP2 does not shard buffers and DDP only broadcasts them from rank 0 when it
wraps the model), so a process that converted differently (another `seed`, other token frequencies, a k-means whose
floating-point sums came out differently on its GPU) would train a different model without any error.

- `check_same_compressed_state(model)`: compares a checksum of every buffer of the compressed layers (and every
  parameter that is not sharded, e.g. the centroids before FSDP2 wraps the model) across the processes and raises
  `CompressedStateMismatchError` (one line naming the first tensor that differs) if any process disagrees. A no-op
  without `torch.distributed` or with one process. **Chosen behaviour: fail, not repair.** Once a model is wrapped,
  repairing is not possible in general: under FSDP2 each rank's centroid shard was cut from its own conversion, so
  copying rank 0's codes would pair them with other ranks' centroids, a silently wrong model.
- `broadcast_compressed_state(model, src=0)`: copies the compressed layers (buffers and parameters) of rank `src`
  to every process. Call it after converting on every rank and before wrapping the model (DDP, `fully_shard`,
  `accelerator.prepare`, `Trainer.train`); the recipes do.
- `SameCompressedStateCallback`: a `TrainerCallback` running the check in `on_train_begin`, i.e. after the Trainer
  wrapped the model and before the first step: `Trainer(..., callbacks=[SameCompressedStateCallback()])`.
- `fully_shard_compressed(model, ...)`: FSDP2 for a converted transformers model: one `fully_shard` group per
  decoder block (`model._no_split_modules`), ONE group for the input embedding and the lm_head (a tied codebook is
  one parameter shared by both, and torch refuses a shared parameter visible to two groups), then the root.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from hf_basis.integrations.record import COMPRESSED_MODULES

__all__ = [
    "CompressedStateMismatchError",
    "SameCompressedStateCallback",
    "broadcast_compressed_state",
    "check_same_compressed_state",
    "compressed_tensors",
    "fully_shard_compressed",
]


class CompressedStateMismatchError(RuntimeError):
    """The compressed layers differ between the processes of a distributed run."""


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _is_sharded(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"  # FSDP2 / tensor parallel shards; each rank holds another part


def compressed_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every buffer and parameter held by the model's compressed layers (codes, centroids, bias,
    packed values, levels), each shared tensor once (a tied codebook), in module order."""
    seen: set[int] = set()
    found = []
    for module_name, module in model.named_modules():
        if not isinstance(module, COMPRESSED_MODULES):
            continue
        named = [*module.named_buffers(prefix=module_name), *module.named_parameters(prefix=module_name)]
        for name, tensor in named:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                found.append((name, tensor))
    return found


def _collective_device(group) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """(2,) int64 checksum of the tensor's bytes: their sum and a position-weighted sum (catches permutations)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).to(torch.int64)
    weights = torch.arange(data.numel(), device=data.device, dtype=torch.int64) % 65521 + 1
    return torch.stack([data.sum(), (data * weights).sum()])


def check_same_compressed_state(model: nn.Module, group=None) -> None:
    """Raise CompressedStateMismatchError unless every process holds the same compressed layers.

    Compares the buffers of the compressed layers (codes, packed values, levels) and those of their parameters that
    are not sharded (centroids and bias before FSDP2, or under DDP). Every process of `group` must call it (it is a
    collective); without torch.distributed, or with one process, it does nothing.
    """
    if not _distributed(group):
        return
    tensors = [(name, t) for name, t in compressed_tensors(model) if not _is_sharded(t)]
    device = _collective_device(group)
    # Every rank must send the same number of numbers; a rank with other layers shows as a count mismatch.
    count = torch.tensor([len(tensors)], device=device, dtype=torch.int64)
    counts = torch.cat([count, -count])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=group)
    if int(counts[0]) != -int(counts[1]):
        raise CompressedStateMismatchError(
            f"hf_basis: the processes hold different numbers of compressed tensors ({-int(counts[1])} to "
            f"{int(counts[0])}); convert the model the same way on every rank"
        )
    if not tensors:
        return
    sums = torch.stack([_fingerprint(t).to(device) for _, t in tensors])  # (N, 2)
    both = torch.cat([sums, -sums])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    high, low = both[: len(tensors)], -both[len(tensors):]
    differ = (high != low).any(dim=1).nonzero().flatten().tolist()
    if differ:
        names = [tensors[i][0] for i in differ]
        raise CompressedStateMismatchError(
            f"hf_basis: the compressed layers differ across the {dist.get_world_size(group)} processes ("
            f"{len(names)} tensor(s), first {names[0]!r}): every rank must convert with the same seed and data, or "
            "call hf_basis.integrations.distributed.broadcast_compressed_state(model) before wrapping the model"
        )


def broadcast_compressed_state(model: nn.Module, src: int = 0, group=None) -> int:
    """Copy the compressed layers (buffers and parameters) of rank `src` to every process; returns how many tensors.

    Call before wrapping the model (DDP, fully_shard, accelerate, Trainer.train): the tensors must not be sharded.
    Every process of `group` must call it; a no-op without torch.distributed or with one process.
    """
    if not _distributed(group):
        return 0
    tensors = compressed_tensors(model)
    sharded = [name for name, t in tensors if _is_sharded(t)]
    if sharded:
        raise ValueError(f"broadcast_compressed_state needs an unwrapped model, but {sharded[0]!r} is already sharded "
                         "(call it before fully_shard / accelerator.prepare)")
    device = _collective_device(group)
    with torch.no_grad():
        for _, tensor in tensors:
            buffer = tensor.detach().to(device).contiguous()
            dist.broadcast(buffer, src=src, group=group)
            tensor.copy_(buffer)
    return len(tensors)


def fully_shard_compressed(model: nn.Module, block_classes: tuple[type, ...] | None = None, **fsdp_kwargs) -> nn.Module:
    """Apply FSDP2 (`torch.distributed.fsdp.fully_shard`) to a converted transformers model, in place; returns it.

    Groups: each module whose class name is in `model._no_split_modules` (the decoder blocks; or of `block_classes`),
    then the input embedding and the output layer together in one group, not resharded after forward (a tied
    codebook, or tied dense weight, is one parameter: torch >= 2.13 refuses it in two groups; and a basis head's lazy
    logits read the gathered centroids after the head returns), then the root with the rest. The integer codes are
    buffers and stay whole on every rank. `fsdp_kwargs` go to every `fully_shard` call (mesh, mp_policy, ...).
    """
    from torch.distributed.fsdp import fully_shard

    if block_classes is None:
        names = set(getattr(model, "_no_split_modules", None) or ())
        blocks = [m for m in model.modules() if type(m).__name__ in names]
    else:
        blocks = [m for m in model.modules() if isinstance(m, block_classes)]
    for block in blocks:
        fully_shard(block, **fsdp_kwargs)
    ends = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        trains = module is not None and any(p.requires_grad for p in module.parameters())
        if trains and all(module is not m for m in ends):
            ends.append(module)
    if ends:
        # Not resharded after forward: a basis head's lazy logits keep using its centroids until the loss (and they
        # are small: the point of compressing them).
        fully_shard(ends, **{**fsdp_kwargs, "reshard_after_forward": False})
    fully_shard(model, **fsdp_kwargs)
    return model


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object


class SameCompressedStateCallback(TrainerCallback):
    """Trainer callback: `check_same_compressed_state` on the model when training begins (every process).

    `Trainer(..., callbacks=[SameCompressedStateCallback()])`. Fails the run with CompressedStateMismatchError
    instead of letting processes train different compressed layers."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            check_same_compressed_state(model)
        return control
