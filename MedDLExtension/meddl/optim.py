"""A plain Adam optimiser for the short test-time optimisations (registration, in-context fine-tuning).

``torch.optim.Adam`` imports ``torch._dynamo`` the first time one is built: about a second on a
CPU, paid by every ``meddl`` process that registers a pair. This is the same algorithm (Kingma &
Ba 2015, bias-corrected moments; torch's defaults ``betas=(0.9, 0.999)``, ``eps=1e-8``, no weight
decay) in a few tensor operations, without that import.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["Adam"]


class Adam:
    """``torch.optim.Adam``'s update for a list of tensors (same defaults, same results)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = [p for p in params if p.requires_grad]
        if lr <= 0:
            raise ValueError(f"Adam: expected lr > 0, got {lr}")
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.step_count = 0
        self._m = [torch.zeros_like(p) for p in self.params]
        self._v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.step_count += 1
        c1 = 1.0 - b1**self.step_count
        c2 = 1.0 - b2**self.step_count
        for p, m, v in zip(self.params, self._m, self._v, strict=True):
            if p.grad is None:
                continue
            g = p.grad
            m.mul_(b1).add_(g, alpha=1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v / c2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / c1)
