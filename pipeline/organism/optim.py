"""AdamW with a correctly rounded square root, so that the organism trains to the same bytes on
every x86-64 CPU in the portable arithmetic.

torch's float32 ``sqrt`` on the CPU goes through MKL's vector math, which rounds within an ulp
and differently from one CPU to another even in MKL's compatible mode (docs/design.md gives the
measurement); AdamW takes the square root of its second moment at every step, so the trained
weights drift apart. Here that root is taken in float64 and rounded once to float32, which is
the correctly rounded result wherever it runs. Otherwise the update is torch's AdamW
(decoupled weight decay, bias correction, ``eps`` added after the root).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def exact_sqrt(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root of a float32 tensor (elementwise), the same bits on
    every CPU: float64 has more than twice float32's precision, so one rounding back is exact."""
    return x.double().sqrt().to(x.dtype)


class PortableAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update (no amsgrad) with :func:`exact_sqrt` for the denominator."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * decay)
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (exact_sqrt(v) / math.sqrt(1 - beta2**t)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
        return loss
