"""Data-parallel training over several processes started by torchrun: DDP or FSDP2.

    torchrun --nproc-per-node 2 -m lorakit train --recipe imdb-llama-3.2-1b
    lorakit train --recipe imdb-llama-3.2-1b --nproc 2        # the same: starts torchrun itself

Every process runs the same training loop (lorakit.train). The recipe's batch_size and
grad_accum keep meaning the global batch of one optimizer step: every rank builds the
same global micro-batches and trains on its contiguous share of each, so N processes
see exactly the examples one process would, and their gradients add up to its gradient.

DDP keeps a whole copy of the model on every rank; FSDP2 (fully_shard on every
transformer block, then on the root) splits every weight, frozen or trained, across the
ranks. Rank 0 alone prints and writes files; checkpoints and the adapter hold full
tensors (gathered from the shards), and every rank reads them back to resume.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import lorakit
from lorakit import data

STRATEGIES = ("auto", "ddp", "fsdp")
# A rank that waits this long for the others in a collective fails instead of hanging.
TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes, as torchrun describes it."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the process's index on its node: the GPU it uses
    local_size: int = 1  # processes on this node

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The World from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); SINGLE without them."""
    if "WORLD_SIZE" not in env:
        return SINGLE
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    values = []
    for name in names:
        text = env.get(name, "")
        if not text.isdigit():
            raise ValueError(f"WORLD_SIZE is set, so {name} must be a non-negative integer as torchrun sets it, "
                             f"got {env.get(name)!r}")
        values.append(int(text))
    world = World(*values)
    if not (world.rank < world.size and world.local_rank < world.local_size <= world.size):
        raise ValueError("inconsistent torchrun variables: need RANK < WORLD_SIZE and LOCAL_RANK < LOCAL_WORLD_SIZE "
                         f"<= WORLD_SIZE, got {dict(zip(names, values))}")
    return world


def check_config(c: Any, world: World) -> None:
    """Settings a distributed run cannot use; raised before any process waits for another."""
    if not world.distributed:
        return
    problems = []
    if c.batch_size < world.size:
        problems.append(f"batch_size is the global batch, split across the {world.size} processes; "
                        f"it must be at least {world.size}, got {c.batch_size}")
    if c.device not in ("auto", "cuda", "cpu"):
        problems.append(f"each process uses the GPU of its LOCAL_RANK; device must be auto, cuda or cpu, "
                        f"got {c.device!r}")
    if problems:
        raise ValueError("distributed run: " + "; ".join(problems))


