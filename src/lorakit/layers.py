"""LoRA layers: wrap a frozen base layer and hold any number of named adapters.

`LoraLinear` wraps `nn.Linear` and transformers' GPT-2 `Conv1D`, `LoraEmbedding` wraps
`nn.Embedding`, `LoraConv2d` wraps `nn.Conv2d`. State uses PEFT's names (`lora_A`,
`lora_B`, `lora_embedding_A/B`), each a ParameterDict keyed by adapter name, so saving
an adapter in PEFT's format is a key rename.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from copy import deepcopy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit import ops

if TYPE_CHECKING:
    from lorakit.route import Route

_VERSION = operator.attrgetter("_version")
SUPPORTED_TYPES = "nn.Linear, transformers' Conv1D, nn.Embedding and nn.Conv2d"


@dataclass
class DecodePlan:
    """A few-token mixed-batch call's tensors, kept by a LoraLinear for the next call of the same shape."""

    route: Route
    key: tuple  # (x.shape, x.dtype, training) of the call that built it
    weight: Tensor  # (out, in)
    bias: Tensor | None
    b_stack: Tensor  # (N, out, R)
    a_cat: Tensor  # (N·R, in)
    b_cat: Tensor  # (out, N·R)
    mask: Tensor  # (T, N·R)
    tokens: ops.multi.AdapterTokens
    # (members, their plans, ops.multi.GroupedDecode): the group this layer leads, as its last step ran it
    group_run: tuple | None = None

    def fits(self, other: DecodePlan) -> bool:
        """Whether this layer can share `other`'s grouped launches: same context, call shape and tables' N and R."""
        return (self.route is other.route and self.key == other.key and self.tokens is other.tokens
                and self.b_stack.shape[::2] == other.b_stack.shape[::2])


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)) or is_conv1d(module)


