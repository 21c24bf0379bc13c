"""Decoding with each step replayed from one CUDA graph: `graphed_generate`.

A decode step of a small batch is a few hundred tiny kernels; launched one by one from
Python, the host, not the GPU, sets the pace (benchmarks/RESULTS.md: a Llama-3.2-1B-shaped
model's eager step at batch 64 took 11-17 ms against 4.6 ms replayed from a graph). Here
the prompt runs once eagerly into a static KV cache, the first steps run eagerly too (they
warm up lorakit's mixed-batch route and are real steps of the output), and one step is
then captured and replayed for every further token. Everything a step changes (the last
token, the cache position, the attention mask, the output buffer, which rows are done)
lives in tensors the graph updates itself, so a replay needs nothing from the host.

Works for transformers causal LMs that take a `StaticCache`, with or without lorakit
layers, inside `lorakit.route(...)` for per-row adapters. `graphs=False` runs the same
steps eagerly (any device): the reference the graphed steps are tested against.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

STOP_CHECK_EVERY = 16  # steps between the host's looks at whether every row has finished (one sync each)


def graphed_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                     max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None,
                     pad_token_id: int | None = None, temperature: float = 0.0, graphs: bool = True,
                     warm_steps: int = 2, timings: dict | None = None) -> Tensor:
    """Continue `input_ids` (B, T), left-padded where `attention_mask` (B, T) has zeros, by up to
    `max_new_tokens`: greedy at temperature 0, else sampled from softmax(logits / temperature)
    (no top-k or top-p) with torch's generator (replays draw new noise each step through
    PyTorch's graph-safe CUDA generator; the GPU tests check greedy decoding only). Returns
    (B, T + n) like transformers' `generate`: after a row emits an EOS token its later tokens
    are `pad_token_id`; n < max_new_tokens only when every row has finished. `eos_token_id` and `pad_token_id` default to the model's generation config.

    `timings`, a dict if given, receives the synchronised seconds of each phase: "prefill_s",
    "warm_s" (the eager steps), "capture_s" and "replay_s", and "replays", the replay count
    (without graphs: "prefill_s", "steps_s" and "steps"). Timing adds a device sync per phase.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, length) with length >= 1; found shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; found {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0; found {temperature}")
    if graphs and input_ids.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; input_ids are on {input_ids.device} (pass graphs=False)")
    from transformers import StaticCache

    gen = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(gen, "eos_token_id", None)
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = pad_token_id if pad_token_id is not None else getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    dev = input_ids.device
    rows, length = input_ids.shape
    total = length + max_new_tokens
    clock = _Clock(timings, dev)
    with torch.no_grad():
        # newer transformers name the cache argument `cache`, older ones `past_key_values`
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = {cache_arg: _static_cache(StaticCache, model, rows, total, dev)}
        mask = torch.zeros(rows, total, dtype=torch.long, device=dev)  # (B, total): 1 where a position is attended
        mask[:, :length] = 1 if attention_mask is None else attention_mask.to(dev, torch.long)
        positions = (mask[:, :length].cumsum(-1) - 1).clamp_min(0)  # (B, T): left padding shifts each row's start
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                       cache_position=torch.arange(length, device=dev), use_cache=True, logits_to_keep=1,
                       **cache).logits
        # the prompt's last slot and position: emitting its token advances both to the first step's
        state = _State(rows, max_new_tokens, length - 1, positions[:, -1:], eos_ids, pad, temperature, dev)
        state.emit(logits[:, -1])
        clock.lap("prefill_s")

        def step() -> None:  # reads `last` at its slot and position (emit advanced them)
            mask.index_fill_(1, state.cache_pos, 1)  # this step's own position is attended
            out = model(input_ids=state.last, attention_mask=mask, position_ids=state.position,
                        cache_position=state.cache_pos, use_cache=True, **cache).logits
            state.emit(out[:, -1])

        state.run(step, max_new_tokens - 1, graphs, warm_steps, clock)
        return torch.cat([input_ids, state.out[:, :state.done]], dim=1)