def process_device(device: torch.device, world: World) -> torch.device:
    """This process's device: cuda:LOCAL_RANK for a distributed run on GPUs, else `device`."""
    if not world.distributed or device.type != "cuda":
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(f"process LOCAL_RANK {world.local_rank} needs GPU cuda:{world.local_rank}, but "
                         f"{torch.cuda.device_count()} are visible; start at most that many processes per node")
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def quiet_unless_main(world: World) -> Iterator[None]:
    """Discard standard output on every rank but 0 (errors still reach standard error)."""
    if world.is_main:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The torch.distributed process group while the block runs (none for one process): NCCL on GPUs, gloo on CPUs.

    Whatever holds the group from C++ (DDP's reducer) must be freed inside the block: the
    group must be destroyed here, through its Python handle, which releases the GIL. Freed
    last by such an object instead, it is destroyed with the GIL held, and gloo's worker
    threads, which may need the GIL to finish their last work, deadlock (pytorch#56297).
    """
    if not world.distributed:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    try:
        dist.barrier()  # every rank has checked its settings and read its data; only now may rank 0 write
        yield
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the failed frames' locals (the wrapped model) go now
        raise
    finally:
        dist.destroy_process_group()


# -- collectives (each returns its input unchanged for one process) -------------------------


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(world: World, *values: float) -> list[float]:
    """Each value summed over all ranks."""
    if not world.distributed:
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(totals)
    return totals.tolist()


def any_rank(world: World, flag: bool) -> bool:
    return all_sum(world, float(flag))[0] > 0


def all_ranks(world: World, flag: bool) -> bool:
    return all_sum(world, float(flag))[0] == world.size


def from_main(world: World, value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(world: World, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order."""
    if not world.distributed:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


# -- the global batch -----------------------------------------------------------------------------


def share(batch: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """This rank's rows of a collated global batch, trimmed to their longest example.

    Ranks take contiguous rows; the first len % size ranks take one more. A rank left
    with no row (a batch smaller than the world) gets row 0 with every label ignored:
    it adds nothing to loss, gradient or counts, but keeps the rank in step with the
    others' collectives.
    """
    if not world.distributed:
        return batch
    base, extra = divmod(len(batch["input_ids"]), world.size)
    start = world.rank * base + min(world.rank, extra)
    stop = start + base + (world.rank < extra)
    if start == stop:
        part = {k: v[:1].clone() for k, v in batch.items()}
        part["labels"].fill_(data.IGNORE_INDEX)
    else:
        part = {k: v[start:stop] for k, v in batch.items()}
    longest = int(part["attention_mask"].sum(1).max())  # batches are right-padded
    return {k: v[:, :longest] if v.dim() == 2 else v for k, v in part.items()}


# -- strategies -------------------------------------------------------------------------------


def choose_strategy(requested: str, model: nn.Module, device: torch.device) -> tuple[str, str]:
    """("ddp" or "fsdp", why). auto: DDP when weights, gradients and AdamW's state fit in half a GPU."""
    if requested != "auto":
        return requested, f"--strategy {requested}"
    if device.type != "cuda":
        return "ddp", "training on CPUs (FSDP2 is for models that do not fit one GPU)"
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    need = weights + 4 * trainable  # + gradients, DDP's gradient buckets and AdamW's two moments
    have = torch.cuda.get_device_properties(device).total_memory
    sizes = f"weights, gradients and optimizer state take {need / 2**30:.1f} GiB"
    if need <= have / 2:
        return "ddp", f"{sizes}, at most half of {device}'s {have / 2**30:.1f} GiB (the rest is for activations)"
    return "fsdp", f"{sizes}, more than half of {device}'s {have / 2**30:.1f} GiB: every rank holds a shard"


def wrap(model: nn.Module, strategy: str, device: torch.device, blocks: nn.ModuleList) -> nn.Module:
    """`model` on `device`, data-parallel: DDP, or FSDP2 with one shard group per block in `blocks`."""
    if strategy == "ddp":
        return DistributedDataParallel(model.to(device), device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)  # gathered for its forward and backward, sharded again after
    fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, head; moves the shards to `device`
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model without DDP's wrapper (FSDP2 shards the model in place: it is its own module)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Forward and backward of one micro-batch; with `sync` False the gradients stay local
    (accumulated) instead of being averaged over the ranks."""
    if sync:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif _is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


# -- full tensors from shards, shards from full tensors --------------------------------------------


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` detached and whole: gathered from all ranks if it is an FSDP2 shard (a DTensor; then every rank must call this)."""
    from torch.distributed.tensor import DTensor

    return t.detach().full_tensor() if isinstance(t, DTensor) else t.detach()


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: the local shard of a DTensor, else `t`."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut across the ranks as `like` is, when `like` is a DTensor; `full` itself otherwise.
    Every rank passes the same `full`, so no data moves between ranks."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def save_adapter(model: nn.Module, directory: Path, world: World) -> None:
    """lorakit.save_adapter of the whole adapter, written by rank 0 (every rank must call this)."""
    module = unwrap(model)
    tensors = {k: full_tensor(v) for k, v in lorakit.adapter_state_dict(module).items()}
    if world.is_main:
        lorakit.save_adapter(module, directory, tensors=tensors)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Under FSDP2 the whole model's weights, gathered on rank 0's CPU (every rank must call this;
    the others get an empty dict). None otherwise: the model holds them itself."""
    if not _is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -- `lorakit train --nproc N` --------------------------------------------------------------------


def relaunch(nproc: int, argv: list[str]) -> NoReturn:
    """Replace this process by torchrun running `lorakit <argv>` in `nproc` processes on this machine:
    its exit status and the signals sent to it (Ctrl-C) are then torchrun's."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise ValueError("--nproc starts torchrun itself; under torchrun (WORLD_SIZE is set) leave it out")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lorakit", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
