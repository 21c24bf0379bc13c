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
Triton shrink/expand kernels (one launch each for all adapters) for prefill-sized inputs,
the layers called in turn on the same input (q/k/v, gate/up) sharing one shrink from the
second context on (the runs of such layers seen in a context are kept on the layers); for
a few tokens (decode), one GEMM over all adapters and one Triton expand, shared by those
layers. The copies are taken when a layer first runs inside a context and kept for later
contexts until an adapter changes (for decode, each group of layers also holds a copy of its
members' A tables side by side, built once per context); a change to an adapter's weights
made inside an open context is seen from the next context on. A later context of the same
rows gets the same index tensors (the model keeps the last SHARED_TENSORS of them), so each
layer's prefill launch plan (`ops.multi.MixedLinear`) stays valid and nothing is checked or
copied to the device again. With gradients, or dropout in training mode, the plain
per-adapter path runs instead and is differentiable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lorakit.inject import _state, list_adapters
from lorakit.layers import LoraLayer, ModulesToSave

SHARED_TENSORS = 256  # index tensors a model keeps for later contexts of the same rows (least recently used go)


class Route:
    """The adapter of each batch row, with per-device index tensors built once per batch shape.

    The index tensors depend on the rows' adapter names alone; `shared` (a model's store, kept
    across contexts) hands a later context of the same rows the same tensors, so that its
    layers find their launch plans still valid and no index is copied to the device again.
    """

    def __init__(self, names: Sequence[str | None], shared: OrderedDict | None = None) -> None:
        self.rows = tuple(names)
        self.names = tuple(dict.fromkeys(n for n in names if n is not None))  # distinct, in order
        self._tensors: dict[tuple, Tensor] = {}  # what this context used: alive while it is open
        self._shared = OrderedDict() if shared is None else shared
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
        return self.cached(("index", names, n_rows, device), lambda: torch.tensor(
            self.row_indices(names, n_rows), dtype=torch.int32, device=device), across_contexts=True)

    def cached(self, key: tuple, make, across_contexts: bool = False):
        """A value built by `make()` once per route context and shared by every layer asking with
        `key`; with `across_contexts`, also by later contexts of the same rows (for values that
        depend on `key` and the rows alone, never on ids of other objects)."""
        held = self._tensors.get(key)
        if held is None:
            if across_contexts:
                shared_key = (self.rows, *key)
                held = self._shared.get(shared_key)
                if held is None:
                    held = self._shared[shared_key] = make()
                    while len(self._shared) > SHARED_TENSORS:
                        self._shared.popitem(last=False)
                else:
                    self._shared.move_to_end(shared_key)
            else:
                held = make()
            self._tensors[key] = held
        return held

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
            rows = self.cached(("rows", name, n_rows, device), lambda name=name: torch.tensor(
                [i for i, n in enumerate(self.per_row(n_rows)) if n == name], dtype=torch.long, device=device),
                across_contexts=True)
            if rows.numel():
                yield name, rows


def _version(x: Tensor) -> int | None:
    """x's in-place version counter (None for inference-mode tensors, which keep none)."""
    return None if x.is_inference() else x._version


def _routable(model: nn.Module) -> list[nn.Module]:
    """The LoRA layers and trained module copies of the model, in one walk of its modules.

    A context is entered for every batch, and its walk is host time before any GPU work: the
    walk reads the module dicts directly and does not enter LoRA layers, whose children are
    the base layer and the adapter tables.
    """
    found, stack, seen = [], [model], {id(model)}
    while stack:
        m = stack.pop()
        if isinstance(m, LoraLayer):
            found.append(m)
            continue
        if isinstance(m, ModulesToSave):
            found.append(m)
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                stack.append(child)
    return found


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
    r = Route(adapters, _state(model).route_tensors)
    for m in layers:
        m.__dict__["route"] = r  # a plain attribute: nn.Module's __setattr__ would only add host time
    try:
        yield r
    finally:
        r.close()
        for m in layers:
            m.__dict__["route"] = None
        # The runs of layers fed one tensor seen here, kept for later contexts' prefill-sized calls
        # (LoraLinear._prefill_step checks each time that its members get that same tensor).
        for m, group in r.siblings.items():
            m.__dict__["_siblings"] = group
