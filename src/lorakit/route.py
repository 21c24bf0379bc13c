"""Mixed batches: each row of a batch runs with its own adapter, or with none.

    with lorakit.route(model, ["support", "legal", None, "support"]):
        logits = model(input_ids=ids).logits              # row 2 sees the base model alone
        out = model.generate(input_ids=ids, max_new_tokens=32)

Every adapter named must be loaded in the model. While the context is open, each LoRA
layer (and each module trained with an adapter, such as a classification head) applies
to each batch row the adapter named for it; nothing else about the model changes, so a
transformers model's `forward` and `generate` work as they are. A batch whose row count
is a multiple k of the names (`generate` with `num_return_sequences` or beams repeats
each row k times) gives each repeated row its source row's adapter.

Without gradients, linear layers run `ops.multi` on stacked copies of the adapters: the
Triton shrink/expand kernels (one launch each for all adapters) for prefill-sized inputs;
for a few tokens (decode), one GEMM over all adapters and one Triton expand, shared by the
layers called in turn on the same input (q/k/v, gate/up). The copies
are taken when a layer first runs inside a context and kept for later contexts until an
adapter changes (for decode, each group of layers also holds a copy of its members' A
tables side by side, built once per context); a change to an adapter's weights made inside
an open context is seen from the next context on. With gradients, or dropout in training mode, the plain
per-adapter path runs instead and is differentiable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lorakit.inject import _state, list_adapters
from lorakit.layers import LoraLayer, ModulesToSave


class Route:
    """The adapter of each batch row, with per-device index tensors built once per batch shape."""

    def __init__(self, names: Sequence[str | None]) -> None:
        self.rows = tuple(names)
        self.names = tuple(dict.fromkeys(n for n in names if n is not None))  # distinct, in order
        self._tensors: dict[tuple, Tensor] = {}
        # Few-token steps: layers called one after another on the same tensor (q/k/v, gate/up)
        # are siblings; the first computes all their outputs in one grouped launch (see
        # LoraLinear._decode_step) and leaves the others theirs, which each takes only if
        # it is called with that same, unmodified tensor.
        self.siblings: dict[nn.Module, tuple[nn.Module, ...]] = {}
        self._run: tuple | None = None  # (x, its version, [layers called on it so far])
        self._left: dict[nn.Module, tuple] = {}  # layer -> (x, version, its output)

    def per_row(self, n_rows: int) -> tuple[str | None, ...]:
        """The adapter of each of a batch's `n_rows` rows."""
        k, rem = divmod(n_rows, len(self.rows))
        if rem or not k:
            raise ValueError(f"lorakit.route names {len(self.rows)} rows (or a multiple of them), "
                             f"but the batch has {n_rows} rows")
        return tuple(n for n in self.rows for _ in range(k))

    def row_indices(self, names: tuple[str, ...], n_rows: int) -> list[int]:
        """Each row's index into `names`, or -1."""
        index = {n: i for i, n in enumerate(names)}
        return [index.get(n, -1) for n in self.per_row(n_rows)]

    def row_tensor(self, names: tuple[str, ...], n_rows: int, device: torch.device) -> Tensor:
        """(n_rows,) int32: `row_indices` on `device`."""
        key = ("index", names, n_rows, device)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.row_indices(names, n_rows), dtype=torch.int32, device=device)
        return self._tensors[key]

    def cached(self, key: tuple, make) -> Tensor:
        """A tensor built once per route context by `make()` and shared by every layer asking with `key`."""
        if key not in self._tensors:
            self._tensors[key] = make()
        return self._tensors[key]

    def note_input(self, layer: nn.Module, x: Tensor) -> None:
        """Record that `layer` ran on x: a run of layers called in turn on one tensor are siblings."""
        run = self._run
        if run is not None and run[0] is x and run[1] == _version(x):
            run[2].append(layer)
        else:
            self._run = run = (x, _version(x), [layer])
        group = tuple(run[2])
        for m in group:
            self.siblings[m] = group

    def leave(self, layer: nn.Module, x: Tensor, y: Tensor) -> None:
        """Hold `layer`'s output y for input x, computed ahead by its group's first layer."""
        self._left[layer] = (x, _version(x), y)

    def take(self, layer: nn.Module, x: Tensor) -> Tensor | None:
        """The output left for `layer` if it was computed from this very x, unmodified; else None."""
        held = self._left.pop(layer, None)
        if held is not None and held[0] is x and held[1] == _version(x):
            return held[2]
        return None

    def close(self) -> None:
        """Drop the tensors held for sibling groups (the context is over)."""
        self._run = None
        self._left.clear()

    def groups(self, n_rows: int, device: torch.device) -> Iterator[tuple[str, Tensor]]:
        """(adapter, the rows that use it as a long tensor) for each adapter in the batch."""
        for name in self.names:
            key = ("rows", name, n_rows, device)
            if key not in self._tensors:
                rows = [i for i, n in enumerate(self.per_row(n_rows)) if n == name]
                self._tensors[key] = torch.tensor(rows, dtype=torch.long, device=device)
            if self._tensors[key].numel():
                yield name, self._tensors[key]


def _version(x: Tensor) -> int | None:
    """x's in-place version counter (None for inference-mode tensors, which keep none)."""
    return None if x.is_inference() else x._version


def _routable(model: nn.Module) -> list[nn.Module]:
    """The LoRA layers and trained module copies of the model, in one walk of its modules
    (a context is entered for every batch: its walk is host time before any GPU work)."""
    return [m for m in model.modules() if isinstance(m, (LoraLayer, ModulesToSave))]


@contextmanager
def route(model: nn.Module, adapters: Sequence[str | None]):
    """Run batches in which row i uses adapter `adapters[i]` (None: no adapter) inside this context."""
    _state(model)  # raises if the model has no adapters
    if isinstance(adapters, str) or not len(adapters):
        raise ValueError(f"lorakit.route takes a list with one adapter name (or None) per batch row; "
                         f"found {adapters!r}")
    known = list_adapters(model)
    unknown = sorted({n for n in adapters if n is not None and n not in known})
    if unknown:
        raise ValueError(f"no adapter named {unknown}; the model has {known}")
    layers = _routable(model)
    if any(getattr(m, "merged_adapters", None) for m in layers):
        raise RuntimeError("the model has merged adapters, which apply to every row; "
                           "unmerge(model) before running a mixed batch")
    if any(m.route is not None for m in layers):
        raise RuntimeError("lorakit.route is already open on this model; contexts do not nest")
    r = Route(adapters)
    for m in layers:
        m.route = r
    try:
        yield r
    finally:
        r.close()
        for m in layers:
            m.route = None
