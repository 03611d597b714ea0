"""AdamW that moves only the selected elements of each parameter, and the poly learning-rate schedule.

Masked fine-tuning must freeze unselected elements EXACTLY (``docs/method.md``): no weight decay and no stale Adam
moment may move them -- ChildTuning's optimizer decays masked weights, a known pitfall. Here the gradient is
masked before the moments are updated (an unselected element's moments stay exactly 0 until it is selected)
and the new value is ``torch.where(mask, updated, old)``, so an unselected element keeps its bits.
"""

from __future__ import annotations

import torch


def poly_lr(base_lr: float, step: int, steps: int, power: float = 0.9) -> float:
    """Rein's poly decay: base_lr * (1 - step / steps) ** power."""
    return base_lr * max(0.0, 1.0 - step / max(steps, 1)) ** power


class MaskedAdamW:
    """AdamW (decoupled weight decay) on ``params`` restricted to boolean ``masks`` of the same shapes.

    The masks are read at every step, so a selection that grows between steps is honoured; bias correction uses
    the global step count. ``state_dict()`` holds tensors and the step (for resumable runs).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor], *,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.05):
        self.params, self.masks = params, masks
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.exp_avg = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.step_count = 0

    @torch.no_grad()
    def step(self, lr: float) -> None:
        self.step_count += 1
        beta1, beta2 = self.betas
        correction1 = 1 - beta1 ** self.step_count
        correction2 = 1 - beta2 ** self.step_count
        for name, p in self.params.items():
            if p.grad is None:
                continue
            mask = self.masks[name].to(p.device)
            grad = torch.where(mask, p.grad.float(), 0.0)
            self.exp_avg[name].mul_(beta1).add_(grad, alpha=1 - beta1)
            self.exp_avg_sq[name].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (self.exp_avg_sq[name] / correction2).sqrt_().add_(self.eps)
            update = (self.exp_avg[name] / correction1) / denominator + self.weight_decay * p.float()
            p.copy_(torch.where(mask, p.float() - lr * update, p.float()))  # unselected: the same bits

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        for name in self.params:
            self.exp_avg[name].copy_(state["exp_avg"][name])
            self.exp_avg_sq[name].copy_(state["exp_avg_sq"][name])
        self.step_count = int(state["step"])

