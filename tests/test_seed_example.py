"""The worked example of the LoRA primer, through lorakit's public API.

The primer uses row vectors: y = x·W_eff with W_eff = W + B·A (A: 2×4, B: 4×2).
In nn.Linear's convention (y = x·weightᵀ) that is weight = Wᵀ, lora_A = Bᵀ and
lora_B = Aᵀ, with scale 1 (lora_alpha = r = 2). The primer's ΔW, W_eff, y and loss
are right; its gradients are not (see DESIGN.md's errata), so the correct numbers
are asserted here and the primer's printed ones are shown to disagree with autograd.
"""

import torch
from torch import nn

import lorakit

W = [[1, 0, -1, 2], [0, 1, 1, -1], [2, -2, 0, 0], [1, 1, 1, 1]]
A = [[0.1, 0.2, 0.3, 0.4], [-0.1, -0.2, 0.0, 0.1]]
B = [[1, 0], [0, 1], [0.5, -0.5], [-1, 1]]
X = [1.0, 0.0, 0.0, 0.0]
TARGET = [1.0, 1.0, 1.0, 1.0]
LR = 0.1

# Correct values (float64 autograd), as listed in DESIGN.md's errata.
GRAD_A = [[0.1, -0.8, -1.7, 1.4], [0, 0, 0, 0]]
GRAD_B = [[-0.10, 0.29], [0, 0], [0, 0], [0, 0]]
A_NEW = [[0.09, 0.28, 0.47, 0.26], [-0.1, -0.2, 0, 0.1]]
B_NEW = [[1.01, -0.029], [0, 1], [0.5, -0.5], [-1, 1]]
LOSS_AFTER = 2.21413629

# What the primer prints for the gradients.
SEED_GRAD_A = [[0.1, 0.2, -1.7, 1.4], [0, 0, 0, 0]]
SEED_GRAD_B = [[0.01, -0.01], [0.02, -0.02], [-0.17, 0.17], [0.14, -0.14]]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


class OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build() -> OneLayer:
    model = OneLayer()
    with torch.no_grad():
        model.proj.weight.copy_(t(W).T)
    lorakit.inject(model, lorakit.LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]))
    layer = model.proj
    with torch.no_grad():
        layer.lora_A["default"].copy_(t(B).T)  # (r, in) = Bᵀ
        layer.lora_B["default"].copy_(t(A).T)  # (out, r) = Aᵀ
    return model


def loss_of(model: OneLayer) -> torch.Tensor:
    y = model(t([X]))
    return 0.5 * ((y - t([TARGET])) ** 2).sum()


def seed_matrices(model: OneLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in the primer's orientation."""
    layer = model.proj
    return layer.lora_B["default"].detach().T, layer.lora_A["default"].detach().T


def test_forward_delta_and_loss_match_the_primer():
    model = build()
    delta = model.proj.delta_weight("default").double().T  # the primer's ΔW = B·A
    assert torch.allclose(delta, t(B) @ t(A))
    assert torch.allclose(t(W) + delta, t([[1.1, 0.2, -0.7, 2.4], [-0.1, 0.8, 1.0, -0.9],
                                           [2.1, -1.8, 0.15, 0.15], [0.8, 0.6, 0.7, 0.7]]))
    y = model(t([X]))
    assert torch.allclose(y, t([[1.1, 0.2, -0.7, 2.4]]))
    assert abs(loss_of(model).item() - 2.75) < 1e-12


def test_one_sgd_step_gives_the_correct_gradients_and_updates():
    model = build()
    w_before = model.proj.base_layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    loss = loss_of(model)
    loss.backward()
    layer = model.proj
    grad_a, grad_b = layer.lora_B["default"].grad.T, layer.lora_A["default"].grad.T
    assert torch.allclose(grad_a, t(GRAD_A), atol=1e-12)
    assert torch.allclose(grad_b, t(GRAD_B), atol=1e-12)
    assert layer.base_layer.weight.grad is None
    opt.step()
    a_new, b_new = seed_matrices(model)
    assert torch.allclose(a_new, t(A_NEW), atol=1e-12)
    assert torch.allclose(b_new, t(B_NEW), atol=1e-12)
    assert torch.equal(layer.base_layer.weight, w_before)  # W is frozen, bit for bit
    w_eff_new = t(W) + b_new @ a_new
    assert torch.allclose(model.proj.delta_weight("default").double().T + t(W), w_eff_new)
    with torch.no_grad():
        assert abs(loss_of(model).item() - LOSS_AFTER) < 5e-9


def test_the_primers_printed_gradients_disagree_with_autograd():
    model = build()
    loss_of(model).backward()
    grad_a = model.proj.lora_B["default"].grad.T
    grad_b = model.proj.lora_A["default"].grad.T
    assert not torch.allclose(grad_a, t(SEED_GRAD_A), atol=1e-3)
    assert (grad_a - t(SEED_GRAD_A)).abs().max().item() > 0.9  # -0.8 vs the printed 0.2
    assert not torch.allclose(grad_b, t(SEED_GRAD_B), atol=1e-3)
