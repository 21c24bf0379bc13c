"""`lorakit explain` prints the worked example with the correct numbers it computes."""

import torch

from lorakit import explain


def test_worked_example_values():
    r = explain.worked_example()
    assert torch.allclose(r["y"], torch.tensor([1.1, 0.2, -0.7, 2.4], dtype=torch.float64))
    assert abs(r["loss"].item() - 2.75) < 1e-12
    assert torch.allclose(r["grad_a"], torch.tensor([[0.1, -0.8, -1.7, 1.4], [0, 0, 0, 0]], dtype=torch.float64))
    assert torch.allclose(r["grad_b"], torch.tensor([[-0.1, 0.29], [0, 0], [0, 0], [0, 0]], dtype=torch.float64))
    assert bool(r["grad_w_is_none"]) and bool(r["w_unchanged"])
    assert abs(r["loss_after"].item() - 2.21413629) < 5e-9


def test_rendered_text_shows_the_steps_and_the_errata():
    text = explain.render()
    for needle in ["L = 2.75", "Loss after the step: 2.21413629", "-0.8", "0.29", "-0.029",
                   "lora_A = Bᵀ, lora_B = Aᵀ", "its gradients are not", "It prints ∇A with 0.2 where autograd gives -0.8"]:
        assert needle in text, needle
    assert "ERROR" not in text
