"""AdamW that moves only the selected elements of each parameter, and the poly learning-rate schedule.

Masked fine-tuning must freeze unselected elements EXACTLY (``docs/method.md``): no weight decay and no stale Adam
moment may move them -- ChildTuning's optimizer decays masked weights, a known pitfall. Here the gradient is
masked before the moments are updated (an unselected element's moments stay exactly 0 until it is selected)
and the new value is ``torch.where(mask, updated, old)``, so an unselected element keeps its bits.

Bias correction. Adam divides its moments by 1 - beta^k, k the number of updates the moments have seen. An element
that joins the selection at schedule step t (Eq. 16 grows the selection) has seen one, not t + 1: with the run's
global count its first update is (0.1 / (1 - 0.9^(t+1))) / sqrt(0.001 / (1 - 0.999^(t+1))) times a normal first
Adam step (1.6x at t = 300, 2.5x at t = 1000, 3.2x in the limit). With ``entries`` each late element's k counts
from the step it joined, so its first update is an ordinary first Adam step; the elements selected from the start
(and every element of a parameter without ``entries``) use the global count, bit for bit as before.
"""

from __future__ import annotations

import torch


def poly_lr(base_lr: float, step: int, steps: int, power: float = 0.9) -> float:
    """Rein's poly decay: base_lr * (1 - step / steps) ** power."""
    return base_lr * max(0.0, 1.0 - step / max(steps, 1)) ** power


class MaskedAdamW:
    """AdamW (decoupled weight decay) on ``params`` restricted to boolean ``masks`` of the same shapes.

    The masks are read at every step, so a selection that grows between steps is honoured. ``entries`` (optional,
    per parameter): ``(positions, steps)``, two int32 vectors over the elements that join the selection after the
    first schedule step: their flat positions in the parameter and the schedule step at which each joins
    (non-decreasing). Their bias correction counts the updates from that step on; every other element's counts
    from the first step. Schedule steps are the calls of ``step`` and ``skip`` (a step without an update, e.g. a
    non-finite loss): ``missed`` lists the skipped ones, so k is the number of updates actually applied.
    ``state_dict()`` holds the moments, the update count and the skipped steps (for resumable runs).
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor], *,
                 entries: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.05):
        self.params, self.masks = params, masks
        self.entries = {name: (positions.to(params[name].device), steps.to(params[name].device))
                        for name, (positions, steps) in (entries or {}).items()}
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.exp_avg = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.step_count = 0  # updates applied
        self.missed: list[int] = []  # schedule steps skipped (no update), ascending

    @property
    def schedule_step(self) -> int:
        """The schedule step the next ``step`` or ``skip`` call is (0-based)."""
        return self.step_count + len(self.missed)

    def skip(self) -> None:
        """A schedule step without an update: nothing moves, the late elements' counts do not advance."""
        self.missed.append(self.schedule_step)

    def late_counts(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(positions, k) of the late elements of ``name`` that have joined by the current update (its schedule step
        is ``schedule_step - 1``): k = the updates applied since each joined, this one included."""
        if name not in self.entries:
            return None
        positions, steps = self.entries[name]
        now = torch.tensor([self.schedule_step - 1], dtype=steps.dtype, device=steps.device)
        joined = int(torch.searchsorted(steps, now, right=True))
        if joined == 0:
            return None
        start = steps[:joined].long()
        missed = torch.tensor(self.missed, dtype=torch.long, device=steps.device)
        applied_before = start - torch.searchsorted(missed, start)  # updates applied before each joined
        return positions[:joined].long(), self.step_count - applied_before

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
            late = self.late_counts(name)
            if late is not None:  # their own bias correction, counted from the step each joined
                positions, k = late
                k = k.double()
                own1 = (1 - torch.pow(beta1, k)).float()
                own2 = (1 - torch.pow(beta2, k)).float()
                m, v = self.exp_avg[name].view(-1)[positions], self.exp_avg_sq[name].view(-1)[positions]
                update.view(-1)[positions] = ((m / own1) / (v / own2).sqrt_().add_(self.eps)
                                              + self.weight_decay * p.detach().view(-1)[positions].float())
            p.copy_(torch.where(mask, p.float() - lr * update, p.float()))  # unselected: the same bits

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step_count,
                "missed": list(self.missed)}

    def load_state_dict(self, state: dict) -> None:
        for name in self.params:
            self.exp_avg[name].copy_(state["exp_avg"][name])
            self.exp_avg_sq[name].copy_(state["exp_avg_sq"][name])
        self.step_count = int(state["step"])
        self.missed = [int(s) for s in state["missed"]]