class LoraLayer(nn.Module):
    """Adapter bookkeeping shared by every LoRA layer; subclasses add shapes and math."""

    a_name = "lora_A"
    b_name = "lora_B"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.add_module(self.a_name, nn.ParameterDict())
        self.add_module(self.b_name, nn.ParameterDict())
        self.train(base_layer.training)  # a model put in eval mode before injection stays in eval mode
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.disabled = False
        # The weight as it was before the first merge, when merging was asked to keep it:
        # unmerge then restores W bit for bit instead of subtracting ΔW in floating point.
        self.register_buffer("original_weight", None, persistent=False)
        # Set by `lorakit.route` while a mixed batch runs: which adapter each batch row uses.
        self.route: Route | None = None
        self._stacks: dict[tuple, tuple] = {}  # padded adapter tables for the mixed-batch kernels
        self._plan: DecodePlan | None = None  # the last few-token mixed-batch call's tensors, reused by the next
        # (route, call key, ops.multi.MixedLinear, what it was built from): the last prefill-sized
        # mixed-batch call's plan
        self._prefill: tuple | None = None

    def __getattr__(self, name: str):
        # Code that reads `layer.weight`, `layer.in_features`, ... sees the base layer's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def A_table(self) -> nn.ParameterDict:
        """Adapter name -> A (PEFT's lora_A, or lora_embedding_A for embeddings)."""
        return self._modules[self.a_name]

    @property
    def B_table(self) -> nn.ParameterDict:
        return self._modules[self.b_name]

    # -- shapes, supplied by subclasses ------------------------------------------------

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter `name` in float32, in the base weight's own layout."""
        raise NotImplementedError

    @property
    def base_weight(self) -> Tensor:
        return self.base_layer.weight

    # -- adapters ------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.A_table.keys())

    def adapter_params(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        return self.A_table[name], self.B_table[name]

    def add_adapter(self, name: str, r: int, lora_alpha: float, scale: float, dropout: float,
                    init: bool | str, dtype: torch.dtype | None = None) -> None:
        assert name not in self.A_table, f"adapter {name!r} exists on this layer"
        weight = self.base_weight
        dtype = dtype or weight.dtype
        a_shape, b_shape = self.adapter_shapes(r)
        a = torch.empty(a_shape, device=weight.device, dtype=dtype)
        b = torch.empty(b_shape, device=weight.device, dtype=dtype)
        with torch.no_grad():
            self.init_adapter(a, b, r, init)
        self.A_table[name] = nn.Parameter(a)
        self.B_table[name] = nn.Parameter(b)
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, lora_alpha, scale
        self.lora_dropout[name] = dropout

    def init_adapter(self, a: Tensor, b: Tensor, r: int, init: bool | str) -> None:
        """A random, B zero (ΔW = 0) for True and "gaussian"; both random for False."""
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def delete_adapter(self, name: str) -> None:
        assert name not in self.merged_adapters, "unmerge before deleting a merged adapter"
        for table in (self.A_table, self.B_table):
            del table[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            del table[name]
        self._stacks.clear()
        self._plan = self._prefill = None
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = tuple(n for n in names if n in self.A_table)

    def unmerged_active(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    # -- mixed batches ---------------------------------------------------------------------

    def check_routable(self) -> None:
        if self.merged_adapters:
            raise RuntimeError("a merged model cannot run a mixed batch; unmerge(model) first")

    def routed_delta(self, x: Tensor, result: Tensor, branch) -> Tensor:
        """result + each row's adapter branch, one adapter's rows at a time (differentiable).

        `branch(name, x_rows)` gives the LoRA term of adapter `name` for those rows.
        """
        self.check_routable()
        if self.disabled:
            return result
        route = self.route
        for name, rows in route.groups(x.shape[0], x.device):
            if name in self.A_table:
                result = result.index_add(0, rows, branch(name, x.index_select(0, rows)).to(result.dtype))
        return result

    # -- merging -------------------------------------------------------------------------

    def merge(self, names: Iterable[str], keep_original: bool = True) -> None:
        """W ← W + Σ ΔW, the sum taken in float32 and rounded once."""
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        weight = self.base_weight
        delta = sum(self.delta_weight(n) for n in names)
        with torch.no_grad():
            if keep_original and not self.merged_adapters:
                self.original_weight = weight.detach().clone()
            weight.copy_(ops.merge_weight(weight, delta))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Undo every merge: exact when the original was kept, else W ← W − Σ ΔW."""
        if not self.merged_adapters:
            return
        weight = self.base_weight
        with torch.no_grad():
            if self.original_weight is not None:
                weight.copy_(self.original_weight)
            else:
                delta = sum(self.delta_weight(n) for n in self.merged_adapters)
                weight.copy_(ops.merge_weight(weight, delta, sign=-1.0))
        self.original_weight = None
        self.merged_adapters = []

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.r[n]}" for n in self.adapter_names)
        return f"adapters=({ranks}), active={list(self.active_adapters)}, merged={self.merged_adapters}"


class LoraLinear(LoraLayer):
    """y = base(x) + Σ_active s·B·A·dropout(x), for nn.Linear and GPT-2's Conv1D."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        w = base_layer.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])

    def adapter_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def delta_weight(self, name: str) -> Tensor:
        delta = ops.lora_delta(self.A_table[name], self.B_table[name], self.scaling[name])  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.route is not None:
            return self._routed_forward(x, *args, **kwargs)
        active = self.unmerged_active()
        if len(active) == 1 and not args and not kwargs:
            name = active[0]
            grad = torch.is_grad_enabled()
            # The modules' own dicts, not attribute lookups through nn.Module: this runs for every
            # layer of every step, and an eager step is paced by its host.
            base = self._modules["base_layer"]
            reason = ops.fast_path_blocker(base, x)
            if reason is None and not grad and torch.is_autocast_enabled(x.device.type):
                reason = "autocast is on (the inference path runs in the input's dtype)"
            if reason is None and (grad or not (self.training and self.lora_dropout[name])):
                weight = base.weight.T if self.fan_in_fan_out else base.weight  # (out, in)
                lora_A = self._modules[self.a_name]._parameters[name]
                lora_B = self._modules[self.b_name]._parameters[name]
                if not grad:
                    # Conv1D keeps its own GEMM, so a zero adapter leaves its output bit for bit
                    return ops.lora_linear_inference(x, weight, base.bias, lora_A, lora_B, self.scaling[name],
                                                     base if self.fan_in_fan_out else None)
                shared = self.__dict__.get("_shared_input")  # q/k/v as one node (lorakit.fusion)
                if shared is not None:
                    y = shared[0].forward(shared[1], self, x, name)
                    if y is not None:
                        return y
                return ops.fused_lora_linear(x, weight, base.bias, lora_A, lora_B, self.scaling[name],
                                             self.lora_dropout[name], self.training)
            if reason is not None and grad:
                ops.log_fallback_once(reason)
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            branch = ops.lora_branch(x, self.A_table[name], self.B_table[name], self.scaling[name],
                                     self.lora_dropout[name], self.training)
            result = result + branch.to(result.dtype)
        return result

    def _routed_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """Each batch row (dim 0 of x) with its own adapter or none."""
        route = self.route
        repeatable = not (args or kwargs or torch.is_grad_enabled() or self.disabled or self.merged_adapters
                          or torch.is_autocast_enabled(x.device.type))
        if repeatable:
            key = (x.shape, x.dtype, self.training)
            plan = self._plan
            if plan is not None and plan.route is route and plan.key == key:
                # decode: every step repeats the last step's shapes; skip the bookkeeping below
                return self._decode_step(x, plan).view(*x.shape[:-1], self.out_features)
            if x.numel() > ops.multi.DENSE_MAX_TOKENS * x.shape[-1]:
                plan = self._prefill_plan(x, key)
                if plan is not None:
                    return self._prefill_step(x, plan)
        self.check_routable()
        loaded = self._modules[self.a_name]._parameters  # the table's own dict: this runs for every layer call
        names = [n for n in route.names if n in loaded]
        differentiable = torch.is_grad_enabled() or (self.training and any(self.lora_dropout[n] for n in names))
        if differentiable or self.disabled or not names or torch.is_autocast_enabled(x.device.type):
            result = self.base_layer(x, *args, **kwargs)
            return self.routed_delta(x, result, lambda name, xr: ops.lora_branch(
                xr, self.A_table[name], self.B_table[name], self.scaling[name], self.lora_dropout[name],
                self.training))
        a_stack, b_stack = self.stacked(route, tuple(names), x.dtype, x.device)
        rows, n_in, n_out = x.shape[0], x.shape[-1], self.out_features
        row_adapter = route.row_tensor(tuple(names), rows, x.device)
        x3 = x.reshape(rows, -1, n_in)  # (rows, seq, in)
        x2, seq = x3.reshape(-1, n_in), x3.shape[1]
        base = self._modules["base_layer"]
        plain = not args and not kwargs and ops.fast_path_blocker(base, x) is None and base.weight.dtype == x.dtype
        weight = base.weight.T if self.fan_in_fan_out else base.weight  # (out, in)
        if x2.shape[0] <= ops.multi.DENSE_MAX_TOKENS:
            n, r = a_stack.shape[:2]
            mask = route.cached(("mask", tuple(names), rows, seq, r, x.dtype, x.device),
                                lambda: ops.multi.dense_row_mask(row_adapter, seq, n, r, x.dtype), across_contexts=True)
            a_cat, b_cat = self.stacked(route, tuple(names), x.dtype, x.device, dense=True)
            if not plain:
                y = base(x, *args, **kwargs).reshape(-1, n_out)
                return ops.multi.dense_expand_add_(y, x2, a_cat, b_cat, mask).reshape(*x.shape[:-1], n_out)
            tokens = route.cached(("tokens", tuple(names), rows, seq, x.device), lambda: ops.multi.adapter_tokens(
                route.row_indices(tuple(names), rows), seq, n, x.device), across_contexts=True)
            self._plan = DecodePlan(route, (x.shape, x.dtype, self.training), weight, base.bias, b_stack, a_cat, b_cat,
                                    mask, tokens)
            route.note_input(self, x)
            y = self._decode_step(x, self._plan, group=False)
        else:  # prefill-sized and not plain (plain ones took `_prefill_plan_for`'s plan above)
            y = base(x, *args, **kwargs).reshape(-1, n_out)
            h = ops.multi.lora_shrink(x2, a_stack, row_adapter, seq)
            ops.multi.lora_expand_add_(y, h, b_stack, row_adapter, seq)
        return y.reshape(*x.shape[:-1], n_out)

    def _prefill_plan_for(self, x: Tensor) -> ops.multi.MixedLinear | None:
        """`_prefill_plan` for a call of this layer on x that has not been made yet: a group's first
        layer asks it for the other members (`_prefill_step`), ahead of their own calls."""
        if (self.route is None or torch.is_grad_enabled() or self.disabled or self.merged_adapters
                or torch.is_autocast_enabled(x.device.type)):
            return None
        return self._prefill_plan(x, (x.shape, x.dtype, self.training))

    def _prefill_plan(self, x: Tensor, key: tuple) -> ops.multi.MixedLinear | None:
        """This layer's plan for a prefill-sized plain call on x in the open context (key: x's shape
        and dtype, training), made now if it has none; None where such a call takes another path.
        The caller has checked that the call is repeatable (no gradients, autocast, merged or
        disabled adapters, extra arguments).

        The plan of the last such call is reused if it was made for the same tables, index
        tensor, base weight and call shape: a later context of the same rows gets the same
        index tensor from `Route`, so its layers check nothing again.
        """
        route = self.route
        held = self._prefill
        if held is not None and held[0] is route and held[1] == key:
            return held[2]
        loaded = self._modules[self.a_name]._parameters
        names = tuple(n for n in route.names if n in loaded)
        base = self._modules["base_layer"]
        if (not names or (self.training and any(self.lora_dropout[n] for n in names))
                or ops.fast_path_blocker(base, x) is not None or base.weight.dtype != x.dtype):
            return None
        a_stack, b_stack = self.stacked(route, names, x.dtype, x.device)
        row_adapter = route.row_tensor(names, x.shape[0], x.device)
        parts = (a_stack, b_stack, row_adapter, base.weight, base.bias)
        if held is not None and held[1] == key and all(p is q for p, q in zip(held[3], parts)):
            plan = held[2]
        else:
            weight = base.weight.T if self.fan_in_fan_out else base.weight  # (out, in)
            plan = ops.multi.MixedLinear(x.reshape(x.shape[0], -1, x.shape[-1]), weight, base.bias, a_stack, b_stack,
                                         row_adapter, out_shape=(*x.shape[:-1], self.out_features))
        self.__dict__["_prefill"] = (route, key, plan, parts)  # not nn.Module's __setattr__: host time
        return plan

    def _prefill_step(self, x: Tensor, plan: ops.multi.MixedLinear) -> Tensor:
        """y of a prefill-sized mixed batch by its plan.

        Layers called one after another on one tensor (q/k/v, gate/up), as seen in an earlier
        call (`Route.note_input`, kept on the layers when a context closes), share one shrink:
        the first of them, when called, runs `lora_shrink_group` for all whose tables match
        its own and leaves each its columns of h, which it takes if it is called next on that
        same, unmodified x; a layer that finds none runs its own shrink.
        """
        route = self.route
        route.note_input(self, x)
        h = route.take(self, x)
        if h is None and ops.multi.PREFILL_SIBLINGS:
            group = self.__dict__.get("_siblings")
            if group is not None and group[0] is self:
                members = []
                for m in group[1:ops.multi.GROUP_MAX_MEMBERS]:
                    p = m._prefill_plan_for(x) if m.route is route else None
                    if p is not None and p.shares_shrink_with(plan):
                        members.append((m, p))
                if members:
                    h_all = ops.multi.lora_shrink_group(x.reshape(plan.t, plan.n_in),
                                                        [plan.a_stack] + [p.a_stack for _, p in members],
                                                        plan.row_adapter, plan.seq, check=False)
                    r = plan.a_stack.shape[1]
                    for i, (m, _) in enumerate(members, 1):
                        route.leave(m, x, h_all[:, i * r:(i + 1) * r])
                    h = h_all[:, :r]
        return plan(x, h)

    def _decode_step(self, x: Tensor, plan: DecodePlan, group: bool = True) -> Tensor:
        """y2 (T, out) of a few-token mixed batch: the base GEMM, then the LoRA branch added in place.

        With `group`, a layer that leads a run of layers fed this same x (`Route.note_input`)
        computes all of theirs in one grouped shrink and expand and leaves their outputs for them to take.
        """
        route, x2 = plan.route, x.reshape(-1, x.shape[-1])
        held = route.take(self, x)
        if held is not None:
            return held
        multi = ops.multi
        if not group:  # the first call of a shape checks its tables
            ys = [F.linear(x2, plan.weight, plan.bias)]
            return multi.grouped_decode_add_(ys, x2, plan.a_cat, [plan.b_stack], plan.tokens, plan.mask,
                                             [plan.b_cat])[0]
        def joins(m: LoraLinear) -> bool:  # a member runs in the group only with its adapters neither off nor merged
            return not (m.disabled or m.merged_adapters)

        run = plan.group_run
        if run is None or not all(m._plan is p and joins(m) for m, p in zip(*run[:2])):
            members = [self]
            if multi.DECODE_SIBLINGS:
                members = [m for m in route.siblings.get(self, (self,))
                           if m._plan is not None and m._plan.fits(plan) and joins(m)]
                if members[0] is not self:
                    members = [self]
            plans = [m._plan for m in members]
            a_group = route.cached(("group table", *(id(p.a_cat) for p in plans)),
                                   lambda: multi.group_table([p.a_cat for p in plans]))
            # each member's tables were checked at its first call of the shape
            run = plan.group_run = (members, plans, multi.GroupedDecode(
                x2, a_group, [p.b_stack for p in plans], plan.tokens, plan.mask, [p.b_cat for p in plans]))
        members, plans, grouped = run
        ys = [F.linear(x2, p.weight, p.bias) for p in plans]
        grouped(ys, x2)
        for m, y in zip(members[1:], ys[1:]):
            route.leave(m, x, y)
        return ys[0]

    def stacked(self, route: Route, names: tuple[str, ...], dtype: torch.dtype, device: torch.device,
                dense: bool = False) -> tuple[Tensor, Tensor]:
        """The padded tables of `names` for the mixed-batch ops: (a_stack, b_stack), or with `dense`
        (a_cat, b_cat). Taken once per route context, rebuilt only when an adapter changed."""
        key = (names, dtype, device)
        held = self._stacks.get(key)
        if held is None or held[0] is not route:
            # The tables' own dicts, not ParameterDict's __getitem__: this runs for every layer of
            # every prefill, and 2·N lookups through the module machinery cost more host time
            # than the layer's kernels take to launch.
            # The stamp is the factors themselves (held, so that no id is reused) and their
            # in-place versions, read by C-level maps: it runs once per layer and context.
            pa, pb = self.A_table._parameters, self.B_table._parameters
            params = (*map(pa.__getitem__, names), *map(pb.__getitem__, names))
            versions = tuple(map(_VERSION, params))
            if held is None or held[2] != versions or not all(map(operator.is_, params, held[1])):
                with torch.no_grad():
                    a_stack, b_stack, _ = ops.multi.stack_adapters([self.A_table[n] for n in names],
                                                                   [self.B_table[n] for n in names],
                                                                   [self.scaling[n] for n in names], dtype, device)
                    held = (route, params, versions, (a_stack, b_stack), ops.multi.dense_tables(a_stack, b_stack))
            else:
                held = (route, *held[1:])
            self._stacks[key] = held
        return held[4] if dense else held[3]


class LoraEmbedding(LoraLayer):
    """E[ids] + Σ_active s·(B·A)ᵀ[ids], with PEFT's layout A: (r, num), B: (dim, r)."""

    a_name = "lora_embedding_A"
    b_name = "lora_embedding_B"

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
    def adapter_shapes(self, r: int):
        num, dim = self.base_layer.weight.shape
        return (r, num), (dim, r)

    def init_adapter(self, a: Tensor, b: Tensor, r: int, init: bool | str) -> None:
        # A gathers rows by token id, so it is the factor left at zero (as PEFT does).
        if init is False:
            nn.init.normal_(a)
            nn.init.normal_(b)
        elif init == "gaussian":
            nn.init.zeros_(a)
            nn.init.normal_(b, std=1.0 / r)
        else:
            nn.init.zeros_(a)
            nn.init.normal_(b)

    def delta_weight(self, name: str) -> Tensor:
        return ops.embedding_delta(self.A_table[name], self.B_table[name], self.scaling[name])

    def forward(self, ids: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(ids, *args, **kwargs)
        if self.route is not None:
            return self.routed_delta(ids, result, self._branch)
        for name in self.unmerged_active():
            result = result + self._branch(name, ids).to(result.dtype)
        return result

    def _branch(self, name: str, ids: Tensor) -> Tensor:
        base = self.base_layer
        h = F.embedding(ids, self.A_table[name].T, base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)  # (..., r)
        return h @ self.B_table[name].T * self.scaling[name]


class LoraConv2d(LoraLayer):
    """y = conv(x) + Σ_active s·B(A(dropout(x))): A a conv with the base's geometry, B 1×1."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on Conv2d needs groups=1, found groups={base_layer.groups}")
        if base_layer.padding_mode != "zeros":
            raise ValueError(f"LoRA on Conv2d needs padding_mode='zeros', found {base_layer.padding_mode!r}")
        super().__init__(base_layer)

    def adapter_shapes(self, r: int):
        out, cin, kh, kw = self.base_layer.weight.shape
        return (r, cin, kh, kw), (out, r, 1, 1)

    def delta_weight(self, name: str) -> Tensor:
        return ops.lora_delta(self.A_table[name], self.B_table[name], self.scaling[name])

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.route is not None:
            return self.routed_delta(x, result, self._branch)
        for name in self.unmerged_active():
            result = result + self._branch(name, x).to(result.dtype)
        return result

    def _branch(self, name: str, x: Tensor) -> Tensor:
        base = self.base_layer
        return ops.lora_conv2d_branch(x, self.A_table[name], self.B_table[name], self.scaling[name],
                                      base.stride, base.padding, base.dilation, self.lora_dropout[name],
                                      self.training)


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA layer for a supported base module."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return LoraLinear(module)
    raise ValueError(f"lorakit adapts {SUPPORTED_TYPES}; found {type(module).__name__}")


class ModulesToSave(nn.Module):
    """A module trained in full per adapter (e.g. a classification head).

    Each adapter gets its own trainable copy; the original stays frozen and is what
    the model uses when no adapter with a copy is active or adapters are disabled.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.train(original_module.training)
        self.active_adapter: str | None = None
        self.disabled = False
        self.route: Route | None = None  # set by `lorakit.route`

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.current, name)

    @property
    def current(self) -> nn.Module:
        if not self.disabled and self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def add_adapter(self, name: str) -> None:
        copy = deepcopy(self.original_module)
        for p in copy.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy

    def forward(self, *args, **kwargs):
        if self.route is None or self.disabled:
            return self.current(*args, **kwargs)
        x, rest = args[0], args[1:]
        result = self.original_module(x, *rest, **kwargs)
        for name, rows in self.route.groups(x.shape[0], x.device):
            if name in self.modules_to_save:
                out = self.modules_to_save[name](x.index_select(0, rows), *rest, **kwargs)
                result = result.index_copy(0, rows, out.to(result.dtype))
        return result
