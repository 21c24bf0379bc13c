"""Training checkpoints: write a run's state atomically, find the latest, and restore it.

A checkpoint is checkpoints/step-N/ in the run directory: the trainable tensors, the
optimizer's state, every rank's random generators (safetensors) and the loop state
(state.json); checkpoints/latest names the newest complete one. `lorakit train --resume`
reads it back, in one process or under torchrun.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lorakit import distributed
from lorakit.checkpoint import atomic_write


def params_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    world: distributed.World = distributed.SINGLE) -> Path:
    """Write checkpoints/step-N atomically, then drop older ones.

    Files go to a temporary directory that is renamed into place, and the `latest`
    pointer is replaced last, so a kill at any moment leaves the previous checkpoint
    complete and pointed to. In a distributed run every rank calls this with the
    unwrapped model: FSDP2 shards are gathered into full tensors, and rank 0 writes
    them with every rank's random generator states.
    """
    trainable = {n: distributed.full_tensor(p).cpu().contiguous()
                 for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    opt_tensors = {f"{i}.{k}": distributed.full_tensor(v).cpu().contiguous()
                   for i, s in opt["state"].items() for k, v in s.items()}
    rng_states = distributed.gather_objects(world, own_rng_states(world))
    root = run_dir / "checkpoints"
    final = root / f"step-{state['step']:08d}"
    if not world.is_main:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    save_file(trainable, tmp / "trainable.safetensors")
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng = {rng_prefix(rank) + name: s for rank, states in enumerate(rng_states) for name, s in states.items()}
    save_file(rng, tmp / "rng.safetensors")
    full_state = {**state, "param_groups": opt["param_groups"], "python_random": random.getstate()}
    (tmp / "state.json").write_text(json.dumps(full_state, indent=1) + "\n")
    for path in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write(root / "latest", lambda tmp: Path(tmp).write_text(final.name + "\n"))
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def own_rng_states(world: distributed.World) -> dict[str, torch.Tensor]:
    """This process's random generators: the CPU's and those of the GPUs it may use."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        gpus = [torch.cuda.current_device()] if world.distributed else range(torch.cuda.device_count())
        rng.update({f"cuda.{i}": torch.cuda.get_rng_state(i) for i in gpus})
    return rng


def rng_prefix(rank: int) -> str:
    """Key prefix of a rank's generators in rng.safetensors: none for rank 0 (and one-process runs)."""
    return f"rank{rank}." if rank else ""


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    world: distributed.World = distributed.SINGLE) -> dict:
    """Restore trainable tensors, optimizer, RNG states; return the loop state (step, epoch, ...).

    Every rank of a distributed run reads the full tensors and keeps its own shard of them.
    """
    state = json.loads((path / "state.json").read_text())
    tensors = _read_tensors(path / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        diff = sorted(set(tensors) ^ set(params))
        raise ValueError(f"{path}: the checkpoint's trainable tensors do not match the model (e.g. {diff[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(distributed.shard_like(tensors[name], p))
    opt_params = params_of(optimizer)
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _read_tensors(path / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        # AdamW's moments have their parameter's shape (and sharding); its step count is a scalar
        opt_state.setdefault(int(index), {})[name] = (distributed.shard_like(value, opt_params[int(index)])
                                                      if value.dim() else value)
    optimizer.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    rng = _read_tensors(path / "rng.safetensors")
    prefix = rng_prefix(world.rank)
    if prefix + "torch" in rng:  # else a rank the checkpoint did not have keeps its seeded generators
        torch.set_rng_state(rng[prefix + "torch"])
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            if f"{prefix}cuda.{i}" in rng:
                torch.cuda.set_rng_state(rng[f"{prefix}cuda.{i}"], i)
    version, internal, gauss = state.pop("python_random")
    random.setstate((version, tuple(internal), gauss))
    return state