def _static_cache(cls, model: nn.Module, rows: int, total: int, dev: torch.device):
    """A StaticCache of `total` slots: transformers 5 sizes and places it on first use; 4.x takes
    the batch size, device and dtype up front (under one of two names for the batch size)."""
    params = inspect.signature(cls.__init__).parameters
    extra: dict = {}
    for name in ("max_batch_size", "batch_size"):
        if name in params:
            extra[name] = rows
            break
    if "device" in params:
        extra["device"] = dev
    if "dtype" in params:
        extra["dtype"] = getattr(model, "dtype", None) or next(p.dtype for p in model.parameters())
    return cls(config=model.config, max_cache_len=total, **extra)


class _State:
    """What a decode step reads and writes, all on the device: the graph replays update it in place."""

    def __init__(self, rows: int, steps: int, slot: int, position: Tensor, eos_ids: list[int], pad: int,
                 temperature: float, dev: torch.device) -> None:
        self.out = torch.full((rows, steps), pad, dtype=torch.long, device=dev)  # (B, max_new_tokens)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)  # the next column of `out`
        self.last = torch.zeros(rows, 1, dtype=torch.long, device=dev)  # (B, 1): the token the next step reads
        self.cache_pos = torch.tensor([slot], dtype=torch.long, device=dev)  # the cache slot of `last`
        self.position = position.clone()  # (B, 1): the position id of `last` in each row
        self.finished = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=dev)
        self.pad, self.temperature = pad, temperature
        self.done = 0  # columns of `out` written so far (host count)

    def emit(self, logits: Tensor) -> None:
        """Choose each row's next token from logits (B, vocab) and advance every counter."""
        if self.temperature > 0:
            probs = torch.softmax(logits.float() / self.temperature, dim=-1)  # (B, vocab)
            # argmax of p / Exp(1) noise draws from p, without multinomial's host checks
            token = (probs / torch.empty_like(probs).exponential_()).argmax(-1)
        else:
            token = logits.argmax(-1)  # (B,)
        token = torch.where(self.finished, self.pad, token)
        if self.eos.numel():
            self.finished |= (token[:, None] == self.eos).any(-1)
        self.out.index_copy_(1, self.index, token[:, None])
        self.last.copy_(token[:, None])
        self.index.add_(1)
        self.cache_pos.add_(1)
        self.position.add_(1)
        self.done += 1

    def all_finished(self) -> bool:
        return bool(self.eos.numel()) and bool(self.finished.all())

    def run(self, step, steps: int, graphs: bool, warm_steps: int, clock: _Clock) -> None:
        """`steps` calls of step(): the first `warm_steps` eagerly (on a side stream, as capture
        needs), then, with `graphs`, the rest replayed from one captured step."""
        if not graphs:
            done = self.done
            for i in range(steps):
                if i % STOP_CHECK_EVERY == 0 and self.all_finished():
                    break
                step()
            clock.lap("steps_s", self.done - done, "steps")
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        warm = min(warm_steps, steps)
        with torch.cuda.stream(side):
            for _ in range(warm):
                step()
        torch.cuda.current_stream().wait_stream(side)
        clock.lap("warm_s")
        if warm == steps:
            return
        done = self.done
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()  # recorded, not run
        self.done = done  # capture ran no step
        clock.lap("capture_s")
        for i in range(steps - warm):
            if i % STOP_CHECK_EVERY == 0 and self.all_finished():
                break
            graph.replay()
            self.done += 1
        clock.lap("replay_s", self.done - done, "replays")


class _Clock:
    """Synchronised phase times into a dict, or nothing (no syncs) without one."""

    def __init__(self, out: dict | None, device: torch.device) -> None:
        self.out, self.cuda = out, device.type == "cuda"
        self.t = self._now() if out is not None else 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str, count: int | None = None, count_name: str | None = None) -> None:
        if self.out is None:
            return
        t = self._now()
        self.out[name] = t - self.t
        if count_name is not None:
            self.out[count_name] = count
        self.t = t
