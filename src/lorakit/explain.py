"""`lorakit explain`: the LoRA primer's worked example, computed step by step.

Every number printed here is computed by lorakit (float64, autograd) from the
primer's W, A, B, x and target; nothing is typed in except those inputs and, for
the closing note, the gradients the primer prints.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import inject

# The primer's inputs, in its row-vector convention: y = x·W_eff, W_eff = W + B·A.
W = [[1, 0, -1, 2], [0, 1, 1, -1], [2, -2, 0, 0], [1, 1, 1, 1]]
A = [[0.1, 0.2, 0.3, 0.4], [-0.1, -0.2, 0.0, 0.1]]
B = [[1, 0], [0, 1], [0.5, -0.5], [-1, 1]]
X = [1.0, 0.0, 0.0, 0.0]
TARGET = [1.0, 1.0, 1.0, 1.0]
LR = 0.1
# What the primer prints for the gradients, to show where it differs.
PRIMER_GRAD_A = [[0.1, 0.2, -1.7, 1.4], [0, 0, 0, 0]]
PRIMER_GRAD_B = [[0.01, -0.01], [0.02, -0.02], [-0.17, 0.17], [0.14, -0.14]]


class _OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def worked_example() -> dict[str, torch.Tensor]:
    """Run the example through lorakit; return every intermediate in the primer's orientation."""
    model = _OneLayer()
    with torch.no_grad():
        model.proj.weight.copy_(_t(W).T)  # nn.Linear computes x·weightᵀ, so weight = Wᵀ
    inject(model, LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]))  # scale = alpha / r = 1
    layer = model.proj
    with torch.no_grad():
        layer.lora_A["default"].copy_(_t(B).T)  # lora_A (r, in) = Bᵀ
        layer.lora_B["default"].copy_(_t(A).T)  # lora_B (out, r) = Aᵀ
    x, target = _t([X]), _t([TARGET])
    out = {"delta": layer.delta_weight("default").double().T.clone()}
    out["w_eff"] = _t(W) + out["delta"]
    y = model(x)
    loss = 0.5 * ((y - target) ** 2).sum()
    loss.backward()
    out.update(y=y.detach()[0], loss=loss.detach())
    out["grad_a"], out["grad_b"] = layer.lora_B["default"].grad.T.clone(), layer.lora_A["default"].grad.T.clone()
    out["grad_w_is_none"] = torch.tensor(layer.base_layer.weight.grad is None)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR).step()
    out["a_new"], out["b_new"] = layer.lora_B["default"].detach().T.clone(), layer.lora_A["default"].detach().T.clone()
    out["w_unchanged"] = torch.tensor(torch.equal(layer.base_layer.weight.detach(), _t(W).T))
    out["w_eff_new"] = _t(W) + out["b_new"] @ out["a_new"]
    with torch.no_grad():
        out["loss_after"] = 0.5 * ((model(x) - target) ** 2).sum()
    return out


def _fmt(m: torch.Tensor) -> str:
    rows = m.tolist() if m.dim() == 2 else [m.tolist()]
    return "\n".join("    [" + " ".join(f"{v + 0.0:9.6g}" for v in row) + " ]" for row in rows)  # + 0.0: no "-0"


def render() -> str:
    r = worked_example()
    lines = [
        "LoRA's worked example (row vectors, as in the primer): y = x·W_eff, W_eff = W + B·A, A: 2×4, B: 4×2",
        f"W =\n{_fmt(_t(W))}", f"A =\n{_fmt(_t(A))}", f"B =\n{_fmt(_t(B))}",
        f"ΔW = B·A =\n{_fmt(r['delta'])}", f"W_eff = W + ΔW =\n{_fmt(r['w_eff'])}",
        f"x = {X}, target = {TARGET}, loss L = ½·Σ(y − target)², learning rate {LR}",
        f"1. Forward: y = x·W_eff =\n{_fmt(r['y'])}\n   L = {r['loss'].item():.8g}",
        "2. Backward (autograd, float64). W is frozen: it gets no gradient "
        f"({'none computed' if bool(r['grad_w_is_none']) else 'ERROR: one was computed'}).",
        f"   ∇A L =\n{_fmt(r['grad_a'])}", f"   ∇B L =\n{_fmt(r['grad_b'])}",
        "3. SGD step: A ← A − 0.1·∇A, B ← B − 0.1·∇B, W unchanged "
        f"({'bit for bit' if bool(r['w_unchanged']) else 'ERROR: W changed'})",
        f"   A_new =\n{_fmt(r['a_new'])}", f"   B_new =\n{_fmt(r['b_new'])}",
        f"4. W_eff,new = W + B_new·A_new =\n{_fmt(r['w_eff_new'])}",
        f"   Loss after the step: {r['loss_after'].item():.8f} (was {r['loss'].item():.8g})",
        "",
        "In lorakit (nn.Linear computes x·weightᵀ) the same layer is weight = Wᵀ, lora_A = Bᵀ, lora_B = Aᵀ,",
        "with scale lora_alpha / r = 1.",
        "",
        "Where the primer's text differs: its ΔW, W_eff, y and loss 2.75 are right, but its gradients are not.",
        f"It prints ∇A with {PRIMER_GRAD_A[0][1]} where autograd gives {r['grad_a'][0, 1].item():.4g}, and a ∇B of",
        f"{PRIMER_GRAD_B} where autograd gives {[[round(v, 4) + 0.0 for v in row] for row in r['grad_b'].tolist()]}",
        "(only B's first row gets a gradient, because x selects the first row). Its A_new, B_new and",
        "W_eff,new follow from those gradients and differ from the values above accordingly.",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "The primer's LoRA worked example, step by step, with the correct numbers."


def run(args: argparse.Namespace) -> int:
    print(render())
    return 0
